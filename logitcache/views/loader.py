"""DataLoader plumbing shared by the build and the trainer: planned batches in, rendered
batches out.

Each dataset item is one whole batch: the groups (mixing pairs or single samples, as
:class:`~logitcache.views.plan.Groups` arrays) that the caller planned for it, rendered from
their seeds to uint8 pixels inside the DataLoader worker and finished into float32 views
(normalised, erased, mixed) in the main process, on the device, as timm's prefetcher does
(logitcache/views/render.py). Which views land in which batch is fixed by the
caller, never by the worker count. Workers never touch the cache store (a worker forked
after the parent opened a zarr store can deadlock on the store's event loop); cached rows
join the batches in the main process (the loader's ``extra``).
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from logitcache import errors
from logitcache.errors import LogitcacheError
from logitcache.views.augment import Recipe
from logitcache.views.plan import Groups
from logitcache.views.render import create_view_transform, finish_batch, finish_views, render_raw_batch


class BatchDataset(Dataset):
    """Renders work orders: item ``(epoch, groups, tag)`` (the view epoch, a :class:`Groups`,
    and a dict of small values passed through to the batch, e.g. the unit a build batch
    belongs to) is that batch rendered up to uint8 pixels, a dict as
    :func:`~logitcache.views.render.render_raw_batch` makes it (:class:`BatchLoader`
    finishes it into views), plus ``"errors"`` (a list of (error class name, one-line
    message): a sample that cannot be read comes back as an error, not an exception, and
    :class:`BatchLoader` raises it in the main process) and ``"render_s"`` (float: the
    seconds this worker spent reading and rendering the batch, for the build's stage rates).
    With ``finish`` the dataset also finishes the views (``"images"``, float32), in the
    worker: for a CPU teacher, whose process is the build's bottleneck (bench/build_fast.py).

    The orders come from the loader's sampler (:class:`BatchOrders`), so one set of workers
    can render epoch after epoch. Used with ``batch_size=None``: the dataset makes whole batches.
    """

    def __init__(self, source, recipe: Recipe, finish: bool = False):
        self.source, self.recipe, self.finish = source, recipe, finish
        self._transform = None  # built lazily, once per worker process

    def __getitem__(self, order: tuple[int, Groups, dict]) -> dict:
        if self._transform is None:
            self._transform = create_view_transform(self.recipe)
        epoch, groups, tag = order
        t0 = time.perf_counter()
        try:
            batch = render_raw_batch(self.recipe, self._transform, self.source, epoch, groups)
            if self.finish:
                finish_views(batch, self.recipe)
        except LogitcacheError as e:  # crosses the process boundary as (class name, message)
            return {"errors": [(type(e).__name__, str(e))], **tag}
        return {**batch, **tag, "errors": [], "render_s": time.perf_counter() - t0}


class BatchOrders(Sampler):
    """The loader's sampler: yields the work orders of ``orders`` (any sequence of
    ``(epoch, groups, tag)``, e.g. an epoch's batches or a build's units), replaced between
    iterations by :meth:`BatchLoader.set_orders`."""

    def __init__(self, orders: Sequence = ()):
        self.orders = orders

    def __iter__(self):
        return (self.orders[b] for b in range(len(self.orders)))

    def __len__(self) -> int:
        return len(self.orders)


class BatchLoader(DataLoader):
    """A DataLoader over a :class:`BatchDataset` that yields finished batches (``"images"``
    (V, 3, H, W) float32 views, made on ``device`` by :func:`~logitcache.views.render.finish_batch`,
    plus whatever ``extra(batch)`` adds, e.g. the trainer's cached rows: one vectorised gather
    per batch, here in the main process) and never one with an unreadable sample: iterating
    raises the first error a worker reported, as its own
    :class:`~logitcache.errors.LogitcacheError` class (one line naming shard and key).

    With persistent workers, :meth:`set_orders` gives the same workers the next epoch's
    batches: no new processes, no start-up wait at each epoch (as timm's loader)."""

    device: torch.device | None = None  # where views are finished (None: the CPU)
    extra: Callable[[dict], dict] | None = None

    def set_orders(self, orders: Sequence, extra: Callable[[dict], dict] | None = None) -> "BatchLoader":
        """Iterate over ``orders`` from now on, each batch completed by ``extra``; returns self."""
        if not isinstance(self.sampler, BatchOrders):
            raise TypeError("a BatchLoader's sampler is a BatchOrders")
        self.sampler.orders, self.extra = orders, extra
        return self

    def __iter__(self):
        recipe = self.dataset.recipe
        for batch in super().__iter__():
            if batch["errors"]:
                name, message = batch["errors"][0]
                cls = getattr(errors, name, LogitcacheError)
                raise (cls if isinstance(cls, type) and issubclass(cls, LogitcacheError) else LogitcacheError)(message)
            batch = finish_batch(batch, recipe, self.device)
            if self.extra is not None:
                batch.update(self.extra(batch))
            yield batch


def _as_is(batch: dict) -> dict:
    """The loader's collate: none (torch's default would turn every small numpy array into a
    shared-memory tensor, each costing a file-descriptor handshake per batch)."""
    return batch


def create_batch_loader(dataset: BatchDataset, orders: Sequence, *, num_workers: int, pin_memory: bool = False,
                        prefetch_factor: int = 4, device: torch.device | None = None,
                        persistent: bool = False, extra: Callable[[dict], dict] | None = None) -> BatchLoader:
    """A :class:`BatchLoader` over ``orders`` (see :class:`BatchOrders`), in order, finishing
    views on ``device`` (None: the CPU) in the main process, as timm's prefetcher does, unless
    the dataset finishes them itself (``BatchDataset(..., finish=True)``). ``persistent``
    keeps the workers between iterations (for a loader that :meth:`~BatchLoader.set_orders`
    reuses, epoch after epoch)."""
    loader = BatchLoader(
        dataset, batch_size=None, sampler=BatchOrders(orders), num_workers=num_workers, pin_memory=pin_memory,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        persistent_workers=persistent and num_workers > 0,
        # Its own generator: starting workers must not consume the global torch RNG, or a
        # resumed run's dropout stream would differ from an uninterrupted one.
        generator=torch.Generator().manual_seed(0),
        collate_fn=_as_is,
    )
    loader.device, loader.extra = device, extra
    return loader
