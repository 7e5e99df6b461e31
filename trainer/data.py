"""Student-side data: regenerated views with their cached teacher rows and label targets.

The views of a training epoch are those of one cached epoch, regenerated from the same
seeds. Cached rows (top-k ids, logits, tail) travel with the images from the DataLoader
workers as small tensors; the distribution is rebuilt on the device in the step.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from logitcache.errors import CacheMismatchError
from logitcache.loader import BatchDataset, create_batch_loader
from logitcache.plan import Groups, plan_epoch, unit_plan_digest
from logitcache.store import EpochArrays
from logitcache.views import Recipe, create_eval_transform


class CachedRows:
    """Adds label targets and one epoch's cached teacher rows to a rendered batch, by sample index.

    Runs in the DataLoader workers, once per batch: one vectorised numpy gather per array
    (no per-sample Python), so rows arrive with the images as small tensors (in their stored
    dtypes: gap codes, counts or float values; decoded on the device)."""

    def __init__(self, arrays: EpochArrays | None, labels: np.ndarray, source=None):
        self.arrays = arrays
        self.labels = labels
        self.source = source

    def __call__(self, batch: dict, tag: dict | None = None) -> dict[str, torch.Tensor]:
        idx, partner = batch["index"].numpy(), batch["partner"].numpy()
        # np.take along axis 0: the same rows as fancy indexing, about 1.7x faster for small batches
        out = {"label": torch.from_numpy(self.labels.take(idx)), "partner_label": torch.from_numpy(self.labels.take(partner))}
        if self.arrays is not None:
            a = self.arrays
            out["ids"] = torch.from_numpy(a.ids.take(idx, axis=0))
            out["values"] = torch.from_numpy(a.values.take(idx, axis=0))
            out["tail"] = torch.from_numpy(a.tail.take(idx))
            if a.feat is not None:  # features were read: the run distils them
                out["feat"] = torch.from_numpy(a.feat.take(idx, axis=0))
                if a.feat_scale is not None:
                    out["feat_scale"] = torch.from_numpy(a.feat_scale.take(idx))
        return out


def check_plans(arrays: EpochArrays, source, recipe: Recipe, *, rank: int = 0, world_size: int = 1) -> None:
    """Refuse an epoch whose units were planned otherwise than this code plans them (other
    view seeds or mixing partners: another recipe, data or logitcache): each unit's plan digest
    against :func:`logitcache.plan.unit_plan_digest`. Rank r checks units r, r + W, ... (about
    a second per ImageNet epoch in all), so every unit is checked once per epoch."""
    for s in range(rank, len(source.shards), world_size):
        shard = source.shards[s]
        keys = [source.key(i) for i in range(shard.start, shard.stop)]
        if arrays.plans[s] != unit_plan_digest(recipe, arrays.epoch, s, shard.start, shard.stop, keys):
            raise CacheMismatchError(
                f"the views of cached epoch {arrays.epoch}, unit {s} (shard {shard.name}) were planned otherwise "
                f"than here (other view seeds or mixing partners): cache built with another recipe, data or "
                f"logitcache version"
            )


def epoch_groups(source, recipe: Recipe, view_epoch: int) -> Groups:
    """The groups of ``view_epoch``, as the build made them (every unit, shard after shard)."""
    return plan_epoch(recipe, view_epoch, [(s.start, s.stop) for s in source.shards])


def train_batches(num_groups: int, groups_per_batch: int, *, seed: int, epoch: int) -> np.ndarray:
    """(B, groups_per_batch) int64: shuffled global batches of group ids (the last partial one
    dropped), a function of ``(seed, epoch)`` alone: the same whatever the world size."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_groups, generator=g).numpy()
    nb = num_groups // groups_per_batch
    return order[:nb * groups_per_batch].reshape(nb, groups_per_batch)


class EpochBatches:
    """This rank's batches of one epoch for :class:`logitcache.loader.BatchDataset`: item ``b``
    is ``(view_epoch, the groups of batch b, {})``. Holds the epoch's group arrays and one
    row of group ids per batch: no Python object per view."""

    def __init__(self, view_epoch: int, groups: Groups, batch_ids: np.ndarray):
        self.view_epoch, self.groups, self.batch_ids = view_epoch, groups, batch_ids

    def __len__(self) -> int:
        return len(self.batch_ids)

    def __getitem__(self, b: int) -> tuple[int, Groups, dict]:
        return self.view_epoch, self.groups.take(self.batch_ids[b]), {}


