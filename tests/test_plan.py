"""Plans as arrays (logitcache.views.plan) are the plans caches were built with: same groups, same
view seeds, same pair seeds, same order, as the per-view planner of format version 1 (kept
here, verbatim in behaviour, as the oracle)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from logitcache.data.source import open_source
from logitcache.views.augment import (
    create_recipe,
    create_train_transform,
    derive_seed,
    mix_pair,
    mix_params,
    render_view,
)
from logitcache.views.plan import (
    Groups,
    num_groups,
    pair_seeds,
    plan_epoch,
    plan_unit,
    view_seeds,
)
from logitcache.views.render import create_view_transform, render_batch


def old_plan_unit(recipe, epoch: int, shard: int, start: int, keys: list[str]) -> list[tuple]:
    """The planner caches were built with: a list of (indices, view seeds, pair seed) per group."""
    seeds = [derive_seed(recipe.cache_seed, epoch, k) for k in keys]
    n = len(keys)
    if not recipe.mixes:
        return [((start + i,), (seeds[i],), 0) for i in range(n)]
    rng = np.random.default_rng(derive_seed(recipe.cache_seed, epoch, "pairing", shard))
    order = rng.permutation(n).tolist()
    groups = []
    for j in range(0, n - 1, 2):
        a, b = order[j], order[j + 1]
        groups.append(((start + a, start + b), (seeds[a], seeds[b]),
                       derive_seed(recipe.cache_seed, epoch, "pair", keys[a], keys[b])))
    if n % 2:
        a = order[-1]
        groups.append(((start + a,), (seeds[a],), 0))
    return groups


def as_old(recipe, epoch: int, groups: Groups, key) -> list[tuple]:
    """The array plan in the oracle's shape, seeds computed as the renderer computes them."""
    first, second = groups.first, groups.second
    sa = view_seeds(recipe.cache_seed, epoch, [key(int(i)) for i in first])
    paired = second >= 0
    sb = view_seeds(recipe.cache_seed, epoch, [key(int(i)) for i in second[paired]])
    ps = pair_seeds(recipe.cache_seed, epoch, [key(int(i)) for i in first[paired]],
                    [key(int(i)) for i in second[paired]])
    out, j = [], 0
    for g in range(len(groups)):
        if paired[g]:
            out.append(((int(first[g]), int(second[g])), (int(sa[g]), int(sb[j])), int(ps[j])))
            j += 1
        else:
            out.append(((int(first[g]),), (int(sa[g]),), 0))
    return out


@pytest.mark.parametrize("recipe_name", ["demo32", "demo32_mix", "vanillakd_a2_norepeat"])
@pytest.mark.parametrize("n", [0, 1, 2, 7, 64, 1251])
def test_unit_plan_equals_the_old_planner(recipe_name, n):
    recipe = create_recipe(recipe_name, cache_seed=3)
    start = 1000
    keys = [f"n{(start + i) % 97:05d}/img_{start + i:07d}" for i in range(n)]
    key = lambda i: keys[i - start]  # noqa: E731
    for epoch, shard in ((0, 0), (5, 17), (299, 1023)):
        groups = plan_unit(recipe, epoch, shard, start, start + n)
        assert len(groups) == num_groups(recipe, n) and groups.num_views == n
        assert as_old(recipe, epoch, groups, key) == old_plan_unit(recipe, epoch, shard, start, keys)
        assert sorted(groups.views().tolist()) == list(range(start, start + n))  # every sample once


@pytest.mark.parametrize("recipe_name", ["demo32", "demo32_mix"])
def test_epoch_plan_on_the_embedded_dataset_equals_the_old_planner(synth_data, recipe_name):
    source = open_source(synth_data, "train")
    recipe = create_recipe(recipe_name)
    keys = source.keys()
    bounds = [(s.start, s.stop) for s in source.shards]
    for epoch in (0, 4):
        groups = plan_epoch(recipe, epoch, bounds)
        old = [g for s, (a, b) in enumerate(bounds) for g in old_plan_unit(recipe, epoch, s, a, keys[a:b])]
        assert as_old(recipe, epoch, groups, source.key) == old


def test_render_batch_equals_rendering_each_group(synth_data):
    """A batch rendered from array groups holds exactly the views the per-group path made."""
    source = open_source(synth_data, "train")
    recipe = create_recipe("demo32_mix")
    transform = create_train_transform(recipe)
    info = source.shards[1]
    groups = plan_unit(recipe, 2, 1, info.start, info.start + 9).take(slice(0, 5))  # 4 pairs + a single
    assert groups.num_views == 9 and (groups.second[:4] >= 0).all() and groups.second[4] == -1
    batch = render_batch(recipe, create_view_transform(recipe), source, 2, groups)
    old = old_plan_unit(recipe, 2, 1, info.start, source.keys()[info.start:info.start + 9])
    images, index, partner, lam = [], [], [], []
    for idx, seeds, pseed in old:
        views = [render_view(transform, source.load_image(i), s) for i, s in zip(idx, seeds)]
        if len(idx) == 2:
            p = mix_params(recipe, pseed)
            views = list(mix_pair(views[0], views[1], p))
            partner += [idx[1], idx[0]]
            lam += [p.lam, p.lam]
        else:
            partner += list(idx)
            lam += [1.0]
        images += views
        index += list(idx)
    assert torch.equal(batch["images"], torch.stack(images))
    assert batch["index"].tolist() == index and batch["partner"].tolist() == partner
    assert torch.equal(batch["lam"], torch.tensor(lam, dtype=torch.float32))
    seeds = [s for _, ss, _ in old for s in ss]
    assert batch["seed"].numpy().view(np.uint64).tolist() == seeds
