"""One optimiser step of the student on one batch (this rank's slice of a global batch).

In order: images to the device; mixed, smoothed label targets (B, C); teacher logits (B, C),
rebuilt from the cached top-k rows (one scatter) or from the online teacher; MKD's meta
step when one is due; the student's forward and loss; backward, clipping, optimiser step
and EMA update. The order is part of the run's RNG stream: a resumed run depends on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from timm.data.mixup import one_hot
from timm.utils import ModelEmaV3

from logitcache.codec import CodecSpec, decode
from logitcache.teacher import Teacher
from logitcache.views import Recipe

from .config import TrainConfig
from .losses import distill_loss
from .mkd import MetaTemperatureLearner, mkd_loss


def smoothed_targets(label: torch.Tensor, partner_label: torch.Tensor, lam: torch.Tensor, num_classes: int,
                     smoothing: float) -> torch.Tensor:
    """Mixed, smoothed label targets (B, C): lam * y(label) + (1 - lam) * y(partner), as timm's
    mixup_target but with a per-sample ``lam`` (B,) and explicit partner labels."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    y1 = one_hot(label, num_classes, on_value=on, off_value=off)
    y2 = one_hot(partner_label, num_classes, on_value=on, off_value=off)
    lam = lam[:, None].to(y1.dtype)
    return y1 * lam + y2 * (1 - lam)


@dataclass
class StudentParts:
    """What the steps update, and the online teacher."""

    model: torch.nn.Module  # the student itself (checkpointed, evaluated, saved)
    train_model: torch.nn.Module  # what the step's forward runs: the student, DDP-wrapped and/or compiled
    optimizer: torch.optim.Optimizer
    scheduler: object  # a timm scheduler (step_update per step, step per epoch)
    ema: ModelEmaV3 | None
    mkd: MetaTemperatureLearner | None
    teacher: Teacher | None  # online mode only


@dataclass
class StepSpec:
    """What every step of a run shares."""

    cfg: TrainConfig
    device: torch.device
    num_classes: int
    recipe: Recipe  # the views' normalisation (the online teacher maps it to its own)
    steps_per_epoch: int  # for the loss's fractional epoch (DKD warm-up)
    world_size: int
    meta_batches: Iterator[tuple[torch.Tensor, torch.Tensor]] | None  # MKD: (images, labels) of the meta split
    codec: CodecSpec | None = None  # the cache's: how its teacher rows decode (None: online teacher)

    @property
    def needs_teacher_logits(self) -> bool:
        return self.cfg.loss.kind != "none" or self.cfg.mkd is not None

    def autocast(self) -> torch.autocast:
        """bf16 autocast on CUDA when ``amp`` is on; disabled otherwise."""
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cfg.amp and self.device.type == "cuda")


@dataclass
class StepResult:
    """A step's loss and logged terms (this rank's share of the global mean), and MKD's meta stats."""

    loss: torch.Tensor  # 0-d
    terms: dict[str, torch.Tensor]  # "hard", "kd" (+ "t_teacher", "t_student" with MKD), 0-d
    meta: dict[str, float] | None  # MKD meta step's stats when one ran


def train_step(spec: StepSpec, parts: StudentParts, batch: dict, *, epoch: int, batch_index: int, step: int,
               global_views: int) -> StepResult:
    """One step on ``batch`` (batch ``batch_index`` of ``epoch``; ``step`` optimiser steps done
    before it). ``global_views`` is the size of the global batch this rank holds a slice of."""
    cfg, device = spec.cfg, spec.device
    x = batch["images"].to(device, non_blocking=True)
    if device.type == "cuda" and cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    target = smoothed_targets(batch["label"].to(device), batch["partner_label"].to(device),
                              batch["lam"].to(device), spec.num_classes, cfg.label_smoothing)
    teacher_logits = _teacher_logits(spec, parts.teacher, batch, x)
    meta = None
    if parts.mkd is not None and parts.mkd.should_step(step):
        x_meta, y_meta = next(spec.meta_batches)
        meta = parts.mkd.meta_step(parts.model, x, teacher_logits, target, x_meta.to(device), y_meta.to(device),
                                   student_lr=parts.optimizer.param_groups[0]["lr"], loss_cfg=cfg.loss)
    loss, terms = _loss(spec, parts, x, teacher_logits, target, epoch + batch_index / spec.steps_per_epoch)
    # This rank's share of the global batch (1 unless a mixing recipe left a group of one
    # view): DDP averages gradients over ranks, so the average is the gradient of the mean
    # over the global batch; logged values are global means too.
    share = len(x) * spec.world_size / global_views
    if share != 1.0:
        loss = loss * share
        terms = {k: (v * share if k in ("hard", "kd") else v) for k, v in terms.items()}
    parts.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.clip_grad:
        torch.nn.utils.clip_grad_norm_(parts.model.parameters(), cfg.clip_grad)
    parts.optimizer.step()
    if parts.ema is not None:
        parts.ema.update(parts.model, step=step)
    return StepResult(loss, terms, meta)


def _teacher_logits(spec: StepSpec, teacher: Teacher | None, batch: dict, x: torch.Tensor) -> torch.Tensor | None:
    """(B, C) float teacher logits of the views ``x``, or None when the loss needs none."""
    if teacher is not None:
        # The teacher answers under inference_mode; the clone (made outside it) is an
        # ordinary tensor that autograd may save (MKD differentiates logits / T).
        return teacher(x, spec.recipe.mean, spec.recipe.std).clone()
    if spec.needs_teacher_logits:
        return decode(spec.codec, *(batch[k].to(spec.device, non_blocking=True) for k in ("ids", "values", "tail")))
    return None


def _loss(spec: StepSpec, parts: StudentParts, x: torch.Tensor, teacher_logits: torch.Tensor | None,
          target: torch.Tensor, frac_epoch: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The student's forward and its loss: MKD's KD at the learned temperatures, or ``cfg.loss``."""
    with spec.autocast():
        logits = parts.train_model(x)
    logits = logits.float()
    if parts.mkd is None:
        return distill_loss(spec.cfg.loss, logits, teacher_logits, target, epoch=frac_epoch)
    t_t, t_s = parts.mkd.kd_temperatures(logits.detach(), teacher_logits)
    loss, terms = mkd_loss(spec.cfg.loss, logits, teacher_logits, target, t_t, t_s)
    return loss, {**terms, "t_teacher": t_t.mean(), "t_student": t_s.mean()}
