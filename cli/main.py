"""The ``logitcache`` command line (typer). Errors meant for users print one line, exit 2."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Offline teacher-logit cache and student trainer for knowledge distillation.")
data_app = typer.Typer(no_args_is_help=True, help="Make the embedded datasets (WebDataset tar shards).")
app.add_typer(data_app, name="data")


def parse_epochs(text: str) -> list[int]:
    """'N' -> 0..N-1; 'A:B' -> A..B-1."""
    try:
        if ":" in text:
            a, b = (int(p) for p in text.split(":", 1))
        else:
            a, b = 0, int(text)
    except ValueError:
        raise typer.BadParameter(f"--epochs takes N or A:B, not {text!r}") from None
    if not 0 <= a < b:
        raise typer.BadParameter(f"--epochs {text}: need 0 <= A < B")
    return list(range(a, b))


@data_app.command("synth")
def data_synth(
    out: Path = typer.Option(Path("data/synth"), help="Output folder."),
    num_classes: int = typer.Option(128, help="Classes (structured: shape x colour x texture)."),
    train_per_class: int = typer.Option(40),
    val_per_class: int = typer.Option(10),
    image_size: int = typer.Option(32, help="Pixels (square)."),
    seed: int = typer.Option(0),
):
    """Write the procedurally generated default dataset (deterministic)."""
    from logitcache.data.synth import generate_synth

    root = generate_synth(out, num_classes=num_classes, train_per_class=train_per_class,
                          val_per_class=val_per_class, image_size=image_size, seed=seed)
    print(f"wrote {root}")


@data_app.command("digits")
def data_digits(out: Path = typer.Option(Path("data/digits")), image_size: int = typer.Option(32),
                seed: int = typer.Option(0)):
    """Write scikit-learn's real digits images as tar shards."""
    from logitcache.data.digits import generate_digits

    print(f"wrote {generate_digits(out, image_size=image_size, seed=seed)}")


@app.command()
def build(
    data: str = typer.Option(..., help="Dataset root (with dataset.json) or image folder; any fsspec URL."),
    teacher: str = typer.Option(..., help="timm model name or alias (beitv2_l, beitv2_b, resnet152)."),
    teacher_weights: Optional[str] = typer.Option(None, help="Weights file (safetensors or a plain state dict)."),
    split: str = typer.Option("train"),
    recipe: str = typer.Option("vanillakd_a2", help="Augmentation recipe name (see logitcache.views.RECIPES)."),
    cache_seed: int = typer.Option(0, help="Root seed of every view seed."),
    out: Optional[str] = typer.Option(None, help="Cache URL (default: a named folder under the cache root)."),
    cache_root: Optional[str] = typer.Option(None, help="Default $LOGITCACHE_ROOT or ~/.cache/logitcache."),
    epochs: str = typer.Option("1", help="N (epochs 0..N-1) or A:B (extend with epochs A..B-1)."),
    codec: str = typer.Option("topk", help="topk or full."),
    topk: int = typer.Option(10, help="Logits kept per view (k >= classes means full)."),
    value_dtype: str = typer.Option("float16", help="float16 or float32."),
    batch_size: int = typer.Option(64, help="Views per teacher batch."),
    workers: int = typer.Option(2, help="DataLoader worker processes."),
    device: str = typer.Option("auto"),
    compile: bool = typer.Option(False, help="torch.compile the teacher."),
    progress: bool = typer.Option(True),
):
    """Run the teacher once over every augmented view and store compressed logits."""
    from logitcache.build import build as run_build, cache_root as root_of, default_cache_name, resolve_device
    from logitcache.codec import create_codec
    from logitcache.data.source import open_source
    from logitcache.teacher import Teacher
    from logitcache.views import create_recipe

    rec = create_recipe(recipe, cache_seed=cache_seed)
    epoch_list = parse_epochs(epochs)
    dev = resolve_device(device)
    t = Teacher(teacher, weights=teacher_weights, device=dev, compile=compile)  # fail fast on weights
    source = open_source(data, split)
    spec = create_codec(codec, source.num_classes, topk, value_dtype)
    name = _dataset_name(data)
    url = out or f"{root_of(cache_root).rstrip('/')}/{default_cache_name(name, split, t.name, rec, spec)}"
    report = run_build(source, dataset_name=name, teacher=t, recipe=rec, codec=spec, url=url, epochs=epoch_list,
                       batch_size=batch_size, num_workers=workers, progress=progress)
    print(f"cache {report.url}: {report.units_written} units written, {report.units_skipped} already committed, "
          f"{report.views} views in {report.seconds:.1f} s ({report.views_per_s:.1f} views/s)")


