"""Statistics of a cache: what ``logitcache inspect`` and ``logitcache ls`` report.

:func:`summarize_cache` reads only the manifest and the commit records;
:func:`inspect_cache` also reads every committed unit whole, once (never per item), and
computes its statistics per unit with vectorised numpy. Both return dataclasses; the CLI
(``cli/format.py``) turns them into text. Sizes are bytes, entropies nats (T=1).
The caches under a cache root: :mod:`logitcache.storage.catalog`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from logitcache.codecs.logits import CodecSpec, rebuilt_probs
from logitcache.storage.layout import storage_bytes  # noqa: F401 - also used from here (bench/)
from logitcache.storage.manifest import Manifest, check_serves
from logitcache.storage.manifest_schema import DIGEST_FORMAT
from logitcache.storage.reader import CacheReader
from logitcache.storage.views_compat import views_digest
from logitcache.views.plan import plan_unit, row_samples


def recipe_name(manifest: Manifest) -> str | None:
    """The name in :data:`logitcache.views.augment.RECIPES` that the cache's recipe is (any cache_seed)."""
    from logitcache.views.augment import RECIPES

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


def row_stats(codec: CodecSpec, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per view of teacher rows (logitcache/codecs/logits.py), from the rebuilt T = 1 distribution:
    ``top1`` (n,) its top class (a topk row's first id, the teacher's exact top-1: quantised gaps
    may tie the rebuilt top two), ``top1_prob``, ``entropy`` (nats) and ``tail_mass`` (the
    probability of the classes a topk row does not keep; 0 for full and sampled)."""
    t = {k: torch.from_numpy(np.ascontiguousarray(rows[k])) for k in ("ids", "values", "tail")}
    p = rebuilt_probs(codec, t["ids"].long(), t["values"], t["tail"]).double()
    top = p.max(dim=1)
    entropy = -(p * p.clamp_min(1e-300).log()).sum(dim=1)
    kept = p.gather(1, t["ids"].long()).sum(dim=1) if codec.name == "topk" else torch.ones(len(p), dtype=p.dtype)
    top1 = t["ids"][:, 0].long() if codec.name == "topk" else top.indices
    return {"top1": top1.numpy(), "top1_prob": top.values.numpy(), "entropy": entropy.numpy(),
            "tail_mass": (1.0 - kept).clamp_min(0).numpy()}


@dataclass
class _Totals:
    """Sums of the content statistics over the units read so far."""

    views: int = 0
    labelled: int = 0  # views whose label is known (the dataset was given)
    agree: int = 0  # of those, views whose top-1 is the sample's own label
    entropy: float = 0.0  # nats
    top1_prob: float = 0.0
    tail_mass: float = 0.0

    def add(self, codec: CodecSpec, rows: dict[str, np.ndarray], labels: np.ndarray | None) -> None:
        """Add one unit's teacher rows, sorted by sample index; ``labels`` of its samples, if known."""
        n = len(rows["tail"])
        if n == 0:
            return
        st = row_stats(codec, rows)
        self.views += n
        self.entropy += float(st["entropy"].sum())
        self.top1_prob += float(st["top1_prob"].sum())
        self.tail_mass += float(st["tail_mass"].sum())
        if labels is not None:
            self.labelled += n
            self.agree += int((st["top1"] == labels).sum())


@dataclass
class CacheSummary:
    """What ``logitcache ls`` shows: cheap (manifest, commit records, storage walk)."""

    url: str
    teacher: str
    dataset: str
    split: str | None
    codec: str
    k: int
    values: str  # the codec's values: gap<b>, float16, float32 or counts
    num_classes: int
    epochs_complete: list[int]
    views: int
    bytes: int | None
    features: str | None = None  # `build --features`: e.g. "pca256/int8"; None: logits only
    views_digest: str = ""  # storage.views_compat.views_digest: caches with one digest hold the same views


@dataclass
class CacheStats:
    """Everything ``logitcache inspect`` reports about one cache."""

    url: str
    format_version: int
    created: str
    teacher: str
    teacher_weights: str
    teacher_weights_sha256: str | None
    recipe_name: str | None  # a name of logitcache.views.augment.RECIPES, or None for a custom recipe
    recipe_sha256: str
    recipe: dict
    dataset: dict  # name, split, fingerprint, num_samples, num_shards, url
    codec: dict  # name, k, num_classes, values, id_bits (CodecSpec.to_dict)
    num_classes: int
    library_versions: dict[str, str]
    build_env: dict  # Teacher.runtime() at build time: device, precision, compile, torch_threads
    epochs_complete: list[int]
    units: dict[int, tuple[int, int]]  # epoch present -> (committed units, total units)
    views: int  # committed views, all epochs
    bytes: int  # on storage (whole group: every unit, committed or not, and metadata)
    bytes_per_view: float | None  # bytes / views
    payload_bytes_per_view: float | None  # before zstd: ids, values, tail (None: sampled, data-dependent)
    error_bound: str  # the codec's worst-case error, in words
    labelled_views: int  # views whose label was known (inspect --data)
    top1_agreement: float | None  # % of labelled views whose cached top-1 is the sample's label
    mean_entropy: float | None  # nats, rebuilt distribution at T=1, all committed views
    max_entropy: float  # log(C), for reference
    mean_top1_prob: float | None  # mean teacher probability of its top-1 class
    mean_tail_mass: float | None  # mean probability outside the kept top-k
    features: dict | None = None  # the manifest's features entry (label, spec, basis sha256, explained)
    views_digest: str = ""  # storage.views_compat.views_digest: caches with one digest hold the same views
    epochs_unfinished: list[int] = dataclasses.field(default_factory=list)  # a build has not finished them
    checks: dict[str, str] = dataclasses.field(default_factory=dict)  # what inspect checked, in words
    pulled_from: dict | None = None  # a pulled published cache: {"url", "epochs": every epoch published there}

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
        values=m.codec.values,
        num_classes=m.num_classes, epochs_complete=complete,
        views=sum(n for units in committed.values() for n in units.values()),
        bytes=reader.store.total_bytes() if with_bytes else None,
        features=m.features["label"] if m.features else None, views_digest=views_digest(m),
    )


