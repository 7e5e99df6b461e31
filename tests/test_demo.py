"""`logitcache demo` end to end at a tiny size: one teacher, one cache built once, every
student's CE twin and KD-from-cache run on the cache's views, the online-KD run, the table,
demo_results.json and demo.png."""

from __future__ import annotations

import json

from logitcache.cli.demo import STUDENTS, run_demo

from logitcache.storage.reader import CacheReader


def test_demo_trains_every_student_from_one_cache(tmp_path, capsys):
    out = tmp_path / "demo"
    results = run_demo(out, epochs=1, teacher_epochs=1, workers=0, num_classes=4, train_per_class=4, val_per_class=2,
                       batch_size=8)
    assert json.loads((out / "demo_results.json").read_text()) == json.loads(json.dumps(results))
    assert (out / "demo.png").stat().st_size > 10_000
    first = next(iter(STUDENTS))
    expected = {f"{s}/{r}" for s in STUDENTS for r in ("ce_only", "kd_cache")} | {f"{first}/kd_online"}
    assert set(results["runs"]) == expected
    assert CacheReader(results["cache"]["url"]).epochs() == [0] and results["cache"]["views"] == 16
    for key in expected:  # every student run read the one cache (the online one for its views)
        summary = json.loads((out / key / "summary.json").read_text())
        assert summary["cache"] == results["cache"]["url"], key
        assert summary["online_teacher"] == key.endswith("kd_online")
    assert {s["model"] for s in results["students"].values()} == {m for m, _ in STUDENTS.values()}
    o = results["online_vs_cache"]
    assert o["online_over_cached"] == o["online_train_seconds"] / o["cached_train_seconds"] > 0
    printed = capsys.readouterr().out
    assert "students from one cache" in printed and "KD with the teacher online took" in printed
