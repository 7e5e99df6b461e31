"""Which views a unit or an epoch holds and how they group, as numpy arrays.

A *unit* is one epoch x one data shard. Its n samples are planned as G *groups*: views
rendered together, a mixing pair (a, b) or a single sample. The plan is a pure function
of (recipe, epoch, shard, shard bounds): pairing is a permutation of the shard's positions
drawn from ``(cache_seed, epoch, "pairing", shard)`` and taken two at a time; an odd
leftover sample is a group of one, last. Without mixing every sample is a group of one,
in index order. So the plan does not depend on batch size, order, ranks or workers.

**Repeated augmentation** (``recipe.aug_repeats`` R > 1, timm's ``--aug-repeats``): the unit
holds m = about n / R samples (the first m of the same permutation), each R times as R
views with their own seeds (repeat r = 0 .. R-1), so an epoch holds about N views, as in
DeiT's sampler, whatever the world size. The samples are taken in *blocks*: without mixing
a block is one sample's R views; with mixing, K = R + 1 samples (rounded up to even) whose R
repeat layers are paired by a round-robin schedule, so no view is mixed with a repeat of
its own sample and each repeat of a sample has another partner. The trainer shuffles whole
blocks (the repeats of a sample land in one global batch, as the method needs). m is a
multiple of K (a shard of fewer than K samples: its samples unmixed, R times each).

Only the pairing is planned up front (integer arrays, a few bytes per group); the seeds
of views and pairs are hashes of sample keys, computed where views are rendered
(:func:`view_seeds`, :func:`pair_seeds`), a batch at a time. Planning a unit costs
microseconds, an epoch of ImageNet (1,024 shards) a few tens of milliseconds, and nothing
is held per view beyond the arrays. A unit's rows are stored sorted by (sample, repeat).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from logitcache.views.augment import Recipe, derive_seed


@dataclass(frozen=True)
class Groups:
    """Groups of views, in order. Shapes (G,), int64 global sample indices:

    ``first``: the group's first sample; ``second``: its mixing partner, or -1 for a group
    of one view. The views of the groups in order are first[0], second[0], first[1], ...
    (second only where it is >= 0): the order in which a build renders and stores them.
    ``repeat``: the repeat index of the group's views (None: 0 everywhere, no repeats);
    ``block``: non-decreasing block ids, the groups a student batch takes together (None:
    each group is its own block).
    """

    first: np.ndarray
    second: np.ndarray
    repeat: np.ndarray | None = None
    block: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.first)

    @property
    def sizes(self) -> np.ndarray:
        """(G,) int64: views per group, 1 or 2."""
        return 1 + (self.second >= 0).astype(np.int64)

    @property
    def num_views(self) -> int:
        return len(self.first) + int((self.second >= 0).sum())

    @property
    def repeats(self) -> np.ndarray:
        """(G,) int64: each group's repeat index."""
        return np.zeros(len(self.first), np.int64) if self.repeat is None else self.repeat

    @property
    def blocks(self) -> np.ndarray:
        """(G,) int64: each group's block id (non-decreasing)."""
        return np.arange(len(self.first), dtype=np.int64) if self.block is None else self.block

    def take(self, ids) -> "Groups":
        """The groups at ``ids`` (a slice, or an integer or boolean array of group ids), in that order."""
        pick = (lambda a: None if a is None else a[ids])
        return Groups(self.first[ids], self.second[ids], pick(self.repeat), pick(self.block))

    def views(self) -> np.ndarray:
        """(V,) int64: the global sample index of every view, in order (see the class doc)."""
        both = np.stack([self.first, self.second], axis=1).reshape(-1)
        return both[both >= 0]

    def view_repeats(self) -> np.ndarray:
        """(V,) int64: the repeat index of every view, in the order of :meth:`views`."""
        return np.repeat(self.repeats, self.sizes)

    @staticmethod
    def concat(parts: Sequence["Groups"]) -> "Groups":
        """The groups of ``parts`` in order; block ids are renumbered to stay distinct."""
        if not parts:
            return Groups(np.zeros(0, np.int64), np.zeros(0, np.int64))
        cat = (lambda f: np.concatenate([f(p) for p in parts]))
        repeat = cat(lambda p: p.repeats) if any(p.repeat is not None for p in parts) else None
        block = None
        if any(p.block is not None for p in parts):
            offsets = np.cumsum([0] + [int(p.blocks[-1]) + 1 if len(p) else 0 for p in parts[:-1]])
            block = np.concatenate([p.blocks + o for p, o in zip(parts, offsets)])
        return Groups(cat(lambda p: p.first), cat(lambda p: p.second), repeat, block)