def _dataset_name(data: str) -> str:
    """The dataset's name from its dataset.json, else the folder name."""
    import fsspec

    try:
        with fsspec.open(data.rstrip("/") + "/dataset.json", "r") as f:
            return json.load(f)["name"]
    except (FileNotFoundError, KeyError, ValueError):
        return os.path.basename(data.rstrip("/")) or "data"


@app.command()
def train(
    data: str = typer.Option(..., help="Dataset root with train and val splits."),
    student: str = typer.Option("resnet50", help="Any timm model name."),
    out: str = typer.Option("runs/student", help="Output folder: metrics.jsonl, model.safetensors, summary.json."),
    cache: Optional[str] = typer.Option(None, help="Cache URL (default: the one cache for this data under the cache root)."),
    cache_root: Optional[str] = typer.Option(None),
    kd: str = typer.Option("kd", help="kd (vanilla KD), dkd, dist, or none (plain CE, no cache)."),
    temperature: float = typer.Option(1.0),
    kd_weight: float = typer.Option(1.0),
    hard_weight: float = typer.Option(1.0),
    hard_loss: str = typer.Option("ce", help="ce or bce on the (mixed) label targets."),
    recipe: str = typer.Option("demo32", help="Augmentation recipe when no cache is used."),
    epochs: int = typer.Option(10),
    reuse_epochs: bool = typer.Option(False, help="Cycle cached epochs when training longer than the cache."),
    batch_size: int = typer.Option(128, help="Global batch, in views."),
    opt: str = typer.Option("adamw", help="timm optimiser name (adamw, lamb, sgd, ...)."),
    lr: float = typer.Option(2e-3),
    weight_decay: float = typer.Option(0.05),
    warmup_epochs: int = typer.Option(1),
    label_smoothing: float = typer.Option(0.0),
    clip_grad: Optional[float] = typer.Option(None),
    workers: int = typer.Option(2),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto"),
    progress: bool = typer.Option(True),
):
    """Train a student from cached teacher logits (no teacher weights are loaded)."""
    from trainer.losses import LossConfig
    from trainer.train import TrainConfig, train as run_train

    cfg = TrainConfig(
        data=data, student=student, out=out, cache=cache, cache_root=cache_root, recipe=recipe, epochs=epochs,
        reuse_epochs=reuse_epochs, batch_size=batch_size, opt=opt, lr=lr, weight_decay=weight_decay,
        warmup_epochs=warmup_epochs, label_smoothing=label_smoothing, clip_grad=clip_grad, num_workers=workers,
        seed=seed, device=device, progress=progress,
        loss=LossConfig(kind=kd, temperature=temperature, kd_weight=kd_weight, hard_weight=hard_weight,
                        hard_kind=hard_loss),
    )
    summary = run_train(cfg)
    print(f"final val top-1 {summary['final_top1']:.2f}%  top-5 {summary['final_top5']:.2f}%  -> {out}")


@app.command()
def demo(
    out: Path = typer.Option(Path("demo_out"), help="Everything the demo makes goes here."),
    epochs: int = typer.Option(12, help="Student epochs (and cached epochs)."),
    teacher_epochs: int = typer.Option(24),
    workers: int = typer.Option(2),
):
    """The whole product on the embedded data: data -> teacher -> cache -> two students."""
    from cli.demo import run_demo

    run_demo(out, epochs=epochs, teacher_epochs=teacher_epochs, workers=workers)


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    from logitcache.errors import LogitcacheError

    try:
        app()
    except LogitcacheError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
