"""Regenerate ``bench/RESULTS.md``, the plots and ``summary.json`` from every result JSON present.

``python -m bench.report [RESULTS_DIR]``; ``bench.run`` calls it after each run.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

from .accuracy.report import intervals_markdown
from .common import RESULTS_DIR
from .readme import README, README_END, README_START, readme_block, update_readme  # noqa: F401 - re-exported

ORDER = ("build", "train_step", "reader", "frontier", "scale", "features", "replay", "epoch", "teachers", "published")
TITLES = {
    "build": "1. Build throughput (build vs raw teacher)",
    "train_step": "2. Student step time (CE vs cached KD vs online KD)",
    "reader": "3. Reader throughput",
    "frontier": "4. Codec frontier: bytes per view on disk vs fidelity (TinyViT side by side)",
    "scale": "5. ImageNet-1k x 300 epochs: planning, resume scan, first unit",
    "features": "6. Teacher features (`build --features`): bytes per view, reconstruction, projector step cost",
    "replay": "7. Replay loader vs timm's loader: views/s of a training epoch's loader, side by side",
    "epoch": "8. Whole training epochs, loader included: logitcache train vs timm's loop (CE, KD)",
    "teachers": "8b. Two teachers, one rendering pass: build throughput against two single-teacher builds",
    "published": "8c. A published cache over HTTP (no listing) against the cache as built: requests, bytes, pull",
}

#: studies with a section of their own: (results file, module with markdown(result), title)
STUDIES = (("accuracy_teachers.json", "bench.accuracy.teachers", "12. Accuracy from two teachers on the same views "
             "(CNN + ViT; mean-probs, per-teacher, CA-MKD)"),
           ("accuracy_peer.json", "bench.accuracy.peer",
            "13. The peer's accuracy: KD from the cache vs timm's online KD"))

# (benchmark, summary key, target, direction, what)
TARGETS = [
    ("build", "build_over_raw_teacher", 0.9, ">=", "build / raw teacher throughput, ResNet-152 224 px batch 16"),
    ("build", "fast_build_over_allowed", 0.9, ">=",
     "build / what its stages allow, fast teacher (ResNet-18 32 px), shared cores"),
    ("train_step", "cached_over_ce_step", 1.05, "<=", "cached-KD step / CE step (ResNet-50)"),
    ("train_step", "deit_t_distilled.cached_over_ce_step", 1.05, "<=",
     "cached deit-hard step / CE step (DeiT-Ti distilled)"),
    ("train_step", "cached_2t_over_ce_step", 1.05, "<=", "cached KD step from two teachers' caches / CE step (ResNet-50)"),
    ("train_step", "speedup_over_ideal_resnet152", 0.9, ">=", "speedup over online / ideal, teacher ResNet-152"),
    ("train_step", "speedup_over_ideal_beitv2_l", 0.9, ">=", "speedup over online / ideal, teacher BEiTv2-L"),
    ("reader", "gather_shuffled_views_per_s", 1e6, ">=", "reader views/s per process, epoch loaded (shuffled rows)"),
    ("reader", "load_epoch_views_per_s", 1e6, ">=", "load_epoch views/s (storage -> memory)"),
    ("reader", "checksum_fraction_of_load_epoch", 0.10, "<=", "checksums' share of load_epoch"),
    ("frontier", "bytes_per_view_k10", 24, "<=", "bytes per view on disk, default codec (topk k=10 gap8), C=1000"),
    ("frontier", "kl_t1_k10_gap8_minus_float16", 1e-3, "<=",
     "KL T=1, gap8 minus float16 values, k=10, ImageNet-shaped"),
    ("frontier", "kl_t1_k10_gap8_minus_float16_demo", 1e-3, "<=", "the same, demo teacher"),
    ("frontier", "best_over_tinyvit_kl_at_44b", 0.5, "<=",
     "best KL T=1 of ours at <= 44 B/view on disk / TinyViT's k=10 KL, ImageNet-shaped"),
    ("frontier", "best_over_tinyvit_kl_at_44b_demo", 0.5, "<=", "the same, demo teacher"),
    ("scale", "startup_to_first_batch_s", 5.0, "<=", "build start-up to the first batch planned, 1.28 M x 300"),
    ("scale", "startup_peak_rss_growth_mb", 500, "<=", "its peak memory growth, MB"),
    ("scale", "trainer_epoch_plan_s", 2.0, "<=", "trainer: one epoch of 1.28 M views planned, s"),
    ("scale", "cli_first_unit_s", 20.0, "<=", "CLI build --epochs 300 over tiny images: first unit, s"),
    ("scale", "cli_build_peak_rss_mb", 1536, "<=", "its build process peak memory, MB"),
    ("features", "projector_over_kd_step", 1.05, "<=", "cached projector step / cached KD step (ResNet-50)"),
    ("replay", "ours_over_timm_32px_w2", 1.0, ">=", "replay loader / timm's loader views/s, 32 px, 2 workers"),
    ("replay", "ours_over_timm_224px_w2", 1.0, ">=", "replay loader / timm's loader views/s, 224 px, 2 workers"),
    ("epoch", "ce_epoch_over_timm", 1.05, "<=", "CE epoch, logitcache train / timm's loop (loader included)"),
    ("epoch", "kd_speedup_over_ideal", 0.9, ">=", "cached KD epoch vs timm online KD, share of the ideal speed-up"),
    ("teachers", "two_teacher_build_speedup", 1.0, ">=", "two single-teacher builds / one build of both, wall time"),
    ("published", "published_open_requests", 3, "<=", "requests to open a published cache (1,024 units per epoch)"),
    ("published", "published_requests_per_epoch", 2, "<=", "requests to read one epoch of it (1,024 units)"),
    ("accuracy_codecs", "acc_gap8_minus_float16_abs_pp", 0.5, "<=",
     "|mean paired difference| gap8 vs float16 top-10, pp"),
]

#: accuracy_codecs.json (``python -m bench.accuracy --variants ce,kd_cache,kd_gap8,kd_sampled ...``): its
#: flat keys summary.json copies unprefixed, and those it copies as ``accuracy_codecs.<key>`` (TARGETS reads them)
CODEC_FLAT_KEYS = ("acc_gap8_minus_float16_pp", "acc_sampled_minus_float16_pp")
CODEC_SUMMARY_KEYS = ("acc_gap8_minus_float16_pp", "acc_gap8_minus_float16_std_pp", "acc_gap8_minus_float16_abs_pp",
                      "acc_sampled_minus_float16_pp", "acc_sampled_minus_float16_std_pp",
                      "acc_sampled_minus_float16_abs_pp")


#: flat summary key -> (benchmark, its own summary key)
HEADLINE = {
    "cached_over_ce_step": ("train_step", "cached_over_ce_step"),
    "speedup_over_online": ("train_step", "speedup_over_online_resnet152"),
    "ideal_speedup_over_online": ("train_step", "ideal_speedup_over_online_resnet152"),
    "build_over_raw_teacher": ("build", "build_over_raw_teacher"),
    "reader_views_per_s": ("reader", "gather_shuffled_views_per_s"),
    "bytes_per_view_k10": ("frontier", "bytes_per_view_k10"),
}


def load_results(results: Path) -> dict[str, dict]:
    out = {}
    for name in ORDER:
        path = results / f"{name}.json"
        if path.is_file():
            out[name] = json.loads(path.read_text())
    return out


def _fmt(v: float) -> str:
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.2e}" if 0 < abs(v) < 0.01 else f"{v:.3f}"


def _summary(results: Path, data: dict) -> tuple[dict, dict | None, dict | None, dict]:
    """summary.json's content: every benchmark's numeric figures under ``<bench>.<key>``, the
    headline figures under flat names, device and date, and the accuracy studies' keys.
    Returns (summary, accuracy.json, accuracy_codecs.json, the codec study's figures)."""
    summary = {}
    for name, d in data.items():
        summary.update({f"{name}.{k}": v for k, v in d["summary"].items() if isinstance(v, (int, float))})
        summary[f"{name}.wall_seconds"] = d["meta"]["wall_seconds"]
    # The headline figures under flat names (numbers only; README's block and the tests read them), plus
    # device and date.
    for flat, (bench, key) in HEADLINE.items():
        if bench in data and isinstance(data[bench]["summary"].get(key), (int, float)):
            summary[flat] = data[bench]["summary"][key]
    if data:
        meta = next(iter(data.values()))["meta"]
        summary["device"] = f"{meta['device']}: {meta['device_name']}"
        summary["date"] = max(d["meta"]["date"] for d in data.values())
    accuracy = json.loads((results / "accuracy.json").read_text()) if (results / "accuracy.json").is_file() else None
    if accuracy is not None:  # python -m bench.accuracy: its flat acc_* headline keys, as accuracy.json names them
        summary.update({k: v for k, v in accuracy.items() if k.startswith(("acc_", "digits_acc_"))})
        for name, row in accuracy["datasets"].get("synth", {}).get("fidelity", {}).items():  # with 95% intervals
            summary.update({f"fidelity.{name}.{k}": row[k] for k in ("mean", "lo", "hi", "n") if _number(row[k])})
    if (results / "accuracy_peer.json").is_file():  # python -m bench.accuracy.peer
        peer = json.loads((results / "accuracy_peer.json").read_text())["paired_cache_minus_timm_pp"]
        summary.update({f"peer.cache_minus_timm.{k}": peer[k] for k in ("mean", "lo", "hi", "n") if _number(peer[k])})
    codecs_path = results / "accuracy_codecs.json"
    codecs = json.loads(codecs_path.read_text()) if codecs_path.is_file() else None
    codec_summary = {}
    if codecs is not None:  # the codec study: its two headline keys as they are, the rest under its name
        codec_summary = {k: codecs[k] for k in CODEC_SUMMARY_KEYS if _number(codecs.get(k))}
        summary.update({k: codec_summary[k] for k in CODEC_FLAT_KEYS if k in codec_summary})
        summary.update({f"accuracy_codecs.{k}": v for k, v in codec_summary.items()})
    return summary, accuracy, codecs, codec_summary


def _runs_markdown(data: dict) -> list[str]:
    """RESULTS.md's table of the runs (device, mode, date, wall and CPU time, load) and versions."""
    lines = ["| benchmark | device | mode | date | wall time | CPU time | load avg at end |",
             "|---|---|---|---|---:|---:|---:|"]
    for name, d in data.items():
        m = d["meta"]
        mode = "tiny" if m.get("tiny") else "quick" if m["quick"] else "full"
        load = m.get("load_avg_1min")
        lines.append(f"| {name} | {m['device']}: {m['device_name']} ({m['cpu_count']} CPUs, "
                     f"{m['torch_threads']} torch threads) | {mode} | {m['date']} | {m['wall_seconds']:.0f} s | "
                     f"{m.get('cpu_seconds', float('nan')):.0f} s | {load if load is None else f'{load:.1f}'} |")
    versions = next(iter(data.values()))["meta"]["versions"]
    total = sum(d["meta"]["wall_seconds"] for d in data.values())
    return lines + ["", f"Total wall time of these runs: {total / 60:.1f} min. CPU time counts this process and its "
                        "finished children (DataLoader workers, subprocesses); a load average above the core count "
                        "means other processes competed for the CPU and the timings are noisy.",
                    "", "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".", ""]


def _targets_markdown(figures: dict[str, dict]) -> list[str]:
    """RESULTS.md's targets table: each TARGETS row whose figure was measured, and whether it is met."""
    rows = []
    for bench, key, target, op, what in TARGETS:
        if bench in figures and _number(figures[bench].get(key)):
            v = figures[bench][key]
            ok = v >= target if op == ">=" else v <= target
            cell = what.replace("|", "\\|")  # "|x|" would split the table's cells
            rows.append(f"| {cell} | `{bench}.{key}` | {_fmt(v)} | {op} {_fmt(target)} | "
                        f"{'yes' if ok else '**no**'} |")
    if not rows:
        return []
    return ["## Targets", "", "| figure | key | measured | target | met |", "|---|---|---:|---:|---|", *rows, ""]


def write_report(results: Path = RESULTS_DIR, md_path: Path | None = None) -> Path:
    """Regenerate summary.json, RESULTS.md (and its plots) and, for the committed results,
    README's headline block, from every benchmark JSON in ``results``."""
    import matplotlib

    matplotlib.use("Agg")
    md_path = md_path or results.parent / "RESULTS.md"
    data = load_results(results)
    rel = Path("results") if md_path.parent == results.parent and results.name == "results" else Path(".")
    summary, accuracy, codecs, codec_summary = _summary(results, data)
    (results / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    if results.resolve() == RESULTS_DIR.resolve():  # the committed results: README quotes them
        update_readme(summary)

    lines = [
        "# logitcache benchmarks",
        "",
        "Generated by `python -m bench.run` from `bench/results/*.json` (do not edit by hand; "
        "`python -m bench.report` regenerates it). How to run and what each figure means: "
        "[bench/README.md](README.md).",
        "",
        "**Ratios** (build / raw teacher, cached / CE step, speedups) are measured side by side in one process and "
        "run, and are the figures to compare across machines. **Absolute times and rates** are recorded too, but "
        "are only meaningful on the GPU machine: on the 2-core CPU they mostly measure the CPU.",
        "",
    ]
    if data:
        lines += _runs_markdown(data)
    figures = {name: d["summary"] for name, d in data.items()}
    if codec_summary:
        figures["accuracy_codecs"] = codec_summary
    lines += _targets_markdown(figures)
    for name, d in data.items():
        mod = importlib.import_module(f"bench.{name}")
        images = mod.plot(d, results)
        lines += [f"## {TITLES[name]}", "", mod.markdown(d), ""]
        lines += [f"![{img}]({(rel / img).as_posix()})" for img in images]
        if images:
            lines.append("")
    if accuracy is not None:
        lines += _accuracy_markdown(accuracy, rel)
    if codecs is not None:
        lines += _codecs_markdown(codecs)
    methods_path = results / "accuracy_methods.json"
    if methods_path.is_file():
        lines += _methods_markdown(json.loads(methods_path.read_text()))
    for file, module, title in STUDIES:  # each renders its own section
        if (results / file).is_file():
            d = json.loads((results / file).read_text())
            command = d.get("settings", {}).get("command") or d["environment"]["command"]
            lines += [f"## {title}", "", f"`{command.strip()}`", "", importlib.import_module(module).markdown(d), ""]
    md_path.write_text("\n".join(lines))
    return md_path


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _codecs_markdown(acc: dict) -> list[str]:
    """The codec study (accuracy_codecs.json): per variant mean +- std of final val top-1 and the
    paired (same seed) difference to vanilla KD from the float16 top-10 cache."""
    lines = ["## 10. Accuracy by cache codec: float16 vs gap8 top-10, sampled N = 32", ""]
    for ds, d in acc["datasets"].items():
        if "codecs" not in d:
            continue
        st, c = d["settings"], d["codecs"]
        lines += [f"**{ds}**: student `{st['student']}`, {st['student_epochs']} epochs, seeds {st['seeds']}, teacher "
                  f"`{st['teacher']}` ({st['teacher_epochs']} epochs, val top-1 {d['teacher']['val_top1']:.2f}%), "
                  f"one teacher for every cache; a seed's runs share init, batch order and views, so differences are "
                  f"paired. Checks: " + ", ".join(f"{k} = {v}" for k, v in d.get("checks", {}).items()) + ".", "",
                  "| variant | seeds | top-1 % mean ± std | paired difference to float16 top-10, pp (mean ± std) |",
                  "|---|---|---:|---:|"]
        for name, r in c["variants"].items():
            top1 = "–" if r["mean"] is None else f"{r['mean']:.2f} ± {r['std']:.2f}"
            diff = "(reference)" if name == c["reference"] else "–" if r.get("minus_float16_mean_pp") is None else (
                f"{r['minus_float16_mean_pp']:+.2f} ± {r['minus_float16_std_pp']:.2f} "
                f"(per seed {', '.join(f'{x:+.2f}' for x in r['minus_float16_pp'])})")
            lines.append(f"| {r['label']} (`{name}`) | {', '.join(map(str, r['seeds']))} | {top1} | {diff} |")
        lines.append("")
    keys = [k for k in ("acc_gap8_minus_float16_pp", "acc_sampled_minus_float16_pp") if _number(acc.get(k))]
    if keys:
        lines += ["Flat keys (summary.json): " + ", ".join(f"`{k}` = {acc[k]:+.2f}" for k in keys) + ".", ""]
    return lines


#: accuracy_methods.json's paired differences, as RESULTS.md names them
METHOD_ROWS = (("projector_cache_minus_kd", "projector (cache) - vanilla KD (cache)"),
               ("projector_cache_minus_online", "projector (cache) - projector (online teacher)"),
               ("projector_cache_minus_ce", "projector (cache) - CE only"),
               ("prokt_minus_kd", "ProKT (online) - vanilla KD (cache)"),
               ("prokt_minus_ce", "ProKT (online) - CE only"))


def _methods_markdown(acc: dict) -> list[str]:
    """The methods study (accuracy_methods.json): per variant mean +- std of final val top-1, and
    the paired (same seed: same init, batch order and views) differences between methods."""
    lines = ["## 11. Accuracy by method: projector feature distillation (cache and online) and ProKT (synth's first "
             "rendering, before 2026-12-06: its own teacher; not yet re-run on make demo's workload)", ""]
    for ds, d in acc["datasets"].items():
        st, h = d["settings"], d["headline"]
        lines += [f"**{ds}**: student `{st['student']}`, {st['student_epochs']} epochs, seeds {st['seeds']}, teacher "
                  f"`{st['teacher']}` ({st['teacher_epochs']} epochs, val top-1 {d['teacher']['val_top1']:.2f}%). "
                  f"Checks: " + ", ".join(f"{k} = {v}" for k, v in d.get("checks", {}).items()) + ".", "",
                  "| variant | top-1 per seed | mean ± std |", "|---|---|---:|"]
        for name, r in d["variants"].items():
            top1 = "–" if r["mean"] is None else f"{r['mean']:.2f} ± {r['std']:.2f}"
            lines.append(f"| {r['label']} (`{name}`) | {', '.join(f'{x:.2f}' for x in r['top1'])} | {top1} |")
        lines += ["", "| paired difference | per seed, pp | mean ± std, pp |", "|---|---|---:|"]
        for key, what in METHOD_ROWS:
            if h.get(f"acc_{key}_pp") is not None:
                per_seed = ", ".join(f"{x:+.2f}" for x in h[f"paired_{key}_pp"])
                lines.append(f"| {what} | {per_seed} | {h[f'acc_{key}_pp']:+.2f} ± {h[f'acc_{key}_std_pp']:.2f} |")
        lines += intervals_markdown(ds, d) + [""]
    return lines


def _accuracy_markdown(acc: dict, rel: Path) -> list[str]:
    """Mean +- std of final val top-1 per variant and dataset (``python -m bench.accuracy``)."""
    lines = ["## 9. Accuracy study (students from the cache vs CE vs online)", ""]
    for ds, d in acc["datasets"].items():
        st = d["settings"]
        lines += [f"**{ds}**: student `{st['student']}`, {st['student_epochs']} epochs, seeds {st['seeds']}, teacher "
                  f"`{st['teacher']}` (val top-1 {d['teacher']['val_top1']:.2f}%).", "",
                  "| variant | top-1 per seed | mean | std |", "|---|---|---:|---:|"]
        for name, r in d["variants"].items():
            lines.append(f"| {name} | {', '.join(f'{x:.2f}' for x in r['top1'])} | {r['mean']:.2f} | {r['std']:.2f} |")
        lines += intervals_markdown(ds, d) + [""]
    lines += ["Checks: " + ", ".join(f"{k} = {v}" for k, v in acc["checks"].items()) + ".", ""]
    lines += [f"![{Path(p).name}]({(rel / Path(p).name).as_posix()})" for p in acc.get("plots", [])]
    return lines + [""]


if __name__ == "__main__":
    print(write_report(Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS_DIR))
