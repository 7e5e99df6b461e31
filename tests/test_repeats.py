"""Repeated augmentation (``Recipe.aug_repeats``, timm's ``--aug-repeats``): which views an
epoch holds is a function of (cache seed, epoch) alone; the build stores every repeat as its
own view; the trainer serves the same views, seeds and teacher rows whatever the ranks,
workers and batch size, with a sample's repeats in one global batch, on different ranks.

The caches here are real builds (``logitcache.build.loop.build``) of the session's synthetic
data (96 samples in shards of 40/40/16) by its tiny teacher."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from logitcache.build.loop import build
from logitcache.build.teacher import Teacher
from logitcache.codecs.logits import create_codec
from logitcache.data.source import open_source
from logitcache.errors import LogitcacheError
from logitcache.replay.batches import check_batch_size, create_train_loader, epoch_groups
from logitcache.replay.rows import CachedRows
from logitcache.storage.reader import CacheReader
from logitcache.views.augment import create_recipe
from logitcache.views.plan import (
    block_samples,
    block_views,
    num_groups,
    plan_unit,
    row_samples,
    unit_plan_digest,
    unit_views,
    view_seeds,
)

RECIPES = {"plain": ("demo32", 3), "mix": ("demo32_mix", 3)}
EPOCHS = [0, 1]


def _recipe(which: str):
    name, repeats = RECIPES[which]
    return create_recipe(name, aug_repeats=repeats)


# -- the plan, as a pure function -------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(n=st.integers(0, 300), repeats=st.integers(2, 5), mixes=st.booleans(), epoch=st.integers(0, 299),
       shard=st.integers(0, 1023))
def test_a_unit_plan_holds_each_chosen_sample_repeats_times_never_mixed_with_itself(n, repeats, mixes, epoch, shard):
    recipe = create_recipe("demo32_mix" if mixes else "demo32", aug_repeats=repeats, cache_seed=5)
    start = 1000
    groups = plan_unit(recipe, epoch, shard, start, start + n)
    views, reps = groups.views(), groups.view_repeats()
    assert len(groups) == num_groups(recipe, n) and len(views) == unit_views(recipe, n)
    held = np.unique(views)
    assert len(views) == len(held) * repeats and ((held >= start) & (held < start + n)).all()
    for i in held:  # each chosen sample: repeats 0 .. R-1, once each
        assert sorted(reps[views == i].tolist()) == list(range(repeats))
    k = block_samples(recipe)
    if n >= k:  # about one view per sample: at most half a block of samples off, each R times (at least a block)
        assert abs(len(held) - max(n / repeats, k)) <= k / 2 + 0.5
    paired = groups.second >= 0
    assert not (groups.first[paired] == groups.second[paired]).any()  # never a repeat of itself
    if mixes and len(held) >= k:  # every repeat of a sample in a whole block has another partner
        for i in held[:10]:
            partners = np.r_[groups.second[groups.first == i], groups.first[groups.second == i]]
            assert len(partners) == repeats and len(set(partners.tolist())) == repeats
    blocks = groups.blocks
    assert (np.diff(blocks) >= 0).all()
    for b in np.unique(blocks)[:10]:  # a block holds every repeat of each of its samples
        in_block = groups.take(blocks == b)
        assert len(in_block.views()) == len(np.unique(in_block.views())) * repeats
    # the same plan again (a function of its arguments alone), and its digest is stable
    again = plan_unit(recipe, epoch, shard, start, start + n)
    assert all(np.array_equal(getattr(groups, f), getattr(again, f)) for f in ("first", "second", "repeat", "block"))


def test_repeat_seeds_are_distinct_and_repeat_zero_is_the_plain_view():
    keys = ["a", "b", "a/1", "a#1"]
    plain = view_seeds(0, 3, keys)
    rep = view_seeds(0, 3, keys * 3, [0] * 4 + [1] * 4 + [2] * 4)
    assert np.array_equal(rep[:4], plain)
    assert len(set(rep.tolist())) == 12  # no key can make two (key, repeat) texts collide


def test_recipes_without_repeats_keep_their_digests():
    recipe = create_recipe("demo32_mix")
    assert "aug_repeats" not in recipe.to_dict()
    assert create_recipe("demo32_mix", aug_repeats=2).to_dict()["aug_repeats"] == 2
    assert create_recipe("demo32_mix", aug_repeats=2).digest() != recipe.digest()
    with pytest.raises(ValueError, match="aug_repeats"):
        create_recipe("demo32", aug_repeats=0)


# -- builds -----------------------------------------------------------------------------


def _build(url, synth_data, tiny_teacher, recipe, *, batch_size=16, workers=0, rank=0, world_size=1):
    source = open_source(synth_data, "train")
    teacher = Teacher("test_resnet", weights=tiny_teacher, num_classes=source.num_classes)
    return build(source, dataset_name="synth", teacher=teacher, recipe=recipe,
                 codec=create_codec("topk", source.num_classes, k=5), url=str(url), epochs=EPOCHS,
                 batch_size=batch_size, num_workers=workers, rank=rank, world_size=world_size,
                 barrier=(lambda: None) if world_size > 1 else None, progress=False)


@pytest.fixture(scope="module")
def caches(tmp_path_factory, synth_data, tiny_teacher):
    """One build of each repeats recipe: 1 process, no workers, teacher batches of 16."""
    root = tmp_path_factory.mktemp("repeats")
    out = {}
    for which in RECIPES:
        _build(root / f"{which}.zarr", synth_data, tiny_teacher, _recipe(which))
        out[which] = str(root / f"{which}.zarr")
    return out


def _same_units(a: str, b: str) -> None:
    ra, rb = CacheReader(a), CacheReader(b)
    for e in EPOCHS:
        for s in range(ra.num_shards):
            ua, ub = ra.read_unit(e, s), rb.read_unit(e, s)
            assert set(ua) == set(ub)
            for key in ua:
                assert np.array_equal(ua[key], ub[key]), (e, s, key)
            assert ra.commit(e, s) == rb.commit(e, s), (e, s)


@pytest.mark.parametrize("which", list(RECIPES))
def test_the_build_stores_every_repeat_whatever_ranks_workers_and_batch(which, caches, synth_data, tiny_teacher,
                                                                        tmp_path):
    recipe, source = _recipe(which), open_source(synth_data, "train")
    reader = CacheReader(caches[which])
    assert reader.manifest.recipe == recipe and reader.epochs() == EPOCHS
    for e in EPOCHS:
        arrays = reader.load_epoch(e)
        want = sum(int(unit_views(recipe, s.stop - s.start)) for s in source.shards)
        assert arrays.num_views == want and 0.8 * len(source) <= want <= 1.2 * len(source)
        for s, info in enumerate(source.shards):  # the plans the trainer checks hold
            keys = [source.key(i) for i in range(info.start, info.stop)]
            assert arrays.plans[s] == unit_plan_digest(recipe, e, s, info.start, info.stop, keys)
    # 3 build ranks (run one after the other), 2 workers, another teacher batch: the same bytes
    other = tmp_path / "ranks.zarr"
    for rank in range(3):
        _build(other, synth_data, tiny_teacher, recipe, batch_size=12, workers=2, rank=rank, world_size=3)
    _same_units(caches[which], str(other))


# -- training batches -------------------------------------------------------------------


def _served(source, recipe, cache: str, *, batch_size: int, world_size: int, workers: int):
    """Every view the trainer serves in student epoch 1 (cached epoch 1), by global batch:
    a list (per global batch) of lists (per rank) of dicts of numpy arrays."""
    reader = CacheReader(cache)
    rows = CachedRows(reader.load_epoch(1), np.asarray(source.labels()), source)
    groups = epoch_groups(source, recipe, 1)
    per_rank = []
    for rank in range(world_size):
        loader = create_train_loader(source, recipe, 1, groups, rows, batch_size=batch_size, seed=4, epoch=1,
                                     num_workers=workers, rank=rank, world_size=world_size)
        per_rank.append([{k: b[k].numpy().copy() for k in ("index", "repeat", "seed", "ids", "values", "lam")}
                         | {"images": b["images"].clone()} for b in loader])
    return [list(batch) for batch in zip(*per_rank)]


def _views(batches) -> dict[tuple[int, int], tuple]:
    out = {}
    for ranks in batches:
        for b in ranks:
            for j, (i, r) in enumerate(zip(b["index"].tolist(), b["repeat"].tolist())):
                assert (i, r) not in out  # every view served once
                out[(i, r)] = (int(b["seed"][j]), b["ids"][j].tolist(), b["values"][j].tolist(),
                               float(b["lam"][j]), b["images"][j])
    return out


@pytest.mark.parametrize("which", list(RECIPES))
def test_training_serves_the_same_views_and_rows_for_any_ranks_workers_and_batch(which, caches, synth_data):
    recipe, source = _recipe(which), open_source(synth_data, "train")
    block = block_views(recipe)  # 12 views (mixing: 4 samples x 3 repeats), else 3
    reader = CacheReader(caches[which])
    arrays = reader.load_epoch(1)
    stored = {}  # (sample, repeat) -> its cached row, read unit by unit (rows sorted by sample, repeat)
    for s, info in enumerate(source.shards):
        held = row_samples(plan_unit(recipe, 1, s, info.start, info.stop), recipe.aug_repeats)
        rows, _ = reader.read_rows(1, s)
        for j, i in enumerate(held.tolist()):
            stored[(i, j % recipe.aug_repeats)] = (rows["ids"][j].tolist(), rows["values"][j].tolist())
    assert len(stored) == arrays.num_views
    for batch_size in (2 * block, 6 * block):
        runs = {(w, workers): _served(source, recipe, caches[which], batch_size=batch_size, world_size=w,
                                      workers=workers)
                for w, workers in ((1, 0), (2, 2), (3, 0))}
        ref = _views(runs[(1, 0)])
        assert len(ref) == len(runs[(1, 0)]) * batch_size  # whole batches only (the last partial one dropped)
        for (w, workers), batches in runs.items():
            got = _views(batches)
            assert got.keys() == ref.keys(), (w, workers)
            for key, (seed, ids, values, lam, image) in got.items():
                assert (seed, ids, values, lam) == ref[key][:4] and torch.equal(image, ref[key][4]), (w, workers, key)
                assert (ids, values) == stored[key]  # the row the build stored for this very view
            for ranks in batches:  # a global batch holds every repeat of its samples ...
                views = [(i, r) for b in ranks for i, r in zip(b["index"].tolist(), b["repeat"].tolist())]
                samples = {i for i, _ in views}
                assert len(views) == len(samples) * recipe.aug_repeats
                if w == 3:  # ... each repeat on another rank (3 ranks, 3 repeats)
                    for rank_batch in ranks:
                        assert len(set(rank_batch["index"].tolist())) == len(rank_batch["index"])
        if recipe.mixes:
            assert any(v[3] < 1.0 for v in ref.values())  # mixed views were really compared


def test_a_batch_that_cannot_hold_a_repeat_block_is_refused(synth_data, caches):
    recipe = _recipe("mix")
    with pytest.raises(ValueError, match=r"cannot hold one whole repeat block \(3 repeats x 4 samples = 12 views\); "
                                         r"use a multiple of 12"):
        check_batch_size(recipe, 8)
    with pytest.raises(ValueError, match="multiple of 4"):
        check_batch_size(recipe, 14, world_size=2)
    check_batch_size(recipe, 12, world_size=3)
    import logitcache

    data = logitcache.CachedTrainData(synth_data, logitcache.open_cache(caches["mix"]))
    with pytest.raises(LogitcacheError, match="use a multiple of 12"):
        data.loader(1, batch_size=6)


def test_verify_and_inspect_read_a_repeats_cache(caches, synth_data, tiny_teacher):
    """verify re-renders random views (any repeat) and re-runs the teacher; inspect counts every
    repeat as a view and pairs each row with its own sample's label."""
    from logitcache.storage.stats import inspect_cache
    from logitcache.verify.run import verify_cache

    source = open_source(synth_data, "train")
    report = verify_cache(caches["mix"], data=synth_data, teacher_weights=tiny_teacher, sample=40, device="cpu")
    assert report.passed, report.reasons
    stats = inspect_cache(caches["mix"], source=source)
    recipe = _recipe("mix")
    assert stats.views == len(EPOCHS) * sum(int(unit_views(recipe, s.stop - s.start)) for s in source.shards)
    assert stats.recipe["aug_repeats"] == 3
    # the labels inspect pairs with rows: each row's own sample (the teacher's top-1 agreement
    # computed here from the rows read directly and the plan's samples)
    reader = CacheReader(caches["mix"])
    labels, agree, n = source.labels(), 0, 0
    for e in EPOCHS:
        arrays = reader.load_epoch(e)
        held = np.repeat(arrays.held, recipe.aug_repeats)
        top = arrays.ids[:, 0]  # top-k ids start with the top class
        agree, n = agree + int((top == labels[held]).sum()), n + len(held)
    assert stats.top1_agreement == pytest.approx(100.0 * agree / n)


