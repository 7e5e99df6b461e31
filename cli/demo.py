"""``logitcache demo``: one teacher, one cache, several students, on the embedded data.

1. generate the synthetic dataset (structured classes, 32 px);
2. train a teacher (timm resnet18) with plain CE;
3. build its cache once (the default codec: top-10 logits as 8-bit gaps);
4. train every student twice on the same cached views: CE only, and KD from the cache
   (a small CNN, timm ``test_resnet``, and a small ViT, timm ``test_vit`` at patch 4);
5. train the first student once more with KD from the teacher run online on the same
   views: the step time the cache saves;
6. print the table, write demo_results.json and demo.png (accuracy curves, time per run).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

TEACHER, RECIPE = "resnet18", "demo32"
#: name -> (timm model, its kwargs): a small CNN and a small ViT (64 patches of 4 px)
STUDENTS = {"cnn": ("test_resnet", {}), "vit": ("test_vit", {"img_size": 32, "patch_size": 4})}
RUNS = ("ce_only", "kd_cache")  # every student's runs; the first student also runs "kd_online"


def run_demo(out: Path, *, epochs: int = 6, teacher_epochs: int = 15, workers: int = 2, num_classes: int = 64,
             train_per_class: int = 40, val_per_class: int = 10, batch_size: int = 128) -> dict:
    from logitcache.build.loop import build
    from logitcache.build.teacher import Teacher
    from logitcache.codecs.logits import create_codec
    from logitcache.data.source import open_source
    from logitcache.data.synth import generate_synth
    from logitcache.views.augment import create_recipe

    console, t0 = Console(), time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    console.rule(f"[bold]1/6 data ({num_classes} classes x {train_per_class} training, {val_per_class} val images)")
    if not (data / "dataset.json").exists():
        generate_synth(data, num_classes=num_classes, train_per_class=train_per_class, val_per_class=val_per_class)
    console.rule(f"[bold]2/6 teacher ({TEACHER}, CE, {teacher_epochs} epochs)")
    teacher_sum = _train(out / "teacher", data, TEACHER, {}, teacher_epochs, workers, batch_size, kind="none",
                         recipe=RECIPE)
    console.rule(f"[bold]3/6 cache ({epochs} epochs of views, top-10 gap8), built once")
    source = open_source(str(data), "train")
    cache_url = str(out / "cache.zarr")
    report = build(source, dataset_name="synth", teacher=Teacher(TEACHER, weights=str(out / "teacher" /
                                                                                      "model.safetensors")),
                   recipe=create_recipe(RECIPE), codec=create_codec("topk", source.num_classes, 10), url=cache_url,
                   epochs=list(range(epochs)), batch_size=128, num_workers=workers)
    runs = {}
    first = next(iter(STUDENTS))
    plan = [(name, run) for name in STUDENTS for run in RUNS] + [(first, "kd_online")]
    for name, run in plan:
        model, kwargs = STUDENTS[name]
        console.rule(f"[bold]{4 if run != 'kd_online' else 5}/6 student {name} ({model}): {run}")
        runs[f"{name}/{run}"] = _train(out / name / run, data, model, kwargs, epochs, workers, batch_size,
                                       cache=cache_url, kind="none" if run == "ce_only" else "kd",
                                       online=out / "teacher" / "model.safetensors" if run == "kd_online" else None)
    results = _results(teacher_sum, teacher_epochs, epochs, report, cache_url, runs, time.perf_counter() - t0)
    (out / "demo_results.json").write_text(json.dumps(results, indent=2))
    console.rule("[bold]6/6 results")
    _plot(out, results)
    _table(console, results)
    console.print(f"results: {out / 'demo_results.json'}  plot: {out / 'demo.png'}")
    return results


def _train(out: Path, data: Path, model: str, kwargs: dict, epochs: int, workers: int, batch_size: int, *,
           kind: str, cache: str | None = None, recipe: str | None = None, online: Path | None = None) -> dict:
    """One run of the trainer (the teacher's, or a student's from the cache); its summary."""
    from logitcache.trainer.config import TrainConfig
    from logitcache.trainer.losses import LossConfig
    from logitcache.trainer.train import train

    extra = {"online_teacher": True, "teacher": TEACHER, "teacher_weights": str(online)} if online else {}
    cfg = TrainConfig(data=str(data), student=model, model_kwargs=kwargs, out=str(out), cache=cache,
                      recipe=recipe or RECIPE, epochs=epochs, batch_size=batch_size, loss=LossConfig(kind=kind),
                      num_workers=workers, **extra)
    return train(cfg)


def _results(teacher: dict, teacher_epochs: int, epochs: int, report, cache_url: str, runs: dict,
             wall: float) -> dict:
    """demo_results.json: the teacher, the cache, every run, KD minus CE per student, the time saved."""
    students = {}
    for name, (model, _) in STUDENTS.items():
        ce, kd = runs[f"{name}/ce_only"], runs[f"{name}/kd_cache"]
        students[name] = {"model": model, "kd_minus_ce_top1_pp": kd["final_top1"] - ce["final_top1"]}
    first = next(iter(STUDENTS))
    cached, online = runs[f"{first}/kd_cache"], runs[f"{first}/kd_online"]
    return {
        "teacher": {"model": TEACHER, "epochs": teacher_epochs, "val_top1": teacher["final_top1"],
                    "wall_seconds": teacher["wall_seconds"]},
        "epochs": epochs,
        "cache": {"url": cache_url, "views": report.views, "build_seconds": report.seconds,
                  "views_per_s": report.views_per_s},
        "runs": {k: {"val_top1": v["final_top1"], "val_top5": v["final_top5"], "train_seconds": v["train_seconds"],
                     "wall_seconds": v["wall_seconds"], "train_images_per_s": v["images_per_s"]}
                 for k, v in runs.items()},
        "students": students,
        "online_vs_cache": {"student": first, "online_train_seconds": online["train_seconds"],
                            "cached_train_seconds": cached["train_seconds"],
                            "online_over_cached": online["train_seconds"] / cached["train_seconds"],
                            "saved_seconds_per_student": online["train_seconds"] - cached["train_seconds"]},
        "demo_seconds": wall,
    }


def _table(console: Console, r: dict) -> None:
    table = Table(title=f"{len(STUDENTS)} students from one cache ({r['cache']['views']:,} views, built once in "
                        f"{r['cache']['build_seconds']:.0f} s), {r['epochs']} epochs; teacher {r['teacher']['model']} "
                        f"val top-1 {r['teacher']['val_top1']:.2f}%")
    for col in ("student", "run", "val top-1 %", "KD - CE pp", "train s", "images/s"):
        table.add_column(col, justify="left" if col in ("student", "run") else "right")
    for key, v in r["runs"].items():
        name, run = key.split("/")
        gain = f"{r['students'][name]['kd_minus_ce_top1_pp']:+.2f}" if run == "kd_cache" else ""
        table.add_row(f"{name} ({r['students'][name]['model']})", run, f"{v['val_top1']:.2f}", gain,
                      f"{v['train_seconds']:.0f}", f"{v['train_images_per_s']:.0f}")
    console.print(table)
    o = r["online_vs_cache"]
    console.print(f"KD with the teacher online took {o['online_over_cached']:.2f}x the training time of KD from the "
                  f"cache ({o['online_train_seconds']:.0f} s vs {o['cached_train_seconds']:.0f} s for student "
                  f"{o['student']}); the cache was built once for all {2 * len(STUDENTS)} cached runs. "
                  f"Demo total {r['demo_seconds']:.0f} s.")


def _plot(out: Path, r: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from logitcache.trainer.metrics_log import read_rows

    fig, (acc, bars) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    for key in ["teacher", *r["runs"]]:
        folder = out / "teacher" if key == "teacher" else out / Path(key)
        rows = read_rows(folder / "metrics.jsonl")
        style = "--" if key.endswith("ce_only") else ":" if key == "teacher" else "-"
        acc.plot([x["epoch"] + 1 for x in rows], [x["val_top1"] for x in rows], style, marker="o", ms=3, label=key)
    acc.set(xlabel="epoch", ylabel="val top-1 (%)", title="accuracy")
    acc.grid(alpha=0.3)
    acc.legend(fontsize=8)
    names = ["teacher (CE)", "cache build", *r["runs"]]
    seconds = [r["teacher"]["wall_seconds"], r["cache"]["build_seconds"],
               *(v["train_seconds"] for v in r["runs"].values())]
    colors = ["grey", "grey", *("tab:red" if k.endswith("kd_online") else "tab:blue" for k in r["runs"])]
    bars.barh(names, seconds, color=colors)
    bars.invert_yaxis()
    bars.set(xlabel="seconds", title="time per run (one-off: grey; online KD: red)")
    fig.tight_layout()
    fig.savefig(out / "demo.png", dpi=120)
    plt.close(fig)
