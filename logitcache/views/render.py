"""Rendering batches of views fast, bit for bit the views of timm's whole transform.

timm's own loader with its prefetcher cuts the training transform where the pixels are
still uint8: the workers crop, flip and augment PIL images, and normalisation (and random
erasing) happen batched, on the device. Replay does the same, in two stages:

1. :func:`render_raw_batch` (in a DataLoader worker): for each view, seed the generators,
   run the PIL stages of the recipe's transform (crop, flip, RandAugment, jitter) and keep
   the uint8 pixels; draw random erasing on a NaN canvas (its rectangles and noise do not
   depend on the pixels underneath); draw each pair's mixing parameters. A batch crosses
   the process boundary as uint8 pixels (a quarter of float32's bytes) plus small arrays.
2. :func:`finish_views` (in the main process, on the consumer's device; for a CPU teacher
   in the workers, as its process is the build's bottleneck): float, ``/ 255``, normalise,
   lay the erased rectangles over, mix the pairs: a few vectorised passes per batch.

Every operation of stage 2 is the same elementwise float32 operation the per-view transform
applies (``to_tensor``'s ``/ 255``, ``Normalize``'s ``sub_``/``div_``, the erasing's
assignment, ``mix_pair``'s products and sums, with lambda rounded to float32 as a Python
scalar is), so the views equal :func:`logitcache.views.augment.render_view` +
:func:`~logitcache.views.augment.mix_pair` bit for bit (tests/test_render.py, every recipe).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from timm.data.random_erasing import RandomErasing

from logitcache.views.augment import MIX_CUTMIX, MIX_MIXUP, Recipe, mix_params, rng_preserved, seed_all
from logitcache.views.plan import Groups, pair_seeds, view_seeds

#: Keys of a raw batch that :func:`finish_batch` turns into ``"images"``.
RAW_KEYS = ("pixels", "erase_at", "erase", "mix_mode", "mix_w", "mix_box", "pair_pos")


@dataclass(frozen=True)
class ViewTransform:
    """The recipe's training transform cut at uint8: ``pil`` (timm's primary and secondary
    stages: PIL image in, PIL image of ``size`` x ``size`` out) and ``erasing`` (timm's
    RandomErasing of the final stage, or None)."""

    pil: Callable[[Image.Image], Image.Image]
    erasing: RandomErasing | None
    size: int


def create_view_transform(recipe: Recipe) -> ViewTransform:
    """timm's ``create_transform`` for the recipe, as :func:`~logitcache.views.augment.create_train_transform`
    builds it, taken apart into its stages (``separate=True``)."""
    primary, secondary, final = create_transform(
        input_size=recipe.input_size, is_training=True, scale=recipe.scale, ratio=recipe.ratio,
        hflip=recipe.hflip, color_jitter=recipe.color_jitter, auto_augment=recipe.auto_augment,
        interpolation=recipe.interpolation, mean=recipe.mean, std=recipe.std, re_prob=recipe.re_prob,
        re_mode=recipe.re_mode, re_count=recipe.re_count, separate=True,
    )
    erasing = [t for t in final.transforms if isinstance(t, RandomErasing)]
    stages = list(primary.transforms) + list(secondary.transforms)

    def pil(image: Image.Image) -> Image.Image:
        for t in stages:
            image = t(image)
        return image

    return ViewTransform(pil, erasing[0] if erasing else None, recipe.input_size)


def _render_one(vt: ViewTransform, image: Image.Image, seed: int, out: np.ndarray) -> torch.Tensor | None:
    """Render one view into ``out`` ((3, H, W) uint8); returns its erasing canvas ((3, H, W)
    float32, NaN where not erased) or None when nothing was erased. Leaves the generators seeded."""
    seed_all(seed)
    img = vt.pil(image)
    if img.mode != "RGB" or img.size != (vt.size, vt.size):
        raise ValueError(f"transform made a {img.mode} image of {img.size}, not RGB {vt.size}x{vt.size}")
    out[...] = np.asarray(img).transpose(2, 0, 1)  # channels first here, in the worker, as timm's collate
    if vt.erasing is None:
        return None
    canvas = torch.full((3, vt.size, vt.size), float("nan"))
    vt.erasing(canvas)
    return None if bool(torch.isnan(canvas).all()) else canvas


def render_raw_batch(recipe: Recipe, vt: ViewTransform, source, epoch: int, groups: Groups) -> dict:
    """The views of ``groups`` at ``epoch``, in group order, before :func:`finish_batch`.

    Returns, over the V views: pixels (V, 3, H, W) uint8 (a tensor); erase_at (E,) int64
    positions of the erased views and erase (E, 3, H, W) float32 their canvases (a tensor
    when E > 0); mix_mode (V,) int8 (``MIX_*``), mix_w (V, 2) float32 (the weights of the
    view's own and its partner's pixels), mix_box (V, 4) int64 (cutmix y0, y1, x0, x1),
    pair_pos (V,) int64 (the partner's position in the batch); and as :func:`render_batch`
    documents (here numpy arrays): index, partner, lam, seed, repeat.
    """
    key, cs = source.key, recipe.cache_seed
    first, second = groups.first.tolist(), groups.second.tolist()
    v = len(first) + sum(b >= 0 for b in second)
    paired = [b for b in second if b >= 0]
    reps = reps_paired = None  # repeat indices (a repeats recipe): a pair's two views share theirs
    if groups.repeat is not None:
        reps = groups.repeat.tolist()
        reps_paired = [r for r, b in zip(reps, second) if b >= 0]
    seeds_a = view_seeds(cs, epoch, [key(a) for a in first], reps).tolist()
    seeds_b = iter(view_seeds(cs, epoch, [key(b) for b in paired], reps_paired).tolist())
    mix_seeds = iter(pair_seeds(cs, epoch, [key(a) for a, b in zip(first, second) if b >= 0],
                                [key(b) for b in paired], reps_paired).tolist())
    pixels = np.empty((v, 3, vt.size, vt.size), np.uint8)
    index, partner, pair_pos = (np.empty(v, np.int64) for _ in range(3))
    seed = np.empty(v, np.uint64)
    lam = np.ones(v, np.float64)
    mode, box = np.zeros(v, np.int8), np.zeros((v, 4), np.int64)
    erased: dict[int, torch.Tensor] = {}
    j = 0
    with rng_preserved():
        for a, b, sa in zip(first, second, seeds_a):
            members = [(a, sa)] if b < 0 else [(a, sa), (b, next(seeds_b))]
            for pos, (i, s) in enumerate(members):
                canvas = _render_one(vt, source.load_image(i), s, pixels[j + pos])
                if canvas is not None:
                    erased[j + pos] = canvas
                index[j + pos], seed[j + pos] = i, s
            if b < 0:
                partner[j], pair_pos[j] = a, j
                j += 1
                continue
            p = mix_params(recipe, next(mix_seeds))
            partner[j:j + 2], pair_pos[j:j + 2] = (b, a), (j + 1, j)
            lam[j:j + 2], mode[j:j + 2], box[j:j + 2] = p.lam, p.mode, p.box
            j += 2
    at = sorted(erased)
    # The weights as mix_pair's Python scalars reach float32: lam and (1 - lam) in float64, then rounded.
    weights = np.stack([lam, 1.0 - lam], axis=1).astype(np.float32)
    # Only the pixels (and erasing canvases) travel as tensors, through shared memory; the small
    # arrays are pickled inline: each shared tensor costs a file-descriptor handshake per batch.
    return {
        "pixels": torch.from_numpy(pixels), "erase_at": np.array(at, dtype=np.int64),
        "erase": torch.stack([erased[p] for p in at]) if at else np.zeros((0, 3, vt.size, vt.size), np.float32),
        "mix_mode": mode, "mix_w": weights, "mix_box": box, "pair_pos": pair_pos, "index": index,
        "partner": partner, "lam": lam.astype(np.float32), "seed": seed.view(np.int64),
        "repeat": groups.view_repeats(),
    }


def finish_batch(batch: dict, recipe: Recipe, device: torch.device | str | None = None,
                 batched: bool | None = None) -> dict:
    """Complete a batch of :func:`render_raw_batch` (or of :func:`finish_views`, already
    finished in a worker): ``images`` (V, 3, H, W) float32 on ``device`` (default: where they
    are), and index, partner, lam, seed, repeat as tensors. The other entries stay as they are."""
    if "pixels" in batch:
        finish_views(batch, recipe, device, batched)
    elif device is not None:
        batch["images"] = batch["images"].to(device, non_blocking=True)
    for k in ("index", "partner", "lam", "seed", "repeat"):
        if isinstance(batch.get(k), np.ndarray):
            batch[k] = torch.from_numpy(batch[k])
    return batch


def finish_views(batch: dict, recipe: Recipe, device: torch.device | str | None = None,
                 batched: bool | None = None) -> dict:
    """Turn a raw batch's uint8 pixels into the views (on ``device``, default: where they
    are): ``images`` (V, 3, H, W) float32, normalised, erased and mixed (``batched``: see
    :func:`_mix`). Pops the raw keys (:data:`RAW_KEYS`); returns ``batch``."""
    raw = {k: batch.pop(k) for k in RAW_KEYS}
    dev = raw["pixels"].device if device is None else torch.device(device)
    x = raw["pixels"].to(dev, non_blocking=True).float().div_(255)
    mean = torch.tensor(recipe.mean, dtype=torch.float32, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(recipe.std, dtype=torch.float32, device=dev).view(1, 3, 1, 1)
    x.sub_(mean).div_(std)
    if len(raw["erase_at"]):
        at, canvas = torch.from_numpy(raw["erase_at"]).to(dev), raw["erase"].to(dev, non_blocking=True)
        x[at] = torch.where(torch.isnan(canvas), x[at], canvas)
    if recipe.mixes:
        _mix(x, raw, batched)
    batch["images"] = x
    return batch


def _mix(x: torch.Tensor, raw: dict, batched: bool | None = None) -> None:
    """Mix the pairs of ``x`` (V, 3, H, W) in place: a mixup view becomes own * w0 + partner
    * w1, a cutmix pair swaps the pixels inside its box. Views not mixed stay as they are.

    ``batched`` (default: on CUDA) mixes all mixup views in one gather; otherwise pair by
    pair, which on a CPU is about 6x faster than gathering whole views. Both make the same bits."""
    mode, pos = raw["mix_mode"], raw["pair_pos"]
    first = np.arange(len(mode)) < pos  # each pair once, at its first view
    mixup = np.flatnonzero(mode == MIX_MIXUP)
    if (x.is_cuda if batched is None else batched) and len(mixup):
        own, other = torch.from_numpy(mixup).to(x.device), torch.from_numpy(pos[mixup]).to(x.device)
        w = torch.from_numpy(raw["mix_w"][mixup]).to(x.device, non_blocking=True).view(-1, 2, 1, 1, 1)
        x[own] = x[own] * w[:, 0] + x[other] * w[:, 1]  # both sides gathered before the write
    elif len(mixup):
        for i in np.flatnonzero((mode == MIX_MIXUP) & first).tolist():
            j = int(pos[i])
            w_own, w_other = raw["mix_w"][i].tolist()  # float32 values: exact as Python floats
            a = x[i] * w_own
            a += x[j] * w_other
            b = x[j] * w_own
            b += x[i] * w_other
            x[i], x[j] = a, b
    for i in np.flatnonzero((mode == MIX_CUTMIX) & first).tolist():
        j = int(pos[i])
        y0, y1, x0, x1 = raw["mix_box"][i].tolist()
        mine = x[i, :, y0:y1, x0:x1].clone()
        x[i, :, y0:y1, x0:x1] = x[j, :, y0:y1, x0:x1]
        x[j, :, y0:y1, x0:x1] = mine


def render_batch(recipe: Recipe, vt: ViewTransform, source, epoch: int, groups: Groups) -> dict:
    """The finished views of ``groups`` at ``epoch``, in group order (see :class:`~logitcache.views.plan.Groups`).

    Seeds are hashed here, a batch at a time, from the samples' keys. Returns tensors over
    the V views: images (V, 3, H, W) float32; index, partner (V,) int64 global sample
    indices (partner = the view itself when not mixed); lam (V,) float32, the weight of
    the view's own image; seed (V,) int64 (the uint64 view seed's bit pattern); repeat (V,)
    int64, the view's repeat index (0 without repeated augmentation).
    """
    return finish_batch(render_raw_batch(recipe, vt, source, epoch, groups), recipe)
