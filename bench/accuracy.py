"""Accuracy study (issue 5): does a student trained from the cache learn what KD promises?

``python -m bench.accuracy [--quick] [--datasets synth,digits] [--seeds 3] [--out bench/results]``

Per dataset (the embedded synthetic set with ``generate_synth``'s defaults, and
scikit-learn's digits): one teacher (timm ``resnet18``, plain CE, recipe ``demo32``),
trained once and kept on disk; caches built with :func:`logitcache.build.build` (one per
k, as many epochs as the students train); then the same student (timm ``test_resnet``,
same epochs / batch / lr / schedule) for every variant and seed:

===============  ==============================================================
``ce``           CE only, on the cache's views (``LossConfig(kind="none")``)
``kd_cache``     vanilla KD from the top-10 cache
``kd_online``    vanilla KD, teacher run on the same views (``online_teacher``)
``mkd``          vanilla KD with meta-learned temperatures (``MKDConfig()``)
``dkd``          DKD (``LossConfig`` defaults) from the top-10 cache
``dist``         DIST, ``kd_weight=2.0`` (as the paper), from the top-10 cache
``kd_top{k}``    vanilla KD from a top-k cache, k in {1, 5, full} (10 is ``kd_cache``)
===============  ==============================================================

A seed (``TrainConfig.seed``) changes the student's init and batch order; the views are
the cache's and the same for every run. Results: ``<out>/accuracy.json`` (every seed's
final val top-1, mean, sample std; headline keys at the top level), plots
``accuracy_vs_k.png`` and ``accuracy_curves.png``. ``--quick`` (1 seed, 2 epochs, synth
only, no k sweep) proves the pipeline and writes ``accuracy_quick*`` files instead.

Work (data, teachers, caches, student runs) goes to ``--workdir`` (default
``runs/accuracy``, git-ignored). Teachers and caches are reused by later invocations;
finished student runs are reused only with ``--resume`` (a study killed half-way resumes
where it stopped). ``--quick`` uses the full study's teacher when one is on disk.

Runs go ``--jobs`` (2) at a time in forked processes with one torch thread each; teacher
and students render their views in-process (``--student-workers 0``), cache builds use
two DataLoader workers. None of that changes a number: views and batch order are
functions of seeds only. Runtime: wall and CPU seconds of the invocation, and summed
over every task (``runtime.tasks_*``, reused tasks with their stored times);
``quiet_2core_estimate_s`` = all tasks' CPU seconds / 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import resource
import shutil
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

TEACHER, STUDENT, RECIPE = "resnet18", "test_resnet", "demo32"
MAIN_K = 10
SWEEP_K = (1, 5, 10, "full")
CURVE_VARIANTS = ("ce", "kd_cache", "kd_online")

VARIANT_LABELS = {
    "ce": "CE only",
    "kd_cache": "vanilla KD, cache (top-10)",
    "kd_online": "vanilla KD, online teacher",
    "mkd": "MKD (learned T), cache (top-10)",
    "dkd": "DKD, cache (top-10)",
    "dist": "DIST (kd_weight 2), cache (top-10)",
    "kd_top1": "vanilla KD, cache top-1",
    "kd_top5": "vanilla KD, cache top-5",
    "kd_full": "vanilla KD, cache full logits",
}
MAIN_VARIANTS = ("ce", "kd_cache", "kd_online", "mkd", "dkd", "dist")


@dataclass
class DatasetPlan:
    """Settings of one dataset's part of the study."""

    name: str  # "synth" | "digits"
    teacher_epochs: int
    student_epochs: int  # also the cache's epochs
    seeds: list[int]
    sweep: bool  # the top-k sweep
    variants: list[str] = field(default_factory=list)


def full_plans(seeds: int) -> dict[str, DatasetPlan]:
    s = list(range(seeds))
    return {
        "synth": DatasetPlan("synth", teacher_epochs=20, student_epochs=10, seeds=s, sweep=True),
        "digits": DatasetPlan("digits", teacher_epochs=15, student_epochs=15, seeds=s, sweep=True),
    }


def quick_plans(seeds: int) -> dict[str, DatasetPlan]:
    s = list(range(seeds))
    return {
        "synth": DatasetPlan("synth", teacher_epochs=2, student_epochs=2, seeds=s, sweep=False),
        "digits": DatasetPlan("digits", teacher_epochs=2, student_epochs=2, seeds=s, sweep=False),
    }


# --- small helpers -------------------------------------------------------------------------

def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


