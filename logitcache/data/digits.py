"""scikit-learn's handwritten digits (1,797 real 8x8 images, 16 grey levels) as a dataset root.

No download: ``sklearn.datasets.load_digits`` ships the data. Images are upscaled to
``image_size`` (bilinear) and stored as RGB PNG, bright ink on a dark background.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from logitcache.data.shards import write_dataset

CLASSES = [str(d) for d in range(10)]


def _digit_image(pixels: np.ndarray, image_size: int) -> Image.Image:
    """RGB image (image_size x image_size) from an (8, 8) array of grey levels in [0, 16]."""
    grey = np.rint(pixels.astype(np.float64) * (255.0 / 16.0)).astype(np.uint8)
    return Image.fromarray(grey, "L").resize((image_size, image_size), Image.BILINEAR).convert("RGB")


def _split_indices(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split: ``round(val_fraction * n_c)`` of each class to val; each split shuffled."""
    rng = np.random.default_rng(seed)
    train: list[np.ndarray] = []
    val: list[np.ndarray] = []
    for c in range(len(CLASSES)):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = int(round(val_fraction * len(idx)))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(val))


def _samples(
    images: np.ndarray, labels: np.ndarray, order: np.ndarray, image_size: int
) -> Iterator[tuple[str, Image.Image, int]]:
    # The key is the sample's index in load_digits(), so it names the same digit in every split.
    for i in order.tolist():
        yield f"d{i:04d}", _digit_image(images[i], image_size), int(labels[i])


def generate_digits(
    root: str | Path,
    *,
    val_fraction: float = 0.2,
    image_size: int = 32,
    seed: int = 0,
    shard_size: int = 1000,
) -> Path:
    """Write the digits as splits "train" and "val" (10 classes "0".."9") under ``root``; return ``root``."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    from sklearn.datasets import load_digits  # here: importing scikit-learn takes about a second

    digits = load_digits()
    images = np.asarray(digits.images)  # (1797, 8, 8) float, values 0..16
    labels = np.asarray(digits.target, dtype=np.int64)  # (1797,)
    train, val = _split_indices(labels, val_fraction, seed)
    splits = {
        "train": _samples(images, labels, train, image_size),
        "val": _samples(images, labels, val, image_size),
    }
    return write_dataset(root, "digits", CLASSES, splits, shard_size=shard_size)
