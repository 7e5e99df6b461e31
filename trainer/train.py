"""Train one student: :func:`train` sets the run up (or resumes it), runs its epochs, evaluates
and checkpoints after each, and writes the final weights and ``summary.json``.

Views are regenerated from seeds; teacher logits come from the cache. No teacher weights are
loaded in cached mode: the teacher's output arrives as top-k rows from the DataLoader
workers and is turned back into full logits on the device (one scatter) in the step.
``online_teacher`` runs a teacher on the same views through the same loss code instead
(the reference the cache is measured against).

Runs under torchrun (DDP; gloo on CPU, NCCL on GPU): every rank takes its slice of the
same global batches, so results do not depend on the world size. Checkpoints are
written every epoch and on SIGTERM; ``resume`` continues exactly where a run stopped
(deterministic mode: bit-identical weights, including MKD's meta-batch stream).

MKD (``cfg.mkd``): every ``meta_every`` steps :class:`logitcache.trainer.mkd.MetaTemperatureLearner`
updates the KD temperatures on a meta batch held out from the *training* split
(``meta_fraction``); the step's loss uses the current temperatures, which steps.jsonl
records every step (``t_teacher``, ``t_student``; ``meta_loss`` on meta steps).

ProKT (``cfg.prokt``, online teacher only): :class:`logitcache.trainer.prokt.ProKTTeacher`, a
trainable copy of the online teacher, takes one step every step before the student, and
the student distils from the updated teacher; steps.jsonl records the teacher's terms
(``teacher_hard``, ``teacher_constraint``) and ``teacher_lr``; the checkpoint holds the
teacher (weights, optimiser, schedule) and the run ends by writing it to
``<out>/prokt_teacher.safetensors``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import timm
import torch

from logitcache.build.teacher import Teacher
from logitcache.distributed import (
    DistContext,
    init_from_env,
    rank_device,
    resolve_device,
)
from logitcache.errors import LogitcacheError
from logitcache.storage.reader import CacheReader

from .checkpoint import (
    StopFlag,
    TrainingStopped,
    load_checkpoint,
    save_checkpoint,
    save_student,
)
from .config import TrainConfig, check_prokt
from .data import create_eval_loader
from .evaluate import evaluate
from .losses import TOKEN_KINDS
from .inputs import RunInputs, open_inputs
from .loop import EpochTally, Position, Run, StepCallback, train_one_epoch
from .metrics_log import Logger, read_rows
from .mkd import MetaTemperatureLearner
from .optim import create_optimizer_and_scheduler
from .projector import FeatureStudent
from .prokt import ProKTTeacher
from .step import StepSpec, StudentParts

__all__ = ["train"]


def train(cfg: TrainConfig, on_step: StepCallback | None = None) -> dict:
    """Train one student; returns the summary (also written to ``<out>/summary.json``; empty
    on ranks other than the main one).

    Raises :class:`TrainingStopped` after a SIGTERM checkpoint. Process-wide settings the run
    changes (``torch.use_deterministic_algorithms``) are restored when it ends."""
    env = init_from_env(rank_device(resolve_device(cfg.device)))
    deterministic = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        return _train(cfg, env, on_step)
    finally:
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        env.close()


def _train(cfg: TrainConfig, env: DistContext, on_step: StepCallback | None) -> dict:
    torch.manual_seed(cfg.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    if cfg.mkd is not None and cfg.loss.kind != "kd":
        raise LogitcacheError(f"MKD learns the temperatures of vanilla KD; it cannot be combined with "
                              f"--kd {cfg.loss.kind}")
    if cfg.prokt is not None:
        check_prokt(cfg)  # also for configs made without make_config
    inputs = open_inputs(cfg, env.world_size)
    if env.main:  # which epochs the run trains on, and which it leaves out (unfinished, damaged)
        print(inputs.epochs_note(), flush=True)
    parts = _create_parts(cfg, inputs, env)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    state = None
    if cfg.resume:
        state = load_checkpoint(out, model=parts.model, optimizer=parts.optimizer, scheduler=parts.scheduler,
                                ema=parts.ema, mkd=parts.mkd, prokt=parts.prokt,
                                projector=parts.projector)
    # The meta stream is a function of the meta-batch number: a resumed run continues it.
    meta_batches = inputs.meta_batches(cfg, start=parts.mkd.num_meta_steps) if parts.mkd is not None else None
    spec = StepSpec(cfg, env.device, inputs.num_classes, inputs.recipe, inputs.steps_per_epoch, env.world_size,
                    meta_batches, tuple(r.manifest.codec for r in inputs.readers),
                    **_cached_features(cfg, inputs.reader, env.device))
    log = Logger(out, env.main, cfg.tensorboard, resume_from=state)
    eval_loader = create_eval_loader(inputs.val_src, inputs.recipe, num_workers=cfg.num_workers)
    run = Run(spec, parts, env, log, StopFlag(), out, Position.from_state(state) if state else Position(), on_step)
    # A SIGTERM checkpoint also holds its epoch's running sums.
    resumed_tally = state.get("epoch_sums") if state is not None else None
    t_start = time.perf_counter()
    try:
        for epoch in range(run.pos.epoch, cfg.epochs):
            tally = EpochTally.from_state(resumed_tally) if run.pos.batch and resumed_tally else EpochTally()
            loader = inputs.train_loader(cfg, epoch, first_batch=run.pos.batch, rank=env.rank,
                                         world_size=env.world_size, device=env.device)
            seconds = train_one_epoch(run, loader, epoch, tally)
            _end_epoch(run, inputs, eval_loader, epoch, tally, seconds)
    finally:
        run.stop.restore()
        log.close()
    return _summary(run, inputs, t_start) if env.main else {}


def _create_parts(cfg: TrainConfig, inputs: RunInputs, env: DistContext) -> StudentParts:
    """The student and what trains it. Called right after seeding: the student is created
    first, so its initial weights do not depend on whether a teacher is built (online) or
    not (cached)."""
    device, num_classes = env.device, inputs.num_classes
    model = timm.create_model(cfg.student, pretrained=False, num_classes=num_classes, **cfg.student_kwargs()).to(device)
    if cfg.loss.kind in TOKEN_KINDS:
        _distilled_training(model, cfg)
    if device.type == "cuda" and cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    teacher = prokt = None
    if cfg.online_teacher:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # leaves the RNG alone
            teacher = _create_online_teacher(cfg, inputs.reader, num_classes, device)
            if cfg.prokt is not None:  # a trainable copy replaces the frozen teacher, which is let go
                prokt = ProKTTeacher(cfg.prokt, teacher, cfg, mean=inputs.recipe.mean, std=inputs.recipe.std,
                                     steps_per_epoch=inputs.steps_per_epoch, autocast=_autocast(cfg, device),
                                     world_size=env.world_size)
                teacher = None
    projector = None
    if cfg.needs_teacher_features:  # created after the student (and outside fork_rng): the same init cached or online
        projector = FeatureStudent(model, _teacher_feature_dim(teacher, inputs.reader)).to(device)
        projector.source = feature_source(cfg, inputs.reader)
    trained = projector if projector is not None else model
    optimizer, scheduler = create_optimizer_and_scheduler(trained, cfg, inputs.steps_per_epoch)
    ema = timm.utils.ModelEmaV3(model, decay=cfg.model_ema_decay) if cfg.model_ema else None
    mkd = None
    if cfg.mkd is not None:  # several caches (per-teacher): a pair of temperatures per teacher
        mkd = MetaTemperatureLearner(cfg.mkd, num_classes, device, teachers=max(1, len(inputs.readers)),
                                     teacher_weights=cfg.teachers.mix if len(inputs.readers) > 1 else None)
    train_model = trained
    if env.world_size > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            trained, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        train_model = torch.compile(train_model)
    return StudentParts(model, train_model, optimizer, scheduler, ema, mkd, teacher, prokt, projector)


def _distilled_training(model: torch.nn.Module, cfg: TrainConfig) -> None:
    """Switch a student with a distillation head to its two-head training forward, or refuse."""
    if not hasattr(model, "set_distilled_training"):
        raise LogitcacheError(f"--kd {cfg.loss.kind} needs a student with a distillation head (timm's "
                              f"deit_*_distilled_* models, e.g. deit_tiny_distilled_patch16_224); {cfg.student} "
                              f"has none")
    model.set_distilled_training(True)


def _teacher_feature_dim(teacher: Teacher | None, reader: CacheReader | None) -> int:
    """D, the width of the teacher features the projector maps to: the online teacher's, else the cache's."""
    return teacher.feature_dim if teacher is not None else reader.manifest.feature_spec.dim


def feature_source(cfg: TrainConfig, reader: CacheReader | None) -> dict | None:
    """Where --kd projector's teacher features come from (a resumed run must read the same
    feature space): the cache's teacher and feature basis, or the online teacher."""
    if not cfg.needs_teacher_features:
        return None
    if cfg.online_teacher:
        return {"online_teacher": cfg.teacher or reader.manifest.teacher, "weights": str(cfg.teacher_weights)}
    f = reader.manifest.features
    return {"teacher": reader.manifest.teacher, "teacher_weights_sha256": reader.manifest.teacher_weights_sha256,
            "features": f["label"], "basis_sha256": f.get("basis_sha256")}


