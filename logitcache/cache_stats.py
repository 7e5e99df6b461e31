"""Statistics of a cache: what ``logitcache inspect`` and ``logitcache ls`` report.

:func:`summarize_cache` reads only the manifest and the commit records;
:func:`inspect_cache` also reads every committed unit whole, once (never per item), and
computes its statistics per unit with vectorised numpy. Both return dataclasses; the CLI
(``cli/format.py``) turns them into text. Sizes are bytes, entropies nats (T=1).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import numpy as np

from .manifest import Manifest
from .store import CacheReader, is_local


def storage_bytes(url: str, storage_options: dict | None = None) -> int:
    """Bytes the cache takes on storage: a directory walk locally, ``fs.du`` elsewhere."""
    if is_local(url):
        path = url.removeprefix("file://")
        total = 0
        for dirpath, _dirs, files in os.walk(path):
            for name in files:
                try:
                    total += os.lstat(os.path.join(dirpath, name)).st_size
                except OSError:
                    pass  # removed while walking
        return total
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return int(fs.du(path, total=True))


def recipe_name(manifest: Manifest) -> str | None:
    """The name in :data:`logitcache.views.RECIPES` that the cache's recipe is (any cache_seed)."""
    from .views import RECIPES

    recipe = manifest.recipe
    for name, known in RECIPES.items():
        if dataclasses.replace(known, cache_seed=recipe.cache_seed) == recipe:
            return name
    return None


def committed_views(reader: CacheReader) -> dict[int, dict[int, int]]:
    """{epoch: {shard: views}} of every committed unit (epochs present, complete or not).

    Committed units come from one listing per epoch (format 2); the view count from each
    one's commit record (one metadata read per unit).
    """
    return {e: {s: int(reader.commit(e, s)["n"]) for s in reader.committed_units(e)} for e in reader.epochs_present()}


def _complete_epochs(committed: dict[int, dict[int, int]], num_shards: int) -> list[int]:
    """Epochs of ``committed`` with all ``num_shards`` units: ``CacheReader.epochs()`` from records already read."""
    return [e for e, units in committed.items() if len(units) == num_shards]


def _log_partition(v: np.ndarray, t: np.ndarray) -> np.ndarray:
    """log of the rebuilt softmax's normaliser: kept logits ``v`` (n, k) plus tail ``t`` (n,); float64."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return np.logaddexp(np.logaddexp.reduce(v, axis=1), t)  # t = -inf (full codec) is fine


def topk_entropy(topk_logits: np.ndarray, tail_lse: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Entropy (nats) at T=1 of the rebuilt distribution, and its tail mass, per view.

    Closed form of ``rebuilt_probs``: the k kept logits plus C - k tail classes sharing
    ``exp(tail_lse)`` equally. O(k) per view, float64. Shapes (n, k), (n,) -> (n,), (n,).
    """
    v = topk_logits.astype(np.float64)
    t = tail_lse.astype(np.float64)
    k = v.shape[1]
    if len(v) == 0:
        return np.zeros(0), np.zeros(0)
    log_z = _log_partition(v, t)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        logp = v - log_z[:, None]
        h = -(np.exp(logp) * logp).sum(axis=1)
        log_m = t - log_z
        mass = np.exp(log_m)
        if k < num_classes:
            h = h - np.where(mass > 0, mass * (log_m - math.log(num_classes - k)), 0.0)
    return h, np.where(np.isfinite(mass), mass, 0.0)


def _major_labels(u: dict[str, np.ndarray]) -> np.ndarray:
    """Per view of a unit, the label of the larger mix weight (-1 if its partner is absent).

    The partner is in the same unit (pairing is shard-local), so its label is read there.
    """
    n = len(u["label"])
    label = u["label"].astype(np.int64)
    order = np.argsort(u["sample_index"])
    pos = np.searchsorted(u["sample_index"], u["partner_index"], sorter=order).clip(0, n - 1)
    partner_pos = order[pos]
    found = u["sample_index"][partner_pos] == u["partner_index"]
    partner_label = np.where(found, label[partner_pos], -1)
    return np.where(u["mix_lam"] >= 0.5, label, partner_label)


@dataclass
class _Totals:
    """Sums of the content statistics over the units read so far."""

    views: int = 0
    unmixed: int = 0
    agree_unmixed: int = 0  # unmixed views whose top-1 is the label
    agree_major: int = 0  # views whose top-1 is the label of larger weight
    entropy: float = 0.0  # nats
    top1_prob: float = 0.0
    tail_mass: float = 0.0

    def add(self, u: dict[str, np.ndarray], num_classes: int) -> None:
        """Add one unit's arrays (rows are views)."""
        n = len(u["label"])
        if n == 0:
            return
        self.views += n
        top1 = u["topk_ids"][:, 0].astype(np.int64)
        label = u["label"].astype(np.int64)
        plain = u["mix_lam"] == 1.0
        self.unmixed += int(plain.sum())
        self.agree_unmixed += int((top1[plain] == label[plain]).sum())
        self.agree_major += int((top1 == _major_labels(u)).sum())
        h, mass = topk_entropy(u["topk_logits"], u["tail_lse"], num_classes)
        self.entropy += float(h.sum())
        self.tail_mass += float(mass.sum())
        v = u["topk_logits"].astype(np.float64)
        log_z = _log_partition(v, u["tail_lse"].astype(np.float64))
        self.top1_prob += float(np.exp(v[:, 0] - log_z).sum())


