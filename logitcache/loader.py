"""DataLoader plumbing shared by the build and the trainer: groups of views in, batches out.

Each dataset item is one :class:`~logitcache.views.Group` (a mixing pair or a single
sample), rendered from its seeds inside the DataLoader worker. Batches are lists of
groups chosen by the caller (a batch sampler), so which views land in which batch never
depends on the worker count. Workers never touch the cache store (a worker forked after
the parent opened a zarr store can deadlock on the store's event loop); cached rows reach
them as plain numpy arrays.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from .errors import LogitcacheError
from .views import Group, Recipe, create_train_transform, render_group


class GroupDataset(Dataset):
    """Item ``i`` is a dict of the rendered views of ``groups[i]`` (tensors with a leading
    view dimension of 1 or 2).

    A sample that cannot be read comes back as ``{"error": message}`` rather than as an
    exception, so the main process can report it on one line (or skip it)."""

    def __init__(self, source, recipe: Recipe, groups: Sequence[Group]):
        self.source = source
        self.recipe = recipe
        self.groups = groups
        self._transform = None  # built lazily, once per worker process

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> dict:
        if self._transform is None:
            self._transform = create_train_transform(self.recipe)
        group = self.groups[i]
        try:
            r = render_group(self.recipe, self._transform, self.source.load_image, group)
        except LogitcacheError as e:
            return {"error": str(e), "item": i}
        return {"images": r.images, "index": r.index, "partner": r.partner, "lam": r.lam, "seed": r.seed,
                "item": torch.full((len(group.indices),), i, dtype=torch.int64)}


def collate_groups(items: list[dict], batch_extra: Callable[[dict], dict] | None = None) -> dict:
    """Concatenate groups along the view dimension; errors are passed through as a list.

    ``batch_extra(batch)`` adds fields computed for the whole batch at once (the trainer's
    cached rows: one vectorised gather per batch instead of one per sample)."""
    good = [it for it in items if "error" not in it]
    errors = [it for it in items if "error" in it] if len(good) < len(items) else []
    batch = {k: torch.cat([it[k] for it in good]) for k in good[0]} if good else {}
    if good and batch_extra is not None:
        batch.update(batch_extra(batch))
    batch["errors"] = errors
    return batch


def create_loader(dataset: Dataset, batches: Sequence[Sequence[int]], *, num_workers: int,
                  pin_memory: bool = False, prefetch_factor: int = 4,
                  batch_extra: Callable[[dict], dict] | None = None) -> DataLoader:
    """A DataLoader over fixed batches of dataset items (each batch a list of item ids)."""
    return DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=functools.partial(collate_groups, batch_extra=batch_extra),
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        persistent_workers=False,
        # Its own generator: starting workers must not consume the global torch RNG, or a
        # resumed run's dropout stream would differ from an uninterrupted one.
        generator=torch.Generator().manual_seed(0),
    )
