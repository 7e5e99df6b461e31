"""The ``logitcache`` command line (typer). Errors meant for users print one line, exit 2."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperArgument

# typer (0.2x) prints a positional argument's Python type ("<str>") beside its metavar; show
# click's usual type name instead ("TEXT"), as the options do.
_CLICK_TYPE_NAMES = {"str": "TEXT", "int": "INTEGER", "float": "FLOAT", "Path": "PATH", "bool": "BOOLEAN"}
TyperArgument.display_type_rich = lambda self, ctx: _CLICK_TYPE_NAMES.get(self.bare_type(), self.bare_type().upper())

# Markdown help: docstring paragraphs reflow to the terminal's width.
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode="markdown",
                  help="Offline teacher-logit cache and student trainer for knowledge distillation.")
data_app = typer.Typer(no_args_is_help=True, rich_markup_mode="markdown",
                       help="Make the embedded datasets (WebDataset tar shards); index shards.")
app.add_typer(data_app, name="data")


@data_app.command("synth")
def data_synth(
    out: Path = typer.Option(Path("data/synth"), metavar="PATH", help="Output folder."),
    num_classes: int = typer.Option(128, metavar="INTEGER", help="Classes, 2 to 128 (shape x colour x texture)."),
    train_per_class: int = typer.Option(40, metavar="INTEGER", help="Training images per class."),
    val_per_class: int = typer.Option(10, metavar="INTEGER", help="Validation images per class."),
    image_size: int = typer.Option(32, metavar="INTEGER", help="Image side in pixels (at least 8)."),
    seed: int = typer.Option(0, metavar="INTEGER", help="Seed of every image."),
):
    """Write the procedurally generated default dataset (deterministic)."""
    from logitcache.data.synth import generate_synth

    root = generate_synth(out, num_classes=num_classes, train_per_class=train_per_class,
                          val_per_class=val_per_class, image_size=image_size, seed=seed)
    print(f"wrote {root}")


@data_app.command("digits")
def data_digits(out: Path = typer.Option(Path("data/digits"), metavar="PATH", help="Output folder."),
                image_size: int = typer.Option(32, metavar="INTEGER", help="Image side in pixels."),
                seed: int = typer.Option(0, metavar="INTEGER", help="Seed of the train/val split.")):
    """Write scikit-learn's real digits images as tar shards."""
    from logitcache.data.digits import generate_digits

    print(f"wrote {generate_digits(out, image_size=image_size, seed=seed)}")


@data_app.command("index")
def data_index(urls: list[str] = typer.Argument(..., metavar="URL...",
                                                help="Dataset roots (with dataset.json) or tar shard URLs "
                                                     "(brace patterns allowed); any fsspec URL.")):
    """Write each tar shard's member index beside it (`<shard>.idx.json`).

    Opening the data then reads one small file per shard instead of walking every shard's
    headers. Re-run after rewriting shards."""
    from logitcache.data.index_file import index_and_write
    from logitcache.data.source import tar_shard_urls

    for url in urls:
        shard_urls, num_classes = tar_shard_urls(url)
        indexes = index_and_write(shard_urls, num_classes)
        print(f"indexed {len(indexes)} shards, {sum(len(ix.keys) for ix in indexes)} samples: {url}")


from logitcache.cli.build_command import register as _register_build  # noqa: E402 - build

_register_build(app)


#: train flags that belong to the loss (LossConfig) and to MKD (MKDConfig), by field name.
_LOSS_FLAGS = {"kd": "kind", "temperature": "temperature", "kd_weight": "kd_weight", "hard_weight": "hard_weight",
               "hard_loss": "hard_kind", "dkd_alpha": "dkd_alpha", "dkd_beta": "dkd_beta",
               "dkd_warmup_epochs": "dkd_warmup_epochs", "dist_beta": "dist_beta", "dist_gamma": "dist_gamma",
               "feature_weight": "feature_weight"}
_MKD_FLAGS = {"mkd_meta_every": "meta_every", "mkd_meta_lr": "meta_lr", "mkd_predictor": "predictor"}
_PROKT_FLAGS = {"prokt_lambda": "lam", "prokt_teacher_lr": "teacher_lr"}
_TEACHERS_FLAGS = {"teachers_mode": "mode", "teacher_mix": "mix", "teacher_temperatures": "temperatures"}


def _numbers(flag: str, text: str) -> list[float]:
    """'0.7,0.3' -> [0.7, 0.3] (a per-teacher list flag)."""
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise typer.BadParameter(f"--{flag.replace('_', '-')} takes numbers separated by commas, "
                                 f"one per --cache, not {text!r}") from None


