"""ProKT - Progressive Knowledge Transfer (Shi et al., "Follow Your Path: a Progressive Method
for Knowledge Distillation", ECML-PKDD 2021): a teacher that is trained along with the student.

The teacher starts from the given (online) teacher's weights and is updated every step,
*before* the student, by one optimiser step on the paper's objective: the hard-label loss
plus a constraint that keeps it close to the student's current output (the "local
intermediate target" of an approximate mirror-descent step)::

    L_teacher = (1 - lam) * hard(teacher(x), y) + lam * T^2 KL(softmax(s / T) || softmax(t / T))

with ``s`` the student's logits on the same views (detached: no gradient reaches the student),
``t`` the teacher's, ``y`` the run's mixed, smoothed label targets and ``T`` the KD temperature
(:func:`prokt_teacher_loss`). The student then learns with the run's vanilla KD loss from the
*updated* teacher's logits (:meth:`ProKTTeacher.targets`). Typical use (the trainer's step)::

    logits = student(x)                                        # (B, C), with grad
    terms = prokt.update(x, logits.detach(), target)           # one teacher step
    teacher_logits = prokt.targets(x)                          # (B, C), eval, no grad
    loss, parts = distill_loss(loss_cfg, logits, teacher_logits, target)

Choices:

* **One student forward**: the constraint's target is the detached output of the student's
  own forward of this step (the student's weights do not change between the teacher's
  update and the student's loss), so BatchNorm's running statistics are updated once per
  step, as without ProKT. The cost: the student's activations stay alive during the
  teacher's update.
* **Teacher modes**: the update's forward runs in train mode (BatchNorm batch statistics,
  running stats updated; dropout / drop-path active, drawing from the global RNG);
  :meth:`ProKTTeacher.targets` runs in eval mode under ``no_grad``: the student learns from
  the teacher's deterministic prediction, as from a frozen online teacher or a cache.
* **Teacher learning rate**: ``teacher_lr`` None means ``0.1 x`` the student's ``lr``
  (:data:`DEFAULT_TEACHER_LR_FACTOR`). The authors' code uses a teacher LR below the
  student's (3e-5 vs 1e-4 for BERT); the teacher here starts from converged weights, and a
  smaller step keeps it from drifting away from its accuracy early on.
* **Optimiser and schedule**: the run's optimiser (``opt``, ``weight_decay``, ``momentum``)
  at the teacher LR, and the run's schedule (warm-up, per-step updates, epoch steps) with
  ``min_lr`` and the warm-up LR scaled by ``teacher_lr / lr``; the run's ``clip_grad``
  clips the teacher's gradient too.
* **Distributed**: with several ranks the teacher is DDP-wrapped (gradients averaged, so
  every rank keeps the same weights); its BatchNorm running statistics are per rank, as the
  student's.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ContextManager

import torch
from torch import Tensor

from .config import ProKTConfig, TrainConfig
from .losses import HARD_KINDS, hard_label_loss, kd_loss

if TYPE_CHECKING:
    from logitcache.build.teacher import Teacher

__all__ = ["ProKTTeacher", "prokt_teacher_loss"]


#: The teacher's logged terms (unweighted, batch means).
PROKT_TERMS = ("teacher_hard", "teacher_constraint")


def prokt_teacher_loss(teacher_logits: Tensor, student_logits: Tensor, target: Tensor, lam: float,
                       temperature: float, hard_kind: str = "ce") -> tuple[Tensor, dict[str, Tensor]]:
    """The teacher's ProKT objective on one batch.

    Args:
        teacher_logits: (B, C) logits of the teacher being trained (gradients flow to it).
        student_logits: (B, C) the student's logits on the same views; the constraint's
            target (detached here: no gradient reaches the student).
        target: (B, C) mixed, smoothed label probabilities.
        lam: constraint weight lambda in [0, 1].
        temperature: T of the constraint.
        hard_kind: ``"ce"`` or ``"bce"`` (:func:`logitcache.trainer.losses.hard_label_loss`).

    Returns:
        ``(loss, terms)``: ``loss == (1 - lam) * hard + lam * constraint`` exactly, with
        ``terms = {"teacher_hard": hard, "teacher_constraint": constraint}``, where
        ``hard = hard_label_loss(teacher_logits, target, kind=hard_kind)`` and
        ``constraint = kd_loss(teacher_logits, student_logits, T)``
        ``= T^2 KL(softmax(student / T) || softmax(teacher / T))`` (batch mean, nats; 0 when
        the two logits agree).
    """
    if hard_kind not in HARD_KINDS:
        raise ValueError(f"unknown hard-label loss kind {hard_kind!r}; expected one of {HARD_KINDS}")
    teacher_logits = teacher_logits.float()
    student_logits = student_logits.detach().to(teacher_logits.dtype)
    hard = hard_label_loss(teacher_logits, target, kind=hard_kind)
    constraint = kd_loss(teacher_logits, student_logits, temperature)
    loss = (1.0 - lam) * hard + lam * constraint
    return loss, {"teacher_hard": hard, "teacher_constraint": constraint}


class ProKTTeacher:
    """A trainable copy of the online teacher, its optimiser and schedule (see the module doc).

    Args:
        cfg: ProKT's settings.
        teacher: the online teacher; its model is copied (the original stays untouched) and
            its input spec (``teacher.io``) maps the views to the teacher's normalisation/size.
        run: the run's settings (optimiser, schedule, loss temperature and hard kind, clip).
        mean, std: the views' normalisation (the recipe's).
        steps_per_epoch: optimiser steps per epoch (the schedule's per-step updates).
        autocast: the run's autocast context factory (bf16 on CUDA when ``amp``).
        world_size: ranks; above 1 the teacher is wrapped in DDP.
    """

    def __init__(self, cfg: ProKTConfig, teacher: "Teacher", run: "TrainConfig", *, mean, std,
                 steps_per_epoch: int, autocast: Callable[[], ContextManager], world_size: int = 1):
        from .optim import create_optimizer_and_scheduler

        self.cfg, self.name, self.io = cfg, teacher.name, teacher.io
        self.device = teacher.device
        self.mean, self.std = tuple(mean), tuple(std)
        self.temperature, self.hard_kind = run.loss.temperature, run.loss.hard_kind
        self.clip_grad, self.channels_last = run.clip_grad, run.channels_last
        self.autocast = autocast
        self.model = copy.deepcopy(teacher.model).train().requires_grad_(True)
        self.train_model = self.model
        if world_size > 1:
            dev = self.device
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[dev.index] if dev.type == "cuda" else None)
        self.lr = cfg.resolved_teacher_lr(run.peak_lr)
        self.optimizer, self.scheduler = create_optimizer_and_scheduler(
            self.model, run, steps_per_epoch, lr=self.lr, min_lr=run.min_lr * (self.lr / run.peak_lr))

    def _inputs(self, x: Tensor) -> Tensor:
        """Views (B, 3, H, W) in the recipe's normalisation -> the teacher's input."""
        from logitcache.build.teacher import adapt_views

        x = adapt_views(x.to(self.device), self.mean, self.std, self.io)
        if self.device.type == "cuda" and self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def update(self, x: Tensor, student_logits: Tensor, target: Tensor, weight: float = 1.0) -> dict[str, Tensor]:
        """One optimiser step of the teacher on views ``x`` (B, 3, H, W).

        ``student_logits`` (B, C) is the constraint's target (detached); ``target`` (B, C) the
        label probabilities. ``weight`` scales the loss that is back-propagated (this rank's
        share of the global batch, see the trainer's step). Returns the unweighted terms
        (0-d, detached): ``teacher_hard``, ``teacher_constraint``."""
        self.model.train()
        with self.autocast():
            logits = self.train_model(self._inputs(x))
        loss, terms = prokt_teacher_loss(logits.float(), student_logits, target, self.cfg.lam, self.temperature,
                                         self.hard_kind)
        self.optimizer.zero_grad(set_to_none=True)
        (loss * weight if weight != 1.0 else loss).backward()
        if self.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        self.optimizer.step()
        return {k: v.detach() for k, v in terms.items()}

    @torch.no_grad()
    def targets(self, x: Tensor) -> Tensor:
        """(B, C) float32 logits of the (updated) teacher on views ``x``: eval mode, no grad."""
        self.model.eval()
        try:
            with self.autocast():
                return self.model(self._inputs(x)).float()
        finally:
            self.model.train()

    def step_update(self, num_updates: int) -> None:
        """The schedule's per-step update (after the student's optimiser step)."""
        self.scheduler.step_update(num_updates)

    def step_epoch(self, epoch: int) -> None:
        """The schedule's end-of-epoch step."""
        self.scheduler.step(epoch)

    def current_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        """``{"model": weights and buffers, "optimizer": ..., "scheduler": ...}``."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict` (weights, optimiser, schedule)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def save_weights(self, path: Path, num_classes: int) -> None:
        """The trained teacher as safetensors with the metadata ``--teacher-weights`` reads."""
        from .checkpoint import save_model

        save_model(self.model, path, self.name, num_classes, self.io)
