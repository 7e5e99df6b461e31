"""One optimiser step of the student on one batch (this rank's slice of a global batch).

In order: images to the device; mixed, smoothed label targets (B, C); teacher logits (B, C),
rebuilt from the cached top-k rows (one scatter) or from the online teacher; MKD's meta
step when one is due; the student's forward and loss; backward, clipping, optimiser step
and EMA update. The order is part of the run's RNG stream: a resumed run depends on it.

ProKT (``parts.prokt``): the student's forward first; one step of the trained teacher
towards the labels and the student's (detached) logits; the updated teacher's logits (eval
mode, no grad); then the student's loss on the same forward's logits, as above.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from timm.data.mixup import one_hot
from timm.utils import ModelEmaV3

from logitcache.build.teacher import Teacher
from logitcache.codecs.features import FeatureSpec, decode_features
from logitcache.codecs.logits import CodecSpec, decode, teacher_top1
from logitcache.replay.teachers import row_keys
from logitcache.views.augment import Recipe

from .config import TrainConfig
from .ensemble import multi_teacher_loss
from .losses import TOKEN_KINDS, distill_loss
from .mkd import MetaTemperatureLearner, mkd_loss
from .projector import FeatureStudent, projector_distance
from .prokt import PROKT_TERMS, ProKTTeacher
from .token import token_distill_loss


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
    teacher: Teacher | None  # online mode only (None with ProKT, whose trained copy replaces it)
    prokt: ProKTTeacher | None = None  # ProKT: the teacher trained along with the student
    projector: FeatureStudent | None = None  # --kd projector: the student with its projector (train_model wraps it)

    def trained_parameters(self):
        """What the optimiser steps (and --clip-grad clips): the student's, and the projector's."""
        return (self.projector if self.projector is not None else self.model).parameters()


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
    # how each cache's teacher rows decode, in --cache order (several caches: one per teacher,
    # trainer/ensemble.py); none: the online teacher
    codecs: tuple[CodecSpec, ...] = ()
    features: FeatureSpec | None = None  # --kd projector from a cache: how its feature rows decode
    basis: tuple[torch.Tensor, torch.Tensor] | None = None  # ... and its basis (mean, components) on the device

    @property
    def codec(self) -> CodecSpec | None:
        """The (first) cache's codec; None: online teacher."""
        return self.codecs[0] if self.codecs else None

    @property
    def needs_teacher_logits(self) -> bool:
        """Whether the cached rows are decoded to logits (deit-hard reads only each row's top-1 id)."""
        return self.cfg.loss.kind not in ("none", "deit-hard") or self.cfg.mkd is not None

    def autocast(self) -> torch.autocast:
        """bf16 autocast on CUDA when ``amp`` is on; disabled otherwise."""
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cfg.amp and self.device.type == "cuda")


@dataclass
class StepResult:
    """A step's loss and logged terms (this rank's share of the global mean), and MKD's meta stats."""

    loss: torch.Tensor  # 0-d
    terms: dict[str, torch.Tensor]  # "hard", "kd" (+ "t_teacher", "t_student" with MKD;
    #                                   "teacher_hard", "teacher_constraint" with ProKT), 0-d
    meta: dict[str, float] | None  # MKD meta step's stats when one ran


#: Terms scaled by this rank's share of the global batch (batch means, and the projector's distance).
_SHARED_TERMS = ("hard", "kd", "feature", *PROKT_TERMS)


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
    # This rank's share of the global batch (1 unless a mixing recipe left a group of one
    # view): DDP averages gradients over ranks, so the average is the gradient of the mean
    # over the global batch; logged values are global means too.
    share = len(x) * spec.world_size / global_views
    frac_epoch = epoch + batch_index / spec.steps_per_epoch
    meta = None
    if parts.prokt is not None:
        loss, terms = _prokt_loss(spec, parts, x, target, frac_epoch, share)
    else:
        teacher_logits, teacher_feats = _teacher_outputs(spec, parts.teacher, batch, x)
        if parts.mkd is not None and parts.mkd.should_step(step):
            x_meta, y_meta = next(spec.meta_batches)
            meta = parts.mkd.meta_step(parts.model, x, teacher_logits, target, x_meta.to(device),
                                       y_meta.to(device), student_lr=parts.optimizer.param_groups[0]["lr"],
                                       loss_cfg=cfg.loss)
        if parts.projector is not None:
            loss, terms = _projector_loss(spec, parts, x, teacher_logits, teacher_feats, target, frac_epoch)
        elif cfg.loss.kind in TOKEN_KINDS:
            loss, terms = _token_loss(spec, parts, x, teacher_logits, target, batch)
        else:
            loss, terms = _loss(spec, parts, x, teacher_logits, target, frac_epoch)
    if share != 1.0:
        loss = loss * share
        terms = {k: (v * share if k in _SHARED_TERMS else v) for k, v in terms.items()}
    parts.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.clip_grad:
        torch.nn.utils.clip_grad_norm_(parts.trained_parameters(), cfg.clip_grad)
    parts.optimizer.step()
    if parts.ema is not None:
        parts.ema.update(parts.model, step=step)
    return StepResult(loss, terms, meta)