def _teachers_table(flags: dict, table: dict | None) -> dict:
    """The ``teachers:`` table (several caches: how they teach), its flags on top."""
    table = dict(table or {})
    for flag, name in _TEACHERS_FLAGS.items():
        if flags[flag] is not None:
            table[name] = flags[flag] if flag == "teachers_mode" else _numbers(flag, flags[flag])
    return table


def _method_table(loss: dict, flags: dict, kind: str, table_flags: dict, table: dict | None) -> dict | None:
    """``--kd mkd`` / ``--kd prokt``: vanilla KD plus the method's table (``mkd:`` / ``prokt:``),
    which its flags fill in; the table as it stands otherwise (None when not asked for)."""
    if loss.get("kind") == kind:
        loss["kind"] = "kd"
        table = dict(table or {})
    for flag, name in table_flags.items():
        if flags[flag] is not None:
            table = dict(table or {})
            table[name] = flags[flag]
    return table


def _train_settings(flags: dict, settings: dict) -> dict:
    """``train``'s settings: the --config file's ``settings`` with the flags given on top; the
    loss, MKD and ProKT flags go to their tables (``--kd mkd`` / ``--kd prokt`` are vanilla KD
    plus an ``mkd`` / ``prokt`` table; ProKT turns the online teacher on)."""
    from logitcache.errors import LogitcacheError

    loss = dict(settings.get("loss") or {})
    mkd = settings.get("mkd")
    prokt = settings.get("prokt")
    for flag, name in _LOSS_FLAGS.items():
        if flags[flag] is not None:
            loss[name] = flags[flag]
    mkd = _method_table(loss, flags, "mkd", _MKD_FLAGS, mkd)  # MKD = vanilla KD with learned temperatures
    prokt = _method_table(loss, flags, "prokt", _PROKT_FLAGS, prokt)  # ProKT = vanilla KD, teacher trained along
    if prokt is not None and flags["online_teacher"] is None:  # ProKT trains the teacher: online only
        settings["online_teacher"] = True
    settings["teachers"] = _teachers_table(flags, settings.get("teachers"))
    if flags["cache"]:  # repeated: one cache per teacher
        settings["cache"] = flags["cache"][0] if len(flags["cache"]) == 1 else list(flags["cache"])
    renamed = {"workers": "num_workers"}
    skip = {"config", "data", "cache", *(_LOSS_FLAGS), *(_MKD_FLAGS), *(_PROKT_FLAGS), *(_TEACHERS_FLAGS)}
    for flag, value in flags.items():
        if flag not in skip and value is not None:
            settings[renamed.get(flag, flag)] = value
    if flags["data"] is not None:
        settings["data"] = flags["data"]
    if "data" not in settings:
        raise LogitcacheError("train needs --data (or `data:` in the --config file)")
    settings["loss"] = loss
    settings["mkd"] = mkd
    settings["prokt"] = prokt
    return settings


#: train's options added for the papers' commands (module constants: train's signature stays short).
_LR_BASE_SIZE = typer.Option(None, metavar="INTEGER", show_default="no scaling",
                             help="--lr is the rate at this global batch: the run uses lr x batch-size / this (DeiT: 512).")
_WARMUP_LR = typer.Option(None, metavar="FLOAT", show_default="1% of the peak lr", help="First learning rate of the warm-up.")
_SCHED_ON_UPDATES = typer.Option(None, "--sched-on-updates/--no-sched-on-updates", show_default="yes",
                                 help="Move the learning rate every step; --no-sched-on-updates: every epoch (timm's "
                                      "train.py default, the papers' runs).")
_DROP = typer.Option(None, metavar="FLOAT", show_default="0.0", help="Dropout before the student's classifier.")
_DROP_PATH = typer.Option(None, metavar="FLOAT", show_default="the model's", help="Stochastic depth rate of the student.")
_RECIPE = typer.Option(None, metavar="NAME", show_default="the cache's; without one demo32",
                       help="Augmentation recipe: without a cache, the views'; with one, checked against the cache's.")
_ALLOW_VIEW_DRIFT = typer.Option(None, "--allow-view-drift/--no-allow-view-drift", show_default="no",
                                 help="Train even when views rendered here differ from those the teacher saw "
                                      "(library versions).")
