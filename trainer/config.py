"""A student run's settings: :class:`TrainConfig`, read from YAML / TOML files or a dict."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

from logitcache.errors import ConfigError

from .ensemble import TeachersConfig
from .losses import TOKEN_KINDS, LossConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # tomllib joined the standard library in 3.11; tomli is the same parser
    import tomli as tomllib


#: ``teacher_lr`` when not given: this times the student's ``lr``.
DEFAULT_TEACHER_LR_FACTOR = 0.1


@dataclass
class ProKTConfig:
    """ProKT's settings (the paper's names).

    Attributes:
        lam: the paper's lambda, weight of the constraint (the authors' ``move_back_weight``);
            in [0, 1]: 0 trains the teacher on the labels only, 1 pulls it to the student only.
        teacher_lr: the teacher's peak learning rate; None = ``DEFAULT_TEACHER_LR_FACTOR`` x
            the student's ``lr``.
    """

    lam: float = 0.4
    teacher_lr: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"--prokt-lambda must be in [0, 1], not {self.lam}")
        if self.teacher_lr is not None and not self.teacher_lr > 0:
            raise ValueError(f"--prokt-teacher-lr must be > 0, not {self.teacher_lr}")

    def resolved_teacher_lr(self, student_lr: float) -> float:
        return self.teacher_lr if self.teacher_lr is not None else DEFAULT_TEACHER_LR_FACTOR * student_lr


@dataclass
class MKDConfig:
    """MKD hyper-parameters.

    Attributes:
        init_teacher_temperature: initial T_t (> 0).
        init_student_temperature: initial T_s (> 0).
        meta_every: a meta step every N student steps (bounds the cost: a meta step is two
            forwards plus a second-order backward, several student steps' worth of compute
            and about twice a step's activation memory); <= 0 disables meta steps.
        inner_lr: look-ahead SGD step size; None = the student's current lr.
        meta_lr: Adam learning rate of the temperature parameters.
        predictor: per-sample temperatures from a small MLP on logit statistics instead of
            two learnable scalars.
        hidden: hidden width of the predictor MLP.
        min_temperature, max_temperature: range the temperatures are kept in.
    """

    init_teacher_temperature: float = 1.0
    init_student_temperature: float = 1.0
    meta_every: int = 10
    inner_lr: float | None = None
    meta_lr: float = 1e-2
    predictor: bool = False
    hidden: int = 32
    min_temperature: float = 0.1
    max_temperature: float = 20.0

    def __post_init__(self) -> None:
        if not 0 < self.min_temperature < self.max_temperature:
            raise ValueError(
                f"need 0 < min_temperature < max_temperature, got {self.min_temperature}, {self.max_temperature}"
            )
        for name in ("init_teacher_temperature", "init_student_temperature"):
            v = getattr(self, name)
            if not self.min_temperature <= v <= self.max_temperature:
                raise ValueError(
                    f"{name}={v} outside [{self.min_temperature}, {self.max_temperature}]"
                )
        if self.inner_lr is not None and not self.inner_lr > 0:
            raise ValueError(f"inner_lr must be > 0 or None, got {self.inner_lr}")
        if not self.meta_lr > 0:
            raise ValueError(f"meta_lr must be > 0, got {self.meta_lr}")
        if self.hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {self.hidden}")


@dataclass
class TrainConfig:
    """One student run. Every field can come from a YAML/TOML file (``load_config``)."""

    data: str  # dataset root with train and val splits
    student: str = "resnet50"
    out: str = "runs/student"
    # cache URL, or several caches on the same views (one per teacher: `teachers` combines them);
    # None = the one cache for this data under the cache root
    cache: str | list[str] | None = None
    cache_root: str | None = None
    recipe: str | None = None  # without a cache: the views' recipe (None: demo32); with one: must be the cache's
    epochs: int = 10
    reuse_epochs: bool = False  # cycle cached epochs when training longer than the cache
    allow_view_drift: bool = False  # train even if views rendered here differ from the cache's canary
    skip_damaged_epochs: bool = False  # train on the other epochs when a finished (sealed) epoch lost data
    batch_size: int = 128  # global, in views
    opt: str = "adamw"
    lr: float = 2e-3
    lr_base_size: int | None = None  # lr is the rate at this global batch: the run uses lr x batch / this (DeiT: 512)
    weight_decay: float = 0.05
    momentum: float = 0.9
    sched: str = "cosine"
    sched_on_updates: bool = True  # timm's --sched-on-updates: the lr moves every step (False: every epoch)
    warmup_epochs: int = 1
    warmup_lr: float | None = None  # the warm-up's first lr (None: 1% of the peak lr)
    min_lr: float = 1e-5
    clip_grad: float | None = None
    label_smoothing: float = 0.0
    loss: LossConfig = field(default_factory=LossConfig)
    teachers: TeachersConfig = field(default_factory=TeachersConfig)  # several caches: how they teach
    mkd: MKDConfig | None = None  # meta-learned temperatures (vanilla KD loss with learnable T)
    meta_fraction: float = 0.05  # MKD: training samples held out as the meta split
    prokt: ProKTConfig | None = None  # ProKT: a teacher trained along with the student (online only)
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
    drop: float = 0.0  # the student's dropout before its classifier (timm's drop_rate)
    drop_path: float | None = None  # stochastic depth (timm's drop_path_rate; None: the model's default)
    model_kwargs: dict = field(default_factory=dict)
    progress: bool = True

    @property
    def peak_lr(self) -> float:
        """The run's peak learning rate: ``lr``, scaled by ``batch_size / lr_base_size`` when set."""
        return self.lr * self.batch_size / self.lr_base_size if self.lr_base_size else self.lr

    def student_kwargs(self) -> dict:
        """Keyword arguments of ``timm.create_model`` for the student: ``drop``, ``drop_path``, ``model_kwargs``."""
        extra = {"drop_rate": self.drop} if self.drop else {}
        if self.drop_path is not None:
            extra["drop_path_rate"] = self.drop_path
        return {**extra, **self.model_kwargs}

    @property
    def cache_urls(self) -> list[str]:
        """The caches given (none: the one found under the cache root is used)."""
        return [] if not self.cache else [self.cache] if isinstance(self.cache, str) else list(self.cache)

    @property
    def needs_teacher_features(self) -> bool:
        """Whether the loss needs the teacher's pooled features (--kd projector): read from a
        cache built with --features, or from the online teacher."""
        return self.loss.kind == "projector"


#: timm's scheduler names (create_scheduler_v2 quietly makes no scheduler for any other).
SCHEDULERS = ("constant", "cosine", "multistep", "plateau", "poly", "rsqrt", "step", "tanh")


def load_config(path: str | Path) -> dict:
    """A run's settings from YAML (.yaml/.yml) or TOML (.toml): TrainConfig's field names,
    with ``loss:``, ``teachers:``, ``mkd:`` and ``prokt:`` as nested tables."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"config file {path}: cannot read it ({e.strerror or e})") from None
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as e:  # noqa: BLE001 - the parsers' syntax errors (their messages span lines)
        kind = "TOML" if path.suffix == ".toml" else "YAML"
        raise ConfigError(f"config file {path}: not valid {kind}: {' '.join(str(e).split())[:200]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a table of settings, found {type(data).__name__}")
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"{path}: unknown settings {sorted(unknown)}")
    return data


def make_config(settings: dict) -> TrainConfig:
    """TrainConfig from a flat dict whose ``loss``/``mkd``/``prokt`` entries may be dicts; every name
    (student, optimiser, scheduler, loss kind, device) and size checked before anything is built."""
    settings = dict(settings)
    try:
        if isinstance(settings.get("loss"), dict):
            settings["loss"] = _make(LossConfig, settings["loss"], "loss")
        if isinstance(settings.get("mkd"), dict):
            settings["mkd"] = _make(MKDConfig, settings["mkd"], "mkd")
        if isinstance(settings.get("teachers"), dict):
            settings["teachers"] = _make(TeachersConfig, settings["teachers"], "teachers")
        if isinstance(settings.get("prokt"), dict):
            settings["prokt"] = _make(ProKTConfig, settings["prokt"], "prokt")
        cfg = _make(TrainConfig, settings, "")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    check_config(cfg)
    return cfg


def _make(cls, values: dict, table: str):
    """``cls(**values)``, naming unknown keys as a user error."""
    unknown = sorted(set(values) - {f.name for f in fields(cls)})
    if unknown:
        where = f" in `{table}:`" if table else ""
        raise ConfigError(f"unknown settings {unknown}{where}; known: {', '.join(f.name for f in fields(cls))}")
    return cls(**values)


def check_config(cfg: TrainConfig) -> None:
    """Raise :class:`ConfigError` for a name timm does not know or an impossible size."""
    import timm
    import torch
    from timm.optim import list_optimizers

    if not timm.is_model(cfg.student):
        raise ConfigError(f"unknown student model {cfg.student!r} (not a timm model name; see timm.list_models())")
    if cfg.opt.lower().removeprefix("lookahead_") not in list_optimizers():
        raise ConfigError(f"unknown optimiser {cfg.opt!r} (not a timm optimiser; see timm.optim.list_optimizers())")
    if cfg.sched not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler {cfg.sched!r}; timm's are {', '.join(SCHEDULERS)}")
    for name in ("epochs", "batch_size"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, not {getattr(cfg, name)}")
    for name in ("num_workers", "warmup_epochs"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-').replace('num-', '')} must be >= 0, not {getattr(cfg, name)}")
    if cfg.limit_batches is not None and cfg.limit_batches < 1:
        raise ConfigError(f"--limit-batches must be >= 1, not {cfg.limit_batches}")
    if not cfg.lr > 0:
        raise ConfigError(f"--lr must be > 0, not {cfg.lr}")
    if cfg.lr_base_size is not None and cfg.lr_base_size < 1:
        raise ConfigError(f"--lr-base-size must be >= 1, not {cfg.lr_base_size}")
    if cfg.warmup_lr is not None and not cfg.warmup_lr >= 0:
        raise ConfigError(f"--warmup-lr must be >= 0, not {cfg.warmup_lr}")
    if not 0 <= cfg.drop < 1 or cfg.drop_path is not None and not 0 <= cfg.drop_path < 1:
        raise ConfigError(f"--drop and --drop-path must be in [0, 1), not {cfg.drop} and {cfg.drop_path}")
    if cfg.recipe is not None:
        from logitcache.views.augment import RECIPES

        if cfg.recipe not in RECIPES:
            raise ConfigError(f"unknown recipe {cfg.recipe!r}; known: {', '.join(sorted(RECIPES))}")
    if cfg.mkd is not None and not 0 < cfg.meta_fraction < 1:
        raise ConfigError(f"--meta-fraction must be in (0, 1), not {cfg.meta_fraction}")
    if cfg.prokt is not None:
        check_prokt(cfg)
    if cfg.loss.kind in TOKEN_KINDS and (cfg.mkd is not None or cfg.prokt is not None):
        raise ConfigError(f"--kd {cfg.loss.kind} distils through the student's distillation head; it cannot be "
                          f"combined with MKD or ProKT")
    if cfg.needs_teacher_features and cfg.mkd is not None:
        raise ConfigError("--kd projector and MKD (learned temperatures) cannot be combined; choose one")
    if len(cfg.cache_urls) > 1:
        check_teachers(cfg)
    elif cfg.teachers != TeachersConfig():
        raise ConfigError("--teachers-mode, --teacher-mix and --teacher-temperatures combine several caches: give "
                          "--cache once per teacher")
    if cfg.device != "auto":
        try:
            torch.device(cfg.device)
        except RuntimeError:
            raise ConfigError(f"unknown device {cfg.device!r}; use auto, cpu, cuda or cuda:N") from None


def check_prokt(cfg: TrainConfig) -> None:
    """ProKT trains its teacher every step: online teacher only, vanilla KD, no MKD."""
    if cfg.cache:
        raise ConfigError("--kd prokt trains the teacher at every step, so logits cached from the frozen teacher "
                          "cannot serve it: run without --cache, with --teacher NAME and --teacher-weights FILE")
    if not cfg.online_teacher:
        raise ConfigError("--kd prokt trains the teacher along with the student: it needs the online teacher "
                          "(online_teacher: true, with --teacher NAME and --teacher-weights FILE)")
    if cfg.mkd is not None:
        raise ConfigError("--kd prokt and MKD (learned temperatures) cannot be combined; choose one")
    if cfg.loss.kind != "kd":
        raise ConfigError(f"--kd prokt distils with vanilla KD from the trained teacher; it cannot be combined "
                          f"with loss kind {cfg.loss.kind!r}")


def check_teachers(cfg: TrainConfig) -> None:
    """Several caches: the kinds that distil from their logits alone, and settings for each cache."""
    k = len(cfg.cache_urls)
    if len(set(cfg.cache_urls)) < k:
        raise ConfigError(f"--cache names one cache twice: {cfg.cache_urls}")
    if cfg.mkd is not None and (cfg.teachers.mode != "per-teacher" or cfg.teachers.temperatures is not None):
        raise ConfigError(f"MKD with {k} caches learns a pair of temperatures per teacher: use --teachers-mode "
                          f"per-teacher, without --teacher-temperatures")
    single = ("ProKT" if cfg.prokt is not None
              else "--online-teacher" if cfg.online_teacher else f"--kd {cfg.loss.kind}"
              if cfg.loss.kind in ("projector", *TOKEN_KINDS) else None)
    if single:
        raise ConfigError(f"{single} distils from one teacher; with {k} caches use --kd kd, dkd or dist")
    if cfg.teachers.mode == "ca-mkd" and cfg.loss.kind != "kd":
        raise ConfigError(f"--teachers-mode ca-mkd weighs per-sample KD terms; it cannot be combined with --kd "
                          f"{cfg.loss.kind}")
    try:
        cfg.teachers.check(k)
    except ValueError as e:
        raise ConfigError(str(e)) from None
