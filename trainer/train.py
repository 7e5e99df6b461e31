"""The student training loop: views regenerated from seeds, teacher logits from the cache.

No teacher weights are loaded in cached mode: the teacher's output arrives as top-k
rows from the DataLoader workers and is turned back into full logits on the device (one
scatter) in the step. ``online_teacher`` runs a teacher on the same views through the
same loss code instead (the reference the cache is measured against).

Runs under torchrun (DDP; gloo on CPU, NCCL on GPU): every rank takes its slice of the
same global batches, so results do not depend on the world size. Checkpoints are
written every epoch and on SIGTERM; ``resume`` continues exactly where a run stopped
(deterministic mode: bit-identical weights, including MKD's meta-batch stream).

MKD (``cfg.mkd``): every ``meta_every`` steps :class:`logitcache.trainer.mkd.MetaTemperatureLearner`
updates the KD temperatures on a meta batch held out from the *training* split
(``meta_fraction``); the step's loss uses the current temperatures, which steps.jsonl
records every step (``t_teacher``, ``t_student``; ``meta_loss`` on meta steps).
"""

from __future__ import annotations

import json
import os
import signal
import shutil
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import timm
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from logitcache.build import cache_root, resolve_device
from logitcache.codec import decode
from logitcache.data.source import open_source
from logitcache.errors import CacheNotFoundError, LogitcacheError
from logitcache.manifest import check_serves
from logitcache.store import CacheReader
from logitcache.teacher import META_INPUT, META_MODEL, ModelInput
from logitcache.views import Recipe, create_recipe

from .data import CachedRows, create_eval_loader, create_train_loader, epoch_groups, meta_split
from .evaluate import evaluate
from .losses import LossConfig, distill_loss


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
    mkd: "MKDConfig | None" = None  # noqa: F821 - logitcache.trainer.mkd.MKDConfig; meta-learned temperatures (vanilla KD loss with learnable T)
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
        import tomllib

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
        from .mkd import MKDConfig

        settings["mkd"] = MKDConfig(**settings["mkd"])
    return TrainConfig(**settings)


def find_cache(root: str, fingerprint: str, teacher: str | None = None) -> str:
    """The one cache under ``root`` built on the data with ``fingerprint``; errors on none or several."""
    from logitcache.store import list_caches

    matches = [c for c in list_caches(root) if c.manifest.dataset.fingerprint == fingerprint
               and (teacher is None or teacher in c.manifest.teacher)]
    if not matches:
        raise CacheNotFoundError(
            f"no cache for this dataset under {root} (fingerprint {fingerprint[:12]}); build one with "
            f"`logitcache build`, or pass --cache URL"
        )
    if len(matches) > 1:
        names = ", ".join(c.url for c in matches)
        raise CacheNotFoundError(f"several caches for this dataset under {root}: {names}; choose one with --cache")
    return matches[0].url


def smoothed_targets(label: torch.Tensor, partner_label: torch.Tensor, lam: torch.Tensor, num_classes: int,
                     smoothing: float) -> torch.Tensor:
    """Mixed, smoothed label targets (B, C): lam * y(label) + (1 - lam) * y(partner), as timm's mixup_target."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    y1 = torch.full((len(label), num_classes), off, device=label.device).scatter_(1, label[:, None], on)
    y2 = torch.full((len(label), num_classes), off, device=label.device).scatter_(1, partner_label[:, None], on)
    lam = lam[:, None].to(y1.dtype)
    return y1 * lam + y2 * (1 - lam)


def save_student(model: torch.nn.Module, path: Path, name: str, num_classes: int, recipe: Recipe) -> None:
    """safetensors weights with what ``--teacher-weights`` needs to rebuild the model."""
    io = ModelInput(recipe.input_size, tuple(recipe.mean), tuple(recipe.std), recipe.interpolation)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={META_MODEL: name, "num_classes": str(num_classes), META_INPUT: io.to_json()})


class DistEnv:
    """torchrun's environment: rank, world size, and the device of this rank."""

    def __init__(self, device: str):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = resolve_device(device)
        if self.device.type == "cuda" and self.world_size > 1:
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, value: torch.Tensor) -> float:
        """The mean of a scalar over ranks (for logging)."""
        return self.means(value.reshape(1))[0]

    def means(self, values: torch.Tensor) -> list[float]:
        """The means of a vector of scalars over ranks: one collective, one device sync."""
        values = values.detach().float()
        if self.world_size > 1:
            values = values.clone()
            dist.all_reduce(values)
            values /= self.world_size
        return values.tolist()

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


