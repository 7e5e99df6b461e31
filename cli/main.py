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
data_app = typer.Typer(no_args_is_help=True, help="Make the embedded datasets (WebDataset tar shards); index shards.")
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


@data_app.command("index")
def data_index(urls: list[str] = typer.Argument(..., help="Dataset roots (with dataset.json) or tar shard URLs "
                                                          "(brace patterns allowed); any fsspec URL.")):
    """Write each tar shard's member index beside it (<shard>.idx.json): opening the data then reads
    one small file per shard instead of walking every shard's headers. Re-run after rewriting shards."""
    from logitcache.data.index_file import index_and_write
    from logitcache.data.source import tar_shard_urls

    for url in urls:
        shard_urls, num_classes = tar_shard_urls(url)
        indexes = index_and_write(shard_urls, num_classes)
        print(f"indexed {len(indexes)} shards, {sum(len(ix.keys) for ix in indexes)} samples: {url}")


def _build_rank(*, data, teacher, teacher_weights, split, recipe, cache_seed, out, cache_root, epochs, codec, topk,
                value_dtype, batch_size, workers, device, compile, progress, recheck, allow_view_drift) -> None:
    """The body of ``build`` for one process: the whole build, or one rank of it when the
    environment says so (WORLD_SIZE > 1: torchrun, or a child started by ``--procs``)."""
    from logitcache import distributed
    from logitcache.build import build as run_build, cache_root as root_of, default_cache_name, resolve_device
    from logitcache.codec import create_codec
    from logitcache.data.source import open_source
    from logitcache.teacher import Teacher
    from logitcache.views import create_recipe

    rec = create_recipe(recipe, cache_seed=cache_seed)
    epoch_list = parse_epochs(epochs)
    dev = distributed.rank_device(resolve_device(device))
    source = open_source(data, split)
    t = Teacher(teacher, weights=teacher_weights, num_classes=source.num_classes, device=dev, compile=compile)
    spec = create_codec(codec, source.num_classes, topk, value_dtype)
    name = _dataset_name(data)
    url = out or f"{root_of(cache_root).rstrip('/')}/{default_cache_name(name, split, t.name, rec, spec)}"
    ctx = distributed.init_from_env(dev)
    try:
        report = run_build(source, dataset_name=name, teacher=t, recipe=rec, codec=spec, url=url, epochs=epoch_list,
                           batch_size=batch_size, num_workers=workers, rank=ctx.rank, world_size=ctx.world_size,
                           barrier=ctx.barrier, progress=progress and ctx.rank == 0, recheck=recheck,
                           allow_view_drift=allow_view_drift)
    finally:
        ctx.close()
    who = f"rank {ctx.rank}/{ctx.world_size}: " if ctx.world_size > 1 else ""
    print(f"{who}cache {report.url}: {report.units_written} units written, {report.units_skipped} already committed, "
          f"{report.views} views in {report.seconds:.1f} s ({report.views_per_s:.1f} views/s)", flush=True)


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
    workers: Optional[int] = typer.Option(None, help="DataLoader worker processes per build process [CPU: 1, "
                                                     "CUDA: up to 8; see logitcache.build.default_workers]."),
    device: str = typer.Option("auto"),
    compile: bool = typer.Option(False, help="torch.compile the teacher."),
    progress: bool = typer.Option(True),
    procs: int = typer.Option(1, help="Build processes on this machine (ranks; each writes its own units)."),
    recheck: bool = typer.Option(False, help="Read every committed unit back, check it against its commit "
                                             "record, and rebuild the damaged ones."),
    allow_view_drift: bool = typer.Option(False, help="Add to a cache even when views rendered here differ from "
                                                      "those its teacher saw (library versions)."),
):
    """Run the teacher once over every augmented view and store compressed logits.

    The cache is written in whole units (epoch x data shard), each committed last: a build
    that was killed or interrupted finishes when run again with the same arguments, and
    ``--epochs A:B`` extends a cache while students read its complete epochs.

    Several processes: ``--procs N`` runs N ranks on this machine; or launch with
    ``torchrun --nproc-per-node N logitcache build ...`` (one or more machines; ranks from
    RANK/WORLD_SIZE/LOCAL_RANK; on CUDA rank r uses cuda:LOCAL_RANK). Units are dealt out
    round-robin; ``--workers`` is per process. The cache is byte-identical to a one-process
    build when every process uses the same number of CPU threads (OMP_NUM_THREADS; torchrun
    sets 1): CPU kernels round differently with other thread counts.

    Object storage: --data and --out take any fsspec URL (s3://, gs://, ...). For an
    S3-compatible server set AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) and the usual
    AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_DEFAULT_REGION; any other s3fs option
    can be given as FSSPEC_S3_<OPTION> (fsspec's environment configuration). Data on
    object storage: `logitcache data index URL...` once, so each process opens the shards
    from their small index files; LOGITCACHE_SHARD_CACHE=DIR keeps local copies of shards.
    """
    opts = {k: v for k, v in locals().items() if k != "procs"}
    if procs < 1:
        raise typer.BadParameter(f"--procs must be >= 1, not {procs}")
    if procs == 1:
        _build_rank(**opts)
        return
    import functools

    from logitcache import distributed

    if distributed.env_world_size() > 1:
        raise typer.BadParameter("--procs starts its own ranks; do not combine it with torchrun")
    code = distributed.run_procs(functools.partial(_build_rank, **opts), procs)
    if code:
        raise typer.Exit(code)