def _teacher_outputs(spec: StepSpec, teacher: Teacher | None, batch: dict,
                     x: torch.Tensor) -> tuple[torch.Tensor | list[torch.Tensor] | None, torch.Tensor | None]:
    """The teacher's (B, C) float logits of the views ``x`` (None when the loss needs none;
    several caches: a list, one per teacher) and, for --kd projector, its (B, D) pooled
    features (else None): from the online teacher's one forward, or decoded from the cached
    rows on the device."""
    feats = None
    if teacher is not None:
        # The teacher answers under inference_mode; the clone (made outside it) is an
        # ordinary tensor that autograd may save (MKD differentiates logits / T).
        if spec.cfg.needs_teacher_features:
            logits, feats = teacher(x, spec.recipe.mean, spec.recipe.std, features=True)
            return logits.clone(), feats.clone()
        return teacher(x, spec.recipe.mean, spec.recipe.std).clone(), None
    if not spec.needs_teacher_logits:
        return None, None
    dev = spec.device
    if len(spec.codecs) > 1:
        return [decode(c, *(batch[k].to(dev, non_blocking=True) for k in row_keys(t)))
                for t, c in enumerate(spec.codecs)], None
    logits = decode(spec.codec, *(batch[k].to(dev, non_blocking=True) for k in row_keys(0)))
    if spec.cfg.needs_teacher_features:
        scale = batch["feat_scale"].to(dev, non_blocking=True) if "feat_scale" in batch else None
        feats = decode_features(spec.features, spec.basis, batch["feat"].to(dev, non_blocking=True), scale)
    return logits, feats


def _projector_loss(spec: StepSpec, parts: StudentParts, x: torch.Tensor, teacher_logits: torch.Tensor,
                    teacher_feats: torch.Tensor, target: torch.Tensor,
                    frac_epoch: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """--kd projector: one forward of the student with its projector; ``cfg.loss`` (hard label +
    KD on the logits) plus ``feature_weight`` x the projector distance to the teacher's (B, D)
    features (trainer/projector.py). Terms: "hard", "kd", "feature"."""
    with spec.autocast():
        logits, projected = parts.train_model(x)
    loss, terms = distill_loss(spec.cfg.loss, logits.float(), teacher_logits, target, epoch=frac_epoch)
    distance = projector_distance(projected.float(), teacher_feats)
    return loss + spec.cfg.loss.feature_weight * distance, {**terms, "feature": distance}


def _prokt_loss(spec: StepSpec, parts: StudentParts, x: torch.Tensor, target: torch.Tensor, frac_epoch: float,
                share: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ProKT: the student's forward (B, C); one teacher step towards ``target`` (B, C) and the
    detached student logits; the student's ``cfg.loss`` on the updated teacher's logits. The
    terms hold the student's ("hard", "kd") and the teacher's ("teacher_hard", "teacher_constraint")."""
    logits = _student_logits(spec, parts, x)
    teacher_terms = parts.prokt.update(x, logits.detach(), target, weight=share)
    teacher_logits = parts.prokt.targets(x)
    loss, terms = distill_loss(spec.cfg.loss, logits, teacher_logits, target, epoch=frac_epoch)
    return loss, {**terms, **teacher_terms}


def _token_loss(spec: StepSpec, parts: StudentParts, x: torch.Tensor, teacher_logits: torch.Tensor,
                target: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """--kd deit-hard / deit-soft: the student's two heads (class, distillation), each (B, C);
    the hard target is the cached top-1 (exact, :func:`~logitcache.codecs.logits.teacher_top1`)
    or the online teacher's argmax."""
    with spec.autocast():
        class_logits, dist_logits = parts.train_model(x)
    top1 = None
    if parts.teacher is None and spec.cfg.loss.kind == "deit-hard":  # from the cached rows
        top1 = teacher_top1(spec.codec, *(batch[k].to(spec.device, non_blocking=True) for k in ("ids", "values",
                                                                                                  "tail")))
    return token_distill_loss(spec.cfg.loss, class_logits.float(), dist_logits.float(), teacher_logits, target,
                              teacher_top1=top1)


def _student_logits(spec: StepSpec, parts: StudentParts, x: torch.Tensor) -> torch.Tensor:
    """The student's forward on ``x``: (B, C) float32 logits, attached to the graph."""
    with spec.autocast():
        logits = parts.train_model(x)
    return logits.float()


def _loss(spec: StepSpec, parts: StudentParts, x: torch.Tensor,
          teacher_logits: torch.Tensor | list[torch.Tensor] | None, target: torch.Tensor,
          frac_epoch: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The student's forward and its loss: MKD's KD at the learned temperatures, ``cfg.loss``,
    or from several teachers ``cfg.teachers`` (trainer/ensemble.py)."""
    logits = _student_logits(spec, parts, x)
    if parts.mkd is None and isinstance(teacher_logits, list):
        return multi_teacher_loss(spec.cfg.loss, spec.cfg.teachers, logits, teacher_logits, target, epoch=frac_epoch)
    if parts.mkd is None:
        return distill_loss(spec.cfg.loss, logits, teacher_logits, target, epoch=frac_epoch)
    # MKD: learned temperatures (several teachers: a pair per teacher, one KD term each)
    t_t, t_s = parts.mkd.kd_temperatures(logits.detach(), teacher_logits)
    loss, terms = mkd_loss(spec.cfg.loss, logits, teacher_logits, target, t_t, t_s, parts.mkd.weights)
    return loss, {**terms, **parts.mkd.logged(t_t, t_s)}