@dataclass
class CacheSummary:
    """What ``logitcache ls`` shows: cheap (manifest, commit records, storage walk)."""

    url: str
    teacher: str
    dataset: str
    split: str | None
    codec: str
    k: int
    num_classes: int
    epochs_complete: list[int]
    views: int
    bytes: int | None


@dataclass
class CacheStats:
    """Everything ``logitcache inspect`` reports about one cache."""

    url: str
    format_version: int
    created: str
    teacher: str
    teacher_weights: str
    teacher_weights_sha256: str | None
    recipe_name: str | None  # a name of logitcache.views.RECIPES, or None for a custom recipe
    recipe_sha256: str
    recipe: dict
    dataset: dict  # name, split, fingerprint, num_samples, num_shards, url
    codec: dict  # name, k, num_classes, value_dtype, id_dtype
    num_classes: int
    library_versions: dict[str, str]
    build_env: dict  # Teacher.runtime() at build time: device, precision, compile, torch_threads
    epochs_complete: list[int]
    units: dict[int, tuple[int, int]]  # epoch present -> (committed units, total units)
    views: int  # committed views, all epochs
    bytes: int  # on storage (whole group: every unit, committed or not, and metadata)
    bytes_per_view: float | None  # bytes / views
    raw_bytes_per_view: int  # uncompressed payload: ids, values, tail_lse
    unmixed_views: int
    top1_agreement: float | None  # % of unmixed views whose cached top-1 is the label
    top1_agreement_major: float | None  # % of all views whose top-1 is the label of larger weight
    mean_entropy: float | None  # nats, rebuilt distribution at T=1, all committed views
    max_entropy: float  # log(C), for reference
    mean_top1_prob: float | None  # mean teacher probability of its top-1 class
    mean_tail_mass: float | None  # mean probability outside the kept top-k

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def summarize_cache(url: str, storage_options: dict | None = None, with_bytes: bool = True) -> CacheSummary:
    """Manifest, complete epochs and committed views of a cache, without reading arrays."""
    reader = CacheReader(url, storage_options=storage_options)
    m = reader.manifest
    committed = committed_views(reader)
    complete = _complete_epochs(committed, reader.num_shards)
    return CacheSummary(
        url=url, teacher=m.teacher, dataset=m.dataset.name, split=m.dataset.split, codec=m.codec.name, k=m.codec.k,
        num_classes=m.num_classes, epochs_complete=complete,
        views=sum(n for units in committed.values() for n in units.values()),
        bytes=storage_bytes(url, storage_options) if with_bytes else None,
    )


def inspect_cache(url: str, storage_options: dict | None = None) -> CacheStats:
    """Manifest, completeness, size and teacher statistics of the cache at ``url``.

    Statistics cover every committed unit (also of incomplete epochs); each unit is read
    whole, once.
    """
    reader = CacheReader(url, storage_options=storage_options)
    m = reader.manifest
    committed = committed_views(reader)
    n_shards = reader.num_shards
    C = m.num_classes

    sums = _Totals()
    for e, units in committed.items():
        for s in units:
            sums.add(reader.read_unit(e, s), C)
    views = sums.views

    nbytes = storage_bytes(url, storage_options)
    d = m.dataset
    return CacheStats(
        url=url, format_version=m.format_version, created=m.created, teacher=m.teacher,
        teacher_weights=m.teacher_weights, teacher_weights_sha256=m.teacher_weights_sha256,
        recipe_name=recipe_name(m), recipe_sha256=m.recipe.digest(), recipe=m.recipe.to_dict(),
        dataset={"name": d.name, "split": d.split, "fingerprint": d.fingerprint, "num_samples": d.num_samples,
                 "num_shards": len(d.shards), "url": d.url},
        codec=m.codec.to_dict(), num_classes=C, library_versions=dict(m.library_versions),
        build_env=dict(m.build_env), epochs_complete=_complete_epochs(committed, n_shards),
        units={e: (len(units), n_shards) for e, units in committed.items()},
        views=views, bytes=nbytes, bytes_per_view=nbytes / views if views else None,
        raw_bytes_per_view=m.codec.bytes_per_view,
        unmixed_views=sums.unmixed,
        top1_agreement=100.0 * sums.agree_unmixed / sums.unmixed if sums.unmixed else None,
        top1_agreement_major=100.0 * sums.agree_major / views if views else None,
        mean_entropy=sums.entropy / views if views else None, max_entropy=math.log(C),
        mean_top1_prob=sums.top1_prob / views if views else None,
        mean_tail_mass=sums.tail_mass / views if views else None,
    )
