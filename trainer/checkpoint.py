"""A run's state on disk: the resume checkpoint (every epoch, and on SIGTERM), the SIGTERM
stop itself, and the final student weights.

``<out>/checkpoint/``: ``model.safetensors`` (+ ``ema.safetensors``; + ``prokt_teacher.safetensors``,
ProKT's trained teacher) and ``state.pt`` (optimiser, scheduler, MKD learner, ProKT's teacher
optimiser and scheduler under ``prokt``, torch RNG states, and the position: ``epoch``, ``batch``
(the next ones to run), ``step``, ``images_seen``, ``train_seconds``, and ``epoch_sums``, the
running sums of a stopped epoch's logged means).
"""

from __future__ import annotations

import json
import shutil
import signal
import threading
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from logitcache.build.teacher import META_INPUT, META_KWARGS, META_MODEL, ModelInput
from logitcache.errors import LogitcacheError
from logitcache.views.augment import Recipe

#: ProKT's trained teacher in the checkpoint folder.
PROKT_WEIGHTS = "prokt_teacher.safetensors"
#: --kd projector's projector (the student's own weights stay in model.safetensors).
PROJECTOR_WEIGHTS = "projector.safetensors"


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return cpu_tensors(module.state_dict())


def cpu_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict as safetensors takes it: detached, contiguous, on the CPU."""
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def save_model(model: torch.nn.Module, path: Path, name: str, num_classes: int, io: ModelInput,
               model_kwargs: dict | None = None) -> None:
    """safetensors weights with what ``--teacher-weights`` needs to rebuild the model: its timm
    name, class count, input spec ``io`` (size, normalisation, interpolation) and the other
    ``timm.create_model`` arguments it was built with (``model_kwargs``, JSON values)."""
    meta = {META_MODEL: name, "num_classes": str(num_classes), META_INPUT: io.to_json()}
    if model_kwargs:
        meta[META_KWARGS] = json.dumps(model_kwargs, sort_keys=True)
    save_file(_cpu_state(model), str(path), metadata=meta)


def save_student(model: torch.nn.Module, path: Path, name: str, num_classes: int, recipe: Recipe,
                 model_kwargs: dict | None = None) -> None:
    """:func:`save_model` for a student trained on ``recipe``'s views."""
    io = ModelInput(recipe.input_size, tuple(recipe.mean), tuple(recipe.std), recipe.interpolation)
    save_model(model, path, name, num_classes, io, model_kwargs)


def save_checkpoint(out: Path, *, model, optimizer, scheduler, ema, mkd, epoch: int, batch: int, step: int,
                    images_seen: int, train_seconds: float, epoch_sums: dict | None = None, prokt=None,
                    projector=None) -> None:
    """``<out>/checkpoint``: model.safetensors (+ ema.safetensors, prokt_teacher.safetensors) and
    state.pt (optimiser, scheduler, RNG, position). Written to a temporary folder, then swapped in by renames
    (the previous one is kept as ``checkpoint.old`` until the new one is in place): a kill at
    any moment leaves one complete checkpoint."""
    tmp, final, old = out / "checkpoint.tmp", out / "checkpoint", out / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_cpu_state(model), str(tmp / "model.safetensors"))
    if ema is not None:
        save_file(_cpu_state(ema.module), str(tmp / "ema.safetensors"))
    if projector is not None:  # trainer.projector.FeatureStudent: its projector, and where its features came from
        save_file(_cpu_state(projector.projector), str(tmp / PROJECTOR_WEIGHTS))
    prokt_state = None
    if prokt is not None:  # the teacher's weights beside the student's; its optimiser and schedule in state.pt
        prokt_state = prokt.state_dict()
        weights = prokt_state.pop("model")
        save_file(cpu_tensors(weights), str(tmp / PROKT_WEIGHTS))
    state = {
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "mkd": mkd.state_dict() if mkd is not None else None,
        "prokt": prokt_state,
        "feature_source": projector.source if projector is not None else None,
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


def load_checkpoint(out: Path, *, model, optimizer, scheduler, ema, mkd, prokt=None, projector=None) -> dict:
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
    if prokt is not None:
        if state.get("prokt") is None or not (ckpt / PROKT_WEIGHTS).exists():
            raise LogitcacheError(f"--resume: the checkpoint in {ckpt} holds no ProKT teacher (a run without "
                                  f"--kd prokt); resume it with its own settings")
        prokt.load_state_dict({"model": load_file(str(ckpt / PROKT_WEIGHTS)), **state["prokt"]})
    if projector is not None:
        _load_projector(ckpt, state, projector)
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state


def _load_projector(ckpt: Path, state: dict, projector) -> None:
    """Restore --kd projector's projector, refusing a checkpoint trained against other features."""
    if not (ckpt / PROJECTOR_WEIGHTS).exists():
        raise LogitcacheError(f"--resume: the checkpoint in {ckpt} holds no projector (a run without --kd projector); "
                              f"resume it with its own settings")
    if state.get("feature_source") != projector.source:
        raise LogitcacheError(f"--resume: the projector in {ckpt} was trained on the features of "
                              f"{state.get('feature_source')}; this run reads {projector.source} (another teacher or "
                              f"feature basis): use the run's own cache or teacher")
    projector.projector.load_state_dict(load_file(str(ckpt / PROJECTOR_WEIGHTS)))


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
