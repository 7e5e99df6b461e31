"""Augmented views that can be replayed from a seed.

A *view* is one augmented image of one sample at one epoch. Every random choice that
makes it (crop, flip, RandAugment ops and magnitudes, colour jitter, random erasing,
the mixup/cutmix partner, lambda and box) is drawn from seeds derived from
``(cache_seed, epoch, sample key)``, so the same view comes out in any process, with
any DataLoader worker count, batch size or order.

Views are float32 tensors of shape (3, H, W), normalised with the recipe's mean/std.
Each model (teacher or student) maps them to its own normalisation and input size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform

from logitcache.errors import UnknownRecipeError

MIX_NONE, MIX_MIXUP, MIX_CUTMIX = 0, 1, 2


@dataclass(frozen=True)
class Recipe:
    """Everything that decides what a training view looks like (timm's option names).

    Two caches or a cache and a student run are compatible only if their recipes are
    equal (see :meth:`digest`). Label smoothing is not here: it changes targets, not views.
    """

    input_size: int = 224  # pixels, square
    scale: tuple[float, float] = (0.08, 1.0)  # random-resized-crop area fraction
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # random-resized-crop aspect ratio
    hflip: float = 0.5
    color_jitter: float = 0.0
    auto_augment: str | None = "rand-m7-mstd0.5"
    interpolation: str = "bicubic"  # of the random-resized crop: bilinear, bicubic, or random (either, per view)
    re_prob: float = 0.0  # random erasing probability
    re_mode: str = "pixel"
    re_count: int = 1
    mean: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_MEAN)  # type: ignore[assignment]
    std: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_STD)  # type: ignore[assignment]
    crop_pct: float = 0.95  # evaluation only: resize then centre-crop fraction
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0  # probability that a pair is mixed at all
    switch_prob: float = 0.5  # probability of cutmix instead of mixup when both are on
    cache_seed: int = 0  # root of every view seed
    # Repeated augmentation (timm's --aug-repeats; DeiT, VanillaKD A1/A2): an epoch holds about
    # one view per sample, of about 1 / aug_repeats of the samples, each aug_repeats times
    # (logitcache/views/plan.py); 1 = every sample once.
    aug_repeats: int = 1

    def __post_init__(self):
        if not isinstance(self.aug_repeats, int) or isinstance(self.aug_repeats, bool) or self.aug_repeats < 1:
            raise ValueError(f"aug_repeats must be an int >= 1, got {self.aug_repeats!r}")

    @property
    def mixes(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    @property
    def group_size(self) -> int:
        """Views rendered together: 2 (a mixing pair) or 1."""
        return 2 if self.mixes else 1

    def to_dict(self) -> dict:
        d = json.loads(json.dumps(dataclasses.asdict(self)))
        if d["aug_repeats"] == 1:  # absent when off: recipes from before the field keep their digests
            del d["aug_repeats"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown recipe fields: {sorted(unknown)}")
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kw)

    def digest(self) -> str:
        """sha256 of the canonical JSON of the recipe (what compatibility checks compare)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


#: The papers' recipes are their published commands' view settings, field by field
#: (tests/test_recipes.py); one deliberate difference: the papers mix per batch (timm's
#: ``--mixup-mode batch``: one lambda for a batch, each view with the flipped batch), a cache
#: per pair (each pair its own lambda and switch), because a view's partner must be fixed
#: when the teacher sees it, before any student batch exists.
RECIPES: dict[str, Recipe] = {
    # VanillaKD strategy A2 (Hao et al. 2023, Hao840/vanillaKD readme, ResNet-50): --aug-repeats 3
    # --aa rand-m7-mstd0.5 --mixup 0.1 --cutmix 1.0 --color-jitter 0 --crop-pct 0.95; timm
    # 0.6.5's defaults otherwise (train-kd.py): --train-interpolation random, no erasing.
    "vanillakd_a2": Recipe(input_size=224, auto_augment="rand-m7-mstd0.5", interpolation="random", crop_pct=0.95,
                           mixup_alpha=0.1, cutmix_alpha=1.0, aug_repeats=3),
    # VanillaKD strategy A1: as A2 with --mixup 0.2.
    "vanillakd_a1": Recipe(input_size=224, auto_augment="rand-m7-mstd0.5", interpolation="random", crop_pct=0.95,
                           mixup_alpha=0.2, cutmix_alpha=1.0, aug_repeats=3),
    # DeiT (Touvron et al. 2021, facebookresearch/deit main.py defaults): repeated augmentation
    # 3, rand-m9-mstd0.5-inc1, colour jitter 0.3 (timm turns it off under RandAugment), bicubic,
    # erasing 0.25 (pixel, 1), mixup 0.8, cutmix 1.0, evaluation crop 0.875.
    "deit": Recipe(input_size=224, color_jitter=0.3, auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic",
                   re_prob=0.25, crop_pct=0.875, mixup_alpha=0.8, cutmix_alpha=1.0, aug_repeats=3),
    # What `vanillakd_a2` was before it had repeated augmentation and random interpolation:
    # caches built with it keep this name (the same recipe, the same digest).
    "vanillakd_a2_norepeat": Recipe(input_size=224, auto_augment="rand-m7-mstd0.5", mixup_alpha=0.1,
                                    cutmix_alpha=1.0),
    # Plain ImageNet-style recipe without mixing.
    "imagenet_basic": Recipe(input_size=224, auto_augment="rand-m9-mstd0.5", re_prob=0.25),
    # The embedded demo: 32 px images, milder crops, RandAugment, no mixing.
    "demo32": Recipe(
        input_size=32, scale=(0.35, 1.0), auto_augment="rand-m6-n1-mstd0.5", crop_pct=1.0,
        interpolation="bilinear",
    ),
    # The embedded demo's teacher (`make teacher`): the demo's 32 px images upsampled to 64 px
    # for a ResNet-18 (its stride-4 stem then keeps the textures), milder crops.
    "demo_teacher": Recipe(
        input_size=64, scale=(0.5, 1.0), auto_augment="rand-m6-n1-mstd0.5", crop_pct=1.0,
        interpolation="bilinear",
    ),
    # The embedded demo with exact mixup/cutmix views.
    "demo32_mix": Recipe(
        input_size=32, scale=(0.35, 1.0), auto_augment="rand-m6-n1-mstd0.5", crop_pct=1.0,
        interpolation="bilinear", mixup_alpha=0.1, cutmix_alpha=1.0,
    ),
}

#: Recipes renamed since caches were built with them: what ``train`` says about such a cache.
RENAMED_RECIPES: dict[str, str] = {
    "vanillakd_a2_norepeat": "the recipe `vanillakd_a2` named before it gained VanillaKD's --aug-repeats 3 and "
                             "random interpolation: not the paper's A2 views (build a new cache with "
                             "--recipe vanillakd_a2 for those)",
}


def create_recipe(name: str, **overrides) -> Recipe:
    """A named recipe from :data:`RECIPES`, with field overrides (like timm's create_*)."""
    if name not in RECIPES:
        raise UnknownRecipeError(f"unknown recipe {name!r}; known: {', '.join(sorted(RECIPES))}")
    return dataclasses.replace(RECIPES[name], **overrides)


def derive_seed(*parts: object) -> int:
    """A stable 64-bit seed (0 <= s < 2**64) from any parts: blake2b of their '/'-joined text.

    Stable across processes, machines and Python versions (no ``hash()`` randomisation).
    """
    text = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def view_seed(cache_seed: int, epoch: int, key: str) -> int:
    """The seed of the view of sample ``key`` at ``epoch`` (uint64)."""
    return derive_seed(cache_seed, epoch, key)


def seed_all(seed: int) -> None:
    """Seed Python ``random``, ``numpy.random`` and torch's CPU generator from one view seed.

    timm's transforms draw from all three (crop and RandAugment magnitudes from ``random``,
    RandAugment ops from ``numpy``, erasing noise from torch), so all three are fixed per view.
    """
    random.seed(seed)
    np.random.seed([seed & 0xFFFFFFFF, seed >> 32])
    torch.random.default_generator.manual_seed(seed)


@contextlib.contextmanager
def rng_preserved() -> Iterator[None]:
    """Restore the three global generators on leaving: the caller's own random streams (e.g.
    shuffling) stay undisturbed by whatever the block seeds. Saving and restoring them costs
    about as much as seeding, so a batch of views is rendered inside one of these."""
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """The block runs with the generators seeded from ``seed`` (:func:`seed_all`); restored after."""
    with rng_preserved():
        seed_all(seed)
        yield


def create_train_transform(recipe: Recipe):
    """timm's training transform for the recipe (crop, flip, RandAugment, jitter, erasing)."""
    return create_transform(
        input_size=recipe.input_size,
        is_training=True,
        scale=recipe.scale,
        ratio=recipe.ratio,
        hflip=recipe.hflip,
        color_jitter=recipe.color_jitter,
        auto_augment=recipe.auto_augment,
        interpolation=recipe.interpolation,
        mean=recipe.mean,
        std=recipe.std,
        re_prob=recipe.re_prob,
        re_mode=recipe.re_mode,
        re_count=recipe.re_count,
    )


def eval_interpolation(recipe: Recipe) -> str:
    """The evaluation resize's interpolation: the recipe's, bicubic for ``random`` (timm's
    train.py evaluates at the model's own, bicubic for the papers' ResNet-50 and DeiT)."""
    return "bicubic" if recipe.interpolation == "random" else recipe.interpolation


def create_eval_transform(recipe: Recipe):
    """timm's evaluation transform (resize, centre crop at ``crop_pct``, normalise)."""
    return create_transform(
        input_size=recipe.input_size,
        is_training=False,
        interpolation=eval_interpolation(recipe),
        mean=recipe.mean,
        std=recipe.std,
        crop_pct=recipe.crop_pct,
    )


def render_view(transform, image: Image.Image, seed: int) -> torch.Tensor:
    """Apply ``transform`` with every random draw fixed by ``seed``. Returns (3, H, W) float32.
    Leaves the global generators seeded: call it inside :func:`rng_preserved` (once per batch)."""
    seed_all(seed)
    return transform(image)


@dataclass(frozen=True)
class MixParams:
    """How the two views of a pair are mixed. ``lam`` is the weight of each view's own image."""

    mode: int = MIX_NONE  # MIX_NONE | MIX_MIXUP | MIX_CUTMIX
    lam: float = 1.0
    box: tuple[int, int, int, int] = (0, 0, 0, 0)  # cutmix box (y0, y1, x0, x1), pixels


_MIX_RNG = np.random.RandomState()  # one per process; mix_params seeds it before every use


def _clip(v: int, size: int) -> int:
    """``int(np.clip(v, 0, size))`` for Python ints, without numpy's per-call overhead."""
    return min(max(int(v), 0), size)


def mix_params(recipe: Recipe, pair_seed: int) -> MixParams:
    """Draw the switch, lambda and box of one pair from its seed.

    The draws follow timm's ``Mixup`` (per-batch parameters, as in its "pair" mode) and its
    ``rand_bbox``/``cutmix_bbox_and_lam``, in the same order from the same stream: a numpy
    ``RandomState`` seeded with the pair seed's two 32-bit halves. Mix with probability
    ``mix_prob``; with both alphas on, cutmix instead of mixup with ``switch_prob``; lambda
    ~ Beta(alpha, alpha); a cutmix box of side ``int(size * sqrt(1 - lambda))`` centred at a
    uniform pixel, clipped to the image, and lambda corrected to the unclipped area. They
    are written out here rather than taken from timm's private ``Mixup._params_per_batch``,
    so a timm release cannot silently change the mixed views of existing caches
    (tests/test_views.py compares both over many seeds).
    """
    rng = _MIX_RNG  # re-seeded: the stream of a new RandomState([lo, hi]), at a tenth of the cost
    rng.seed([pair_seed & 0xFFFFFFFF, pair_seed >> 32])
    if not recipe.mixes or rng.rand() >= recipe.mix_prob:
        return MixParams()
    if recipe.mixup_alpha > 0 and recipe.cutmix_alpha > 0:
        use_cutmix = rng.rand() < recipe.switch_prob
    else:
        use_cutmix = recipe.cutmix_alpha > 0
    alpha = recipe.cutmix_alpha if use_cutmix else recipe.mixup_alpha
    lam = float(rng.beta(alpha, alpha))
    if lam == 1.0:
        return MixParams()
    if not use_cutmix:
        return MixParams(MIX_MIXUP, lam)
    size = recipe.input_size
    cut = int(size * np.sqrt(1 - lam))  # square box side, pixels
    cy, cx = rng.randint(0, size), rng.randint(0, size)
    y0, y1 = _clip(cy - cut // 2, size), _clip(cy + (cut + 1) // 2, size)
    x0, x1 = _clip(cx - cut // 2, size), _clip(cx + (cut + 1) // 2, size)
    lam = 1.0 - (y1 - y0) * (x1 - x0) / float(size * size)
    return MixParams(MIX_CUTMIX, float(lam), (y0, y1, x0, x1))


def mix_pair(a: torch.Tensor, b: torch.Tensor, params: MixParams) -> tuple[torch.Tensor, torch.Tensor]:
    """The two mixed views of a pair: (mix of a with b, mix of b with a), same lambda and box."""
    if params.mode == MIX_MIXUP:
        return a * params.lam + b * (1 - params.lam), b * params.lam + a * (1 - params.lam)
    if params.mode == MIX_CUTMIX:
        y0, y1, x0, x1 = params.box
        va, vb = a.clone(), b.clone()
        va[:, y0:y1, x0:x1] = b[:, y0:y1, x0:x1]
        vb[:, y0:y1, x0:x1] = a[:, y0:y1, x0:x1]
        return va, vb
    return a, b