_SKIP_DAMAGED = typer.Option(None, "--skip-damaged-epochs/--no-skip-damaged-epochs", show_default="no",
                             help="Train on the other epochs when an epoch its build finished has lost a unit or "
                                  "its folder (repair it with build --recheck instead).")
_CACHE = typer.Option(None, metavar="URL", show_default="the one cache for this data under the cache root",
                      help="Cache URL; repeat it for several teachers' caches on the same views (--teachers-mode).")
_CACHE_ROOT = typer.Option(None, metavar="URL", show_default="$LOGITCACHE_ROOT or ~/.cache/logitcache",
                           help="Where named caches live.")
_TEACHERS_MODE = typer.Option(None, metavar="mean-probs|mean-logits|per-teacher|ca-mkd", show_default="mean-probs",
                              help="Several caches: distil their mean probabilities, mean logits, one term per "
                                   "teacher, or CA-MKD's per-sample confidence weights (Zhang et al., ICASSP 2022).")
_TEACHER_MIX = typer.Option(None, metavar="W1,W2,...", show_default="equal",
                            help="Several caches: fixed teacher weights, in --cache order.")
_TEACHER_TEMPERATURES = typer.Option(None, metavar="T1,T2,...", show_default="--temperature",
                                     help="--teachers-mode per-teacher: each teacher's KD temperature.")
_KD = typer.Option(None, metavar="kd|mkd|prokt|projector|dkd|dist|deit-hard|deit-soft|none", show_default="kd",
                 help="Distillation term: vanilla KD, KD with learned temperatures, KD from a teacher trained along "
                      "(ProKT; online teacher, no cache), KD plus projector feature distillation (a cache built with "
                      "--features, or the online teacher), DKD, DIST, DeiT's distillation token (hard: the teacher's "
                      "top-1, soft: KL at --temperature; a deit_*_distilled_* student) or none.")