def _cached_features(cfg: TrainConfig, reader: CacheReader | None, device: torch.device) -> dict:
    """StepSpec's ``features`` and ``basis`` when --kd projector reads them from the cache."""
    if not cfg.needs_teacher_features or cfg.online_teacher:
        return {}
    basis = reader.feature_basis()
    return {"features": reader.manifest.feature_spec, "basis": basis.to_torch(device) if basis is not None else None}


def _autocast(cfg: TrainConfig, device: torch.device):
    """The step's autocast (bf16 on CUDA when ``amp``), as a factory of context managers."""
    return lambda: torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda")


def _create_online_teacher(cfg: TrainConfig, reader: CacheReader | None, num_classes: int,
                           device: torch.device) -> Teacher:
    name = cfg.teacher or (reader.manifest.teacher if reader is not None else None)
    if name is None and cfg.prokt is not None:
        raise LogitcacheError("--kd prokt needs --teacher NAME (the teacher it trains; its weights from "
                              "--teacher-weights FILE or timm's pretrained ones)")
    if name is None:
        raise LogitcacheError("--online-teacher needs --teacher NAME (or a cache that names its teacher)")
    # The cache's teacher runs as it ran in the build (at the input size the build set, if any).
    size = reader.manifest.teacher_input_size if reader is not None and name == reader.manifest.teacher else None
    return Teacher(name, weights=cfg.teacher_weights, num_classes=num_classes, device=device, input_size=size)


