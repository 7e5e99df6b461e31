"""Run the accuracy study: plan it, run its tasks, summarise them and write the results."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

from ..common import Clock, package_version
from .graph import study_tasks
from .jobs import log, prepare_dataset
from .plan import FULL_EPOCHS, select_plans
from .report import plot
from .scheduler import Task, schedule
from .summary import add_flat_keys, runtime, summarise_datasets


def environment(threads: int) -> dict:
    """Where and with what the study ran."""
    from logitcache.storage.manifest import device_name

    return {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpu": device_name("cpu"), "cpu_count": os.cpu_count(),
            "torch_threads": threads, "load_avg_1min_start": os.getloadavg()[0],
            "python": platform.python_version(),
            "versions": {n: package_version(n) for n in ("torch", "timm", "numpy", "logitcache")},
            "command": " ".join(["python", "-m", "bench.accuracy", *sys.argv[1:]])}


def _progress(total: int):
    """A callback that logs each finished task: its figure, its times, or why it failed."""
    count = {"n": 0}

    def on_done(t: Task, r: dict) -> None:
        count["n"] += 1
        head = f"[{count['n']}/{total}] {t.label}"
        if "error" in r:
            log(f"{head}: FAILED {r['error']}")
            return
        what = (f"val top-1 {r['top1']:.2f}%" if "top1" in r else
                f"val top-1 {r['val_top1']:.2f}%" if "val_top1" in r else f"{r.get('epochs')} epochs")
        cpu = r.get("cpu_main_s", 0.0) + r.get("cpu_workers_s", 0.0)
        log(f"{head}: {what} ({r.get('wall_s', 0.0):.0f} s wall, {cpu:.0f} s cpu"
            f"{', reused' if r.get('reused') else ''})")

    return on_done


def output_path(out: str | Path, quick: bool, output: str | Path | None = None) -> Path:
    """Where the results JSON goes: ``output`` when given, else ``<out>/accuracy[_quick].json``."""
    if output is not None:
        return Path(output)
    return Path(out) / ("accuracy_quick.json" if quick else "accuracy.json")


def _write(results: dict, path: Path, work: Path) -> None:
    """``path`` (``<stem>.json``) and the plots ``<stem>_*.png`` next to it, and a copy of the JSON
    next to the runs it summarises."""
    out, stem = path.parent, path.stem
    out.mkdir(parents=True, exist_ok=True)
    results["plots"] = plot(results, out, prefix=stem)
    text = json.dumps(results, indent=2, allow_nan=False, default=str)
    (out / f"{stem}.json").write_text(text)
    (work / f"{stem}.json").write_text(text)


def run(quick: bool = False, *, datasets: list[str] | None = None, seeds: int | None = None,
        out: str | Path | None = "bench/results", workdir: str | Path = "runs/accuracy", workers: int = 2,
        student_workers: int = 0, jobs: int = 2, threads: int = 1, resume: bool = False,
        synth_epochs: int | None = None, digits_epochs: int | None = None, teacher_epochs: dict | None = None,
        limit_batches: int | None = None, variants: list[str] | None = None,
        output: str | Path | None = None) -> dict:
    """Run the study; returns (and with ``out`` writes) the results dict.

    ``variants``: run only these (plan.ALL_VARIANTS; e.g. the codec study's ``ce, kd_cache,
    kd_gap8, kd_sampled``), with the same teacher, caches' views and seeds as the whole study.
    ``output``: the results JSON's path (default ``<out>/accuracy.json``, quick
    ``accuracy_quick.json``); plots go next to it, named after it.

    ``quick`` may also be a bench context with a ``.quick`` attribute. Parallelism (none of
    it changes a result: views and batches are functions of seeds only): ``jobs`` runs at a
    time, each a process with ``threads`` torch threads; ``workers`` DataLoader workers for
    cache builds, ``student_workers`` for teacher and student training (0: the views are
    rendered in-process, cheaper on 2 cores than starting workers twice an epoch)."""
    if hasattr(quick, "quick"):  # bench.run's context object
        quick = bool(quick.quick)
    plans = select_plans(quick, datasets, seeds, synth_epochs=synth_epochs, digits_epochs=digits_epochs,
                         teacher_epochs=teacher_epochs, variants=variants)
    # quick: a full-study teacher already on disk beats a 2-epoch one
    prefer = {n: FULL_EPOCHS[n][0] for n in plans} if quick else {}
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    env = environment(threads)
    env.update(jobs=jobs, workers=workers, student_workers=student_workers)
    clock = Clock()
    from logitcache.data.source import open_source

    datas = {n: prepare_dataset(n, work) for n in plans}
    num_classes = {n: open_source(str(d), "train").num_classes for n, d in datas.items()}
    tasks, layout = study_tasks(plans, work, datas, num_classes, workers=workers, student_workers=student_workers,
                                resume=resume, limit_batches=limit_batches, prefer=prefer)
    for n, p in plans.items():
        log(f"{n}: {asdict(p)}; runs: {layout[n]['variants']}")
    log(f"{len(tasks)} tasks, {jobs} at a time")
    done = schedule(tasks, jobs, threads, _progress(len(tasks)))
    path = output_path(out if out is not None else "bench/results", quick, output)
    results: dict = {"name": "accuracy", "study": path.stem, "quick": quick, "environment": env,
                     "datasets": summarise_datasets(plans, datas, layout, done, limit_batches)}
    total = clock.read()  # the pool's processes (and their workers) are reaped by now
    env["load_avg_1min_end"] = os.getloadavg()[0]
    results["runtime"] = runtime(total, done)
    results["failures"] = [list(k) for k, r in done.items() if "error" in r]
    add_flat_keys(results)
    if out is not None:
        _write(results, path, work)
    return results