@app.command()
def train(
    data: Optional[str] = typer.Option(None, metavar="URL", help="Dataset root with train and val splits."),
    config: Optional[Path] = typer.Option(None, metavar="PATH", help="YAML/TOML file of TrainConfig settings; flags override it."),
    student: Optional[str] = typer.Option(None, metavar="NAME", show_default="resnet50", help="Any timm model name."),
    out: Optional[str] = typer.Option(None, metavar="PATH", show_default="runs/student", help="Output folder."),
    cache: Optional[list[str]] = _CACHE,
    cache_root: Optional[str] = _CACHE_ROOT,
    kd: Optional[str] = _KD,
    teachers_mode: Optional[str] = _TEACHERS_MODE,
    teacher_mix: Optional[str] = _TEACHER_MIX,
    teacher_temperatures: Optional[str] = _TEACHER_TEMPERATURES,
    temperature: Optional[float] = typer.Option(None, metavar="FLOAT", show_default="1.0", help="KD temperature."),
    kd_weight: Optional[float] = typer.Option(None, metavar="FLOAT", show_default="1.0", help="Weight of the distillation term."),
    hard_weight: Optional[float] = typer.Option(None, metavar="FLOAT", show_default="1.0", help="Weight of the hard-label loss."),
    hard_loss: Optional[str] = typer.Option(None, metavar="ce|bce", show_default="ce", help="Loss on the (mixed) label targets."),
    dkd_alpha: Optional[float] = typer.Option(None, metavar="FLOAT", show_default="1.0", help="DKD: weight of the target-class term."),
    dkd_beta: Optional[float] = typer.Option(None, metavar="FLOAT", show_default="1.0", help="DKD: weight of the non-target term."),
    dkd_warmup_epochs: Optional[float] = typer.Option(None, metavar="FLOAT", show_default="0.0", help="DKD: linear warm-up, in epochs."),
    dist_beta: Optional[float] = typer.Option(None, metavar="FLOAT", show_default="1.0", help="DIST: weight of the inter-class relation."),
    dist_gamma: Optional[float] = typer.Option(None, metavar="FLOAT", show_default="1.0", help="DIST: weight of the intra-class relation."),
    feature_weight: Optional[float] = typer.Option(None, metavar="FLOAT", show_default="1.0", help="Projector: weight of the feature distance."),
    mkd_meta_every: Optional[int] = typer.Option(None, metavar="INTEGER", show_default="10", help="MKD: a meta step every N student steps."),
    mkd_meta_lr: Optional[float] = typer.Option(None, metavar="FLOAT", show_default="0.01", help="MKD: learning rate of the temperatures."),
    meta_fraction: Optional[float] = typer.Option(None, metavar="FLOAT", show_default="0.05",
                                                  help="MKD: share of training samples held out as the meta split."),
    mkd_predictor: Optional[bool] = typer.Option(None, "--mkd-predictor/--no-mkd-predictor", show_default="no",
                                                 help="MKD: per-sample temperatures from a small network."),
    prokt_lambda: Optional[float] = typer.Option(None, metavar="FLOAT", show_default="0.4",
                                                 help="ProKT: weight of the teacher's pull towards the student, in [0, 1]."),
    prokt_teacher_lr: Optional[float] = typer.Option(None, metavar="FLOAT", show_default="0.1 x --lr",
                                                     help="ProKT: peak learning rate of the teacher."),
    online_teacher: Optional[bool] = typer.Option(None, "--online-teacher/--no-online-teacher", show_default="no",
                                                  help="Run the teacher on the views instead of reading the cache."),
    teacher: Optional[str] = typer.Option(None, metavar="NAME", show_default="the cache's teacher", help="Online teacher."),
    teacher_weights: Optional[str] = typer.Option(None, metavar="PATH", show_default="timm's pretrained weights",
                                                  help="Online teacher weights file."),
    recipe: Optional[str] = _RECIPE,
    epochs: Optional[int] = typer.Option(None, metavar="INTEGER", show_default="10", help="Student epochs."),
    reuse_epochs: Optional[bool] = typer.Option(None, "--reuse-epochs/--no-reuse-epochs", show_default="no",
                                                help="Cycle cached epochs when training longer than the cache."),
    allow_view_drift: Optional[bool] = _ALLOW_VIEW_DRIFT,
    skip_damaged_epochs: Optional[bool] = _SKIP_DAMAGED,
    batch_size: Optional[int] = typer.Option(None, metavar="INTEGER", show_default="128", help="Global batch, in views."),
    opt: Optional[str] = typer.Option(None, metavar="NAME", show_default="adamw", help="timm optimiser name: adamw, lamb, sgd, ..."),
    lr: Optional[float] = typer.Option(None, metavar="FLOAT", show_default="2e-3", help="Peak learning rate."),
    lr_base_size: Optional[int] = _LR_BASE_SIZE,
    warmup_lr: Optional[float] = _WARMUP_LR,
    sched_on_updates: Optional[bool] = _SCHED_ON_UPDATES,
    drop: Optional[float] = _DROP,
    drop_path: Optional[float] = _DROP_PATH,
    weight_decay: Optional[float] = typer.Option(None, metavar="FLOAT", show_default="0.05", help="Weight decay."),
    momentum: Optional[float] = typer.Option(None, metavar="FLOAT", show_default="0.9", help="Momentum for SGD-like optimisers."),
    sched: Optional[str] = typer.Option(None, metavar="NAME", show_default="cosine", help="timm scheduler name: cosine, step, ..."),
    min_lr: Optional[float] = typer.Option(None, metavar="FLOAT", show_default="1e-5", help="Final learning rate of the schedule."),
    warmup_epochs: Optional[int] = typer.Option(None, metavar="INTEGER", show_default="1", help="Linear learning-rate warm-up, in epochs."),
    label_smoothing: Optional[float] = typer.Option(None, metavar="FLOAT", show_default="0.0", help="Label smoothing of the hard targets."),
    clip_grad: Optional[float] = typer.Option(None, metavar="FLOAT", show_default="no clipping", help="Clip the gradient norm to this."),
    model_ema: Optional[bool] = typer.Option(None, "--model-ema/--no-model-ema", show_default="no",
                                             help="Keep an EMA of the student's weights."),
    model_ema_decay: Optional[float] = typer.Option(None, metavar="FLOAT", show_default="0.9998", help="Decay of the weights' EMA."),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", show_default="no", help="torch.compile the student."),
    deterministic: Optional[bool] = typer.Option(None, "--deterministic/--no-deterministic", show_default="no",
                                                 help="torch.use_deterministic_algorithms."),
    resume: Optional[bool] = typer.Option(None, "--resume/--no-resume", show_default="no", help="Continue from <out>/checkpoint."),
    limit_batches: Optional[int] = typer.Option(None, metavar="INTEGER", show_default="all", help="At most this many batches per epoch."),
    workers: Optional[int] = typer.Option(None, metavar="INTEGER", show_default="2", help="DataLoader workers per process."),
    seed: Optional[int] = typer.Option(None, metavar="INTEGER", show_default="0", help="Seed of the batch order and the student's init."),
    device: Optional[str] = typer.Option(None, metavar="TEXT", show_default="auto", help="auto, cpu, cuda or cuda:N."),
    tensorboard: Optional[bool] = typer.Option(None, "--tensorboard/--no-tensorboard", show_default="yes", help="Write TensorBoard logs."),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", show_default="yes", help="Show a progress bar."),
):
    """Train a student from cached teacher logits (and features), loading no teacher weights.

    `--online-teacher` runs the teacher on the same views instead; `--kd prokt` trains one
    along with the student (online only). `--cache A --cache B`: several teachers' caches on
    the same views teach together (--teachers-mode). Under torchrun, every rank trains on its slice of the same global batches (DDP)."""
    _run_train(dict(locals()))  # first: only the parameters