def _end_epoch(run: Run, inputs: RunInputs, eval_loader, epoch: int, tally: EpochTally, seconds: float) -> None:
    """After an epoch's steps: the schedule's epoch step; on the main rank evaluation, the
    metrics row, the epoch checkpoint and the progress line; then every rank waits."""
    cfg, parts, pos = run.spec.cfg, run.parts, run.pos
    pos.train_seconds += seconds
    pos.images_seen += tally.epoch_images
    parts.scheduler.step(epoch + 1)
    if parts.prokt is not None:
        parts.prokt.step_epoch(epoch + 1)
    pos.epoch, pos.batch = epoch + 1, 0
    row = {"epoch": epoch, "view_epoch": inputs.view_epoch(epoch), "step": pos.step, **tally.means(),
           "lr": parts.optimizer.param_groups[0]["lr"], "epoch_seconds": seconds,
           "images_per_s": tally.epoch_images / seconds if seconds else 0.0}
    if run.env.main:
        device = run.spec.device
        metrics = evaluate(parts.model, eval_loader, device)
        row.update(val_top1=metrics["top1"], val_top5=metrics["top5"], val_loss=metrics["loss"])
        row.update({f"val_{k}": v for k, v in metrics.items() if k.endswith("_head")})
        if parts.ema is not None:
            ema_metrics = evaluate(parts.ema.module, eval_loader, device)
            row.update(val_top1_ema=ema_metrics["top1"], val_top5_ema=ema_metrics["top5"])
        if parts.mkd is not None:
            row.update(parts.mkd.current())
        if parts.prokt is not None:
            row["teacher_lr"] = parts.prokt.current_lr()
        run.log.epoch(**row)
        save_checkpoint(run.out, model=parts.model, optimizer=parts.optimizer, scheduler=parts.scheduler,
                        ema=parts.ema, mkd=parts.mkd, prokt=parts.prokt, projector=parts.projector, epoch=pos.epoch,
                        batch=0, step=pos.step, images_seen=pos.images_seen, train_seconds=pos.train_seconds)
        if cfg.progress:
            print(f"epoch {epoch + 1}/{cfg.epochs}  loss {row['loss']:.3f}  val top-1 {row['val_top1']:.2f}%  "
                  f"top-5 {row['val_top5']:.2f}%  {row['images_per_s']:.0f} img/s", flush=True)
    run.env.barrier()


