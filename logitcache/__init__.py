"""logitcache: an offline teacher-logit cache and student trainer for knowledge distillation.

The public API (stable names; see ``logitcache.api`` for the batch layout), for training
from a cache in your own loop::

    data = logitcache.CachedTrainData("data/synth", "caches/synth.zarr")
    for batch in data.loader(epoch, batch_size=128, rank=rank, world_size=world_size):
        target = logitcache.smoothed_targets(batch["label"], batch["partner_label"], batch["lam"], C, 0.1)
        s = student(batch["images"].to(device))
        t = logitcache.teacher_logits(batch, data.codec, device)
        loss = logitcache.hard_label_loss(s, target.to(device)) + logitcache.kd_loss(s, t, 1.0)

Names are imported on first use, so ``import logitcache`` stays light (no torch, no timm).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: public name -> the module it lives in (re-exported, not copied).
_PUBLIC = {
    "open_cache": "logitcache.api",
    "CachedTrainData": "logitcache.api",
    "teacher_logits": "logitcache.api",
    "teacher_probs": "logitcache.api",
    "teacher_features": "logitcache.api",
    "ensemble_probs": "logitcache.api",
    "CacheReader": "logitcache.storage.reader",
    "decode": "logitcache.codecs.logits",
    "rebuilt_probs": "logitcache.codecs.logits",
    "teacher_top1": "logitcache.codecs.logits",
    "smoothed_targets": "logitcache.trainer.step",
    "hard_label_loss": "logitcache.trainer.losses",
    "kd_loss": "logitcache.trainer.losses",
    "dkd_loss": "logitcache.trainer.losses",
    "dist_loss": "logitcache.trainer.losses",
    "distill_loss": "logitcache.trainer.losses",
    "LossConfig": "logitcache.trainer.losses",
    "token_distill_loss": "logitcache.trainer.token",
    "MetaTemperatureLearner": "logitcache.trainer.mkd",
    "MKDConfig": "logitcache.trainer.config",
    "mkd_loss": "logitcache.trainer.mkd",
    "FeatureStudent": "logitcache.trainer.projector",
    "projector_distance": "logitcache.trainer.projector",
    "LogitcacheError": "logitcache.errors",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    """Import a public name's module on first use (PEP 562)."""
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'logitcache' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
