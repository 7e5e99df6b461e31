"""View canaries: a few of each unit's views, hashed when the teacher saw them, rendered
again before a cache is used, so views never drift silently from what the teacher saw.

A replayed view's pixels depend on the library versions (timm's transforms, torchvision,
Pillow's resize, numpy's and torch's generators). A build stores, in each unit's commit
record, the sample indices and sha256 of the first :data:`CANARY_VIEWS` views it fed the
teacher (their float32 bytes). ``train`` and a ``build`` that adds to an existing cache
render one unit's canary again before anything else and refuse on a mismatch, naming the
library versions that differ from the build's; ``--allow-view-drift`` overrides.
"""

from __future__ import annotations

import hashlib

import torch

from logitcache.errors import CacheMismatchError, CorruptCacheError
from logitcache.storage.layout import REPAIR_HINT
from logitcache.storage.manifest import Manifest, library_versions
from logitcache.storage.reader import CacheReader
from logitcache.views.plan import plan_unit, unit_plan_digest

#: Views hashed per unit (the first ones of the unit, in build order).
CANARY_VIEWS = 4


def view_digest(view: torch.Tensor) -> str:
    """sha256 (hex) of one rendered view's float32 bytes, shape (3, H, W)."""
    return hashlib.sha256(view.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def canary_of(images: torch.Tensor, index: torch.Tensor) -> dict:
    """The canary of a unit from its first batch: images (B, 3, H, W), index (B,) int64."""
    n = min(CANARY_VIEWS, len(index))
    return {"index": index[:n].tolist(), "sha256": [view_digest(images[i]) for i in range(n)]}


def _version_changes(built: dict[str, str]) -> str:
    now = library_versions()
    changes = [f"{name} {built.get(name, '?')} -> {now[name]}" for name in now
               if name != "logitcache" and built.get(name) != now[name]]
    return ", ".join(changes) if changes else "no library version differs (the data or the code changed)"


def check_canary(commit: dict | None, manifest: Manifest, source, epoch: int, shard: int, where: str,
                 allow_drift: bool = False) -> bool:
    """Render unit (``epoch``, ``shard``)'s canary views again and compare them with the
    commit record's. Returns False when there is nothing to compare (format 1, an empty unit);
    raises :class:`CacheMismatchError` on a mismatch unless ``allow_drift``."""
    canary = (commit or {}).get("canary")
    if not canary:
        return False
    from logitcache.views.render import create_view_transform, render_batch

    info = source.shards[shard]
    if not all(info.start <= i < info.stop for i in canary["index"]):  # the record's types: storage/layout.py
        raise CorruptCacheError(f"cache {where}: epoch {epoch}, unit {shard}: commit record field canary names "
                                f"samples outside the unit ({info.start} .. {info.stop - 1}); {REPAIR_HINT}")
    recipe = manifest.recipe
    groups = plan_unit(recipe, epoch, shard, info.start, info.stop).take(slice(0, CANARY_VIEWS))
    batch = render_batch(recipe, create_view_transform(recipe), source, epoch, groups)
    n = len(canary["index"])
    index = batch["index"][:n].tolist()
    bad = [j for j in range(n) if index[j] != canary["index"][j] or view_digest(batch["images"][j]) != canary["sha256"][j]]
    if bad and not allow_drift:
        key = source.key(int(canary["index"][bad[0]]))
        raise CacheMismatchError(
            f"views rendered here differ from the views the teacher saw ({where}: epoch {epoch}, unit {shard}, "
            f"key {key!r}; {len(bad)} of {n} canary views differ); library versions since the build: "
            f"{_version_changes(manifest.library_versions)}. Train under the build's versions, or pass "
            f"--allow-view-drift to use the cache anyway"
        )
    return True


def check_plan(plan: str, recipe, epoch: int, shard: int, source, where: str) -> None:
    """Refuse unit (``epoch``, ``shard``) of the cache ``where`` when its plan digest (from its
    commit record) is not the plan this code makes of the data ``source`` (other view seeds
    or mixing partners: another recipe, data or logitcache version)."""
    info = source.shards[shard]
    keys = [source.key(i) for i in range(info.start, info.stop)]
    if plan != unit_plan_digest(recipe, epoch, shard, info.start, info.stop, keys):
        raise CacheMismatchError(
            f"cache {where}: the views of epoch {epoch}, unit {shard} (shard {info.name}) were planned otherwise "
            f"than here (other view seeds or mixing partners): cache built with another recipe, data or logitcache "
            f"version, or its commit record was edited")


def check_views_of(reader: CacheReader, source, epochs: list[int] | None = None, allow_drift: bool = False) -> None:
    """Render the canary of the first committed unit that has one, in the first of ``epochs``
    (default: the cache's epochs) with committed units, and compare (logitcache/storage/canary.py);
    a new or format 1 cache has nothing to check."""
    if reader.format_version < 2:
        return
    for epoch in reader.epochs_present() if epochs is None else epochs:
        for shard in reader.committed_units(epoch):
            if check_canary(reader.commit(epoch, shard), reader.manifest, source, epoch, shard, reader.url,
                            allow_drift):
                return
        if reader.committed_units(epoch):
            return
