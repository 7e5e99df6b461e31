"""The build: for every unit (epoch x data shard), render its views, run the teacher,
compress the logits and write the unit whole.

Units are spread over ranks round-robin (rank r of W takes units r, r + W, ...); each
rank writes only its own units. Committed units are skipped, so re-running a killed
build finishes it, and ends identical to an uninterrupted one: a unit's batches are
fixed (its groups in plan order, ``batch_size`` views at a time), so the teacher sees
the same batches whatever happened before.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from logitcache.build.features import (
    BuildFeatures,
    FeatureRequest,
    adopt_features,
    prepare_features,
)
from logitcache.build.report import BuildProgress, BuildReport
from logitcache.build.teacher import Teacher, check_logits
from logitcache.build.units import UnitBatches
from logitcache.codecs.logits import CodecSpec, ValueRangeError, encode
from logitcache.errors import BadLogitsError, CorruptCacheError, LogitcacheError
from logitcache.storage.canary import canary_of, check_views_of
from logitcache.storage.layout import unit_path
from logitcache.storage.manifest import DatasetInfo, Manifest
from logitcache.storage.reader import CacheReader
from logitcache.storage.writer import CacheWriter
from logitcache.views.augment import Recipe
from logitcache.views.loader import BatchDataset, create_batch_loader
from logitcache.views.plan import plan_digest, row_of


def default_cache_name(dataset: str, split: str | None, teacher: str, recipe: Recipe, codec: CodecSpec,
                       features: FeatureRequest | None = None) -> str:
    short = teacher.split(".")[0]
    feat = f"-feat{features.dims}{features.dtype or ''}" if features is not None else ""
    return f"{dataset}-{split or 'all'}-{short}-{codec.name}{codec.k}-{codec.values}{feat}-{recipe.digest()[:8]}.zarr"


def default_workers(device: torch.device) -> int:
    """DataLoader workers of a build when none are asked for.

    CUDA: up to 8 (one core left to the main process), so rendering keeps the GPU busy.
    CPU: 1. The teacher's own threads need the cores; rendering costs a few ms per view,
    which one worker delivers faster than a CPU teacher consumes them, while more workers
    take cores from the teacher (bench/build.py compares 0, 1 and 2 workers against raw
    teacher inference: bench/RESULTS.md, section 1)."""
    if device.type == "cuda":
        return max(1, min(8, (os.cpu_count() or 2) - 1))
    return 1


def dataset_info(source, name: str) -> DatasetInfo:
    return DatasetInfo(
        name=name, split=source.split, fingerprint=source.fingerprint(), num_samples=len(source),
        shards=[os.path.basename(s.name) for s in source.shards], shard_sizes=[s.stop - s.start for s in source.shards],
        url=str(source.url),
    )


@dataclass
class BuildTarget:
    """One teacher of a build and the cache it writes: ``teacher`` over every view, its logits
    coded with ``codec`` into the cache at ``url`` (``features``: its pooled features too)."""

    teacher: Teacher
    codec: CodecSpec
    url: str
    features: FeatureRequest | None = None


def build(source, *, dataset_name: str, teacher: Teacher, recipe: Recipe, codec: CodecSpec, url: str,
          epochs: list[int], features: FeatureRequest | None = None, **options) -> BuildReport:
    """Build (or finish, or extend) the cache at ``url``: :func:`build_many` with one teacher
    (``options``: its keyword arguments)."""
    return build_many(source, dataset_name=dataset_name, targets=[BuildTarget(teacher, codec, url, features)],
                      recipe=recipe, epochs=epochs, **options)[0]


def build_many(
    source,
    *,
    dataset_name: str,
    targets: list[BuildTarget],
    recipe: Recipe,
    epochs: list[int],
    batch_size: int = 64,
    num_workers: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    barrier=None,
    progress: bool = True,
    storage_options: dict | None = None,
    recheck: bool = False,
    allow_view_drift: bool = False,
) -> list[BuildReport]:
    """Build (or finish, or extend) one cache per target on the same views, rendering each
    view once: every teacher sees the same batches, so each cache is byte-identical to the
    one a build of its teacher alone writes. See the module docstring; one report per target.

    Several processes: call with ``rank``/``world_size`` in each and a ``barrier`` that waits
    for all ranks (logitcache.distributed); rank 0 creates the roots and epoch groups before
    it, each rank then writes only its own units. ``storage_options`` go to fsspec.
    ``num_workers`` None picks :func:`default_workers` for the first teacher's device.
    ``recheck`` reads every committed unit back and rebuilds those that fail their checksums.
    Adding to a cache first renders one committed unit's canary views again and refuses when
    they differ from what the teacher saw (logitcache/storage/canary.py), unless ``allow_view_drift``.
    A unit is rendered when any target lacks it, and written to those that lack it.
    """
    if not targets:
        raise LogitcacheError("a build needs at least one teacher")
    if len({t.url for t in targets}) < len(targets):
        raise LogitcacheError(f"two teachers of one build write the same cache: {[t.url for t in targets]}")
    for t in targets:
        _check_classes(t, source)
    device = targets[0].teacher.device
    if num_workers is None:
        num_workers = default_workers(device)
    writers, feats = [], []
    for t in targets:  # rank 0 creates (or checks) each cache before the others open it
        w, f = _open_target(t, source, dataset_name, recipe, epochs, rank, barrier, storage_options,
                            batch_size, num_workers, allow_view_drift)
        writers.append(w)
        feats.append(f)
    reports = [BuildReport(url=t.url, workers=num_workers) for t in targets]
    units, needs = _units_to_build(writers, recipe, source, epochs, rank, world_size, batch_size, reports, recheck)
    for t, w in enumerate(writers):  # an epoch whose units are written again is unsealed first
        w.unseal(np.unique(units.epochs[needs[:, t]]).tolist())
    t0 = time.perf_counter()
    sinks = [_Sink(t.teacher, t.codec, recipe, w, source, r, f) for t, w, f, r in zip(targets, writers, feats, reports)]
    for u in np.flatnonzero(units.unit_views == 0):  # an empty data shard has no batches: commit it now
        for sink in (s for s, need in zip(sinks, needs[u]) if need):
            empty = encode(sink.codec, torch.zeros(0, sink.codec.num_classes), np.zeros(0, np.uint64))
            empty.update(sink.features.empty() if sink.features else {})
            sink.writer.write_unit(int(units.epochs[u]), int(units.shards[u]), empty,
                                   plan_digest(np.zeros(0), np.zeros(0)))
            sink.report.units_written += 1
    if len(units):
        # A CPU teacher's process is the bottleneck: the workers finish its views (bench/build_fast.py).
        dataset = BatchDataset(source, recipe, finish=device.type == "cpu")
        loader = create_batch_loader(dataset, units, num_workers=num_workers, pin_memory=device.type == "cuda",
                                     device=device)
        _teach_and_write(loader, units, needs, sinks, progress)
    if rank == 0:  # epochs finished before (a build killed before sealing them), or by empty units only
        for w in writers:
            w.seal_finished(epochs)
    for r in reports:
        r.seconds = time.perf_counter() - t0
    return reports


def _check_classes(target: BuildTarget, source) -> None:
    if target.codec.num_classes != source.num_classes:
        raise LogitcacheError(f"codec has {target.codec.num_classes} classes, dataset has {source.num_classes}")
    if target.teacher.num_classes != source.num_classes:
        raise LogitcacheError(
            f"teacher {target.teacher.name} predicts {target.teacher.num_classes} classes but dataset {source.url} "
            f"has {source.num_classes}"
        )


def _open_target(t: BuildTarget, source, dataset_name: str, recipe: Recipe, epochs: list[int], rank: int, barrier,
                 storage_options: dict | None, batch_size: int, num_workers: int,
                 allow_view_drift: bool) -> tuple[CacheWriter, BuildFeatures | None]:
    """The writer of one target's cache (created or checked by rank 0, then opened by every
    rank after ``barrier``) and the features it stores (fitted by rank 0, read back by the others)."""
    manifest = Manifest(
        teacher=t.teacher.name, teacher_weights=t.teacher.weights_label,
        teacher_weights_sha256=t.teacher.weights_sha256, recipe=recipe, dataset=dataset_info(source, dataset_name),
        codec=t.codec, num_classes=source.num_classes, build_env=t.teacher.runtime(),
        teacher_input_size=t.teacher.input_size_override,
    )
    feats = None
    if rank == 0:
        if t.features is not None:
            feats = prepare_features(t.features, t.teacher, source, recipe, url=t.url, storage_options=storage_options,
                                     first_epoch=epochs[0], batch_size=batch_size, num_workers=num_workers)
            manifest.add_features(feats.entry)
        writer = CacheWriter(t.url, manifest, storage_options, basis=feats.basis if feats else None)
        check_views_of(CacheReader(t.url, storage_options), source, allow_drift=allow_view_drift)
        writer.prepare_epochs(epochs)
    if barrier is not None:
        barrier()
    if rank != 0:
        if t.features is not None:
            feats = adopt_features(t.url, storage_options)
            manifest.add_features(feats.entry)
        writer = CacheWriter(t.url, manifest, storage_options)
    return writer, feats


def _units_to_build(writers: list[CacheWriter], recipe: Recipe, source, epochs: list[int], rank: int,
                    world_size: int, batch_size: int, reports: list[BuildReport],
                    recheck: bool) -> tuple[UnitBatches, np.ndarray]:
    """This rank's units that some cache lacks (rank r of W takes units r, r + W, ... of the
    (epoch, shard) order), and (U, T) bool: which of the T caches each of them is written to;
    counts the committed units each cache skips. ``recheck``: committed units are read back
    and checked, and damaged ones are built again."""
    bounds = np.array([(s.start, s.stop) for s in source.shards], dtype=np.int64).reshape(-1, 2)
    num_shards = len(bounds)
    all_units = np.arange(len(epochs) * num_shards)
    mine = all_units[all_units % world_size == rank]
    ep = np.asarray(epochs, dtype=np.int64)[mine // num_shards]
    sh = mine % num_shards
    done = np.zeros((len(mine), len(writers)), dtype=bool)
    for t, writer in enumerate(writers):
        for e in epochs:  # one listing per epoch and cache
            at = ep == e
            done[at, t] = np.isin(sh[at], writer.committed_units(e))
        if recheck:
            d = done[:, t]
            d[d] = [not _damaged(writer, int(e), int(s)) for e, s in zip(ep[d], sh[d])]
            done[:, t] = d
        reports[t].units_skipped += int(done[:, t].sum())
    todo = ~done.all(axis=1)
    return UnitBatches(recipe, bounds, ep[todo], sh[todo], batch_size), ~done[todo]


def _damaged(writer: CacheWriter, epoch: int, shard: int) -> bool:
    """Whether a committed unit fails to read back whole (``--recheck``); it is then rebuilt."""
    try:
        CacheReader(writer.url, writer.storage_options).read_unit(epoch, shard)
        return False
    except CorruptCacheError as e:
        print(f"--recheck: rebuilding damaged unit: {e}", flush=True)
        return True


@dataclass
class _Sink:
    """Where one teacher's batches go: logits checked, encoded, gathered per unit, written."""

    teacher: Teacher
    codec: CodecSpec
    recipe: Recipe
    writer: CacheWriter
    source: object
    report: BuildReport
    features: BuildFeatures | None = None
    pending: dict[int, list[dict]] = field(default_factory=dict)  # unit -> its encoded batches so far

    def take(self, batch: dict, u: int, where: str, render_s: float) -> None:
        """Run the teacher on ``batch`` (of unit ``u``), check and encode its outputs, keep them."""
        t0 = time.perf_counter()
        if self.features is not None:
            logits, feats = self.teacher(batch["images"], self.recipe.mean, self.recipe.std, features=True)
        else:
            logits, feats = self.teacher(batch["images"], self.recipe.mean, self.recipe.std), None
        index = batch["index"].numpy()
        keys = [self.source.key(int(i)) for i in index]
        check_logits(logits, self.codec.num_classes, keys, where)  # waits for the device: timed with it
        self.report.teacher_seconds += time.perf_counter() - t0
        self.report.render_seconds += render_s
        seeds = batch["seed"].numpy().view(np.uint64)
        try:
            rows = encode(self.codec, logits, seeds)
        except ValueRangeError as e:
            raise BadLogitsError(f"{e} (--value-dtype float32; {where})") from None
        rows.update(index=index, seed=seeds, partner=batch["partner"].numpy(), repeat=batch["repeat"].numpy())
        if feats is not None:
            rows.update(self.features.encode(feats, keys, where))
        self.pending.setdefault(u, []).append(rows)
        self.report.views += len(index)


