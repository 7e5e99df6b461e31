"""Tests for logitcache/views/augment.py: stable seeds, exact replay of views, mix pairing.

The key test (``test_regenerated_views_are_what_the_teacher_saw``) is the issue's "Done
when": views regenerated in another process, with another DataLoader worker count and
batch size, are byte-identical to those the build fed the teacher, and the cache holds
that teacher's logits on them within the codec's stated tolerance.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import recipe_of

from logitcache.build.teacher import Teacher
from logitcache.codecs.logits import CodecSpec, decode
from logitcache.data.source import open_source
from logitcache.storage.reader import CacheReader
from logitcache.views.augment import (
    MIX_CUTMIX,
    MIX_MIXUP,
    MIX_NONE,
    MixParams,
    create_recipe,
    derive_seed,
    mix_pair,
    mix_params,
    seeded,
    view_seed,
)
from logitcache.views.plan import pair_seeds, plan_digest, plan_unit, unit_views, view_seeds
from logitcache.views.render import create_view_transform, render_batch

# -- view seeds -------------------------------------------------------------------------

#: THE STABILITY CONTRACT. view_seed(0, 3, "s0000001") was computed once (blake2b with an
#: 8-byte digest of b"0/3/s0000001", read little-endian) and must never change: every
#: cache ever built names its views by these seeds, on any machine, OS or Python version.
#: If this test fails, existing caches can no longer be replayed.
VIEW_SEED_0_3_S0000001 = 1094866549171520790  # 0x0f31bf535bd38516


def test_view_seed_is_a_hard_coded_constant():
    assert view_seed(0, 3, "s0000001") == VIEW_SEED_0_3_S0000001
    # the documented formula (docs/FORMAT.md), spelled out
    digest = hashlib.blake2b(b"0/3/s0000001", digest_size=8).digest()
    assert int.from_bytes(digest, "little") == VIEW_SEED_0_3_S0000001
    assert view_seed(0, 3, "s0000001") == derive_seed(0, 3, "s0000001")


def test_view_seeds_are_uint64_and_distinct():
    seeds = [view_seed(c, e, f"s{i:07d}") for c in (0, 1) for e in range(3) for i in range(50)]
    assert all(0 <= s < 2**64 for s in seeds)
    assert len(set(seeds)) == len(seeds)
    # each part matters
    assert view_seed(0, 3, "s0000001") != view_seed(1, 3, "s0000001")
    assert view_seed(0, 3, "s0000001") != view_seed(0, 4, "s0000001")
    assert view_seed(0, 3, "s0000001") != view_seed(0, 3, "s0000002")


def test_view_seed_is_equal_in_another_process(another_process):
    # ``another_process`` ran with PYTHONHASHSEED=12345: hash() randomisation must not matter
    assert another_process["view_seeds"] == {
        "0/3/s0000001": VIEW_SEED_0_3_S0000001,
        "7/0/a/b": view_seed(7, 0, "a/b"),
        "0/1/s0000000": view_seed(0, 1, "s0000000"),
    }


# -- seeded() ----------------------------------------------------------------------------


def _rng_states():
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def _assert_states_equal(a, b):
    assert a[0] == b[0]
    assert a[1][0] == b[1][0] and np.array_equal(a[1][1], b[1][1]) and a[1][2:] == b[1][2:]
    assert torch.equal(a[2], b[2])


def _draw():
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_seeded_restores_global_rng_states():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    _draw()  # move off the freshly seeded state
    before = _rng_states()
    expected_next = _draw()
    random.setstate(before[0]), np.random.set_state(before[1]), torch.set_rng_state(before[2])

    with seeded(2**64 - 1):  # the largest view seed
        inside = _draw()
    _assert_states_equal(_rng_states(), before)
    assert _draw() == expected_next  # the caller's streams continue undisturbed

    # same seed -> same draws from all three generators; another seed -> others
    with seeded(2**64 - 1):
        assert _draw() == inside
    with seeded(12345):
        assert _draw() != inside


def test_seeded_restores_states_after_an_exception():
    before = _rng_states()
    with pytest.raises(RuntimeError):
        with seeded(99):
            _draw()
            raise RuntimeError("boom")
    _assert_states_equal(_rng_states(), before)


# -- mix pairing -------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 7, 16, 40])
@pytest.mark.parametrize("epoch", [0, 3])
def test_mix_pairing_covers_every_sample_once(n, epoch):
    recipe = create_recipe("demo32_mix")
    start, shard = 1000, 4
    keys = [f"k{i:05d}" for i in range(n)]
    groups = plan_unit(recipe, epoch, shard, start, start + n)
    assert sorted(groups.views().tolist()) == list(range(start, start + n))  # every sample exactly once
    assert groups.num_views == n
    assert int((groups.second < 0).sum()) == n % 2  # singles: the odd leftover only
    paired = groups.second >= 0
    assert np.all(groups.first[paired] != groups.second[paired])  # a pair has two distinct samples
    seeds = view_seeds(recipe.cache_seed, epoch, [keys[i - start] for i in groups.first])
    assert seeds.tolist() == [view_seed(recipe.cache_seed, epoch, keys[i - start]) for i in groups.first]
    a = [keys[i - start] for i in groups.first[paired]]
    b = [keys[i - start] for i in groups.second[paired]]
    assert pair_seeds(recipe.cache_seed, epoch, a, b).tolist() == [
        derive_seed(recipe.cache_seed, epoch, "pair", x, y) for x, y in zip(a, b)]
    # pairing is fixed by (cache_seed, epoch, shard) and changes with each
    same = plan_unit(recipe, epoch, shard, start, start + n)
    assert np.array_equal(same.first, groups.first) and np.array_equal(same.second, groups.second)
    if n >= 7:
        assert not np.array_equal(plan_unit(recipe, epoch + 1, shard, start, start + n).first, groups.first)
        assert not np.array_equal(plan_unit(recipe, epoch, shard + 1, start, start + n).first, groups.first)


def test_no_mix_recipe_plans_single_groups_in_order():
    recipe = create_recipe("demo32")
    groups = plan_unit(recipe, 2, 0, 10, 15)
    assert groups.first.tolist() == list(range(10, 15)) and np.all(groups.second == -1)
    assert groups.views().tolist() == list(range(10, 15))


def test_mix_params_are_valid_and_cover_both_modes():
    recipe = create_recipe("demo32_mix")
    size = recipe.input_size
    modes = set()
    for i in range(300):
        seed = derive_seed("test-pair", i)
        p = mix_params(recipe, seed)
        assert mix_params(recipe, seed) == p  # the pair seed fixes switch, lambda and box
        modes.add(p.mode)
        assert 0.0 < p.lam <= 1.0
        if p.mode == MIX_CUTMIX:
            y0, y1, x0, x1 = p.box
            assert 0 <= y0 <= y1 <= size and 0 <= x0 <= x1 <= size  # the box is inside the image
            assert p.lam == pytest.approx(1.0 - (y1 - y0) * (x1 - x0) / (size * size), abs=1e-12)
        elif p.mode == MIX_MIXUP:
            assert p.box == (0, 0, 0, 0)
        else:
            assert p.mode == MIX_NONE and p == MixParams()
    assert {MIX_MIXUP, MIX_CUTMIX} <= modes


def _timm_private_mix_params(recipe, pair_seed: int) -> MixParams:
    """The draws as logitcache made them before it had its own: timm's private
    ``Mixup._params_per_batch`` and ``cutmix_bbox_and_lam`` under the global RNGs seeded from
    the pair seed. The oracle that existing caches were built with."""
    from timm.data.mixup import Mixup, cutmix_bbox_and_lam

    from logitcache.views.augment import seeded

    mixer = Mixup(mixup_alpha=recipe.mixup_alpha, cutmix_alpha=recipe.cutmix_alpha, prob=recipe.mix_prob,
                  switch_prob=recipe.switch_prob, mode="pair", num_classes=2)
    size = recipe.input_size
    with seeded(pair_seed):
        lam, use_cutmix = mixer._params_per_batch()
        if lam == 1.0:
            return MixParams()
        if not use_cutmix:
            return MixParams(MIX_MIXUP, float(lam))
        (y0, y1, x0, x1), lam = cutmix_bbox_and_lam((size, size), lam, correct_lam=True)
        return MixParams(MIX_CUTMIX, float(lam), (int(y0), int(y1), int(x0), int(x1)))


MIX_VARIANTS = {
    "vanillakd_a2": {}, "demo32_mix": {},
    "mixup_only": {"mixup_alpha": 0.8, "cutmix_alpha": 0.0},
    "cutmix_only": {"mixup_alpha": 0.0, "cutmix_alpha": 1.0},
    "half_mixed": {"mix_prob": 0.5, "switch_prob": 0.3},
}


@pytest.mark.parametrize("variant", sorted(MIX_VARIANTS))
def test_mix_params_equal_the_old_timm_draws(variant):
    """Every pair seed gives exactly the switch, lambda and box the old private-API draws gave
    (10,000 seeds per recipe), so caches built before keep replaying."""
    base = "demo32_mix" if variant not in ("vanillakd_a2",) else "vanillakd_a2"
    recipe = create_recipe(base, **MIX_VARIANTS[variant])
    modes = set()
    for i in range(10_000):
        seed = derive_seed("old-vs-new", variant, i)
        new = mix_params(recipe, seed)
        assert new == _timm_private_mix_params(recipe, seed), (variant, i, seed)
        modes.add(new.mode)
    expected = {"mixup_only": {MIX_MIXUP}, "cutmix_only": {MIX_CUTMIX}, "half_mixed": {MIX_NONE, MIX_MIXUP, MIX_CUTMIX}}
    assert expected.get(variant, {MIX_MIXUP, MIX_CUTMIX}) <= modes  # every branch of the recipe was compared


def test_mix_pair_pixels():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 8, 8, generator=g), torch.rand(3, 8, 8, generator=g)
    va, vb = mix_pair(a, b, MixParams(MIX_MIXUP, 0.25))
    assert torch.allclose(va, 0.25 * a + 0.75 * b) and torch.allclose(vb, 0.25 * b + 0.75 * a)
    p = MixParams(MIX_CUTMIX, 1 - 6 / 64, (1, 3, 2, 5))
    va, vb = mix_pair(a, b, p)
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[1:3, 2:5] = True
    assert torch.equal(va[:, inside], b[:, inside]) and torch.equal(va[:, ~inside], a[:, ~inside])
    assert torch.equal(vb[:, inside], a[:, inside]) and torch.equal(vb[:, ~inside], b[:, ~inside])
    assert torch.equal(a, mix_pair(a, b, MixParams())[0])


# -- replay independent of order ---------------------------------------------------------


@pytest.mark.parametrize("recipe_name", ["demo32", "demo32_mix"])
def test_replay_is_independent_of_order(synth_data, recipe_name):
    recipe = create_recipe(recipe_name)
    source = open_source(synth_data, "train")
    shard = len(source.shards) - 1
    info = source.shards[shard]
    groups = plan_unit(recipe, 1, shard, info.start, info.stop)

    def render(order, disturb, transform):
        out = {}
        for j in order:
            if disturb:  # whatever the global RNGs hold must not matter
                random.seed(j), np.random.seed(j), torch.manual_seed(j)
            out[j] = render_batch(recipe, transform, source, 1, groups.take([j]))
        return out

    n = len(groups)
    forward = render(range(n), False, create_view_transform(recipe))
    shuffled_order = list(range(n))
    random.Random(7).shuffle(shuffled_order)
    transform = create_view_transform(recipe)  # used for both orders, after other renders
    for other in (render(reversed(range(n)), True, transform), render(shuffled_order, True, transform)):
        for j in range(n):
            x, y = forward[j], other[j]
            assert torch.equal(x["images"], y["images"]), f"group {j} rendered differently"
            for name in ("index", "partner", "lam", "seed"):
                assert torch.equal(x[name], y[name])
    if recipe.mixes:  # the pairs really are mixed (the test is not vacuous)
        assert any(float(r["lam"][0]) < 1.0 for r in forward.values() if len(r["lam"]) == 2)


# -- THE KEY TEST: regenerated views == what the build fed the teacher --------------------

REGEN_WORKERS = 2
REGEN_GROUPS_PER_BATCH = 3  # the build used 16 views per batch, one unit at a time

#: Regenerates every view of both caches' epochs in a fresh process, with a DataLoader of
#: REGEN_WORKERS workers, batches of REGEN_GROUPS_PER_BATCH groups that cross unit
#: boundaries, and the batches in reverse order. Saves one file per recipe.
_REGEN_SCRIPT = r"""
import json, sys
import torch
from logitcache.data.source import open_source
from logitcache.views.loader import BatchDataset, create_batch_loader
from logitcache.views.plan import plan_epoch
from logitcache.views.augment import create_recipe, view_seed

