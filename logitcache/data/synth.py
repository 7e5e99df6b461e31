"""The default dataset: procedurally generated images of structured classes.

Class ``c`` is a combination of three shared attributes, ``(shape, colour family,
texture)`` with texture varying fastest::

    shape   = c // 16        circle triangle square pentagon hexagon star cross crescent
    colour  = (c // 4) % 4   red yellow green blue
    texture = c % 4          solid stripes dots checks

so class 0 is "circle-red-solid" and class 127 "crescent-blue-checks". Classes sharing
two attributes (or with look-alike shapes such as pentagon/hexagon/circle, or
neighbouring hues such as red/yellow) are confusable, which gives a teacher's soft
labels information beyond the hard label.

Each image has its own random position, scale, rotation, colour jitter within the
family, shading, texture period/phase/contrast (fading across the shape, so partly
visible), a noisy cluttered background (blobs and lines) and pixel noise. The object is
large (a third to nearly half the image across) and its texture coarse (3-4.5 px periods
at 32 px), so a model that sees 32 px views at a finer scale (a ResNet-18 given them
upsampled to 64 px) learns far more than a small one at 32 px: the gap a teacher's soft
labels are worth something in. Rendering happens at twice ``image_size`` and is box-downsampled
(anti-aliasing). Everything is drawn from a numpy Generator seeded by
``(seed, split, position)``: the same seed gives byte-identical shards.
"""

from __future__ import annotations

import colorsys
import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from logitcache.data.shards import write_dataset
from logitcache.errors import SynthSizeError

SHAPES = ("circle", "triangle", "square", "pentagon", "hexagon", "star", "cross", "crescent")
# Centre hue of each colour family, in degrees.
COLOURS = {"red": 0.0, "yellow": 55.0, "green": 125.0, "blue": 225.0}
TEXTURES = ("solid", "stripes", "dots", "checks")
MAX_CLASSES = len(SHAPES) * len(COLOURS) * len(TEXTURES)  # 128

_SPLIT_CODES = {"train": 0, "val": 1}
_HUE_JITTER = 20.0  # degrees either side of the family's centre hue


#: The rendering's version: 2 since 2026-12-06 (larger objects, coarser textures, no distractor shape or
#: occluding lines, less noise). Studies that keep generated data record it (bench/accuracy/jobs.py).
RENDERING = 2

#: The smallest image side: below it the shapes and textures are a few pixels of noise.
MIN_IMAGE_SIZE = 8



