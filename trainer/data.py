"""Student-side data beyond the replayed epochs: the validation loader and MKD's held-out meta
split. The training epochs (views regenerated from their seeds, with their cached rows) are
:mod:`logitcache.replay`'s."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from logitcache.views.augment import Recipe, create_eval_transform


def meta_split(source, fraction: float, seed: int) -> np.ndarray:
    """(N,) bool: the training samples held out as MKD's meta split (never the validation set).

    Chosen per sample from its key (a stable hash), so the split does not depend on order."""
    from logitcache.views.augment import derive_seed

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
