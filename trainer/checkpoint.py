"""A run's state on disk: the resume checkpoint (every epoch, and on SIGTERM), the SIGTERM
stop itself, and the final student weights.

``<out>/checkpoint/``: ``model.safetensors`` (+ ``ema.safetensors``) and ``state.pt``
(optimiser, scheduler, MKD learner, torch RNG states, and the position: ``epoch``, ``batch``
(the next ones to run), ``step``, ``images_seen``, ``train_seconds``, and ``epoch_sums``, the
running sums of a stopped epoch's logged means).
"""

from __future__ import annotations

import shutil
import signal
import threading
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from logitcache.errors import LogitcacheError
from logitcache.teacher import META_INPUT, META_MODEL, ModelInput
from logitcache.views import Recipe


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_student(model: torch.nn.Module, path: Path, name: str, num_classes: int, recipe: Recipe) -> None:
    """safetensors weights with what ``--teacher-weights`` needs to rebuild the model."""
    io = ModelInput(recipe.input_size, tuple(recipe.mean), tuple(recipe.std), recipe.interpolation)
    save_file(_cpu_state(model), str(path),
              metadata={META_MODEL: name, "num_classes": str(num_classes), META_INPUT: io.to_json()})


def save_checkpoint(out: Path, *, model, optimizer, scheduler, ema, mkd, epoch: int, batch: int, step: int,
                    images_seen: int, train_seconds: float, epoch_sums: dict | None = None) -> None:
    """``<out>/checkpoint``: model.safetensors (+ ema.safetensors) and state.pt (optimiser,
    scheduler, RNG, position). Written to a temporary folder, then swapped in by renames
    (the previous one is kept as ``checkpoint.old`` until the new one is in place): a kill at
    any moment leaves one complete checkpoint."""
    tmp, final, old = out / "checkpoint.tmp", out / "checkpoint", out / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_cpu_state(model), str(tmp / "model.safetensors"))
    if ema is not None:
        save_file(_cpu_state(ema.module), str(tmp / "ema.safetensors"))
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
    """Restore what :func:`save_checkpoint` wrote into the given objects (and the torch RNG);
    returns the state, whose position entries say where the run continues."""
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