def block_samples(recipe: Recipe) -> int:
    """Samples per block of a repeats recipe: 1 unmixed; mixed, R + 1 rounded up to even
    (a round-robin over K samples pairs R layers with R distinct partners)."""
    r = recipe.aug_repeats
    return 1 if not recipe.mixes else r + 1 + (r + 1) % 2


def selected_samples(recipe: Recipe, n):
    """How many of a unit's ``n`` samples an epoch holds (an int, or an integer array of
    unit sizes, elementwise): all without repeats; else about n / R, a multiple of the
    block size (at least one block, or all n when fewer)."""
    r = recipe.aug_repeats
    if r == 1:
        return n
    k = block_samples(recipe)
    m = k * ((n + r * k // 2) // (r * k))  # rounded to the nearest whole block
    return np.minimum(n, np.maximum(m, k))


def block_views(recipe: Recipe) -> int:
    """Views of one whole block: the repeats of its samples (1 without repeats: a group)."""
    return recipe.aug_repeats * block_samples(recipe) if recipe.aug_repeats > 1 else recipe.group_size


def unit_views(recipe: Recipe, n):
    """Views (= stored rows) of a unit of ``n`` samples (elementwise over arrays)."""
    return selected_samples(recipe, n) * recipe.aug_repeats


def num_groups(recipe: Recipe, num_samples):
    """Groups of a unit of ``num_samples`` samples (an int, or an integer array of unit
    sizes, elementwise): pairs and a leftover single when mixing."""
    r = recipe.aug_repeats
    if r > 1:
        m, k = selected_samples(recipe, num_samples), block_samples(recipe)
        if not recipe.mixes:
            return m * r
        return (m // k) * r * k // 2 + (m % k) * r
    return (num_samples + 1) // 2 if recipe.mixes else num_samples


def _round_robin(k: int, rounds: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A block's pair template: positions (a, b) in the block and the round (= repeat) of
    each of its ``rounds * k / 2`` pairs, by the circle method (every round pairs all k; no
    pair twice), ordered pair slot by slot so a sample's repeats sit close together."""
    a, b, r = [], [], []
    for slot in range(k // 2):
        for rnd in range(rounds):
            if slot == 0:
                pa, pb = 0, rnd % (k - 1) + 1
            else:
                pa, pb = (rnd + slot) % (k - 1) + 1, (rnd - slot) % (k - 1) + 1
            a.append(pa)
            b.append(pb)
            r.append(rnd)
    return np.array(a, np.int64), np.array(b, np.int64), np.array(r, np.int64)


def plan_unit(recipe: Recipe, epoch: int, shard: int, start: int, stop: int) -> Groups:
    """The groups of one unit: global samples ``start <= i < stop`` of data shard ``shard``."""
    n = stop - start
    if not recipe.mixes and recipe.aug_repeats == 1:
        return Groups(np.arange(start, stop, dtype=np.int64), np.full(n, -1, np.int64))
    order = np.random.default_rng(derive_seed(recipe.cache_seed, epoch, "pairing", shard)).permutation(n)
    order = order.astype(np.int64) + start
    if recipe.aug_repeats > 1:
        return _plan_repeats(recipe, order[:int(selected_samples(recipe, n))])
    pairs = n // 2
    first, second = order[0:2 * pairs:2], order[1:2 * pairs:2]
    if n % 2:
        first, second = np.append(first, order[-1]), np.append(second, -1)
    return Groups(first, second)


def _plan_repeats(recipe: Recipe, chosen: np.ndarray) -> Groups:
    """The groups of a repeats unit whose samples are ``chosen`` (in block order)."""
    r, k = recipe.aug_repeats, block_samples(recipe)
    nb = len(chosen) // k if recipe.mixes else 0
    parts = []
    if nb:
        ta, tb, tr = _round_robin(k, r)
        base = (np.arange(nb, dtype=np.int64) * k)[:, None]
        parts.append(Groups(chosen[base + ta].ravel(), chosen[base + tb].ravel(), np.tile(tr, nb),
                            np.repeat(np.arange(nb, dtype=np.int64), len(ta))))
    single = chosen[nb * k:]  # unmixed: every chosen sample; mixed: a shard smaller than one block
    m = len(single)
    parts.append(Groups(np.repeat(single, r), np.full(m * r, -1, np.int64), np.tile(np.arange(r, dtype=np.int64), m),
                        np.repeat(np.arange(m, dtype=np.int64), r)))
    return Groups.concat(parts)  # the singles' blocks numbered on after the pairs' (0 .. nb-1)


def plan_epoch(recipe: Recipe, epoch: int, bounds: Sequence[tuple[int, int]]) -> Groups:
    """The groups of every unit of ``epoch``, shard after shard; ``bounds[s] = (start, stop)``."""
    return Groups.concat([plan_unit(recipe, epoch, s, a, b) for s, (a, b) in enumerate(bounds)])


def held_samples(groups: Groups) -> np.ndarray:
    """(m,) int64, sorted: the samples that have rows in a unit (or epoch) planned as ``groups``."""
    return np.unique(groups.views())


def row_samples(groups: Groups, repeats: int) -> np.ndarray:
    """(V,) int64: the sample of each stored row of a unit (or epoch) planned as ``groups``:
    rows are sorted by (sample, repeat), ``repeats`` rows per sample held."""
    return np.repeat(held_samples(groups), repeats)


def row_of(held: np.ndarray, index: np.ndarray, repeat: np.ndarray, repeats: int) -> np.ndarray:
    """The row of each view (sample ``index``, repeat ``repeat``) among rows sorted by
    (sample, repeat), where ``held`` (sorted) are the samples that have rows."""
    return np.searchsorted(held, index) * repeats + repeat

def _digests(texts) -> np.ndarray:
    b2 = hashlib.blake2b
    raw = b"".join([b2(t.encode(), digest_size=8).digest() for t in texts])
    return np.frombuffer(raw, dtype="<u8").astype(np.uint64)


def _epoch_part(epoch: int, repeat: int) -> str:
    """The epoch's part of a seed's text: ``"e"`` for repeat 0 (the views of a recipe without
    repeats), ``"e#r"`` for repeat r > 0 (no key can make the two texts collide)."""
    return f"{epoch}#{repeat}" if repeat else f"{epoch}"


def view_seeds(cache_seed: int, epoch: int, keys: Sequence[str], repeats: Sequence[int] | None = None) -> np.ndarray:
    """(n,) uint64: the view seed of every key (:func:`logitcache.views.augment.view_seed`;
    with ``repeats``, each key's repeat index: repeat r > 0 hashes ``cache_seed/epoch#r/key``)."""
    if repeats is None:
        prefix = f"{cache_seed}/{epoch}/"
        return _digests(prefix + k for k in keys)
    return _digests(f"{cache_seed}/{_epoch_part(epoch, r)}/{k}" for k, r in zip(keys, repeats))


def pair_seeds(cache_seed: int, epoch: int, keys_a: Sequence[str], keys_b: Sequence[str],
               repeats: Sequence[int] | None = None) -> np.ndarray:
    """(n,) uint64: the seed of each pair (key_a, key_b): its mixing switch, lambda and box
    (``repeats``: the pair's repeat index, as :func:`view_seeds`)."""
    if repeats is None:
        prefix = f"{cache_seed}/{epoch}/pair/"
        return _digests(f"{prefix}{a}/{b}" for a, b in zip(keys_a, keys_b))
    return _digests(f"{cache_seed}/{_epoch_part(epoch, r)}/pair/{a}/{b}" for a, b, r in zip(keys_a, keys_b, repeats))


def plan_digest(view_seeds: np.ndarray, partner_positions: np.ndarray) -> str:
    """sha256 (hex) of a unit's plan, rows in (sample, repeat) order: the view seeds as
    little-endian uint64, then each row's mixing partner as a little-endian int32 row
    position in the unit (its own position when it is not mixed; without repeats the
    position in the shard). Format 3 commit records hold it."""
    h = hashlib.sha256(np.ascontiguousarray(view_seeds, dtype="<u8").tobytes())
    h.update(np.ascontiguousarray(partner_positions, dtype="<i4").tobytes())
    return h.hexdigest()


def partner_positions(groups: Groups, repeats: int = 1) -> np.ndarray:
    """(V,) int64: each row's mixing partner as a row position in the unit planned as
    ``groups`` (its own when alone); rows sorted by (sample, repeat), ``repeats`` per sample
    (without repeats row r is the shard's r-th sample). A pair's views share their repeat."""
    held, rep = held_samples(groups), groups.repeats
    paired = groups.second >= 0
    a = row_of(held, groups.first, rep, repeats)
    b = row_of(held, np.where(paired, groups.second, groups.first), rep, repeats)
    out = np.empty(groups.num_views, np.int64)
    out[a], out[b[paired]] = b, a[paired]
    return out


def unit_plan_digest(recipe: Recipe, epoch: int, shard: int, start: int, stop: int, keys: Sequence[str]) -> str:
    """The digest of the plan of one unit as this code plans it; ``keys`` are its samples' keys."""
    r = recipe.aug_repeats
    groups = plan_unit(recipe, epoch, shard, start, stop)
    if r == 1:  # every sample once, rows in index order: the keys as given
        seeds = view_seeds(recipe.cache_seed, epoch, keys)
    else:
        rows = row_samples(groups, r)
        seeds = view_seeds(recipe.cache_seed, epoch, [keys[i - start] for i in rows.tolist()],
                           np.tile(np.arange(r), len(rows) // r).tolist())
    return plan_digest(seeds, partner_positions(groups, r))