def test_a_cache_without_repeats_is_refused_for_a_recipe_with_them(caches, synth_data, tiny_teacher, built_cache_mix,
                                                                  tmp_path):
    """Repeats are part of the recipe: building on a cache with other repeats, or training a
    recipe's views from a cache of others, is refused in one line naming the field."""
    import types

    from logitcache.errors import CacheMismatchError
    from logitcache.trainer.config import TrainConfig
    from logitcache.trainer.inputs import RunInputs, _check_recipe, open_inputs

    with pytest.raises(LogitcacheError, match="recipe"):  # the build: the cache's manifest differs
        _build(caches["mix"], synth_data, tiny_teacher, create_recipe("demo32_mix"))
    cfg = TrainConfig(data=synth_data, cache=built_cache_mix, recipe="vanillakd_a2", out=str(tmp_path / "r"),
                      device="cpu", num_workers=0, batch_size=16)
    with pytest.raises(CacheMismatchError, match=r"holds other views than recipe vanillakd_a2: its .*aug_repeats 1 "
                                                 r"\(recipe 3\)"):
        open_inputs(cfg, world_size=1)
    from logitcache.views.augment import RECIPES

    with pytest.raises(CacheMismatchError, match=r"interpolation 'bicubic' \(recipe 'random'\).*aug_repeats 1"):
        _check_recipe("vanillakd_a2", RECIPES["vanillakd_a2_norepeat"], "old.zarr")
    _check_recipe("vanillakd_a2_norepeat", RECIPES["vanillakd_a2_norepeat"], "old.zarr")  # the same views: fine
    # a cache of the old vanillakd_a2 trains, and the run's first line names its recipe's new name
    old = types.SimpleNamespace(url="old.zarr", manifest=types.SimpleNamespace(recipe=RECIPES["vanillakd_a2_norepeat"]),
                                epochs_present=lambda: [0], store=types.SimpleNamespace(index_sha256=None))
    inputs = RunInputs(None, None, [old], RECIPES["vanillakd_a2_norepeat"], [0], None, 1, np.zeros(1), epochs_needed=1)
    assert "its recipe is vanillakd_a2_norepeat, the recipe `vanillakd_a2` named before" in inputs.epochs_note()
