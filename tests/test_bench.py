"""The benchmark suite runs, writes its results where asked, and README quotes the committed
headline figures exactly (bench/report.py writes README's block from summary.json)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUMMARY = ROOT / "bench" / "results" / "summary.json"
FLAT_KEYS = ("cached_over_ce_step", "speedup_over_online", "ideal_speedup_over_online", "build_over_raw_teacher",
             "reader_views_per_s", "bytes_per_view_k10", "acc_cache_minus_online_pp", "acc_kd_minus_ce_pp",
             "acc_ce_std_pp")


def test_committed_summary_has_the_headline_keys_as_numbers():
    summary = json.loads(SUMMARY.read_text())
    for key in FLAT_KEYS:
        assert isinstance(summary[key], (int, float)) and not isinstance(summary[key], bool), key
    assert isinstance(summary["device"], str) and summary["device"]
    assert isinstance(summary["date"], str) and summary["date"][:2] == "20"


def test_readme_quotes_the_committed_summary_exactly():
    from bench.report import README_END, README_START, readme_block

    readme = (ROOT / "README.md").read_text()
    block = readme.split(README_START, 1)[1].split(README_END, 1)[0].strip()
    expected = readme_block(json.loads(SUMMARY.read_text())).strip()
    assert expected, "summary.json yields no headline rows"
    assert block == expected, "README's benchmark table is stale: run python -m bench.report"


def test_update_readme_replaces_only_the_block(tmp_path):
    from bench.report import README_END, README_START, update_readme

    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{README_START}\nold table\n{README_END}\nafter\n")
    assert update_readme({"cached_over_ce_step": 1.01234, "device": "cpu: X", "date": "2026-01-01"}, readme)
    text = readme.read_text()
    assert text.startswith("before\n") and text.endswith("\nafter\n") and "old table" not in text
    assert "| 1.012 | <= 1.05 |" in text
    plain = tmp_path / "plain.md"
    plain.write_text("no markers\n")
    assert not update_readme({"cached_over_ce_step": 1.0}, plain) and plain.read_text() == "no markers\n"


@pytest.mark.timeout(420)
def test_tiny_suite_runs_and_writes_where_asked(tmp_path):
    readme_before = (ROOT / "README.md").read_text()
    out = tmp_path / "results"
    p = subprocess.run([sys.executable, "-m", "bench.run", "--tiny", "--only", "reader,frontier,scale,replay,epoch,published", "--device", "cpu",
                        "--results-dir", str(out), "--workdir", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout + p.stderr
    summary = json.loads((out / "summary.json").read_text())
    epoch = json.loads((out / "epoch.json").read_text())["summary"]
    assert epoch["ce_epoch_over_timm"] > 0 and epoch["kd_speedup_over_ideal"] > 0
    assert summary["epoch.ce_epoch_over_timm"] == epoch["ce_epoch_over_timm"]
    assert summary["reader_views_per_s"] > 0 and summary["bytes_per_view_k10"] > 0
    reader = json.loads((out / "reader.json").read_text())
    assert reader["meta"]["tiny"] is True and reader["meta"]["device"] == "cpu"
    results_md = (out / "RESULTS.md").read_text()
    assert "## 3. Reader throughput" in results_md and "## 4. Codec frontier" in results_md
    frontier = json.loads((out / "frontier.json").read_text())["summary"]
    assert frontier["bytes_per_view_k10"] == summary["bytes_per_view_k10"]
    assert frontier["tinyvit_bytes_per_view_k10"] == 44
    for suffix in ("", "_demo"):
        assert 0 <= frontier[f"kl_t1_k10_float16{suffix}"] <= frontier[f"tinyvit_kl_t1_k10{suffix}"] * 1.05
        assert abs(frontier[f"kl_t1_k10_gap8_minus_float16{suffix}"]) < 1e-2
        assert frontier[f"bytes_per_view_sampled_n32{suffix}"] > 0
    assert (out / "frontier.png").is_file()
    scale = json.loads((out / "scale.json").read_text())["summary"]
    assert scale["resume_scan_local_listings_per_epoch"] == 1 and scale["resume_scan_s3_requests_per_epoch"] == 1
    assert scale["cli_first_unit_s"] > 0 and scale["startup_to_first_batch_s"] > 0
    published = json.loads((out / "published.json").read_text())["summary"]
    assert published["published_open_requests"] == 1 and published["published_requests_per_epoch"] == 2
    assert published["built_requests_per_epoch"] > 2 * 8  # 8 units: a listing, then several requests per unit
    assert (ROOT / "README.md").read_text() == readme_before  # only the committed results rewrite README


def test_paired_studies_difference_by_seed_and_tabulate():
    from bench.accuracy.paired import paired, pm, tables

    top1 = {"ce": [10.0, 12.0, 11.0], "kd": [11.5, 12.5, 13.0]}
    diffs = paired(top1, [("kd - CE", "kd", "ce")])
    assert diffs == {"kd - CE": [1.5, 0.5, 2.0]}
    assert pm(diffs["kd - CE"], "+") == "+1.33 +- 0.76" and pm([3.0]) == "3.00 +- 0.00"
    lines = tables({"top1": top1, "paired_pp": diffs}, "paired")
    assert "| kd | 12.33 +- 0.76 |" in lines and "| kd - CE | +1.33 +- 0.76 |" in lines


def test_intervals_are_student_t_and_decide_the_fidelity_rows():
    from bench.accuracy.intervals import ci95, fidelity_rows, fmt, method_rows

    c = ci95([0.1, -0.2, 0.3, 0.0, 0.2])  # mean 0.08, std 0.1924; t(0.975, 4) = 2.7764
    assert c["n"] == 5 and math.isclose(c["mean"], 0.08) and math.isclose(c["std"], 0.19235384, rel_tol=1e-6)
    assert math.isclose(c["hi"] - c["mean"], 2.7764451 * c["std"] / math.sqrt(5), rel_tol=1e-6)
    assert ci95([1.0])["lo"] is None and fmt(ci95([1.0])) == "1.00 (n=1)"

    def runs(**top1):
        return {v: {"seeds": list(range(len(t))), "top1": t} for v, t in top1.items()}

    close = runs(kd_cache=[50.0, 51.0, 52.0, 50.5, 51.5], kd_online=[50.1, 50.9, 52.2, 50.4, 51.4])
    row = fidelity_rows(close)["cache_minus_online"]
    assert row["meets_target"] and row["paired_pp"] == pytest.approx([-0.1, 0.1, -0.2, 0.1, 0.1])
    lossy = runs(kd_cache=[49.0, 50.5, 51.0, 49.5, 51.0], kd_online=[50.1, 50.9, 52.2, 50.4, 51.4])
    assert not fidelity_rows(lossy)["cache_minus_online"]["meets_target"]  # mean -0.8 pp
    noisy = runs(kd_cache=[50.0, 53.0, 50.0, 53.0, 51.5], kd_online=[51.5, 51.5, 51.5, 51.5, 51.5])
    assert not fidelity_rows(noisy)["cache_minus_online"]["meets_target"]  # mean 0, interval reaches -1.9 pp
    few = runs(kd_cache=[50.0, 51.0, 52.0], kd_online=[50.0, 51.0, 52.0])
    assert not fidelity_rows(few)["cache_minus_online"]["meets_target"]  # fewer than 5 seeds
    m = method_rows(runs(ce=[40.0, 41.0, 42.0], kd_cache=[43.0, 45.0, 46.0]))
    assert m["kd_cache"]["minus_ce"]["mean"] == pytest.approx(11 / 3) and "minus_ce" not in m["ce"]