def _kd_name(cfg: TrainConfig) -> str:
    """The run's distillation as ``--kd`` names it: mkd and prokt are vanilla KD plus their tables."""
    return "mkd" if cfg.mkd is not None else "prokt" if cfg.prokt is not None else cfg.loss.kind


def _cache_urls(inputs: RunInputs) -> str | list[str] | None:
    """The run's cache for its summary: a URL, several (one per teacher), or None."""
    urls = [r.url for r in inputs.readers]
    return urls[0] if len(urls) == 1 else urls or None


def _summary(run: Run, inputs: RunInputs, t_start: float) -> dict:
    """Main rank, at the end: the student's (and EMA's) weights and ``summary.json``."""
    cfg, parts, out, pos = run.spec.cfg, run.parts, run.out, run.pos
    kwargs = cfg.student_kwargs()  # a student built with other arguments (a ViT's img_size) is rebuilt with them
    save_student(parts.model, out / "model.safetensors", cfg.student, inputs.num_classes, inputs.recipe, kwargs)
    if parts.ema is not None:
        save_student(parts.ema.module, out / "model_ema.safetensors", cfg.student, inputs.num_classes, inputs.recipe,
                     kwargs)
    epochs_logged = read_rows(out / "metrics.jsonl")
    summary = {
        "student": cfg.student, "kd": _kd_name(cfg),
        "online_teacher": cfg.online_teacher, "cache": _cache_urls(inputs),
        "world_size": run.env.world_size, "epochs": cfg.epochs,
        "final_top1": epochs_logged[-1]["val_top1"], "final_top5": epochs_logged[-1]["val_top5"],
        "best_top1": max(h["val_top1"] for h in epochs_logged), "wall_seconds": time.perf_counter() - t_start,
        "train_seconds": pos.train_seconds,
        "images_per_s": pos.images_seen / pos.train_seconds if pos.train_seconds else 0.0,
        "config": json.loads(json.dumps(asdict(cfg), default=str)), "weights": str(out / "model.safetensors"),
    }
    if parts.mkd is not None:
        summary.update(parts.mkd.current())
    if parts.prokt is not None:
        parts.prokt.save_weights(out / "prokt_teacher.safetensors", inputs.num_classes)
        summary["prokt_teacher_weights"] = str(out / "prokt_teacher.safetensors")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
