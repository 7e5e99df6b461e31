"""The run's optimiser and learning-rate schedule, by timm name (``--opt``, ``--sched``).

One factory serves the student and ProKT's trained teacher, which follows the student's
schedule at its own peak learning rate.
"""

from __future__ import annotations

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from .config import TrainConfig

#: The warm-up starts at this fraction of the peak learning rate.
WARMUP_LR_FRACTION = 0.01


def create_optimizer_and_scheduler(module: torch.nn.Module, cfg: TrainConfig, steps_per_epoch: int, *,
                                   lr: float | None = None, min_lr: float | None = None):
    """(optimiser, scheduler) for ``module``'s parameters: ``cfg.opt`` (weight decay, momentum)
    at peak ``lr`` (default ``cfg.peak_lr``), ``cfg.sched`` over ``cfg.epochs`` with a linear
    warm-up of ``cfg.warmup_epochs`` from ``cfg.warmup_lr`` (default ``WARMUP_LR_FRACTION x
    lr``; scaled with ``lr``), down to ``min_lr`` (default ``cfg.min_lr``), updated every
    step (``step_update``) or, without ``cfg.sched_on_updates``, every epoch (``step``)."""
    peak = cfg.peak_lr
    lr = peak if lr is None else lr
    warmup_lr = lr * WARMUP_LR_FRACTION if cfg.warmup_lr is None else cfg.warmup_lr * lr / peak
    optimizer = create_optimizer_v2(module, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    scheduler, _ = create_scheduler_v2(optimizer, sched=cfg.sched, num_epochs=cfg.epochs,
                                       warmup_epochs=cfg.warmup_epochs,
                                       min_lr=cfg.min_lr if min_lr is None else min_lr,
                                       warmup_lr=warmup_lr, step_on_epochs=not cfg.sched_on_updates,
                                       updates_per_epoch=steps_per_epoch)
    return optimizer, scheduler