class Logger:
    """JSON lines (metrics.jsonl: epochs; steps.jsonl: steps) and TensorBoard, main rank only."""

    def __init__(self, out: Path, enabled: bool, tensorboard: bool, resume_from: dict | None = None):
        """``resume_from`` (a checkpoint's state): keep the rows the checkpoint covers (steps up
        to its step, epochs before its epoch) and append; rows a killed run wrote after its
        last checkpoint are dropped, so the logs read like one uninterrupted run."""
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        if resume_from is not None:
            _keep_rows(out / "steps.jsonl", lambda r: r.get("step", 0) <= resume_from["step"])
            _keep_rows(out / "metrics.jsonl", lambda r: r.get("epoch", 0) < resume_from["epoch"])
        mode = "a" if resume_from is not None else "w"
        self.epochs = open(out / "metrics.jsonl", mode)
        self.steps = open(out / "steps.jsonl", mode)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tb"))
            except ImportError:  # tensorboard is optional
                self.tb = None

    def step(self, step: int, **row) -> None:
        if not self.enabled:
            return
        self.steps.write(json.dumps({"step": step, **row}) + "\n")
        self.steps.flush()  # one small write per step; lets a watcher follow the run
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, step)

    def epoch(self, **row) -> None:
        if not self.enabled:
            return
        self.epochs.write(json.dumps(row) + "\n")
        self.epochs.flush()
        self.steps.flush()
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"epoch/{k}", v, row["epoch"])
            self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.epochs.close()
            self.steps.close()
            if self.tb is not None:
                self.tb.close()


def _keep_rows(path: Path, keep) -> None:
    """Rewrite a JSON-lines file with the rows ``keep(row)`` accepts (a torn last line is dropped)."""
    if not path.exists():
        return
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if keep(row):
            rows.append(line + "\n")
    path.write_text("".join(rows))


# --- checkpoints -------------------------------------------------------------------------