def _teach_and_write(loader, units: UnitBatches, needs: np.ndarray, sinks: list[_Sink], progress: bool) -> None:
    """Every batch of ``units`` through the teachers whose caches lack its unit (``needs``, (U, T));
    a unit is written to each of them when its last batch is in."""
    canaries: dict[int, dict] = {}  # per unit: its first views, hashed as the teachers see them
    remaining = {u: int(n) for u, n in enumerate(units.unit_views) if n}
    epochs, counts = np.unique(units.epochs[units.unit_views > 0], return_counts=True)
    epoch_left = dict(zip(epochs.tolist(), counts.tolist()))  # this rank's units still to write, per epoch
    with BuildProgress(progress, sum(remaining.values()), len(units.unit_views)) as bar:
        for batch in loader:
            u = batch["unit"]
            epoch, shard = int(units.epochs[u]), int(units.shards[u])
            if u not in canaries:
                canaries[u] = canary_of(batch["images"], batch["index"])
            mine = [s for s, need in zip(sinks, needs[u]) if need]
            for sink in mine:
                where = f"{sink.writer.url} {unit_path(epoch, shard)}, shard {sink.source.shards[shard].name}"
                sink.take(batch, u, where, batch["render_s"] / len(mine))
            remaining[u] -= len(batch["index"])
            bar.advance(len(batch["index"]))
            if remaining[u] == 0:
                canary = canaries.pop(u)
                for sink in mine:
                    _write_unit(sink, epoch, shard, sink.pending.pop(u), canary)
                bar.unit_done()
                epoch_left[epoch] -= 1
                if not epoch_left[epoch]:  # this rank's last unit of the epoch: seal it if it is complete
                    for sink in sinks:
                        sink.writer.seal_if_complete(epoch)


def _write_unit(sink: _Sink, epoch: int, shard: int, parts: list[dict], canary: dict) -> None:
    """Sort a finished unit's rows by (sample index, repeat) and write it with the digest of its plan."""
    whole = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.lexsort((whole["repeat"], whole["index"]))
    index, repeat = whole["index"][order], whole["repeat"][order]
    held = np.unique(index)
    partner_rows = row_of(held, whole["partner"][order], repeat, sink.recipe.aug_repeats)  # a pair shares its repeat
    plan = plan_digest(whole["seed"][order], partner_rows)
    stored = [k for k in whole if k not in ("index", "seed", "partner", "repeat")]
    sink.writer.write_unit(epoch, shard, {k: whole[k][order] for k in stored}, plan, canary=canary)
    sink.report.units_written += 1
