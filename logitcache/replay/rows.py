"""An epoch's cached teacher rows joined to rendered batches (:class:`CachedRows`), and the
check that the cached units were planned as this code plans them (:func:`check_plans`).

Cached rows (top-k ids, logits, tail) join each batch in the main process as it arrives from
the DataLoader workers (one gather per array), as small tensors; the distribution is rebuilt
on the device in the step.
"""

from __future__ import annotations

import numpy as np
import torch

from logitcache.replay.teachers import row_keys
from logitcache.storage.canary import check_plan
from logitcache.storage.reader import EpochArrays
from logitcache.views.augment import Recipe


class CachedRows:
    """Adds label targets and one epoch's cached teacher rows to a rendered batch, by view
    (sample index, and repeat: :meth:`~logitcache.storage.reader.EpochArrays.rows_of`).
    ``arrays``: one cache's epoch, or several caches' on the same views (teacher i's rows
    under :func:`~logitcache.replay.teachers.row_keys` (i)), or None (labels only).

    Runs in the main process (the loader's ``extra``), once per batch: one vectorised numpy
    gather per array (no per-sample Python), so rows join the images as small tensors (in
    their stored dtypes: gap codes, counts or float values; decoded on the device). Workers
    need not hold the epoch's arrays, so one set of workers serves every epoch."""

    def __init__(self, arrays: EpochArrays | list[EpochArrays] | None, labels: np.ndarray, source=None):
        self.teachers: list[EpochArrays] = [] if arrays is None else list(arrays) if isinstance(arrays, list) else [arrays]
        self.labels = labels
        self.source = source

    def __call__(self, batch: dict) -> dict[str, torch.Tensor]:
        idx, partner = batch["index"].numpy(), batch["partner"].numpy()
        # np.take along axis 0: the same rows as fancy indexing, about 1.7x faster for small batches
        out = {"label": torch.from_numpy(self.labels.take(idx)), "partner_label": torch.from_numpy(self.labels.take(partner))}
        for t, a in enumerate(self.teachers):
            row = a.rows_of(idx, batch["repeat"].numpy())
            ids, values, tail = row_keys(t)
            out[ids] = torch.from_numpy(a.ids.take(row, axis=0))
            out[values] = torch.from_numpy(a.values.take(row, axis=0))
            out[tail] = torch.from_numpy(a.tail.take(row))
            if a.feat is not None:  # features were read: the run distils them
                out["feat"] = torch.from_numpy(a.feat.take(row, axis=0))
                if a.feat_scale is not None:
                    out["feat_scale"] = torch.from_numpy(a.feat_scale.take(row))
        return out


def check_plans(arrays: EpochArrays, source, recipe: Recipe, *, rank: int = 0, world_size: int = 1) -> None:
    """Refuse an epoch whose units were planned otherwise than this code plans them (other
    view seeds or mixing partners: another recipe, data or logitcache): each unit's plan digest
    against :func:`logitcache.views.plan.unit_plan_digest` (:func:`logitcache.storage.canary.check_plan`).
    Rank r checks units r, r + W, ... (about a second per ImageNet epoch in all), so every unit
    is checked once per epoch."""
    for s in range(rank, len(source.shards), world_size):
        check_plan(arrays.plans[s], recipe, arrays.epoch, s, source, arrays.cache)