def recipe_of(spec):
    name, _, repeats = spec.partition("@")
    return create_recipe(name, aug_repeats=int(repeats or 1))

args = json.loads(sys.argv[1])
seeds = {"0/3/s0000001": view_seed(0, 3, "s0000001"), "7/0/a/b": view_seed(7, 0, "a/b"),
         "0/1/s0000000": view_seed(0, 1, "s0000000")}
source = open_source(args["data"], "train")
bounds = [(s.start, s.stop) for s in source.shards]
for name, out_path in args["outputs"].items():
    recipe = recipe_of(name)
    per, batches = args["groups_per_batch"], []
    for epoch in args["epochs"]:
        groups = plan_epoch(recipe, epoch, bounds)
        batches += [(epoch, groups.take(slice(i, i + per)), {"epoch": epoch}) for i in range(0, len(groups), per)]
    loader = create_batch_loader(BatchDataset(source, recipe), batches[::-1], num_workers=args["workers"])
    parts = {k: [] for k in ("images", "index", "partner", "lam", "seed", "repeat", "epoch")}
    for batch in loader:
        assert not batch["errors"], batch["errors"]
        for k in ("images", "index", "partner", "lam", "seed", "repeat"):
            parts[k].append(batch[k])
        parts["epoch"].append(torch.full((len(batch["index"]),), batch["epoch"], dtype=torch.int64))
    torch.save({k: torch.cat(v) for k, v in parts.items()}, out_path)
