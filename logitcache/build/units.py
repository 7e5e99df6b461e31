"""The units a build still has to write, as teacher batches planned on demand (:class:`UnitBatches`)."""

from __future__ import annotations

import numpy as np

from logitcache.views.augment import Recipe
from logitcache.views.plan import Groups, num_groups, plan_unit, unit_views


class UnitBatches:
    """The teacher batches of a list of units, planned when a batch is asked for.

    Holds O(units) integers whatever the epoch count: item ``j`` is ``(epoch, groups,
    {"unit": u})``, batch ``j`` of the concatenated batches of the units, where unit ``u``'s
    groups (:func:`logitcache.plan.plan_unit`) are cut into batches of ``batch_size //
    group_size`` groups in plan order. A unit's batches are fixed whatever else is built,
    so a resumed build feeds the teacher the same batches as an uninterrupted one.
    """

    def __init__(self, recipe: Recipe, bounds: np.ndarray, epochs: np.ndarray, shards: np.ndarray, batch_size: int):
        self.recipe, self.bounds = recipe, bounds  # bounds (S, 2): [start, stop) of each data shard
        self.epochs, self.shards = epochs.astype(np.int64), shards.astype(np.int64)  # (U,): the units
        self.per_batch = max(1, batch_size // recipe.group_size)
        sizes = bounds[self.shards, 1] - bounds[self.shards, 0]
        self.unit_views = unit_views(recipe, sizes)  # (U,) views of each unit
        self.unit_batches = -(-num_groups(recipe, sizes) // self.per_batch)
        self.end = np.cumsum(self.unit_batches)  # (U,): one past each unit's last batch
        self._last: tuple[int, Groups] | None = None  # the unit planned last

    def __len__(self) -> int:
        return int(self.end[-1]) if len(self.end) else 0

    def __getitem__(self, j: int) -> tuple[int, Groups, dict]:
        u = int(np.searchsorted(self.end, j, side="right"))
        b = j - int(self.end[u] - self.unit_batches[u])
        if self._last is None or self._last[0] != u:
            e, s = int(self.epochs[u]), int(self.shards[u])
            self._last = (u, plan_unit(self.recipe, e, s, int(self.bounds[s, 0]), int(self.bounds[s, 1])))
        groups = self._last[1].take(slice(b * self.per_batch, (b + 1) * self.per_batch))
        return int(self.epochs[u]), groups, {"unit": u}
