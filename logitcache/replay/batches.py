"""A training epoch's batches: the views of one cached epoch, regenerated from the same seeds,
shuffled into global batches (a function of the seed and epoch alone, whatever the world
size) and cut into each rank's slice (:func:`create_train_loader`)."""

from __future__ import annotations

import math

import numpy as np
import torch

from logitcache.replay.rows import CachedRows, check_plans
from logitcache.views.augment import Recipe
from logitcache.views.loader import BatchDataset, BatchLoader, create_batch_loader
from logitcache.views.plan import Groups, block_samples, block_views, plan_epoch


def check_batch_size(recipe: Recipe, batch_size: int, world_size: int = 1) -> None:
    """Refuse (``ValueError``, one line) a global batch of ``batch_size`` views that does not
    split into whole groups per rank, or that cannot hold one whole repeat block."""
    gs, bv = recipe.group_size, block_views(recipe)
    if batch_size < 1 or batch_size % (gs * world_size):
        raise ValueError(f"batch size {batch_size} must be a positive multiple of {gs * world_size} "
                         f"(views per group x world size)")
    if batch_size < bv:
        whole = bv * gs * world_size // math.gcd(bv, gs * world_size)
        raise ValueError(f"batch size {batch_size} cannot hold one whole repeat block ({recipe.aug_repeats} "
                         f"repeats x {block_samples(recipe)} samples = {bv} views); use a multiple of {whole}")


def epoch_groups(source, recipe: Recipe, view_epoch: int) -> Groups:
    """The groups of ``view_epoch``, as the build made them (every unit, shard after shard)."""
    return plan_epoch(recipe, view_epoch, [(s.start, s.stop) for s in source.shards])


def train_batches(num_groups: int, groups_per_batch: int, *, seed: int, epoch: int,
                  blocks: np.ndarray | None = None) -> np.ndarray:
    """(B, groups_per_batch) int64: shuffled global batches of group ids (the last partial one
    dropped), a function of ``(seed, epoch)`` alone: the same whatever the world size.

    ``blocks`` ((G,) non-decreasing block ids, :attr:`~logitcache.views.plan.Groups.blocks`):
    whole blocks are shuffled, their groups kept together and in order (a repeated sample's
    views share a batch unless its block straddles two, as in timm's RepeatAugSampler when the
    batch is not a multiple of the block)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    if blocks is None or len(blocks) == 0:
        order = torch.randperm(num_groups, generator=g).numpy()
    else:
        starts = np.flatnonzero(np.r_[True, blocks[1:] != blocks[:-1]])
        counts = np.diff(np.r_[starts, len(blocks)])
        perm = torch.randperm(len(starts), generator=g).numpy()
        # each shuffled block's groups in order: start of its block + position within it
        offsets = np.repeat(starts[perm] - (np.cumsum(counts[perm]) - counts[perm]), counts[perm])
        order = offsets + np.arange(len(blocks))
    nb = num_groups // groups_per_batch
    return order[:nb * groups_per_batch].reshape(nb, groups_per_batch)


class EpochBatches:
    """This rank's batches of one epoch for :class:`logitcache.views.loader.BatchDataset`: item ``b``
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
                        skip: int = 0, device: torch.device | None = None,
                        reuse: BatchLoader | None = None) -> BatchLoader:
    """Student epoch ``epoch`` over ``groups`` of cached epoch ``view_epoch``. ``batch_size``
    is the global batch in views; it must split evenly into groups and ranks. Rank ``r`` of
    ``W`` takes the r-th of W equal slices of every global batch; with repeated augmentation
    every W-th group from the r-th on, so a sample's repeats go to different ranks. Views are finished on
    ``device`` (None: the CPU).

    ``limit`` keeps the first batches only; ``skip`` drops the first ones (a resumed epoch).
    ``reuse``: the loader of an earlier epoch of the same source and recipe, given this
    epoch's batches (its persistent workers carry on); else a new loader with persistent
    workers. Returns the loader, with ``global_batch_views`` (one int per batch) set."""
    gs = recipe.group_size
    check_batch_size(recipe, batch_size, world_size)
    for arrays in rows.teachers:
        check_plans(arrays, source, recipe, rank=rank, world_size=world_size)
    batches = train_batches(len(groups), batch_size // gs, seed=seed, epoch=epoch, blocks=groups.block)
    batches = batches[:limit] if limit else batches
    # Views per global batch (a mixing recipe's odd leftover sample is a group of one view, so
    # ranks may hold different numbers of views): the trainer weights each rank's mean loss
    # by its share, which makes the DDP-averaged gradient the gradient of the global mean.
    global_views = groups.sizes[batches].sum(axis=1).tolist()
    if groups.block is None:  # rank r: the r-th of W equal slices of each global batch
        per_rank = batch_size // gs // world_size
        mine = EpochBatches(view_epoch, groups, batches[skip:, rank * per_rank:(rank + 1) * per_rank])
    else:  # rank r: groups r, r + W, ...: a block's consecutive groups (a sample's repeats) on other ranks,
        mine = EpochBatches(view_epoch, groups, batches[skip:, rank::world_size])  # as timm's RepeatAugSampler
    if reuse is None:
        reuse = create_batch_loader(BatchDataset(source, recipe), (), num_workers=num_workers,
                                    pin_memory=pin_memory, device=device, persistent=True)
    elif (reuse.dataset.source is not source or reuse.dataset.recipe != recipe or reuse.num_workers != num_workers
          or reuse.pin_memory != pin_memory or reuse.device != device):
        raise ValueError("reuse: that loader renders another source or recipe, or with other workers, pinning "
                         "or device")
    loader = reuse.set_orders(mine, extra=rows)
    loader.global_batch_views = global_views[skip:]
    return loader
