"""DataLoader plumbing shared by the build and the trainer: planned batches in, rendered
batches out.

Each dataset item is one whole batch: the groups (mixing pairs or single samples, as
:class:`~logitcache.views.plan.Groups` arrays) that the caller planned for it, rendered from
their seeds inside the DataLoader worker. Which views land in which batch is fixed by the
caller, never by the worker count. Workers never touch the cache store (a worker forked
after the parent opened a zarr store can deadlock on the store's event loop); cached rows
reach them as plain numpy arrays.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from logitcache import errors
from logitcache.errors import LogitcacheError
from logitcache.views.augment import (
    Recipe,
    create_train_transform,
    mix_pair,
    mix_params,
    render_view,
    rng_preserved,
)
from logitcache.views.plan import Groups, pair_seeds, view_seeds


def render_batch(recipe: Recipe, transform, source, epoch: int, groups: Groups) -> dict:
    """The views of ``groups`` at ``epoch``, in group order (see :class:`~logitcache.views.plan.Groups`).

    Seeds are hashed here, a batch at a time, from the samples' keys. Returns tensors over
    the V views: images (V, 3, H, W) float32; index, partner (V,) int64 global sample
    indices (partner = the view itself when not mixed); lam (V,) float32, the weight of
    the view's own image; seed (V,) int64 (the uint64 view seed's bit pattern).
    """
    key = source.key
    first, second = groups.first.tolist(), groups.second.tolist()
    paired = [b for b in second if b >= 0]
    seeds_a = view_seeds(recipe.cache_seed, epoch, [key(a) for a in first]).tolist()
    seeds_b = iter(view_seeds(recipe.cache_seed, epoch, [key(b) for b in paired]).tolist())
    mix_seeds = iter(pair_seeds(recipe.cache_seed, epoch, [key(a) for a, b in zip(first, second) if b >= 0],
                                [key(b) for b in paired]).tolist())
    images, index, partner, lam, seed = [], [], [], [], []
    with rng_preserved():
        for a, b, sa in zip(first, second, seeds_a):
            va = render_view(transform, source.load_image(a), sa)
            if b < 0:
                images.append(va)
                index.append(a), partner.append(a), lam.append(1.0), seed.append(sa)
                continue
            sb = next(seeds_b)
            vb = render_view(transform, source.load_image(b), sb)
            params = mix_params(recipe, next(mix_seeds))
            images += mix_pair(va, vb, params)
            index += [a, b]
            partner += [b, a]
            lam += [params.lam, params.lam]
            seed += [sa, sb]
    return {
        "images": torch.stack(images), "index": torch.tensor(index, dtype=torch.int64),
        "partner": torch.tensor(partner, dtype=torch.int64), "lam": torch.tensor(lam, dtype=torch.float32),
        "seed": torch.from_numpy(np.array(seed, dtype=np.uint64).view(np.int64)),
    }


class BatchDataset(Dataset):
    """Item ``b`` is batch ``b`` of ``batches`` rendered: a dict as :func:`render_batch` makes
    it, plus ``"errors"`` (a list of (error class name, one-line message); a sample that
    cannot be read comes back as an error, not an exception, and :class:`BatchLoader`
    raises it in the main process), ``"render_s"`` (float: the seconds this worker spent
    reading and rendering the batch, for the build's stage rates) and
    whatever ``extra(batch, tag)`` adds (e.g. the trainer's cached rows: one vectorised
    gather per batch, in the worker).

    ``batches[b]`` is ``(epoch, groups, tag)``: the view epoch, a :class:`Groups`, and a
    dict of small values passed through to the batch (e.g. the unit a build batch belongs
    to). Used with ``batch_size=None``: the dataset makes whole batches.
    """

    def __init__(self, source, recipe: Recipe, batches, extra: Callable[[dict, dict], dict] | None = None):
        self.source, self.recipe, self.batches, self.extra = source, recipe, batches, extra
        self._transform = None  # built lazily, once per worker process

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, b: int) -> dict:
        if self._transform is None:
            self._transform = create_train_transform(self.recipe)
        epoch, groups, tag = self.batches[b]
        t0 = time.perf_counter()
        try:
            batch = render_batch(self.recipe, self._transform, self.source, epoch, groups)
            if self.extra is not None:
                batch.update(self.extra(batch, tag))
        except LogitcacheError as e:  # crosses the process boundary as (class name, message)
            return {"errors": [(type(e).__name__, str(e))], **tag}
        return {**batch, **tag, "errors": [], "render_s": time.perf_counter() - t0}


class BatchLoader(DataLoader):
    """A DataLoader over a :class:`BatchDataset` that never yields a batch with an unreadable
    sample: iterating raises the first error a worker reported, as its own
    :class:`~logitcache.errors.LogitcacheError` class (one line naming shard and key)."""

    def __iter__(self):
        for batch in super().__iter__():
            if batch["errors"]:
                name, message = batch["errors"][0]
                cls = getattr(errors, name, LogitcacheError)
                raise (cls if isinstance(cls, type) and issubclass(cls, LogitcacheError) else LogitcacheError)(message)
            yield batch


def create_batch_loader(dataset: BatchDataset, *, num_workers: int, pin_memory: bool = False,
                        prefetch_factor: int = 4) -> BatchLoader:
    """A :class:`BatchLoader` over a :class:`BatchDataset`'s batches, in order."""
    return BatchLoader(
        dataset, batch_size=None, shuffle=False, num_workers=num_workers, pin_memory=pin_memory,
        prefetch_factor=prefetch_factor if num_workers > 0 else None, persistent_workers=False,
        # Its own generator: starting workers must not consume the global torch RNG, or a
        # resumed run's dropout stream would differ from an uninterrupted one.
        generator=torch.Generator().manual_seed(0),
    )