def create_train_loader(source, recipe: Recipe, view_epoch: int, groups: Groups, rows: CachedRows, *,
                        batch_size: int, seed: int, epoch: int, num_workers: int, rank: int = 0,
                        world_size: int = 1, pin_memory: bool = False, limit: int | None = None,
                        skip: int = 0) -> DataLoader:
    """Student epoch ``epoch`` over ``groups`` of cached epoch ``view_epoch``. ``batch_size``
    is the global batch in views; it must split evenly into groups and ranks. Rank ``r`` of
    ``W`` takes the r-th of W equal slices of every global batch.

    ``limit`` keeps the first batches only; ``skip`` drops the first ones (a resumed epoch)."""
    gs = recipe.group_size
    if batch_size % (gs * world_size):
        raise ValueError(f"batch size {batch_size} must be a multiple of {gs * world_size} (group size x world size)")
    if rows.arrays is not None:
        check_plans(rows.arrays, source, recipe, rank=rank, world_size=world_size)
    batches = train_batches(len(groups), batch_size // gs, seed=seed, epoch=epoch)
    batches = batches[:limit] if limit else batches
    # Views per global batch (a mixing recipe's odd leftover sample is a group of one view, so
    # ranks may hold different numbers of views): the trainer weights each rank's mean loss
    # by its share, which makes the DDP-averaged gradient the gradient of the global mean.
    global_views = groups.sizes[batches].sum(axis=1).tolist()
    per_rank = batch_size // gs // world_size
    mine = EpochBatches(view_epoch, groups, batches[skip:, rank * per_rank:(rank + 1) * per_rank])
    loader = create_batch_loader(BatchDataset(source, recipe, mine, extra=rows), num_workers=num_workers,
                                 pin_memory=pin_memory)
    loader.global_batch_views = global_views[skip:]
    return loader


def meta_split(source, fraction: float, seed: int) -> np.ndarray:
    """(N,) bool: the training samples held out as MKD's meta split (never the validation set).

    Chosen per sample from its key (a stable hash), so the split does not depend on order."""
    from logitcache.views import derive_seed

    if not 0 < fraction < 1:
        raise ValueError(f"meta fraction must be in (0, 1), not {fraction}")
    threshold = int(fraction * (1 << 64))
    return np.array([derive_seed(seed, "meta", source.key(i)) < threshold for i in range(len(source))])


class IndexedEvalDataset(Dataset):
    """Images of chosen training samples through the eval transform: (image, label)."""

    def __init__(self, source, recipe: Recipe, indices: np.ndarray):
        self.inner = EvalDataset(source, recipe)
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.inner[int(self.indices[i])]


def meta_batches(num: int, batch_size: int, *, seed: int, start: int = 0):
    """Endless shuffled batches of positions ``0..num-1`` (a fresh permutation per pass, each
    from ``(seed, pass)``), from batch number ``start`` on: the stream is a pure function of
    the batch number, so a resumed run continues it exactly."""
    if num < 1:
        raise ValueError("the meta split is empty: raise --meta-fraction or use more training data")
    batch_size = min(batch_size, num)
    per_pass = num // batch_size  # the last partial batch of a pass is dropped
    p, j = divmod(start, per_pass)
    while True:
        order = torch.randperm(num, generator=torch.Generator().manual_seed(seed * 1_000_003 + 7919 * p + 1)).tolist()
        for k in range(j, per_pass):
            yield order[k * batch_size:(k + 1) * batch_size]
        p, j = p + 1, 0


def create_meta_loader(source, recipe: Recipe, indices: np.ndarray, *, batch_size: int, seed: int,
                       start: int = 0) -> DataLoader:
    """Endless shuffled batches ``(images, labels)`` of the meta split (main process: small and
    cheap), from meta batch number ``start`` on (see :func:`meta_batches`)."""
    return DataLoader(IndexedEvalDataset(source, recipe, indices),
                      batch_sampler=meta_batches(len(indices), batch_size, seed=seed, start=start),
                      generator=torch.Generator().manual_seed(seed))


class EvalDataset(Dataset):
    """Validation images through timm's eval transform: (image (3, H, W), label)."""

    def __init__(self, source, recipe: Recipe):
        self.source = source
        self.recipe = recipe
        self._transform = None

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        if self._transform is None:
            self._transform = create_eval_transform(self.recipe)
        return self._transform(self.source.load_image(i)), self.source.label(i)


def create_eval_loader(source, recipe: Recipe, *, batch_size: int = 256, num_workers: int = 2) -> DataLoader:
    """Validation batches ``(images, labels)`` in dataset order. Its workers persist across
    epochs (the eval set never changes; the train loader's views do, so it is made anew)."""
    return DataLoader(EvalDataset(source, recipe), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      persistent_workers=num_workers > 0, generator=torch.Generator())