class Clock:
    """Wall and CPU seconds (this process + reaped children, i.e. DataLoader workers)."""

    def __init__(self):
        self.wall = time.perf_counter()
        self.cpu = self._cpu()

    @staticmethod
    def _cpu() -> tuple[float, float]:
        me = resource.getrusage(resource.RUSAGE_SELF)
        ch = resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime, ch.ru_utime + ch.ru_stime

    def read(self) -> dict:
        main, children = self._cpu()
        return {"wall_s": time.perf_counter() - self.wall, "cpu_main_s": main - self.cpu[0],
                "cpu_workers_s": children - self.cpu[1]}


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def _log(msg: str) -> None:
    print(f"[accuracy {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _environment(threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import importlib.metadata as md

    def version(n):
        try:
            return md.version(n)
        except md.PackageNotFoundError:
            return "missing"

    return {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpu": cpu, "cpu_count": os.cpu_count(),
            "torch_threads": threads, "load_avg_1min_start": os.getloadavg()[0],
            "python": platform.python_version(),
            "versions": {n: version(n) for n in ("torch", "timm", "numpy", "logitcache")},
            "command": " ".join(["python", "-m", "bench.accuracy", *sys.argv[1:]])}


# --- data, teacher, caches -------------------------------------------------------------------

def _dataset(name: str, work: Path) -> Path:
    root = work / name / "data"
    if (root / "dataset.json").exists():
        return root
    tmp = work / name / "data.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if name == "synth":
        from logitcache.data.synth import generate_synth

        generate_synth(tmp)  # the defaults: 128 classes, 40 train + 10 val per class, 32 px
    elif name == "digits":
        from logitcache.data.digits import generate_digits

        generate_digits(tmp)  # the defaults: 80/20 split, 32 px
    else:
        raise ValueError(f"unknown dataset {name!r}; use synth or digits")
    tmp.rename(root)
    return root


def _demo_teacher(data: Path, epochs: int) -> Path | None:
    """demo_out/teacher/model.safetensors when it was trained on this very synth dataset."""
    demo = Path("demo_out")
    weights, summary, demo_data = demo / "teacher" / "model.safetensors", demo / "teacher" / "summary.json", demo / "data"
    if not (weights.exists() and summary.exists() and (demo_data / "dataset.json").exists()):
        return None
    from logitcache.data.source import open_source

    try:
        same = open_source(str(demo_data), "train").fingerprint() == open_source(str(data), "train").fingerprint()
        cfg = json.loads(summary.read_text()).get("config", {})
    except Exception:  # noqa: BLE001 - an unreadable demo folder is simply not reused
        return None
    if same and cfg.get("student") == TEACHER and cfg.get("recipe") == RECIPE and cfg.get("epochs", 0) >= epochs:
        return weights
    return None


def _teacher(name: str, data: Path, work: Path, epochs: int, workers: int, only_existing: bool = False) -> dict | None:
    """Train (once) the dataset's teacher; later calls find it on disk. ``only_existing``:
    None instead of training."""
    from logitcache.data.source import open_source
    from logitcache.trainer.losses import LossConfig
    from logitcache.trainer.train import TrainConfig, train

    fingerprint = open_source(str(data), "train").fingerprint()
    spec = {"model": TEACHER, "recipe": RECIPE, "epochs": epochs, "loss": "none", "batch_size": 128, "seed": 0,
            "data": fingerprint}
    tdir = work / name / f"teacher-{_digest(spec)}"
    weights = tdir / "model.safetensors"
    info = {"model": TEACHER, "epochs": epochs, "recipe": RECIPE, "dir": str(tdir), "weights": str(weights)}
    if (tdir / "done.json").exists():
        return {**json.loads((tdir / "done.json").read_text()), "reused": True}
    if name == "synth":
        demo = _demo_teacher(data, epochs)
        if demo is not None:
            tdir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(demo, weights)
            summary = json.loads((demo.parent / "summary.json").read_text())
            done = {**info, "val_top1": summary["final_top1"], "val_top5": summary["final_top5"],
                    "epochs": summary["config"]["epochs"], "source": str(demo), "seconds": 0.0}
            (tdir / "done.json").write_text(json.dumps(done, indent=2))
            return {**done, "reused": True}
    if only_existing:
        return None
    _log(f"{name}: training teacher {TEACHER} for {epochs} epochs -> {tdir}")
    clock = Clock()
    summary = train(TrainConfig(data=str(data), student=TEACHER, out=str(tdir), recipe=RECIPE, epochs=epochs,
                                batch_size=128, loss=LossConfig(kind="none"), num_workers=workers, seed=0,
                                tensorboard=False))
    done = {**info, "val_top1": summary["final_top1"], "val_top5": summary["final_top5"], **clock.read()}
    (tdir / "done.json").write_text(json.dumps(done, indent=2))
    return {**done, "reused": False}


def _cache(name: str, data: Path, work: Path, teacher: dict, k, epochs: int, workers: int) -> dict:
    """Build (or extend to ``epochs``, or just find) the top-k cache of this teacher."""
    from logitcache.build import build
    from logitcache.codec import create_codec
    from logitcache.data.source import open_source
    from logitcache.store import CacheReader
    from logitcache.teacher import Teacher
    from logitcache.views import create_recipe

    source = open_source(str(data), "train")
    codec = create_codec("full", source.num_classes) if k == "full" else create_codec("topk", source.num_classes, k)
    tag = "full" if codec.name == "full" else f"top{codec.k}"
    url = str(work / name / "caches" / f"{Path(teacher['dir']).name}-{tag}.zarr")
    stats = Path(url + ".accuracy.json")  # how the build went, for reruns that reuse the cache
    have = CacheReader(url).epochs() if Path(url, "zarr.json").exists() else []
    if set(range(epochs)) <= set(have):
        built = json.loads(stats.read_text()) if stats.exists() else {"wall_s": 0.0}
        return {**built, "url": url, "codec": tag, "epochs": len(have), "reused": True}
    _log(f"{name}: building cache {tag} ({epochs} epochs) -> {url}")
    clock = Clock()
    report = build(source, dataset_name=name, teacher=Teacher(TEACHER, weights=teacher["weights"]),
                   recipe=create_recipe(RECIPE), codec=codec, url=url, epochs=list(range(epochs)), batch_size=128,
                   num_workers=workers, progress=False)
    result = {"url": url, "codec": tag, "epochs": epochs, "views": report.views, "views_per_s": report.views_per_s,
              **clock.read()}
    stats.write_text(json.dumps(result, indent=2))
    return {**result, "reused": False}


# --- student runs ----------------------------------------------------------------------------

def _variant_config(variant: str, caches: dict, teacher: dict) -> dict:
    """TrainConfig keyword arguments that make ``variant`` (besides the shared ones)."""
    from logitcache.trainer.losses import LossConfig
    from logitcache.trainer.mkd import MKDConfig

    main = caches[MAIN_K]["url"]
    if variant == "ce":
        return {"cache": main, "loss": LossConfig(kind="none")}
    if variant == "kd_cache":
        return {"cache": main, "loss": LossConfig(kind="kd")}
    if variant == "kd_online":
        return {"cache": main, "loss": LossConfig(kind="kd"), "online_teacher": True, "teacher": TEACHER,
                "teacher_weights": teacher["weights"]}
    if variant == "mkd":
        return {"cache": main, "loss": LossConfig(kind="kd"), "mkd": MKDConfig()}
    if variant == "dkd":
        return {"cache": main, "loss": LossConfig(kind="dkd")}
    if variant == "dist":
        return {"cache": main, "loss": LossConfig(kind="dist", kd_weight=2.0)}
    if variant.startswith("kd_top") or variant == "kd_full":
        k = "full" if variant == "kd_full" else int(variant.removeprefix("kd_top"))
        return {"cache": caches[k]["url"], "loss": LossConfig(kind="kd")}
    raise ValueError(f"unknown variant {variant!r}")


def _student(name: str, data: Path, work: Path, variant: str, seed: int, epochs: int, extra: dict,
             workers: int, resume: bool, limit_batches: int | None) -> dict:
    from logitcache.trainer.train import TrainConfig, train

    out = work / name / "students" / f"e{epochs}" / variant / f"seed{seed}"
    cfg = TrainConfig(data=str(data), student=STUDENT, out=str(out), epochs=epochs, batch_size=128, lr=2e-3,
                      num_workers=workers, seed=seed, tensorboard=False, progress=False,
                      limit_batches=limit_batches, **extra)
    spec = json.loads(json.dumps(asdict(cfg), default=str))
    spec.pop("num_workers")  # the views, and so the results, do not depend on it
    marker = out / "accuracy_run.json"
    if resume and marker.exists():
        saved = json.loads(marker.read_text())
        if saved.get("spec") == spec:
            return {**saved["result"], "reused": True}
    shutil.rmtree(out, ignore_errors=True)
    clock = Clock()
    summary = train(cfg)
    curve = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    result = {"top1": summary["final_top1"], "top5": summary["final_top5"], "best_top1": summary["best_top1"],
              "curve_top1": [r["val_top1"] for r in curve], **clock.read(),
              "train_images_per_s": summary["images_per_s"], "dir": str(out)}
    for key in ("t_teacher", "t_student"):
        if key in summary:
            result[key] = summary[key]
    marker.write_text(json.dumps({"spec": spec, "result": result}, indent=2))
    return {**result, "reused": False}


def _task_teacher(name: str, data: Path, work: Path, epochs: int, workers: int, prefer_epochs: int | None) -> dict:
    if prefer_epochs:
        found = _teacher(name, data, work, prefer_epochs, workers, only_existing=True)
        if found is not None:
            return found
    return _teacher(name, data, work, epochs, workers)


def _variants_for(plan: DatasetPlan, num_classes: int) -> tuple[list[str], dict, list]:
    """The runs to make, which variant answers each k of the sweep, and the caches to build."""
    variants = list(MAIN_VARIANTS)
    sweep = {}
    if plan.sweep:
        for k in SWEEP_K:
            if k == MAIN_K or (k == "full" and num_classes <= MAIN_K):
                sweep[str(k)] = "kd_cache"  # digits: top-10 of 10 classes *is* the full cache
            else:
                v = "kd_full" if k == "full" else f"kd_top{k}"
                sweep[str(k)] = v
                variants.append(v)
    ks = [MAIN_K] + [k for k in SWEEP_K if plan.sweep and k != MAIN_K and not (k == "full" and num_classes <= MAIN_K)]
    return variants, sweep, ks


def _cache_k(variant: str):
    if variant == "kd_full":
        return "full"
    if variant.startswith("kd_top"):
        return int(variant.removeprefix("kd_top"))
    return MAIN_K


# --- the schedule: teachers -> caches -> students, `jobs` processes at a time ---------------------

@dataclass
class Task:
    key: tuple
    deps: list[tuple]
    fn: object
    make_args: object  # done results -> positional args of fn
    label: str


def _init_process(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _schedule(tasks: list[Task], jobs: int, threads: int, on_done) -> dict:
    """Run ``tasks`` (first ready in list order), ``jobs`` at a time (in-process when 1).
    A task whose dependency failed fails too. Returns key -> result or {"error": ...}."""
    import concurrent.futures as cf
    import multiprocessing as mp

    done: dict = {}
    pending = list(tasks)

    def ready(t: Task) -> bool:
        return all(d in done for d in t.deps)

    def finish(t: Task, result=None, error: str | None = None) -> None:
        done[t.key] = {"error": error} if error else result
        on_done(t, done[t.key])

    def failed_deps(t: Task) -> list:
        return [d for d in t.deps if d in done and "error" in done[d]]

    if jobs <= 1:
        _init_process(threads)
        while pending:
            t = next(t for t in pending if ready(t))
            pending.remove(t)
            if failed_deps(t):
                finish(t, error=f"dependency failed: {failed_deps(t)}")
                continue
            try:
                finish(t, t.fn(*t.make_args(done)))
            except Exception as exc:  # noqa: BLE001 - record, go on with the other runs
                finish(t, error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}")
        return done

    import torch

    # fork (cheap) unless the caller already initialised CUDA, which a forked child cannot use
    method = "spawn" if torch.cuda.is_available() and torch.cuda.is_initialized() else "fork"
    with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context(method), initializer=_init_process,
                                initargs=(threads,)) as pool:
        running: dict = {}
        while pending or running:
            while len(running) < jobs:
                t = next((t for t in pending if ready(t)), None)
                if t is None:
                    break
                pending.remove(t)
                if failed_deps(t):
                    finish(t, error=f"dependency failed: {failed_deps(t)}")
                    continue
                running[pool.submit(t.fn, *t.make_args(done))] = t
            if not running:
                continue
            finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for fut in finished:
                t = running.pop(fut)
                try:
                    finish(t, fut.result())
                except Exception as exc:  # noqa: BLE001
                    tb = "".join(traceback.format_exception(exc, limit=8))
                    finish(t, error=f"{type(exc).__name__}: {exc}\n{tb}")
    return done


def _tasks(plans: dict[str, DatasetPlan], work: Path, datas: dict, num_classes: dict, *, workers: int,
           student_workers: int, resume: bool, limit_batches: int | None, prefer: dict) -> tuple[list[Task], dict]:
    """Teachers first, then main caches, then students seed-major, sweep caches just before their students."""
    teachers, caches, students, sweep_caches, sweep_students = [], [], [], [], []
    layout = {}
    for name, plan in plans.items():
        data = datas[name]
        variants, sweep, ks = _variants_for(plan, num_classes[name])
        layout[name] = {"variants": variants, "sweep": sweep, "ks": ks}
        tkey = ("teacher", name)
        teachers.append(Task(tkey, [], _task_teacher,
                             lambda done, n=name, d=data, p=plan: (n, d, work, p.teacher_epochs, student_workers,
                                                                   prefer.get(n)),
                             f"{name}/teacher"))
        for k in ks:
            t = Task(("cache", name, k), [tkey], _cache,
                     lambda done, n=name, d=data, k=k, p=plan, tk=tkey: (n, d, work, done[tk], k, p.student_epochs,
                                                                          workers),
                     f"{name}/cache top-{k}")
            (caches if k == MAIN_K else sweep_caches).append(t)
        for seed in plan.seeds:
            for v in variants:
                ck = ("cache", name, _cache_k(v))

                def make(done, n=name, d=data, v=v, seed=seed, p=plan, ck=ck, tk=tkey):
                    return (n, d, work, v, seed, p.student_epochs,
                            _variant_config(v, {_cache_k(v): done[ck], MAIN_K: done[("cache", n, MAIN_K)]}, done[tk]),
                            student_workers, resume, limit_batches)

                deps = [tkey, ("cache", name, MAIN_K), ck]
                t = Task(("student", name, v, seed), deps, _student, make, f"{name}/{v}/seed{seed}")
                (students if v in MAIN_VARIANTS else sweep_students).append(t)
    return teachers + caches + students + sweep_caches + sweep_students, layout


def _summarise(name: str, plan: DatasetPlan, data: Path, layout: dict, done: dict, limit_batches) -> dict:
    from logitcache.data.source import open_source

    variants, sweep, ks = layout["variants"], layout["sweep"], layout["ks"]
    teacher = done[("teacher", name)]
    caches = {str(k): done[("cache", name, k)] for k in ks}
    runs: dict[str, dict] = {v: {"label": VARIANT_LABELS[v], "seeds": [], "top1": [], "top5": [], "runs": []}
                             for v in variants}
    for seed in plan.seeds:
        for v in variants:
            r = done[("student", name, v, seed)]
            if "error" in r:
                runs[v]["runs"].append({"seed": seed, **r})
                continue
            runs[v]["seeds"].append(seed)
            runs[v]["top1"].append(r["top1"])
            runs[v]["top5"].append(r["top5"])
            runs[v]["runs"].append({"seed": seed, **r})
    for d in runs.values():
        d["mean"], d["std"] = _mean_std(d["top1"])
        d["top5_mean"], d["top5_std"] = _mean_std(d["top5"])
    k_sweep = {k: {"variant": v, "top1": runs[v]["top1"], "mean": runs[v]["mean"], "std": runs[v]["std"]}
               for k, v in sweep.items()}

    # Paired (same seed) differences: same init and batch order, only the teacher signal differs.
    def paired(a: str, b: str) -> list[float]:
        da = dict(zip(runs[a]["seeds"], runs[a]["top1"]))
        db = dict(zip(runs[b]["seeds"], runs[b]["top1"]))
        return [da[s] - db[s] for s in sorted(set(da) & set(db))]

    def diff(a: str, b: str) -> float | None:
        if runs[a]["mean"] is None or runs[b]["mean"] is None:
            return None
        return runs[a]["mean"] - runs[b]["mean"]

    headline = {
        "acc_cache_minus_online_pp": diff("kd_cache", "kd_online"),
        "acc_kd_minus_ce_pp": diff("kd_cache", "ce"),
        "acc_ce_std_pp": runs["ce"]["std"],
        "acc_kd_std_pp": runs["kd_cache"]["std"],
        "acc_online_std_pp": runs["kd_online"]["std"],
        "paired_cache_minus_online_pp": paired("kd_cache", "kd_online"),
        "paired_kd_minus_ce_pp": paired("kd_cache", "ce"),
    }
    checks = {}
    n_seeds = len(plan.seeds)
    if headline["acc_kd_minus_ce_pp"] is not None and n_seeds > 1:
        ce_std, kd_std = runs["ce"]["std"], runs["kd_cache"]["std"]
        checks["kd_beats_ce_by_more_than_ce_std"] = headline["acc_kd_minus_ce_pp"] > ce_std
        checks["kd_beats_ce_by_more_than_max_std"] = headline["acc_kd_minus_ce_pp"] > max(ce_std, kd_std)
    if headline["acc_cache_minus_online_pp"] is not None:
        checks["cache_online_within_0p5pp"] = abs(headline["acc_cache_minus_online_pp"]) <= 0.5
    seed0 = plan.seeds[0]
    curves = {}
    for v in CURVE_VARIANTS:
        r = done.get(("student", name, v, seed0), {})
        if "curve_top1" in r:
            curves[v] = r["curve_top1"]
    student_keys = [k for k in done if k[0] == "student" and k[1] == name]
    return {
        "dataset": {"name": name, "root": str(data), "num_classes": open_source(str(data), "train").num_classes,
                    "train": len(open_source(str(data), "train")), "val": len(open_source(str(data), "val"))},
        "settings": {**asdict(plan), "variants": variants, "student": STUDENT, "batch_size": 128, "lr": 2e-3,
                     "opt": "adamw", "weight_decay": 0.05, "sched": "cosine", "warmup_epochs": 1, "recipe": RECIPE,
                     "limit_batches": limit_batches, "teacher": TEACHER, "main_k": MAIN_K,
                     "std": "sample std over seeds (ddof=1)"},
        "teacher": teacher,
        "caches": caches,
        "variants": runs,
        "k_sweep": k_sweep,
        "headline": headline,
        "checks": checks,
        "curves_seed0": curves,
        "time": {
            "teacher_wall_s": teacher.get("wall_s", 0.0),
            "caches_wall_s": sum(c.get("wall_s", 0.0) for c in caches.values()),
            "students_wall_s": sum(done[k].get("wall_s", 0.0) for k in student_keys),
            "students_cpu_s": sum(done[k].get("cpu_main_s", 0.0) + done[k].get("cpu_workers_s", 0.0)
                                  for k in student_keys),
        },
    }


# --- entry points ------------------------------------------------------------------------------

def run(quick: bool = False, *, datasets: list[str] | None = None, seeds: int | None = None,
        out: str | Path | None = "bench/results", workdir: str | Path = "runs/accuracy", workers: int = 2,
        student_workers: int = 0, jobs: int = 2, threads: int = 1, resume: bool = False,
        synth_epochs: int | None = None, digits_epochs: int | None = None, teacher_epochs: dict | None = None,
        limit_batches: int | None = None) -> dict:
    """Run the study; returns (and with ``out`` writes) the results dict.

    ``quick`` may also be a bench context with a ``.quick`` attribute. Parallelism (none of
    it changes a result: views and batches are functions of seeds only): ``jobs`` runs at a
    time, each a process with ``threads`` torch threads; ``workers`` DataLoader workers for
    cache builds, ``student_workers`` for teacher and student training (0: the views are
    rendered in-process, cheaper on 2 cores than starting workers twice an epoch)."""
    if hasattr(quick, "quick"):  # bench.run's context object
        quick = bool(quick.quick)
    if datasets is None:
        datasets = ["synth"] if quick else ["synth", "digits"]
    seeds = seeds if seeds is not None else (1 if quick else 3)
    plans = (quick_plans if quick else full_plans)(seeds)
    unknown = set(datasets) - set(plans)
    if unknown:
        raise ValueError(f"unknown datasets {sorted(unknown)}; use synth, digits")
    if synth_epochs:
        plans["synth"].student_epochs = synth_epochs
    if digits_epochs:
        plans["digits"].student_epochs = digits_epochs
    for name, e in (teacher_epochs or {}).items():
        plans[name].teacher_epochs = e
    plans = {n: plans[n] for n in datasets}
    # quick: a full-study teacher already on disk beats a 2-epoch one
    prefer = {n: full_plans(1)[n].teacher_epochs for n in plans} if quick else {}
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    env = _environment(threads)
    env.update(jobs=jobs, workers=workers, student_workers=student_workers)
    clock = Clock()
    from logitcache.data.source import open_source

    datas = {n: _dataset(n, work) for n in plans}
    num_classes = {n: open_source(str(d), "train").num_classes for n, d in datas.items()}
    tasks, layout = _tasks(plans, work, datas, num_classes, workers=workers, student_workers=student_workers,
                           resume=resume, limit_batches=limit_batches, prefer=prefer)
    for n, p in plans.items():
        _log(f"{n}: {asdict(p)}; runs: {layout[n]['variants']}")
    _log(f"{len(tasks)} tasks, {jobs} at a time")
    count = {"n": 0}

    def on_done(t: Task, r: dict) -> None:
        count["n"] += 1
        head = f"[{count['n']}/{len(tasks)}] {t.label}"
        if "error" in r:
            _log(f"{head}: FAILED {r['error']}")
            return
        what = (f"val top-1 {r['top1']:.2f}%" if "top1" in r else
                f"val top-1 {r['val_top1']:.2f}%" if "val_top1" in r else f"{r.get('epochs')} epochs")
        cpu = r.get("cpu_main_s", 0.0) + r.get("cpu_workers_s", 0.0)
        _log(f"{head}: {what} ({r.get('wall_s', 0.0):.0f} s wall, {cpu:.0f} s cpu"
             f"{', reused' if r.get('reused') else ''})")

    done = _schedule(tasks, jobs, threads, on_done)
    results: dict = {"name": "accuracy", "quick": quick, "environment": env, "datasets": {}}
    for name, plan in plans.items():
        if "error" in done[("teacher", name)] or "error" in done[("cache", name, MAIN_K)]:
            results["datasets"][name] = {"error": done[("teacher", name)].get("error")
                                         or done[("cache", name, MAIN_K)].get("error")}
            continue
        results["datasets"][name] = _summarise(name, plan, datas[name], layout[name], done, limit_batches)
    total = clock.read()  # the pool's processes (and their workers) are reaped by now
    env["load_avg_1min_end"] = os.getloadavg()[0]
    cpu = total["cpu_main_s"] + total["cpu_workers_s"]
    results["runtime"] = {
        "wall_s": total["wall_s"], "cpu_total_s": cpu,
        "note": "wall_s, cpu_total_s: this invocation, on the machine in environment (shared when load_avg "
                "exceeds cpu_count); cpu counts this process and every descendant (pool processes, DataLoader "
                "workers). tasks_*: summed over all tasks, reused ones with their stored times",
    }
    # The work itself, summed over every task, reused ones included (their stored times):
    # independent of interruptions and --resume.
    ran = [r for r in done.values() if "error" not in r]
    results["runtime"]["tasks_wall_s"] = sum(r.get("wall_s", 0.0) for r in ran)
    results["runtime"]["tasks_cpu_s"] = sum(r.get("cpu_main_s", 0.0) + r.get("cpu_workers_s", 0.0) for r in ran)
    results["runtime"]["tasks_reused"] = sum(bool(r.get("reused")) for r in ran)
    results["runtime"]["tasks"] = len(done)
    # a quiet 2-core machine does that work with both cores busy (2 jobs)
    results["runtime"]["quiet_2core_estimate_s"] = results["runtime"]["tasks_cpu_s"] / 2
    results["failures"] = [list(k) for k, r in done.items() if "error" in r]
    for name, d in results["datasets"].items():
        if "headline" not in d:
            continue
        prefix = "" if name == "synth" else f"{name}_"
        for key in ("acc_cache_minus_online_pp", "acc_kd_minus_ce_pp", "acc_ce_std_pp"):
            results[prefix + key] = d["headline"][key]
        for key, value in d["checks"].items():
            results.setdefault("checks", {})[prefix + key] = value
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        stem = "accuracy_quick" if quick else "accuracy"
        results["plots"] = plot(results, out, prefix=stem)
        text = json.dumps(results, indent=2, allow_nan=False, default=_json_default)
        (out / f"{stem}.json").write_text(text)
        (work / f"{stem}.json").write_text(text)  # a copy next to the runs it summarises
    return results


def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return str(o)


def markdown(data: dict) -> str:
    """The results as a markdown table (mean ± sample std of final val top-1 over seeds)."""
    names = [n for n, d in data["datasets"].items() if "variants" in d]
    lines = ["| variant | " + " | ".join(f"{n} top-1 % (n)" for n in names) + " |",
             "|---|" + "---:|" * len(names)]
    variants = []
    for n in names:
        variants += [v for v in data["datasets"][n]["variants"] if v not in variants]
    for v in variants:
        cells = []
        for n in names:
            d = data["datasets"][n]["variants"].get(v)
            cells.append("–" if not d or d["mean"] is None else f"{d['mean']:.2f} ± {d['std']:.2f} ({len(d['top1'])})")
        lines.append(f"| {VARIANT_LABELS[v]} | " + " | ".join(cells) + " |")
    teachers = ", ".join(f"{n}: {data['datasets'][n]['teacher']['val_top1']:.2f}%" for n in names)
    lines.append("")
    for n in names:
        sweep = data["datasets"][n].get("k_sweep") or {}
        if sweep:
            cells = [f"k={k}: {v['mean']:.2f} ± {v['std']:.2f}" + (" (= top-10 run)" if v["variant"] == "kd_cache" else "")
                     for k, v in sweep.items() if v["mean"] is not None]
            lines.append(f"{n} top-k sweep (vanilla KD from cache): " + "; ".join(cells) + ".")
    lines.append(f"Teacher ({TEACHER}) val top-1: {teachers}.")
    return "\n".join(lines)


def plot(data: dict, outdir: str | Path, prefix: str = "accuracy") -> list[str]:
    """``<prefix>_vs_k.png`` (when a k sweep ran) and ``<prefix>_curves.png``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    written = []
    swept = {n: d for n, d in data["datasets"].items() if d.get("k_sweep")}
    if swept:
        fig, axes = plt.subplots(1, len(swept), figsize=(5 * len(swept), 3.8), squeeze=False)
        for ax, (n, d) in zip(axes[0], swept.items()):
            ks = [k for k in ("1", "5", "10", "full") if k in d["k_sweep"] and d["k_sweep"][k]["mean"] is not None]
            xs = list(range(len(ks)))
            labels = [f"full ({d['dataset']['num_classes']})" if k == "full" else k for k in ks]
            if n != "synth" and d["dataset"]["num_classes"] <= MAIN_K:
                labels = [lab if k != "10" else "10 (= full)" for k, lab in zip(ks, labels)]
            ax.errorbar(xs, [d["k_sweep"][k]["mean"] for k in ks], yerr=[d["k_sweep"][k]["std"] for k in ks],
                        marker="o", capsize=4, label="vanilla KD from cache")
            for v, style in (("ce", "--"), ("kd_online", ":")):
                m, s = d["variants"][v]["mean"], d["variants"][v]["std"]
                if m is not None:
                    line = ax.axhline(m, ls=style, color="grey" if v == "ce" else "tab:red",
                                      label=f"{VARIANT_LABELS[v]} (±std band)")
                    ax.axhspan(m - s, m + s, color=line.get_color(), alpha=0.12)
            ax.set_xticks(xs, labels)
            ax.set_xlabel("cached top-k logits per view")
            ax.set_ylabel("final val top-1 (%)")
            ax.set_title(f"{n}: {d['settings']['student']}, {d['settings']['student_epochs']} epochs, "
                         f"{len(d['settings']['seeds'])} seeds")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = outdir / f"{prefix}_vs_k.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(str(path))
    with_curves = [n for n, d in data["datasets"].items() if d.get("curves_seed0")]
    curve_ds = "synth" if "synth" in with_curves else next(iter(with_curves), None)
    if curve_ds:
        curves = data["datasets"][curve_ds]["curves_seed0"]
        fig, ax = plt.subplots(figsize=(6, 4))
        for v, ys in curves.items():
            ax.plot(range(1, len(ys) + 1), ys, marker="o", ms=3, label=VARIANT_LABELS[v])
        ax.set_xlabel("epoch")
        ax.set_ylabel("val top-1 (%)")
        ax.set_title(f"{curve_ds}, seed 0: student {STUDENT}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = outdir / f"{prefix}_curves.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(str(path))
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 seed, 2 epochs, synth only, no k sweep")
    p.add_argument("--datasets", default=None, help="comma-separated: synth,digits (default: both; quick: synth)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per variant (default 3; quick 1)")
    p.add_argument("--out", default="bench/results", help="where accuracy*.json / *.png go")
    p.add_argument("--workdir", default="runs/accuracy", help="data, teachers, caches, student runs")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of cache builds")
    p.add_argument("--student-workers", type=int, default=0, help="DataLoader workers of teacher and student training")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (processes)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the main process")
    p.add_argument("--resume", action="store_true", help="reuse finished student runs with the same settings")
    p.add_argument("--synth-epochs", type=int, default=None, help="student epochs on synth (default 10)")
    p.add_argument("--digits-epochs", type=int, default=None, help="student epochs on digits (default 15)")
    args = p.parse_args(argv)
    datasets = args.datasets.split(",") if args.datasets else None
    results = run(args.quick, datasets=datasets, seeds=args.seeds, out=args.out, workdir=args.workdir,
                  workers=args.workers, student_workers=args.student_workers, jobs=args.jobs, threads=args.threads,
                  resume=args.resume, synth_epochs=args.synth_epochs, digits_epochs=args.digits_epochs)
    print(markdown(results))
    rt = results["runtime"]
    print(f"\nruntime: {rt['wall_s']:.0f} s wall, {rt['cpu_total_s']:.0f} s cpu "
          f"(quiet 2-core estimate {rt['quiet_2core_estimate_s']:.0f} s)")
    for k in sorted(results):
        if k.startswith(("acc_", "digits_acc_")):
            v = results[k]
            print(f"{k}: {'n/a' if v is None else f'{v:+.2f}'}")
    for k, v in results.get("checks", {}).items():
        print(f"check {k}: {v}")
    for k in results["failures"]:
        print(f"FAILED: {'/'.join(map(str, k))}")
    return 1 if results["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
