"""The fast path (uint8 pixels from the workers, finished batched: logitcache/views/render.py)
makes exactly the views of timm's whole transform applied view by view (the reference, what
the teacher of every earlier cache saw), for every named recipe and for the transform options
the named ones leave off (erasing modes and counts, colour jitter, partial mixing)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from logitcache.data.source import open_source
from logitcache.storage.canary import view_digest
from logitcache.views.augment import (
    MIX_CUTMIX,
    MIX_MIXUP,
    RECIPES,
    create_recipe,
    create_train_transform,
    mix_pair,
    mix_params,
    render_view,
    rng_preserved,
)
from logitcache.views.plan import pair_seeds, plan_unit, view_seeds
from logitcache.views.render import create_view_transform, finish_batch, render_batch, render_raw_batch

VARIANTS = {
    **{name: {} for name in RECIPES},
    "erase_pixel": dict(base="demo32_mix", re_prob=1.0, re_count=3),
    "erase_rand": dict(base="demo32", re_prob=0.5, re_mode="rand"),
    "erase_const": dict(base="demo32", re_prob=1.0, re_mode="const"),
    "jitter": dict(base="demo32_mix", color_jitter=0.4, auto_augment=None),
    "half_mixed": dict(base="demo32_mix", mix_prob=0.5, switch_prob=0.3, re_prob=0.25),
}


def _recipe(name: str):
    opts = dict(VARIANTS[name])
    return create_recipe(opts.pop("base", name), **opts)


def reference_views(recipe, source, epoch: int, groups) -> torch.Tensor:
    """Each view through timm's whole transform (float, normalised, erased), pairs mixed one by one."""
    transform, key = create_train_transform(recipe), source.key
    out = []
    with rng_preserved():
        for a, b, r in zip(groups.first.tolist(), groups.second.tolist(), groups.repeats.tolist()):
            idx = [a] if b < 0 else [a, b]  # a pair's views share their repeat index
            seeds = view_seeds(recipe.cache_seed, epoch, [key(i) for i in idx], [r] * len(idx)).tolist()
            views = [render_view(transform, source.load_image(i), s) for i, s in zip(idx, seeds)]
            if b >= 0:
                p = mix_params(recipe, int(pair_seeds(recipe.cache_seed, epoch, [key(a)], [key(b)], [r])[0]))
                views = list(mix_pair(views[0], views[1], p))
            out += views
    return torch.stack(out)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_fast_views_equal_the_reference_views(synth_data, name):
    recipe = _recipe(name)
    source = open_source(synth_data, "train")
    info = source.shards[0]
    n = 24 if recipe.input_size <= 64 else 6
    groups = plan_unit(recipe, 3, 0, info.start, info.stop).take(slice(0, n))
    batch = render_batch(recipe, create_view_transform(recipe), source, 3, groups)
    ref = reference_views(recipe, source, 3, groups)
    assert batch["images"].dtype == torch.float32 and batch["images"].shape == ref.shape
    assert batch["images"].is_contiguous()
    assert torch.equal(batch["images"], ref)
    # the canary digests a build stores (of the views the teacher saw) are the reference's
    assert [view_digest(v) for v in batch["images"][:4]] == [view_digest(v) for v in ref[:4]]
    # mixing all mixup views at once (the CUDA path) makes the same bits as pair by pair
    raw = render_raw_batch(recipe, create_view_transform(recipe), source, 3, groups)
    assert torch.equal(finish_batch(raw, recipe, batched=True)["images"], ref)


def test_the_variants_exercise_what_they_name(synth_data):
    """Erasing and both mixing modes really happen in the compared batches (not vacuous)."""
    source = open_source(synth_data, "train")
    info = source.shards[0]
    seen = {}
    for name in ("erase_pixel", "half_mixed", "demo32_mix"):
        recipe = _recipe(name)
        groups = plan_unit(recipe, 3, 0, info.start, info.stop).take(slice(0, 24))
        raw = render_raw_batch(recipe, create_view_transform(recipe), source, 3, groups)
        seen[name] = (len(raw["erase_at"]) / len(raw["index"]), set(raw["mix_mode"].tolist()))
    assert seen["erase_pixel"][0] > 0.75  # re_prob 1 (timm gives up on a box that does not fit in 10 tries)
    assert 0 < seen["half_mixed"][0] < 0.5
    assert {MIX_MIXUP, MIX_CUTMIX} <= seen["demo32_mix"][1] | seen["half_mixed"][1]


def test_finishing_leaves_unmixed_views_as_rendered(synth_data):
    """A recipe without mixing: the finished batch is the uint8 pixels, scaled and normalised."""
    recipe = dataclasses.replace(create_recipe("demo32"), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    source = open_source(synth_data, "train")
    info = source.shards[0]
    raw = render_raw_batch(recipe, create_view_transform(recipe), source, 0,
                           plan_unit(recipe, 0, 0, info.start, info.stop).take(slice(0, 5)))
    pixels = raw["pixels"].clone()
    images = finish_batch(raw, recipe)["images"]
    assert "pixels" not in raw and images.shape == (5, 3, 32, 32)
    expect = (pixels.double() / 255 - torch.tensor(recipe.mean).view(1, 3, 1, 1).double()) \
        / torch.tensor(recipe.std).view(1, 3, 1, 1).double()
    assert torch.allclose(images.double(), expect, atol=1e-5)