def _run_train(flags: dict) -> None:
    """``train`` with its flags (None: not given) over the --config file's settings."""
    from logitcache.trainer.config import load_config, make_config
    from logitcache.trainer.train import train as run_train

    config = flags["config"]
    summary = run_train(make_config(_train_settings(flags, load_config(config) if config else {})))
    if summary:
        print(f"final val top-1 {summary['final_top1']:.2f}%  top-5 {summary['final_top5']:.2f}%  -> "
              f"{summary['weights']}")


from logitcache.cli.demo_teacher import DEMO_EPOCHS, TEACHER_EPOCHS  # noqa: E402 - no heavy imports


@app.command()
def demo(
    out: Path = typer.Option(Path("demo_out"), metavar="PATH", help="Everything the demo makes goes here."),
    epochs: int = typer.Option(DEMO_EPOCHS, metavar="INTEGER", min=1, help="Student epochs (and cached epochs)."),
    train_per_class: int = typer.Option(40, metavar="INTEGER", min=1, help="Training images per class."),
    workers: int = typer.Option(2, metavar="INTEGER", min=0, help="DataLoader workers."),
):
    """The whole product on the embedded data: the shipped teacher, one cache, a CNN and a ViT
    student (each CE only and KD from the cache) and one online-KD run for the time it costs.
    A second run in the same --out reuses the data and the cache."""
    from logitcache.cli.demo import run_demo

    run_demo(out, epochs=epochs, workers=workers, train_per_class=train_per_class)


@app.command("demo-teacher")
def demo_teacher(
    work: Path = typer.Option(Path("runs/demo_teacher"), metavar="PATH", help="Its data and its run go here."),
    epochs: int = typer.Option(TEACHER_EPOCHS, metavar="INTEGER", min=1, help="Teacher epochs."),
    install: bool = typer.Option(True, help="Copy the weights and their record into cli/assets."),
):
    """Train the demo's teacher (`make teacher`): ResNet-18 on its own synthetic images at 64 px,
    float16 weights and a record (sha256, val top-1 on the demo's val split) in cli/assets."""
    from logitcache.cli.demo_teacher import train_demo_teacher

    record = train_demo_teacher(work, epochs=epochs, install=install)
    print(f"teacher val top-1 {record['val_top1']:.2f}% on the demo's val split; sha256 {record['sha256']}")


from logitcache.cli.cache_tools import register as _register_cache_tools  # noqa: E402 - inspect, verify, ls

_register_cache_tools(app)


def main() -> None:
    """Console entry point: user errors (ours and the command line's) become one line on
    stderr and exit code 2."""
    from logitcache.errors import LogitcacheError
    from logitcache.trainer.checkpoint import TrainingStopped

    try:
        code = app(prog_name="logitcache", standalone_mode=False)
    except typer.TyperException as e:  # typer's own (vendored click) exceptions
        if type(e).__name__ == "NoArgsIsHelpError":  # a bare command group: its help, as typer prints it
            e.show()
            sys.exit(e.exit_code)
        # an unknown flag, a bad or missing value: one line, as our own errors
        hint = f" (see '{e.ctx.command_path} --help')" if getattr(e, "ctx", None) is not None else ""
        print(f"error: {' '.join(e.format_message().split())}{hint}", file=sys.stderr)
        sys.exit(2)
    except typer.Abort:
        print("Aborted.", file=sys.stderr)
        sys.exit(130)
    except LogitcacheError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingStopped as e:
        print(str(e), file=sys.stderr)
        sys.exit(143)  # the conventional status of a SIGTERM stop
    if isinstance(code, int) and code:  # typer.Exit(code) from a command (verify's failure)
        sys.exit(code)

if __name__ == "__main__":
    main()
