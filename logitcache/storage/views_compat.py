"""Whether caches hold the same views, so that several teachers' caches can teach one student
on each view: the same data (fingerprint), the same recipe (cache seed included) and, per
epoch, the same plan digest for every unit (which views a unit holds, their seeds and pairs:
logitcache/views/plan.py). A mismatch is one line naming both caches and what differs.
:func:`common_epochs` and :func:`load_same_views` serve the trainer and the public API alike."""

from __future__ import annotations

import dataclasses
import hashlib
import json

from logitcache.errors import CacheMismatchError
from logitcache.storage.manifest import Manifest
from logitcache.storage.reader import CacheReader, EpochArrays


def views_digest(manifest: Manifest) -> str:
    """12 hex digits naming a cache's views: its recipe (with its cache seed) and its data's
    fingerprint. Caches with one digest cache the same views (``inspect``/``ls`` show it)."""
    key = {"recipe": manifest.recipe.digest(), "data": manifest.dataset.fingerprint}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def check_same_views(manifests: list[Manifest], urls: list[str]) -> None:
    """Raise :class:`CacheMismatchError` unless every cache holds views of the first one's data
    and recipe, with its class count."""
    first, where = manifests[0], urls[0]
    for m, url in zip(manifests[1:], urls[1:]):
        if m.dataset.fingerprint != first.dataset.fingerprint:
            raise CacheMismatchError(
                f"caches {where} and {url} hold views of different data (fingerprints "
                f"{first.dataset.fingerprint[:12]} and {m.dataset.fingerprint[:12]}): build one with "
                f"`logitcache build --views-of` the other")
        if m.num_classes != first.num_classes:
            raise CacheMismatchError(f"caches {where} and {url} have {first.num_classes} and {m.num_classes} classes")
        if m.recipe != first.recipe:
            field = next(f.name for f in dataclasses.fields(first.recipe)
                         if getattr(first.recipe, f.name) != getattr(m.recipe, f.name))
            raise CacheMismatchError(
                f"caches {where} and {url} hold different views: recipe field {field} is "
                f"{getattr(first.recipe, field)!r} and {getattr(m.recipe, field)!r} (build one with "
                f"`logitcache build --views-of` the other)")


def check_same_plans(epoch: int, plans: list[list[str]], urls: list[str]) -> None:
    """Raise unless every cache's units of ``epoch`` have the first cache's plan digests
    (``plans[t][shard]``: cache t's digest of unit ``shard``), naming the first differing unit."""
    for other, url in zip(plans[1:], urls[1:]):
        if len(other) != len(plans[0]):
            raise CacheMismatchError(f"caches {urls[0]} and {url} have {len(plans[0])} and {len(other)} units "
                                     f"in epoch {epoch}")
        for shard, (a, b) in enumerate(zip(plans[0], other)):
            if a != b:
                raise CacheMismatchError(
                    f"caches {urls[0]} and {url} hold different views: epoch {epoch}, unit {shard} has plan "
                    f"digests {a[:12]} and {b[:12]}")


def common_epochs(readers: list[CacheReader], skip_damaged: bool = False) -> tuple[list[int], list[int]]:
    """(the epochs complete in every cache, sorted; the damaged epochs left out, sorted).

    An epoch its build sealed that has lost a unit, a commit record or its folder
    (logitcache/storage/seals.py) is damage: refused in one line, unless ``skip_damaged``
    (train's ``--skip-damaged-epochs``), which leaves it out with a warning."""
    import warnings

    complete, damaged = [], set()
    for r in readers:
        status = r.epoch_status()
        if status.damaged and not skip_damaged:
            error = status.damage_error(r.url)
            raise type(error)(f"{error}; or train on the other epochs with --skip-damaged-epochs")
        if status.damaged:
            warnings.warn(f"{status.damage_error(r.url)}; training on the other epochs (--skip-damaged-epochs)",
                          UserWarning, stacklevel=3)
        complete.append(set(status.complete))
        damaged |= set(status.damaged)
    return sorted(set.intersection(*complete) - damaged), sorted(damaged)


def load_same_views(readers: list[CacheReader], epoch: int, features: bool = False) -> list[EpochArrays]:
    """Every cache's ``epoch`` (``features``: the first cache's teacher features too), checked
    to hold the same views unit by unit (:func:`check_same_plans`)."""
    arrays = [r.load_epoch(epoch, features=features and t == 0) for t, r in enumerate(readers)]
    check_same_plans(epoch, [a.plans for a in arrays], [r.url for r in readers])
    return arrays