def _dataset_name(data: str) -> str:
    """The dataset's name from its dataset.json, else the folder name."""
    import fsspec

    try:
        with fsspec.open(data.rstrip("/") + "/dataset.json", "r") as f:
            return json.load(f)["name"]
    except (FileNotFoundError, KeyError, ValueError):
        return os.path.basename(data.rstrip("/")) or "data"


#: train flags that belong to the loss (LossConfig) and to MKD (MKDConfig), by field name.
_LOSS_FLAGS = {"kd": "kind", "temperature": "temperature", "kd_weight": "kd_weight", "hard_weight": "hard_weight",
               "hard_loss": "hard_kind", "dkd_alpha": "dkd_alpha", "dkd_beta": "dkd_beta",
               "dkd_warmup_epochs": "dkd_warmup_epochs", "dist_beta": "dist_beta", "dist_gamma": "dist_gamma"}
_MKD_FLAGS = {"mkd_meta_every": "meta_every", "mkd_meta_lr": "meta_lr", "mkd_predictor": "predictor"}


@app.command()
def train(
    data: Optional[str] = typer.Option(None, help="Dataset root with train and val splits."),
    config: Optional[Path] = typer.Option(None, help="YAML/TOML file with TrainConfig settings; flags override it."),
    student: Optional[str] = typer.Option(None, help="Any timm model name [resnet50]."),
    out: Optional[str] = typer.Option(None, help="Output folder [runs/student]."),
    cache: Optional[str] = typer.Option(None, help="Cache URL (default: the one cache for this data under the cache root)."),
    cache_root: Optional[str] = typer.Option(None),
    kd: Optional[str] = typer.Option(None, help="kd (vanilla KD), mkd (learned temperatures), dkd, dist, none [kd]."),
    temperature: Optional[float] = typer.Option(None, help="KD temperature [1.0]."),
    kd_weight: Optional[float] = typer.Option(None, help="Weight of the distillation term [1.0]."),
    hard_weight: Optional[float] = typer.Option(None, help="Weight of the hard-label loss [1.0]."),
    hard_loss: Optional[str] = typer.Option(None, help="ce or bce on the (mixed) label targets [ce]."),
    dkd_alpha: Optional[float] = typer.Option(None),
    dkd_beta: Optional[float] = typer.Option(None),
    dkd_warmup_epochs: Optional[float] = typer.Option(None),
    dist_beta: Optional[float] = typer.Option(None),
    dist_gamma: Optional[float] = typer.Option(None),
    mkd_meta_every: Optional[int] = typer.Option(None, help="MKD: meta step every N student steps [10]."),
    mkd_meta_lr: Optional[float] = typer.Option(None, help="MKD: learning rate of the temperatures."),
    meta_fraction: Optional[float] = typer.Option(None, help="MKD: share of training samples held out as the meta split [0.05]."),
    mkd_predictor: Optional[bool] = typer.Option(None, "--mkd-predictor/--no-mkd-predictor",
                                                 help="MKD: per-sample temperatures from a small network."),
    online_teacher: Optional[bool] = typer.Option(None, "--online-teacher/--no-online-teacher",
                                                  help="Run the teacher on the views instead of reading the cache."),
    teacher: Optional[str] = typer.Option(None, help="Online teacher (default: the cache's teacher)."),
    teacher_weights: Optional[str] = typer.Option(None, help="Online teacher weights file."),
    recipe: Optional[str] = typer.Option(None, help="Augmentation recipe when no cache is used [demo32]."),
    epochs: Optional[int] = typer.Option(None, help="[10]"),
    reuse_epochs: Optional[bool] = typer.Option(None, "--reuse-epochs/--no-reuse-epochs",
                                                help="Cycle cached epochs when training longer than the cache."),
    allow_view_drift: Optional[bool] = typer.Option(
        None, "--allow-view-drift/--no-allow-view-drift",
        help="Train even when views rendered here differ from those the teacher saw (library versions)."),
    batch_size: Optional[int] = typer.Option(None, help="Global batch, in views [128]."),
    opt: Optional[str] = typer.Option(None, help="timm optimiser name: adamw, lamb, sgd, ... [adamw]."),
    lr: Optional[float] = typer.Option(None, help="[2e-3]"),
    weight_decay: Optional[float] = typer.Option(None, help="[0.05]"),
    momentum: Optional[float] = typer.Option(None, help="Momentum for SGD-like optimisers [0.9]."),
    sched: Optional[str] = typer.Option(None, help="timm scheduler name [cosine]."),
    min_lr: Optional[float] = typer.Option(None, help="Final learning rate of the schedule [1e-5]."),
    warmup_epochs: Optional[int] = typer.Option(None, help="[1]"),
    label_smoothing: Optional[float] = typer.Option(None, help="[0.0]"),
    clip_grad: Optional[float] = typer.Option(None),
    model_ema: Optional[bool] = typer.Option(None, "--model-ema/--no-model-ema"),
    model_ema_decay: Optional[float] = typer.Option(None),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the student."),
    deterministic: Optional[bool] = typer.Option(None, "--deterministic/--no-deterministic"),
    resume: Optional[bool] = typer.Option(None, "--resume/--no-resume", help="Continue from <out>/checkpoint."),
    limit_batches: Optional[int] = typer.Option(None, help="At most this many batches per epoch."),
    workers: Optional[int] = typer.Option(None, help="DataLoader workers per process [2]."),
    seed: Optional[int] = typer.Option(None),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda [auto]."),
    tensorboard: Optional[bool] = typer.Option(None, "--tensorboard/--no-tensorboard"),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress"),
):
    """Train a student from cached teacher logits (no teacher weights are loaded).

    Under torchrun, every rank trains on its slice of the same global batches (DDP)."""
    flags = dict(locals())  # first: only the parameters
    from logitcache.errors import LogitcacheError
    from logitcache.trainer.config import load_config, make_config
    from logitcache.trainer.train import train as run_train

    settings = load_config(config) if config else {}
    loss = dict(settings.get("loss") or {})
    mkd = settings.get("mkd")
    for flag, name in _LOSS_FLAGS.items():
        if flags[flag] is not None:
            loss[name] = flags[flag]
    if loss.get("kind") == "mkd":  # MKD = vanilla KD with learned temperatures
        loss["kind"] = "kd"
        mkd = dict(mkd or {})
    for flag, name in _MKD_FLAGS.items():
        if flags[flag] is not None:
            mkd = dict(mkd or {})
            mkd[name] = flags[flag]
    renamed = {"workers": "num_workers"}
    skip = {"config", "data", *(_LOSS_FLAGS), *(_MKD_FLAGS)}
    for flag, value in flags.items():
        if flag not in skip and value is not None:
            settings[renamed.get(flag, flag)] = value
    if data is not None:
        settings["data"] = data
    if "data" not in settings:
        raise LogitcacheError("train needs --data (or `data:` in the --config file)")
    settings["loss"] = loss
    settings["mkd"] = mkd
    summary = run_train(make_config(settings))
    if summary:
        print(f"final val top-1 {summary['final_top1']:.2f}%  top-5 {summary['final_top5']:.2f}%  -> "
              f"{summary['weights']}")


@app.command()
def demo(
    out: Path = typer.Option(Path("demo_out"), help="Everything the demo makes goes here."),
    epochs: int = typer.Option(12, help="Student epochs (and cached epochs)."),
    teacher_epochs: int = typer.Option(30, help="Teacher epochs (plain CE)."),
    workers: int = typer.Option(2),
):
    """The whole product on the embedded data: data -> teacher -> cache -> two students."""
    from logitcache.cli.demo import run_demo

    run_demo(out, epochs=epochs, teacher_epochs=teacher_epochs, workers=workers)


from logitcache.cli.cache_tools import register as _register_cache_tools  # noqa: E402 - inspect, verify, ls

_register_cache_tools(app)


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    from logitcache.errors import LogitcacheError

    from logitcache.trainer.checkpoint import TrainingStopped

    try:
        app()
    except LogitcacheError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingStopped as e:
        print(str(e), file=sys.stderr)
        sys.exit(143)  # the conventional status of a SIGTERM stop


if __name__ == "__main__":
    main()
