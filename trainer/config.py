"""A student run's settings: :class:`TrainConfig`, read from YAML / TOML files or a dict."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

from logitcache.errors import LogitcacheError

from .losses import LossConfig
from .mkd import MKDConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # tomllib joined the standard library in 3.11; tomli is the same parser
    import tomli as tomllib


@dataclass
class TrainConfig:
    """One student run. Every field can come from a YAML/TOML file (``load_config``)."""

    data: str  # dataset root with train and val splits
    student: str = "resnet50"
    out: str = "runs/student"
    cache: str | None = None  # cache URL; None = the one cache for this data under the cache root
    cache_root: str | None = None
    recipe: str = "demo32"  # only without a cache (a cache carries its own recipe)
    epochs: int = 10
    reuse_epochs: bool = False  # cycle cached epochs when training longer than the cache
    allow_view_drift: bool = False  # train even if views rendered here differ from the cache's canary
    batch_size: int = 128  # global, in views
    opt: str = "adamw"
    lr: float = 2e-3
    weight_decay: float = 0.05
    momentum: float = 0.9
    sched: str = "cosine"
    warmup_epochs: int = 1
    min_lr: float = 1e-5
    clip_grad: float | None = None
    label_smoothing: float = 0.0
    loss: LossConfig = field(default_factory=LossConfig)
    mkd: MKDConfig | None = None  # meta-learned temperatures (vanilla KD loss with learnable T)
    meta_fraction: float = 0.05  # MKD: training samples held out as the meta split
    online_teacher: bool = False  # run the teacher on the views instead of reading the cache
    teacher: str | None = None  # online teacher name (default: the cache's teacher)
    teacher_weights: str | None = None
    model_ema: bool = False
    model_ema_decay: float = 0.9998
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    channels_last: bool = True  # on CUDA
    compile: bool = False
    deterministic: bool = False  # torch.use_deterministic_algorithms
    resume: bool = False  # continue from <out>/checkpoint
    limit_batches: int | None = None  # at most this many batches per epoch (tests, benchmarks)
    num_workers: int = 2
    seed: int = 0
    device: str = "auto"
    tensorboard: bool = True
    model_kwargs: dict = field(default_factory=dict)
    progress: bool = True


def load_config(path: str | Path) -> dict:
    """A run's settings from YAML (.yaml/.yml) or TOML (.toml): TrainConfig's field names,
    with ``loss:`` and ``mkd:`` as nested tables."""
    path = Path(path)
    text = path.read_text()
    if path.suffix == ".toml":
        data = tomllib.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text) or {}
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(data) - known
    if unknown:
        raise LogitcacheError(f"{path}: unknown settings {sorted(unknown)}")
    return data


def make_config(settings: dict) -> TrainConfig:
    """TrainConfig from a flat dict whose ``loss``/``mkd`` entries may be dicts."""
    settings = dict(settings)
    if isinstance(settings.get("loss"), dict):
        settings["loss"] = LossConfig(**settings["loss"])
    if isinstance(settings.get("mkd"), dict):
        settings["mkd"] = MKDConfig(**settings["mkd"])
    return TrainConfig(**settings)
