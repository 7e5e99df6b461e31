"""One training epoch: its steps, their logged rows, the epoch's running sums, and the SIGTERM
stop (every rank stops after the same step; the main rank checkpoints, then
:class:`TrainingStopped` is raised)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from logitcache.distributed import DistContext

from .checkpoint import StopFlag, TrainingStopped, save_checkpoint
from .metrics_log import Logger
from .prokt import PROKT_TERMS
from .step import StepSpec, StudentParts, train_step

#: ``on_step(info)``: called on every rank after every optimiser step with ``info`` =
#: ``{"step", "epoch", "batch", "row", "model", "ema", "teacher", "mkd", "prokt"}`` (``row`` is
#: what steps.jsonl gets; ``teacher`` is None in cached mode and with ProKT, whose trained
#: teacher is ``prokt``). For tests and monitoring.
StepCallback = Callable[[dict], None]

#: The step terms an epoch's metrics row averages.
EPOCH_TERMS = ("loss", "hard", "kd")


@dataclass
class Position:
    """Where a run stands (checkpointed): the next epoch and batch, and totals so far."""

    epoch: int = 0
    batch: int = 0
    step: int = 0  # optimiser steps taken
    images_seen: int = 0  # views trained on, over all ranks
    train_seconds: float = 0.0  # time in epochs' steps (no evaluation, no set-up)

    @classmethod
    def from_state(cls, state: dict) -> "Position":
        return cls(state["epoch"], state["batch"], state["step"], state["images_seen"], state["train_seconds"])


@dataclass
class EpochTally:
    """Running sums of an epoch's logged step means, for its metrics row."""

    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(EPOCH_TERMS, 0.0))
    n_batches: int = 0
    epoch_images: int = 0  # views, over all ranks

    @classmethod
    def from_state(cls, saved: dict) -> "EpochTally":
        """The tally a SIGTERM checkpoint saved (see :meth:`state`)."""
        tally = cls(n_batches=saved["n_batches"], epoch_images=saved["epoch_images"])
        tally.sums.update(saved["sums"])
        return tally

    def state(self) -> dict:
        return {"sums": self.sums, "n_batches": self.n_batches, "epoch_images": self.epoch_images}

    def means(self) -> dict[str, float]:
        return {k: v / max(self.n_batches, 1) for k, v in self.sums.items()}


@dataclass
class Run:
    """One run's live objects, set up by :func:`logitcache.trainer.train.train`."""

    spec: StepSpec
    parts: StudentParts
    env: DistContext
    log: Logger
    stop: StopFlag
    out: Path
    pos: Position
    on_step: StepCallback | None = None


def train_one_epoch(run: Run, loader, epoch: int, tally: EpochTally) -> float:
    """Train ``epoch`` on ``loader``'s batches (from ``run.pos.batch`` on), adding every step's
    logged means to ``tally``; returns the seconds it took. ``run.pos.step`` advances."""
    parts, pos, env = run.parts, run.pos, run.env
    keys = [*EPOCH_TERMS] + (parts.mkd.logged_keys() if parts.mkd is not None else [])
    if parts.projector is not None:  # the projector's distance: in the step rows and the epoch's means
        keys.append("feature")
        tally.sums.setdefault("feature", 0.0)
    if parts.prokt is not None:  # the trained teacher's terms: in the step rows and the epoch's means
        keys += PROKT_TERMS
        for k in PROKT_TERMS:
            tally.sums.setdefault(k, 0.0)
    first_batch = pos.batch
    parts.train_model.train()
    t0 = time.perf_counter()
    for b, batch in enumerate(loader, start=first_batch):
        global_views = loader.global_batch_views[b - first_batch]
        result = train_step(run.spec, parts, batch, epoch=epoch, batch_index=b, step=pos.step,
                            global_views=global_views)
        pos.step += 1
        tally.n_batches += 1
        parts.scheduler.step_update(pos.step)
        if parts.prokt is not None:
            parts.prokt.step_update(pos.step)
        # One collective (and one device sync) per step: the logged means and the stop flag.
        values = torch.stack([result.loss.detach(), *(result.terms[k].detach() for k in keys[1:]),
                              torch.tensor(float(run.stop.stop), device=result.loss.device)])
        *means, stop_any = env.means(values)
        row = {"epoch": epoch, **dict(zip(keys, means)), "lr": parts.optimizer.param_groups[0]["lr"]}
        if parts.prokt is not None:
            row["teacher_lr"] = parts.prokt.current_lr()
        if result.meta is not None:
            row["meta_loss"] = result.meta["meta_loss"]
        run.log.step(pos.step, **row)
        for k in tally.sums:
            tally.sums[k] += row[k]
        tally.epoch_images += global_views
        if run.on_step is not None:
            run.on_step({"step": pos.step, "epoch": epoch, "batch": b, "row": row, "model": parts.model,
                         "ema": parts.ema, "teacher": parts.teacher, "mkd": parts.mkd, "prokt": parts.prokt})
        if stop_any > 0:  # SIGTERM on any rank: every rank stops after the same step
            pos.train_seconds += time.perf_counter() - t0
            _stop(run, epoch, b + 1, tally)
    return time.perf_counter() - t0


def _stop(run: Run, epoch: int, next_batch: int, tally: EpochTally) -> None:
    """Checkpoint mid-epoch (main rank), wait for every rank, raise :class:`TrainingStopped`."""
    parts, pos = run.parts, run.pos
    if run.env.main:
        save_checkpoint(run.out, model=parts.model, optimizer=parts.optimizer, scheduler=parts.scheduler,
                        ema=parts.ema, mkd=parts.mkd, prokt=parts.prokt, projector=parts.projector, epoch=epoch,
                        batch=next_batch, step=pos.step,
                        images_seen=pos.images_seen + tally.epoch_images, train_seconds=pos.train_seconds,
                        epoch_sums=tally.state())
    run.env.barrier()  # no rank exits (and gets the others killed) before the checkpoint exists
    raise TrainingStopped(f"stopped by SIGTERM at epoch {epoch} batch {next_batch}; "
                          f"continue with --resume (checkpoint in {run.out / 'checkpoint'})")