def class_attributes(c: int) -> tuple[str, str, str]:
    """(shape, colour family, texture) of class ``c`` in ``[0, 128)``."""
    if not 0 <= c < MAX_CLASSES:
        raise ValueError(f"class {c} not in [0, {MAX_CLASSES})")
    return SHAPES[c // 16], list(COLOURS)[(c // 4) % 4], TEXTURES[c % 4]


def class_names(num_classes: int = MAX_CLASSES) -> list[str]:
    """Names like "triangle-red-stripes" of the first ``num_classes`` classes."""
    return ["-".join(class_attributes(c)) for c in range(num_classes)]


def _hsv(h_deg: float, s: float, v: float) -> np.ndarray:
    """RGB in [0, 255] (float32, shape (3,)) from hue in degrees, saturation and value in [0, 1]."""
    return np.array(colorsys.hsv_to_rgb((h_deg % 360.0) / 360.0, s, v), dtype=np.float32) * 255.0


def _shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices (working pixels) of a polygonal shape of circumradius ``r`` rotated by ``angle`` radians."""
    if shape in ("triangle", "square", "pentagon", "hexagon"):
        n = {"triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6}[shape]
        radii = [r] * n
        angles = [angle + 2 * math.pi * i / n for i in range(n)]
    elif shape == "star":
        radii = [r if i % 2 == 0 else 0.45 * r for i in range(10)]
        angles = [angle + math.pi * i / 5 for i in range(10)]
    elif shape == "cross":
        a = 0.36 * r  # half the arm width
        pts = [(a, r), (a, a), (r, a), (r, -a), (a, -a), (a, -r), (-a, -r), (-a, -a), (-r, -a), (-r, a), (-a, a), (-a, r)]
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]
    else:
        raise ValueError(shape)
    return [(cx + q * math.cos(t), cy + q * math.sin(t)) for q, t in zip(radii, angles)]


def _shape_mask(shape: str, cx: float, cy: float, r: float, angle: float, size: int) -> Image.Image:
    """Mask ("L", ``size`` x ``size``, 255 inside) of a shape centred at (cx, cy), circumradius ``r`` working pixels."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "crescent":
        # A disc with a smaller disc, shifted along ``angle``, cut out of it.
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        ox, oy = cx + 0.45 * r * math.cos(angle), cy + 0.45 * r * math.sin(angle)
        q = 0.8 * r
        draw.ellipse([ox - q, oy - q, ox + q, oy + q], fill=0)
    else:
        draw.polygon(_shape_polygon(shape, cx, cy, r, angle), fill=255)
    return mask


def _texture(texture: str, rng: np.random.Generator, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Pattern in {0, 1} (float32, shape of ``u``) over rotated coordinates ``u``, ``v`` (working pixels)."""
    if texture == "solid":
        return np.zeros_like(u)
    period = rng.uniform(12.0, 18.0)  # working pixels: 3-4.5 px at 32 px
    pu, pv = rng.uniform(0.0, 1.0, size=2)
    if texture == "stripes":
        return (((u / period + pu) % 1.0) < rng.uniform(0.4, 0.6)).astype(np.float32)
    if texture == "dots":
        fu = (u / period + pu) % 1.0 - 0.5
        fv = (v / period + pv) % 1.0 - 0.5
        return (fu * fu + fv * fv < rng.uniform(0.22, 0.32) ** 2).astype(np.float32)
    if texture == "checks":
        cell = period / 2.0 + 1.0
        return ((np.floor(u / cell + pu) + np.floor(v / cell + pv)) % 2.0).astype(np.float32)
    raise ValueError(texture)


def render_image(label: int, rng: np.random.Generator, image_size: int = 32) -> Image.Image:
    """One RGB image (``image_size`` x ``image_size``) of class ``label``, all randomness from ``rng``."""
    shape, colour, texture = class_attributes(label)
    size = 2 * image_size  # working resolution; box-downsampled at the end
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5

    # Background: dull base colour + smooth low-frequency noise.
    base = _hsv(rng.uniform(0, 360), rng.uniform(0.0, 0.25), rng.uniform(0.2, 0.9))
    coarse = rng.normal(0.0, 16.0, size=(4, 4, 3)).astype(np.float32)
    smooth = np.stack(
        [np.asarray(Image.fromarray(coarse[..., k]).resize((size, size), Image.BILINEAR)) for k in range(3)], axis=-1
    )
    bg = Image.fromarray(np.clip(base + smooth, 0, 255).astype(np.uint8))

    # Clutter behind the object: small blobs and lines in any colour, one grey distractor shape.
    draw = ImageDraw.Draw(bg)
    for _ in range(rng.integers(1, 5)):
        col = tuple(int(x) for x in _hsv(rng.uniform(0, 360), rng.uniform(0, 0.5), rng.uniform(0.2, 1.0)))
        x0, y0 = rng.uniform(0, size, size=2)
        if rng.random() < 0.5:
            q = rng.uniform(1.5, max(1.5, 0.06 * size))  # tiny images: blobs of the smallest size
            draw.ellipse([x0 - q, y0 - q, x0 + q, y0 + q], fill=col)
        else:
            x1, y1 = rng.uniform(0, size, size=2)
            draw.line([x0, y0, x1, y1], fill=col, width=int(rng.integers(1, 4)))

    # The object: mask at a random position, scale and rotation.
    r = rng.uniform(0.32, 0.45) * size
    cx, cy = rng.uniform(r * 0.8, size - r * 0.8, size=2)  # may be cut a little by the border
    angle = rng.uniform(0, 2 * math.pi)
    mask = np.asarray(_shape_mask(shape, cx, cy, r, angle, size), dtype=np.float32)[..., None] / 255.0

    # Colour within the family, linear shading, texture of a second tone that fades across the shape.
    c1 = _hsv(COLOURS[colour] + rng.uniform(-_HUE_JITTER, _HUE_JITTER), rng.uniform(0.55, 1.0), rng.uniform(0.55, 1.0))
    tone = 0.0 if rng.random() < 0.5 else 255.0  # darker or lighter second tone
    c2 = c1 + (tone - c1) * rng.uniform(0.45, 0.8)
    theta = rng.uniform(0, 2 * math.pi)
    dxr, dyr = (xx - cx) / r, (yy - cy) / r
    u = (xx - cx) * math.cos(theta) + (yy - cy) * math.sin(theta)
    v = -(xx - cx) * math.sin(theta) + (yy - cy) * math.cos(theta)
    pattern = _texture(texture, rng, u, v)
    phi = rng.uniform(0, 2 * math.pi)
    fade = np.clip(0.8 + rng.uniform(0.0, 0.5) * (dxr * math.cos(phi) + dyr * math.sin(phi)), 0.3, 1.0)
    shade = 1.0 + rng.uniform(0.0, 0.3) * (dxr * math.cos(phi + 1.0) + dyr * math.sin(phi + 1.0))
    weight = (pattern * fade)[..., None]
    fg = (c1 * (1 - weight) + c2 * weight) * shade[..., None]
    img = np.asarray(bg, dtype=np.float32) * (1 - mask) + fg * mask

    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))

    # Down to the output size, then global contrast/brightness jitter and pixel noise.
    small = np.asarray(out.resize((image_size, image_size), Image.BOX), dtype=np.float32)
    small = (small - 128.0) * rng.uniform(0.8, 1.1) + 128.0 + rng.uniform(-15, 15)
    small += rng.normal(0.0, rng.uniform(1.0, 3.0), size=small.shape)
    return Image.fromarray(np.clip(np.rint(small), 0, 255).astype(np.uint8), "RGB")


def _split_samples(
    split: str, num_classes: int, per_class: int, key_start: int, image_size: int, seed: int
) -> Iterator[tuple[str, Image.Image, int]]:
    """(key, image, label) of one split: balanced classes in a seeded shuffled order."""
    code = _SPLIT_CODES[split]
    labels = np.repeat(np.arange(num_classes), per_class)
    labels = np.random.default_rng([seed, code]).permutation(labels)
    for i, label in enumerate(labels.tolist()):
        rng = np.random.default_rng([seed, code, i])  # one stream per image: order-independent
        yield f"s{key_start + i:07d}", render_image(label, rng, image_size), label


def generate_synth(
    root: str | Path,
    *,
    num_classes: int = 128,
    train_per_class: int = 40,
    val_per_class: int = 10,
    image_size: int = 32,
    seed: int = 0,
    shard_size: int = 1000,
) -> Path:
    """Write the synthetic dataset (splits "train" and "val") under ``root``; return ``root``.

    ``num_classes`` <= 128 takes the first classes of the fixed enumeration (see module
    docstring). Keys are "s0000000", ... numbered across train then val, so they are
    unique over the whole dataset. Default size: 5,120 train + 1,280 val images of 32x32.
    """
    if not 2 <= num_classes <= MAX_CLASSES:
        raise SynthSizeError(f"--num-classes must be in [2, {MAX_CLASSES}], not {num_classes}")
    if image_size < MIN_IMAGE_SIZE:
        raise SynthSizeError(f"--image-size must be >= {MIN_IMAGE_SIZE} pixels, not {image_size}")
    if train_per_class < 1 or val_per_class < 1:
        raise SynthSizeError(f"--train-per-class and --val-per-class must be >= 1, not {train_per_class} "
                             f"and {val_per_class}")
    if shard_size < 1:
        raise SynthSizeError(f"shard_size must be >= 1, not {shard_size}")
    n_train = num_classes * train_per_class
    splits = {
        "train": _split_samples("train", num_classes, train_per_class, 0, image_size, seed),
        "val": _split_samples("val", num_classes, val_per_class, n_train, image_size, seed),
    }
    return write_dataset(root, "synth", class_names(num_classes), splits, shard_size=shard_size)


#: beside a dataset :func:`generate_synth_once` wrote: its arguments and the rendering's version
SPEC_FILE = "synth_spec.json"


def generate_synth_once(root: str | Path, **kwargs) -> bool:
    """:func:`generate_synth` ``(root, **kwargs)`` unless ``root`` holds a dataset it wrote with
    the same arguments and :data:`RENDERING` (recorded in :data:`SPEC_FILE`); True when reused.
    A new one is written beside ``root`` and renamed over it: a kill leaves no half dataset."""
    root = Path(root)
    spec = {**kwargs, "rendering": RENDERING}
    marker = root / SPEC_FILE
    if (root / "dataset.json").exists() and marker.exists() and json.loads(marker.read_text()) == spec:
        return True
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    generate_synth(tmp, **kwargs)
    (tmp / SPEC_FILE).write_text(json.dumps(spec))
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return False