def inspect_cache(url: str, storage_options: dict | None = None, source=None) -> CacheStats:
    """Manifest, completeness, size and teacher statistics of the cache at ``url``.

    Statistics cover every committed unit (also of incomplete epochs); each unit is read
    whole, once. With ``source`` (the cache's dataset split) the teacher's top-1 agreement
    with the labels is computed too (the cache does not store labels).
    """
    reader = CacheReader(url, storage_options=storage_options)
    m = reader.manifest
    if source is not None:
        check_serves(m, fingerprint=source.fingerprint(), num_classes=source.num_classes, where=url)
    committed = committed_views(reader)
    n_shards = reader.num_shards
    C = m.num_classes
    labels = source.labels() if source is not None else None
    starts = np.cumsum([0] + list(m.dataset.shard_sizes))

    status = reader.epoch_status()
    if status.damaged:
        raise status.damage_error(url)
    checked = _Checked()
    sealed = set(reader.store.sealed(reader.format_version))
    if reader.feature_basis() is not None:  # read and checked against the manifest's sha256
        checked.basis = True
    sums = _Totals()
    for e, units in committed.items():
        # a complete epoch is read as train reads it: its seal checked against every commit record
        read = reader.read_units(e, reader.has_features) if e in status.complete else [
            reader.read_rows(e, s, reader.has_features) for s in units]
        checked.add_epoch(reader, source, e, list(units), read, sealed=e in status.complete and e in sealed)
        for s, (rows, _) in zip(units, read):
            row_labels = None
            if labels is not None:  # each row's sample: with repeats, the unit's plan says which
                row_labels = labels[row_samples(plan_unit(m.recipe, e, s, starts[s], starts[s + 1]),
                                                m.recipe.aug_repeats)]
            sums.add(m.codec, rows, row_labels)
    views = sums.views
    payload = m.codec.payload_bits_per_view

    nbytes = reader.store.total_bytes()
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
        payload_bytes_per_view=payload / 8 if payload is not None else None, error_bound=m.codec.error_bound(),
        labelled_views=sums.labelled,
        top1_agreement=100.0 * sums.agree / sums.labelled if sums.labelled else None,
        mean_entropy=sums.entropy / views if views else None, max_entropy=math.log(C),
        mean_top1_prob=sums.top1_prob / views if views else None,
        mean_tail_mass=sums.tail_mass / views if views else None, features=m.features, views_digest=views_digest(m),
        epochs_unfinished=status.unfinished, checks=checked.summary(reader, source is not None),
        pulled_from=reader.store.pulled_from,
    )


@dataclass
class _Checked:
    """What :func:`inspect_cache` checked beyond the checksums of every array it read."""

    basis: bool = False
    units: int = 0
    plans: int = 0  # units whose plan digest matched this code's plan of the data (--data)
    canaries: int = 0  # units whose canary views rendered again identically (--data; one per epoch)
    sealed: int = 0  # complete epochs whose commit records were checked against their seal

    def add_epoch(self, reader: CacheReader, source, epoch: int, units: list[int], read: list,
                  sealed: bool) -> None:
        """Count one epoch's units; with ``source``, check their plans and one canary."""
        from logitcache.storage.canary import check_canary, check_plan

        self.units += len(units)
        self.sealed += sealed  # a complete epoch with a seal: read_units checked its records against it
        if source is None:
            return
        for s, (_, plan) in zip(units, read):
            check_plan(plan, reader.manifest.recipe, epoch, s, source, reader.url)
            self.plans += 1
        for s in units:  # the first unit with views: its canary (train checks one unit per run)
            if check_canary(reader.commit(epoch, s), reader.manifest, source, epoch, s, reader.url):
                self.canaries += 1
                break

    def summary(self, reader: CacheReader, with_data: bool) -> dict[str, str]:
        """Each check, in words: what it covered, or why it did not run."""
        fmt = reader.format_version
        no_data = "not checked: pass --data (the cache's dataset)"
        return {
            "checksums": f"every array of {_count(self.units, 'committed unit')}" + (
                " (features included)" if reader.has_features else ""),
            "manifest": "its digest, and every commit record names it" if fmt >= DIGEST_FORMAT else
                        f"fields and recipe digest only (format {fmt} has no manifest digest)",
            "seals": (f"{_count(self.sealed, 'complete epoch')} against its seal" if fmt >= DIGEST_FORMAT else
                      f"none (format {fmt} has no seals: a lost epoch looks unfinished)"),
            "basis": "checked against the manifest's sha256" if self.basis else "none (no PCA features)",
            "plans": f"{_count(self.plans, 'unit')} against this code's plan" if with_data else no_data,
            "canaries": f"{_count(self.canaries, 'unit')} rendered again, one per epoch" if with_data else no_data,
        }


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