print(json.dumps({"view_seeds": seeds}))
"""


REGEN_EPOCHS = [0, 1]  # the epochs of the session caches (tests/conftest.py)
REGEN_RECIPES = ["demo32", "demo32_mix", "demo32_mix@3"]  # name@R: aug_repeats R (tests/conftest.py)


@pytest.fixture(scope="module")
def another_process(tmp_path_factory, synth_data):
    """What a fresh Python process (PYTHONHASHSEED=12345) computes: view seeds, and every view
    of REGEN_EPOCHS of each recipe as {recipe: {(epoch, sample index, repeat): {images, partner, lam, seed}}}."""
    out_dir = tmp_path_factory.mktemp("regen")
    outputs = {name: str(out_dir / f"{name}.pt") for name in REGEN_RECIPES}
    args = {"data": synth_data, "outputs": outputs, "epochs": REGEN_EPOCHS, "workers": REGEN_WORKERS,
            "groups_per_batch": REGEN_GROUPS_PER_BATCH}
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    proc = subprocess.run([sys.executable, "-c", _REGEN_SCRIPT, json.dumps(args)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["views"] = {}
    for name, path in outputs.items():
        saved = torch.load(path, weights_only=True)
        views = {
            (int(e), int(i), int(r)): {k: saved[k][row] for k in ("images", "partner", "lam", "seed")}
            for row, (e, i, r) in enumerate(zip(saved["epoch"].tolist(), saved["index"].tolist(),
                                                saved["repeat"].tolist()))
        }
        assert len(views) == len(saved["index"])  # no (epoch, sample, repeat) rendered twice
        result["views"][name] = views
    return result


def _build_feed(source, recipe, epochs, batch_size):
    """(epoch, sample index, repeat) of every view in the order the build feeds the teacher, and the
    sizes of its teacher calls: units in (epoch, shard) order, groups in plan order,
    ``batch_size // group_size`` groups per call, never across units."""
    order, batch_sizes = [], []
    per_batch = max(1, batch_size // recipe.group_size)
    for epoch in epochs:
        for shard, info in enumerate(source.shards):
            groups = plan_unit(recipe, epoch, shard, info.start, info.stop)
            for b in range(0, len(groups), per_batch):
                part = groups.take(slice(b, b + per_batch))
                chunk = list(zip(part.views().tolist(), part.view_repeats().tolist()))
                batch_sizes.append(len(chunk))
                order += [(epoch, i, r) for i, r in chunk]
    return order, batch_sizes


def _assert_matches_teacher(spec: CodecSpec, ids: np.ndarray, values: np.ndarray, tail: np.ndarray,
                            true: torch.Tensor, where: str) -> None:
    """Cached top-k rows (8-bit gaps) vs the teacher's float32 logits ``true`` (B, C), at the codec's bound.

    Ids: the teacher's top-k, except where two of its logits tie within 1e-4. Kept logits
    relative to the top: within half a gap step of the teacher's (plus 1e-4 for float32
    rounding). The tail fill relative to the top: within half a gap step of the teacher's
    ``log-sum-exp(tail) - log(C - k) - top``.
    """
    assert spec.quantised and spec.name == "topk"
    ids_t = torch.from_numpy(ids.astype(np.int64))
    rebuilt = decode(spec, ids_t, torch.from_numpy(values), torch.from_numpy(tail)).double()
    true = true.double()
    true_vals, true_ids = torch.topk(true, spec.k, dim=1)
    at_cached = true.gather(1, ids_t)
    ties = (at_cached - true_vals).abs() <= 1e-4
    assert torch.all((ids_t == true_ids) | ties), f"{where}: ids differ where the teacher's logits do not tie"
    top_r, top_t = rebuilt.amax(1, keepdim=True), true.amax(1, keepdim=True)
    kept_err = ((rebuilt.gather(1, ids_t) - top_r) - (at_cached - top_t)).abs()
    assert kept_err.max() <= spec.gap_step / 2 + 1e-4, f"{where}: kept logits off by {float(kept_err.max())}"
    fill = torch.logsumexp(true.scatter(1, ids_t, -float("inf")), dim=1) - math.log(spec.num_classes - spec.k)
    tail_of = rebuilt.scatter(1, ids_t, float("inf")).amin(1)  # any class not kept holds the fill
    tail_err = ((tail_of - top_r[:, 0]) - (fill - top_t[:, 0])).abs()
    assert tail_err.max() <= spec.gap_step / 2 + 1e-4, f"{where}: tail fill off by {float(tail_err.max())}"


@pytest.mark.parametrize("which", ["built_cache_record", "built_cache_mix_record", "built_cache_repeats_record"])
def test_regenerated_views_are_what_the_teacher_saw(request, which, synth_data, tiny_teacher, another_process):
    record = request.getfixturevalue(which)
    assert set(record.epochs) <= set(REGEN_EPOCHS) and record.recipe in REGEN_RECIPES
    recipe = recipe_of(record.recipe)
    source = open_source(synth_data, "train")
    order, batch_sizes = _build_feed(source, recipe, record.epochs, record.batch_size)
    views_per_epoch = sum(int(unit_views(recipe, s.stop - s.start)) for s in source.shards)
    assert len(order) == len(record.epochs) * views_per_epoch

    # 1. the build fed the teacher exactly the planned batches ...
    assert [len(v) for v in record.teacher_inputs] == batch_sizes
    fed = torch.cat(record.teacher_inputs)
    assert not torch.equal(fed[0], fed[1]) and fed.std() > 0.1  # real, distinct images
    reader = CacheReader(record.url)

    # 2. byte-identical views from another process, 2 workers, another batch size and order
    regen = another_process["views"][record.recipe]
    assert set(regen) == set(order)
    again = torch.stack([regen[key]["images"] for key in order])
    assert again.dtype == torch.float32 and again.shape == fed.shape
    assert torch.equal(again, fed), "regenerated views differ from what the build fed the teacher"
    if recipe.mixes:
        assert any(float(regen[key]["lam"]) < 1.0 for key in order)  # mixed views were really compared

    # 3. the cache holds the teacher's logits on the regenerated views (a fresh Teacher,
    #    run over the same batches as the build) within the codec's stated tolerance,
    #    and the plan (view seeds, mixing partners) of the regenerated views
    teacher = Teacher("test_resnet", weights=tiny_teacher, num_classes=source.num_classes)
    spec = reader.manifest.codec
    bounds = np.cumsum([0] + batch_sizes)
    true = torch.cat([teacher(again[a:b], recipe.mean, recipe.std) for a, b in zip(bounds[:-1], bounds[1:])])
    for epoch in record.epochs:
        rows = [j for j, (e, _, _) in enumerate(order) if e == epoch]
        ep = reader.load_epoch(epoch)
        index = ep.rows_of(np.array([order[j][1] for j in rows]), np.array([order[j][2] for j in rows]))
        _assert_matches_teacher(spec, ep.ids[index], ep.values[index], ep.tail[index],
                                true[rows], f"{record.recipe} epoch {epoch}")
        for s, info in enumerate(source.shards):  # a unit's rows in (sample, repeat) order
            keys = sorted(k for k in regen if k[0] == epoch and info.start <= k[1] < info.stop)
            seeds = np.array([int(regen[k]["seed"]) for k in keys], np.int64).view(np.uint64)
            assert np.array_equal(seeds, [view_seed(recipe.cache_seed, epoch, source.key(i)) if r == 0 else
                                          view_seeds(recipe.cache_seed, epoch, [source.key(i)], [r])[0]
                                          for _, i, r in keys])
            position = {k: p for p, k in enumerate(keys)}  # a pair's views share their repeat
            partners = np.array([position[(e, int(regen[(e, i, r)]["partner"]), r)] for e, i, r in keys])
            assert ep.plans[s] == plan_digest(seeds, partners), (epoch, s)
