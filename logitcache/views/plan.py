"""Which views a unit or an epoch holds and how they group, as numpy arrays.

A *unit* is one epoch x one data shard. Its n samples are planned as G *groups*: views
rendered together, a mixing pair (a, b) or a single sample. The plan is a pure function
of (recipe, epoch, shard, shard bounds): pairing is a permutation of the shard's positions
drawn from ``(cache_seed, epoch, "pairing", shard)`` and taken two at a time; an odd
leftover sample is a group of one, last. Without mixing every sample is a group of one,
in index order. So the plan does not depend on batch size, order, ranks or workers.

Only the pairing is planned up front (integer arrays, a few bytes per group); the seeds
of views and pairs are hashes of sample keys, computed where views are rendered
(:func:`view_seeds`, :func:`pair_seeds`), a batch at a time. Planning a unit costs
microseconds, an epoch of ImageNet (1,024 shards) a few tens of milliseconds, and nothing
is held per view beyond the arrays.
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
    """

    first: np.ndarray
    second: np.ndarray

    def __len__(self) -> int:
        return len(self.first)

    @property
    def sizes(self) -> np.ndarray:
        """(G,) int64: views per group, 1 or 2."""
        return 1 + (self.second >= 0).astype(np.int64)

    @property
    def num_views(self) -> int:
        return len(self.first) + int((self.second >= 0).sum())

    def take(self, ids) -> "Groups":
        """The groups at ``ids`` (a slice, or an integer array of group ids), in that order."""
        return Groups(self.first[ids], self.second[ids])

    def views(self) -> np.ndarray:
        """(V,) int64: the global sample index of every view, in order (see the class doc)."""
        both = np.stack([self.first, self.second], axis=1).reshape(-1)
        return both[both >= 0]

    @staticmethod
    def concat(parts: Sequence["Groups"]) -> "Groups":
        if not parts:
            return Groups(np.zeros(0, np.int64), np.zeros(0, np.int64))
        return Groups(np.concatenate([p.first for p in parts]), np.concatenate([p.second for p in parts]))


def num_groups(recipe: Recipe, num_samples):
    """Groups of a unit of ``num_samples`` samples (an int, or an integer array of unit
    sizes, elementwise): pairs and a leftover single when mixing."""
    return (num_samples + 1) // 2 if recipe.mixes else num_samples


def plan_unit(recipe: Recipe, epoch: int, shard: int, start: int, stop: int) -> Groups:
    """The groups of one unit: global samples ``start <= i < stop`` of data shard ``shard``."""
    n = stop - start
    if not recipe.mixes:
        return Groups(np.arange(start, stop, dtype=np.int64), np.full(n, -1, np.int64))
    order = np.random.default_rng(derive_seed(recipe.cache_seed, epoch, "pairing", shard)).permutation(n)
    order = order.astype(np.int64) + start
    pairs = n // 2
    first, second = order[0:2 * pairs:2], order[1:2 * pairs:2]
    if n % 2:
        first, second = np.append(first, order[-1]), np.append(second, -1)
    return Groups(first, second)


def plan_epoch(recipe: Recipe, epoch: int, bounds: Sequence[tuple[int, int]]) -> Groups:
    """The groups of every unit of ``epoch``, shard after shard; ``bounds[s] = (start, stop)``."""
    return Groups.concat([plan_unit(recipe, epoch, s, a, b) for s, (a, b) in enumerate(bounds)])


def _digests(texts) -> np.ndarray:
    b2 = hashlib.blake2b
    raw = b"".join([b2(t.encode(), digest_size=8).digest() for t in texts])
    return np.frombuffer(raw, dtype="<u8").astype(np.uint64)


def view_seeds(cache_seed: int, epoch: int, keys: Sequence[str]) -> np.ndarray:
    """(n,) uint64: :func:`logitcache.views.augment.view_seed` of every key (one hash each)."""
    prefix = f"{cache_seed}/{epoch}/"
    return _digests(prefix + k for k in keys)


def pair_seeds(cache_seed: int, epoch: int, keys_a: Sequence[str], keys_b: Sequence[str]) -> np.ndarray:
    """(n,) uint64: the seed of each pair (key_a, key_b): its mixing switch, lambda and box."""
    prefix = f"{cache_seed}/{epoch}/pair/"
    return _digests(f"{prefix}{a}/{b}" for a, b in zip(keys_a, keys_b))


def plan_digest(view_seeds: np.ndarray, partner_positions: np.ndarray) -> str:
    """sha256 (hex) of a unit's plan, rows in sample order: the view seeds as little-endian
    uint64, then each row's mixing partner as a little-endian int32 position in the shard
    (its own position when it is not mixed). Format 3 commit records hold it."""
    h = hashlib.sha256(np.ascontiguousarray(view_seeds, dtype="<u8").tobytes())
    h.update(np.ascontiguousarray(partner_positions, dtype="<i4").tobytes())
    return h.hexdigest()


def partner_positions(groups: Groups, start: int, n: int) -> np.ndarray:
    """(n,) int64: each sample's mixing partner as a position in the unit (its own when alone)."""
    out = np.arange(n, dtype=np.int64)
    paired = groups.second >= 0
    a, b = groups.first[paired] - start, groups.second[paired] - start
    out[a], out[b] = b, a
    return out


def unit_plan_digest(recipe: Recipe, epoch: int, shard: int, start: int, stop: int, keys: Sequence[str]) -> str:
    """The digest of the plan of one unit as this code plans it; ``keys`` are its samples' keys."""
    groups = plan_unit(recipe, epoch, shard, start, stop)
    return plan_digest(view_seeds(recipe.cache_seed, epoch, keys), partner_positions(groups, start, stop - start))
