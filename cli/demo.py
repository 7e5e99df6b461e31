"""``logitcache demo``: the whole product on the embedded dataset, end to end.

1. generate the synthetic dataset (128 structured classes, 32 px);
2. train a teacher (timm resnet18) with plain CE;
3. build its cache (top-10 logits per view, one view per image and epoch);
4. train the same student twice from the same views: CE only, then KD from the cache;
5. print a table, write demo_results.json and accuracy.png.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

TEACHER, STUDENT, RECIPE = "resnet18", "test_resnet", "demo32"


def run_demo(out: Path, *, epochs: int = 12, teacher_epochs: int = 30, workers: int = 2, topk: int = 10,
             train_per_class: int = 40) -> dict:
    from logitcache.build import build
    from logitcache.codec import create_codec
    from logitcache.data.source import open_source
    from logitcache.data.synth import generate_synth
    from logitcache.teacher import Teacher
    from logitcache.views import create_recipe
    from logitcache.trainer.config import TrainConfig
    from logitcache.trainer.losses import LossConfig
    from logitcache.trainer.train import train

    console = Console()
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    timings = {}

    console.rule("[bold]1/5 data")
    t = time.perf_counter()
    if not (data / "dataset.json").exists():
        generate_synth(data, train_per_class=train_per_class)
    timings["data_s"] = time.perf_counter() - t
    console.print(f"dataset at {data}")

    console.rule(f"[bold]2/5 teacher ({TEACHER}, CE, {teacher_epochs} epochs)")
    t = time.perf_counter()
    teacher_sum = train(TrainConfig(data=str(data), student=TEACHER, out=str(out / "teacher"), recipe=RECIPE,
                                    epochs=teacher_epochs, loss=LossConfig(kind="none"), num_workers=workers))
    timings["teacher_s"] = time.perf_counter() - t

    console.rule(f"[bold]3/5 cache ({epochs} epochs of views, top-{topk})")
    source = open_source(str(data), "train")
    teacher = Teacher(TEACHER, weights=str(out / "teacher" / "model.safetensors"))
    cache_url = str(out / "cache.zarr")
    report = build(source, dataset_name="synth", teacher=teacher, recipe=create_recipe(RECIPE),
                   codec=create_codec("topk", source.num_classes, topk), url=cache_url,
                   epochs=list(range(epochs)), batch_size=128, num_workers=workers)
    timings["build_s"] = report.seconds

    runs = {}
    for step, (name, kind) in enumerate((("ce_only", "none"), ("kd_from_cache", "kd")), start=4):
        console.rule(f"[bold]{step}/5 student {STUDENT}: {name}")
        cfg = TrainConfig(data=str(data), student=STUDENT, out=str(out / name), cache=cache_url, epochs=epochs,
                          loss=LossConfig(kind=kind), num_workers=workers)
        runs[name] = train(cfg)

    results = {
        "teacher": {"model": TEACHER, "val_top1": teacher_sum["final_top1"], "epochs": teacher_epochs},
        "student": STUDENT,
        "epochs": epochs,
        "cache": {"url": cache_url, "views": report.views, "views_per_s": report.views_per_s, "topk": topk},
        "runs": {k: {"val_top1": v["final_top1"], "val_top5": v["final_top5"], "wall_seconds": v["wall_seconds"],
                     "train_images_per_s": v["images_per_s"]} for k, v in runs.items()},
        "kd_minus_ce_top1_pp": runs["kd_from_cache"]["final_top1"] - runs["ce_only"]["final_top1"],
        "timings_s": timings,
    }
    (out / "demo_results.json").write_text(json.dumps(results, indent=2))
    _plot(out, list(runs))
    _table(console, results)
    console.print(f"results: {out / 'demo_results.json'}  plot: {out / 'accuracy.png'}")
    return results


def _table(console: Console, r: dict) -> None:
    table = Table(title=f"student {r['student']}, {r['epochs']} epochs, teacher {r['teacher']['model']} "
                        f"(val top-1 {r['teacher']['val_top1']:.2f}%)")
    for col in ("run", "val top-1 %", "val top-5 %", "wall time s", "train images/s"):
        table.add_column(col, justify="right" if col != "run" else "left")
    for name, v in r["runs"].items():
        table.add_row(name, f"{v['val_top1']:.2f}", f"{v['val_top5']:.2f}", f"{v['wall_seconds']:.1f}",
                      f"{v['train_images_per_s']:.0f}")
    console.print(table)
    console.print(f"KD from cache minus CE only: {r['kd_minus_ce_top1_pp']:+.2f} pp top-1; cache built at "
                  f"{r['cache']['views_per_s']:.0f} views/s")


def _plot(out: Path, names: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ["teacher", *names]:
        rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        ax.plot([r["epoch"] + 1 for r in rows], [r["val_top1"] for r in rows], marker="o", ms=3, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("val top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    plt.close(fig)