def save_checkpoint(out: Path, *, model, optimizer, scheduler, ema, mkd, epoch: int, batch: int, step: int,
                    images_seen: int, train_seconds: float, epoch_sums: dict | None = None) -> None:
    """``<out>/checkpoint``: model.safetensors (+ ema.safetensors) and state.pt (optimiser,
    scheduler, RNG, position). Written to a temporary folder, then swapped in by renames
    (the previous one is kept as ``checkpoint.old`` until the new one is in place): a kill at
    any moment leaves one complete checkpoint."""
    tmp, final, old = out / "checkpoint.tmp", out / "checkpoint", out / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    if ema is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in ema.module.state_dict().items()},
                  str(tmp / "ema.safetensors"))
    state = {
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "mkd": mkd.state_dict() if mkd is not None else None,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "epoch": epoch, "batch": batch, "step": step, "images_seen": images_seen, "train_seconds": train_seconds,
        "epoch_sums": epoch_sums,
    }
    torch.save(state, tmp / "state.pt")
    if (final / "state.pt").exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    else:
        shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(out: Path, *, model, optimizer, scheduler, ema, mkd) -> dict:
    ckpt = out / "checkpoint"
    if not (ckpt / "state.pt").exists() and (out / "checkpoint.old" / "state.pt").exists():
        ckpt = out / "checkpoint.old"  # killed between the two renames of save_checkpoint
    if not (ckpt / "state.pt").exists():
        raise LogitcacheError(f"--resume: no checkpoint in {out / 'checkpoint'}")
    model.load_state_dict(load_file(str(ckpt / "model.safetensors")))
    if ema is not None and (ckpt / "ema.safetensors").exists():
        ema.module.load_state_dict(load_file(str(ckpt / "ema.safetensors")))
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if mkd is not None and state["mkd"] is not None:
        mkd.load_state_dict(state["mkd"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state


class StopFlag:
    """Set by SIGTERM: the loop checkpoints after the current step and stops."""

    def __init__(self):
        self.stop = False
        self._installed = threading.current_thread() is threading.main_thread()  # signals: main thread only
        if self._installed:
            self._previous = signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        self.stop = True

    def restore(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)


class TrainingStopped(Exception):
    """Raised (and handled by the CLI) after a SIGTERM checkpoint."""


# --- the run -----------------------------------------------------------------------------

def _setup_data(cfg: TrainConfig):
    train_src = open_source(cfg.data, "train")
    val_src = open_source(cfg.data, "val")
    reader = None
    if cfg.loss.kind != "none" and not cfg.online_teacher or cfg.cache:
        url = cfg.cache or find_cache(cache_root(cfg.cache_root), train_src.fingerprint())
        reader = CacheReader(url)
        check_serves(reader.manifest, fingerprint=train_src.fingerprint(), num_classes=train_src.num_classes, where=url)
        recipe = reader.manifest.recipe
        view_epochs = reader.epochs()
        if not view_epochs:
            raise LogitcacheError(f"cache {url} has no complete epoch yet")
        if cfg.epochs > len(view_epochs) and not cfg.reuse_epochs:
            raise LogitcacheError(
                f"{cfg.epochs} student epochs but cache {url} holds {len(view_epochs)} complete epochs; build more "
                f"(logitcache build --epochs A:B) or pass --reuse-epochs to cycle them"
            )
        if cfg.epochs > len(view_epochs):
            warnings.warn(
                f"{cfg.epochs} student epochs but cache {url} holds {len(view_epochs)} complete epochs: reusing "
                f"cached epochs (student epoch e trains on cached epoch e mod {len(view_epochs)}; --reuse-epochs)",
                UserWarning, stacklevel=3,
            )
    else:
        recipe = create_recipe(cfg.recipe)
        view_epochs = list(range(cfg.epochs))
    return train_src, val_src, reader, recipe, view_epochs


def _create_online_teacher(cfg: TrainConfig, reader, num_classes: int, device):
    from logitcache.teacher import Teacher

    name = cfg.teacher or (reader.manifest.teacher if reader is not None else None)
    if name is None:
        raise LogitcacheError("--online-teacher needs --teacher NAME (or a cache that names its teacher)")
    return Teacher(name, weights=cfg.teacher_weights, num_classes=num_classes, device=device)


#: ``on_step(info)``: called on every rank after every optimiser step with ``info`` =
#: ``{"step", "epoch", "batch", "row", "model", "ema", "teacher", "mkd"}`` (``row`` is what
#: steps.jsonl gets; ``teacher`` is None in cached mode). For tests and monitoring.
StepCallback = Callable[[dict], None]


def train(cfg: TrainConfig, on_step: StepCallback | None = None) -> dict:
    """Train one student; returns the summary (also written to ``<out>/summary.json``).

    Raises :class:`TrainingStopped` after a SIGTERM checkpoint. Process-wide settings the run
    changes (``torch.use_deterministic_algorithms``) are restored when it ends."""
    env = DistEnv(cfg.device)
    deterministic = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        return _train(cfg, env, on_step)
    finally:
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        env.close()


def _train_groups(groups: list, held_out: np.ndarray | None) -> list:
    """The groups the student trains on: without any sample of MKD's meta split."""
    if held_out is None:
        return groups
    return [g for g in groups if not any(held_out[i] for i in g.indices)]


def _train(cfg: TrainConfig, env: DistEnv, on_step: StepCallback | None = None) -> dict:
    torch.manual_seed(cfg.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    if cfg.mkd is not None and cfg.loss.kind != "kd":
        raise LogitcacheError(f"MKD learns the temperatures of vanilla KD; it cannot be combined with "
                              f"--kd {cfg.loss.kind}")
    device = env.device
    train_src, val_src, reader, recipe, view_epochs = _setup_data(cfg)
    num_classes = train_src.num_classes
    gs = recipe.group_size
    if cfg.batch_size % (gs * env.world_size):
        raise LogitcacheError(f"--batch-size {cfg.batch_size} must be a multiple of {gs * env.world_size} "
                              f"(views per group x world size)")
    held_out = meta_split(train_src, cfg.meta_fraction, cfg.seed) if cfg.mkd is not None else None
    # Batches per epoch (scheduler, DKD warm-up): from the first epoch's groups; every epoch
    # has the same number unless MKD's meta split removes a slightly different number of pairs.
    n_groups = len(_train_groups(epoch_groups(train_src, recipe, view_epochs[0], None), held_out))
    steps_per_epoch = n_groups // (cfg.batch_size // gs)
    if cfg.limit_batches:
        steps_per_epoch = min(steps_per_epoch, cfg.limit_batches)
    if steps_per_epoch < 1:
        raise LogitcacheError(f"--batch-size {cfg.batch_size} is larger than an epoch of training views "
                              f"({n_groups} groups of {gs}); use a smaller batch")
    needs_teacher_logits = cfg.loss.kind != "none" or cfg.mkd is not None

    # The student first, straight after seeding: its initial weights must not depend on
    # whether a teacher is built (online) or not (cached).
    model = timm.create_model(cfg.student, pretrained=False, num_classes=num_classes, **cfg.model_kwargs).to(device)
    if device.type == "cuda" and cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    teacher = None
    if cfg.online_teacher:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # leaves the RNG alone
            teacher = _create_online_teacher(cfg, reader, num_classes, device)
    labels = train_src.labels()
    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    scheduler, _ = create_scheduler_v2(optimizer, sched=cfg.sched, num_epochs=cfg.epochs,
                                       warmup_epochs=cfg.warmup_epochs, min_lr=cfg.min_lr, warmup_lr=cfg.lr * 0.01,
                                       step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    ema = timm.utils.ModelEmaV3(model, decay=cfg.model_ema_decay) if cfg.model_ema else None
    mkd = None
    if cfg.mkd is not None:
        from .mkd import MetaTemperatureLearner, mkd_loss

        mkd = MetaTemperatureLearner(cfg.mkd, num_classes, device)

    train_model = model
    if env.world_size > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        train_model = torch.compile(train_model)

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    start_epoch, start_batch, step, images_seen, train_seconds = 0, 0, 0, 0, 0.0
    state = None
    if cfg.resume:
        state = load_checkpoint(out, model=model, optimizer=optimizer, scheduler=scheduler, ema=ema, mkd=mkd)
        start_epoch, start_batch, step = state["epoch"], state["batch"], state["step"]
        images_seen, train_seconds = state["images_seen"], state["train_seconds"]
    # The meta stream is a function of the meta-batch number: a resumed run continues it.
    meta_iter = (_meta_batches(train_src, recipe, held_out, cfg, start=mkd.num_meta_steps)
                 if mkd is not None else None)
    log = Logger(out, env.main, cfg.tensorboard, resume_from=state)
    eval_loader = create_eval_loader(val_src, recipe, num_workers=cfg.num_workers)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda")
    stop = StopFlag()
    history: list[dict] = []
    keys = ["loss", "hard", "kd"] + (["t_teacher", "t_student"] if mkd is not None else [])
    t_start = time.perf_counter()
    try:
        for epoch in range(start_epoch, cfg.epochs):
            view_epoch = view_epochs[epoch % len(view_epochs)]
            arrays = reader.load_epoch(view_epoch) if reader is not None else None
            groups = _train_groups(epoch_groups(train_src, recipe, view_epoch, arrays), held_out)
            first_batch = start_batch if epoch == start_epoch else 0
            loader = create_train_loader(
                train_src, recipe, groups, CachedRows(arrays if not cfg.online_teacher else None, labels),
                batch_size=cfg.batch_size, seed=cfg.seed, epoch=epoch, num_workers=cfg.num_workers,
                rank=env.rank, world_size=env.world_size, pin_memory=device.type == "cuda",
                limit=cfg.limit_batches, skip=first_batch,
            )
            train_model.train()
            t0 = time.perf_counter()
            sums = dict.fromkeys(("loss", "hard", "kd"), 0.0)
            n_batches, epoch_images = 0, 0
            if first_batch and state is not None and state.get("epoch_sums"):  # a resumed epoch
                saved = state["epoch_sums"]
                sums.update(saved["sums"])
                n_batches, epoch_images = saved["n_batches"], saved["epoch_images"]
            for b, batch in enumerate(loader, start=first_batch):
                if batch["errors"]:
                    raise LogitcacheError(batch["errors"][0]["error"])
                x = batch["images"].to(device, non_blocking=True)
                if device.type == "cuda" and cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                target = smoothed_targets(batch["label"].to(device), batch["partner_label"].to(device),
                                          batch["lam"].to(device), num_classes, cfg.label_smoothing)
                teacher_logits = None
                if teacher is not None:
                    # The teacher answers under inference_mode; the clone (made outside it) is an
                    # ordinary tensor that autograd may save (MKD differentiates logits / T).
                    teacher_logits = teacher(x, recipe.mean, recipe.std).clone()
                elif needs_teacher_logits:
                    teacher_logits = decode(batch["topk_ids"].to(device, non_blocking=True),
                                            batch["topk_logits"].to(device, non_blocking=True),
                                            batch["tail_lse"].to(device, non_blocking=True), num_classes)
                frac_epoch = epoch + b / steps_per_epoch
                meta = None
                if mkd is not None and mkd.should_step(step):
                    x_meta, y_meta = next(meta_iter)
                    meta = mkd.meta_step(model, x, teacher_logits, target, x_meta.to(device), y_meta.to(device),
                                         student_lr=optimizer.param_groups[0]["lr"], loss_cfg=cfg.loss)
                with autocast:
                    logits = train_model(x)
                logits = logits.float()
                if mkd is not None:
                    t_t, t_s = mkd.kd_temperatures(logits.detach(), teacher_logits)
                    loss, parts = mkd_loss(cfg.loss, logits, teacher_logits, target, t_t, t_s)
                    parts = {**parts, "t_teacher": t_t.mean(), "t_student": t_s.mean()}
                else:
                    loss, parts = distill_loss(cfg.loss, logits, teacher_logits, target, epoch=frac_epoch)
                # This rank's share of the global batch (1 unless a mixing recipe left a group of
                # one view): DDP averages gradients over ranks, so the average is the gradient of
                # the mean over the global batch; logged values are global means too.
                global_views = loader.global_batch_views[b - first_batch]
                share = len(x) * env.world_size / global_views
                if share != 1.0:
                    loss = loss * share
                    parts = {k: (v * share if k in ("hard", "kd") else v) for k, v in parts.items()}
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.clip_grad:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                optimizer.step()
                if ema is not None:
                    ema.update(model, step=step)
                step += 1
                n_batches += 1
                scheduler.step_update(step)
                # One collective (and one device sync) per step: the logged means and the stop flag.
                values = torch.stack([loss.detach(), *(parts[k].detach() for k in keys[1:]),
                                      torch.tensor(float(stop.stop), device=loss.device)])
                *means, stop_any = env.means(values)
                row = {"epoch": epoch, **dict(zip(keys, means)), "lr": optimizer.param_groups[0]["lr"]}
                if meta is not None:
                    row["meta_loss"] = meta["meta_loss"]
                log.step(step, **row)
                for k in sums:
                    sums[k] += row[k]
                epoch_images += global_views
                if on_step is not None:
                    on_step({"step": step, "epoch": epoch, "batch": b, "row": row, "model": model, "ema": ema,
                             "teacher": teacher, "mkd": mkd})
                if stop_any > 0:  # SIGTERM on any rank: every rank stops after the same step
                    train_seconds += time.perf_counter() - t0
                    if env.main:
                        save_checkpoint(out, model=model, optimizer=optimizer, scheduler=scheduler, ema=ema, mkd=mkd,
                                        epoch=epoch, batch=b + 1, step=step, images_seen=images_seen + epoch_images,
                                        train_seconds=train_seconds,
                                        epoch_sums={"sums": sums, "n_batches": n_batches,
                                                    "epoch_images": epoch_images})
                    env.barrier()  # no rank exits (and gets the others killed) before the checkpoint exists
                    raise TrainingStopped(f"stopped by SIGTERM at epoch {epoch} batch {b + 1}; "
                                          f"continue with --resume (checkpoint in {out / 'checkpoint'})")
            epoch_seconds = time.perf_counter() - t0
            train_seconds += epoch_seconds
            images_seen += epoch_images
            scheduler.step(epoch + 1)
            start_batch = 0
            row = {"epoch": epoch, "view_epoch": view_epoch, "step": step,
                   **{k: v / max(n_batches, 1) for k, v in sums.items()}, "lr": optimizer.param_groups[0]["lr"],
                   "epoch_seconds": epoch_seconds, "images_per_s": epoch_images / epoch_seconds if epoch_seconds else 0.0}
            if env.main:
                metrics = evaluate(model, eval_loader, device)
                row.update(val_top1=metrics["top1"], val_top5=metrics["top5"], val_loss=metrics["loss"])
                if ema is not None:
                    ema_metrics = evaluate(ema.module, eval_loader, device)
                    row.update(val_top1_ema=ema_metrics["top1"], val_top5_ema=ema_metrics["top5"])
                if mkd is not None:
                    row.update(_current_temperatures(mkd))
                log.epoch(**row)
                save_checkpoint(out, model=model, optimizer=optimizer, scheduler=scheduler, ema=ema, mkd=mkd,
                                epoch=epoch + 1, batch=0, step=step, images_seen=images_seen, train_seconds=train_seconds)
                if cfg.progress:
                    print(f"epoch {epoch + 1}/{cfg.epochs}  loss {row['loss']:.3f}  val top-1 {row['val_top1']:.2f}%  "
                          f"top-5 {row['val_top5']:.2f}%  {row['images_per_s']:.0f} img/s", flush=True)
            history.append(row)
            env.barrier()
    finally:
        stop.restore()
        log.close()

    summary = {}
    if env.main:
        save_student(model, out / "model.safetensors", cfg.student, num_classes, recipe)
        if ema is not None:
            save_student(ema.module, out / "model_ema.safetensors", cfg.student, num_classes, recipe)
        epochs_logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        summary = {
            "student": cfg.student, "kd": "mkd" if cfg.mkd is not None else cfg.loss.kind,
            "online_teacher": cfg.online_teacher, "cache": reader.url if reader else None,
            "world_size": env.world_size, "epochs": cfg.epochs,
            "final_top1": epochs_logged[-1]["val_top1"], "final_top5": epochs_logged[-1]["val_top5"],
            "best_top1": max(h["val_top1"] for h in epochs_logged), "wall_seconds": time.perf_counter() - t_start,
            "train_seconds": train_seconds, "images_per_s": images_seen / train_seconds if train_seconds else 0.0,
            "config": json.loads(json.dumps(asdict(cfg), default=str)), "weights": str(out / "model.safetensors"),
        }
        if mkd is not None:
            summary.update(_current_temperatures(mkd))
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _current_temperatures(mkd) -> dict[str, float]:
    """``{"t_teacher", "t_student"}`` now: the learner's scalar temperatures, or with the
    per-sample predictor the batch means of its last step (steps.jsonl has every step's)."""
    return {k: float(v) for k, v in mkd.current().items()}


def _meta_batches(source, recipe: Recipe, held_out: np.ndarray, cfg: TrainConfig, start: int = 0):
    """An endless stream of (images, labels) from the meta split, through the eval transform,
    from meta batch number ``start`` on."""
    from .data import create_meta_loader

    loader = create_meta_loader(source, recipe, np.flatnonzero(held_out), batch_size=min(cfg.batch_size, 64),
                                seed=cfg.seed, start=start)
    return iter(loader)
