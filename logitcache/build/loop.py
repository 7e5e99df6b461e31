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
from dataclasses import dataclass

import numpy as np
import torch

from logitcache.build.features import (
    BuildFeatures,
    FeatureRequest,
    adopt_features,
    prepare_features,
)
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
class BuildReport:
    """What a build did, and how fast each of its two stages ran (seconds are wall time)."""

    url: str
    units_written: int = 0
    units_skipped: int = 0
    views: int = 0
    seconds: float = 0.0
    workers: int = 0  # DataLoader workers that rendered the views (0: the main process did)
    render_seconds: float = 0.0  # summed over batches: reading and rendering, in the workers
    teacher_seconds: float = 0.0  # summed over batches: the teacher's forward and its logit check

    @property
    def views_per_s(self) -> float:
        return self.views / self.seconds if self.seconds > 0 else 0.0

    @property
    def render_views_per_s(self) -> float:
        """What the renderers together deliver: views / render seconds x the workers rendering
        at once (with 0 workers the main process renders between teacher calls)."""
        return self.views / self.render_seconds * max(self.workers, 1) if self.render_seconds > 0 else 0.0

    @property
    def teacher_views_per_s(self) -> float:
        return self.views / self.teacher_seconds if self.teacher_seconds > 0 else 0.0

    @property
    def bound_by(self) -> str:
        """The slower stage, "rendering" or "teacher": what to add (workers or a faster device)."""
        return "rendering" if self.render_views_per_s < self.teacher_views_per_s else "teacher"


def build(
    source,
    *,
    dataset_name: str,
    teacher: Teacher,
    recipe: Recipe,
    codec: CodecSpec,
    url: str,
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
    features: FeatureRequest | None = None,
) -> BuildReport:
    """Build (or finish, or extend) the cache at ``url``. See the module docstring.

    Several processes: call with ``rank``/``world_size`` in each and a ``barrier`` that waits
    for all ranks (logitcache.distributed); rank 0 creates the root and epoch groups before
    it, each rank then writes only its own units. ``storage_options`` go to fsspec.
    ``num_workers`` None picks :func:`default_workers` for the teacher's device.
    ``recheck`` reads every committed unit back and rebuilds those that fail their checksums.
    Adding to a cache first renders one committed unit's canary views again and refuses when
    they differ from what the teacher saw (logitcache/storage/canary.py), unless ``allow_view_drift``.
    ``features``: also store each view's pooled teacher features (logitcache/build/features.py).
    """
    if codec.num_classes != source.num_classes:
        raise LogitcacheError(f"codec has {codec.num_classes} classes, dataset has {source.num_classes}")
    if teacher.num_classes != source.num_classes:
        raise LogitcacheError(
            f"teacher {teacher.name} predicts {teacher.num_classes} classes but dataset {source.url} has "
            f"{source.num_classes}"
        )
    if num_workers is None:
        num_workers = default_workers(teacher.device)
    manifest = Manifest(
        teacher=teacher.name, teacher_weights=teacher.weights_label, teacher_weights_sha256=teacher.weights_sha256,
        recipe=recipe, dataset=dataset_info(source, dataset_name), codec=codec, num_classes=source.num_classes,
        build_env=teacher.runtime(), teacher_input_size=teacher.input_size_override,
    )
    feats = None
    if rank == 0:
        if features is not None:
            feats = prepare_features(features, teacher, source, recipe, url=url, storage_options=storage_options,
                                     first_epoch=epochs[0], batch_size=batch_size, num_workers=num_workers)
            manifest.add_features(feats.entry)
        writer = CacheWriter(url, manifest, storage_options, basis=feats.basis if feats else None)
        check_views_of(CacheReader(url, storage_options), source, allow_drift=allow_view_drift)
        writer.prepare_epochs(epochs)
    if barrier is not None:
        barrier()
    if rank != 0:
        if features is not None:
            feats = adopt_features(url, storage_options)
            manifest.add_features(feats.entry)
        writer = CacheWriter(url, manifest, storage_options)

    report = BuildReport(url=url, workers=num_workers)
    units = _units_to_build(writer, recipe, source, epochs, rank, world_size, batch_size, report, recheck)
    t0 = time.perf_counter()
    for u in np.flatnonzero(units.unit_views == 0):  # an empty data shard has no batches: commit it now
        empty = encode(codec, torch.zeros(0, codec.num_classes), np.zeros(0, np.uint64))
        empty.update(feats.empty() if feats else {})
        writer.write_unit(int(units.epochs[u]), int(units.shards[u]), empty, plan_digest(np.zeros(0), np.zeros(0)))
        report.units_written += 1
    if len(units):
        # A CPU teacher's process is the bottleneck: the workers finish its views (bench/build_fast.py).
        dataset = BatchDataset(source, recipe, finish=teacher.device.type == "cpu")
        loader = create_batch_loader(dataset, units, num_workers=num_workers, pin_memory=teacher.device.type == "cuda",
                                     device=teacher.device)
        _teach_and_write(loader, units, _Sink(teacher, codec, recipe, writer, source, report, feats), progress)
    report.seconds = time.perf_counter() - t0
    return report


def _units_to_build(writer: CacheWriter, recipe: Recipe, source, epochs: list[int], rank: int, world_size: int,
                    batch_size: int, report: BuildReport, recheck: bool) -> UnitBatches:
    """This rank's uncommitted units (rank r of W takes units r, r + W, ... of the (epoch,
    shard) order); counts the committed ones it skips. ``recheck``: committed units are
    read back and checked, and damaged ones are built again."""
    bounds = np.array([(s.start, s.stop) for s in source.shards], dtype=np.int64).reshape(-1, 2)
    num_shards = len(bounds)
    all_units = np.arange(len(epochs) * num_shards)
    mine = all_units[all_units % world_size == rank]
    ep = np.asarray(epochs, dtype=np.int64)[mine // num_shards]
    sh = mine % num_shards
    done = np.zeros(len(mine), dtype=bool)
    for e in epochs:  # one listing per epoch
        at = ep == e
        done[at] = np.isin(sh[at], writer.committed_units(e))
    if recheck:
        done[done] = [not _damaged(writer, int(e), int(s)) for e, s in zip(ep[done], sh[done])]
    report.units_skipped += int(done.sum())
    return UnitBatches(recipe, bounds, ep[~done], sh[~done], batch_size)


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
    """Where the teacher's batches go: logits checked, encoded, gathered per unit, written."""

    teacher: Teacher
    codec: CodecSpec
    recipe: Recipe
    writer: CacheWriter
    source: object
    report: BuildReport
    features: BuildFeatures | None = None


def _teach_and_write(loader, units: UnitBatches, sink: _Sink, progress: bool) -> None:
    pending: dict[int, list[dict]] = {}
    canaries: dict[int, dict] = {}  # per unit: its first views, hashed as the teacher sees them
    remaining = {u: int(n) for u, n in enumerate(units.unit_views) if n}
    with _progress(progress, sum(remaining.values()), len(units.unit_views)) as bar:
        for batch in loader:
            u = batch["unit"]
            epoch, shard = int(units.epochs[u]), int(units.shards[u])
            where = f"{sink.writer.url} {unit_path(epoch, shard)}, shard {sink.source.shards[shard].name}"
            if u not in canaries:
                canaries[u] = canary_of(batch["images"], batch["index"])
            t0 = time.perf_counter()
            if sink.features is not None:
                logits, feats = sink.teacher(batch["images"], sink.recipe.mean, sink.recipe.std, features=True)
            else:
                logits, feats = sink.teacher(batch["images"], sink.recipe.mean, sink.recipe.std), None
            index = batch["index"].numpy()
            keys = [sink.source.key(int(i)) for i in index]
            check_logits(logits, sink.codec.num_classes, keys, where)  # waits for the device: timed with it
            sink.report.teacher_seconds += time.perf_counter() - t0
            sink.report.render_seconds += batch["render_s"]
            seeds = batch["seed"].numpy().view(np.uint64)
            try:
                rows = encode(sink.codec, logits, seeds)
            except ValueRangeError as e:
                raise BadLogitsError(f"{e} (--value-dtype float32; {where})") from None
            rows.update(index=index, seed=seeds, partner=batch["partner"].numpy(), repeat=batch["repeat"].numpy())
            if feats is not None:
                rows.update(sink.features.encode(feats, keys, where))
            pending.setdefault(u, []).append(rows)
            remaining[u] -= len(index)
            sink.report.views += len(index)
            bar.advance(len(index))
            if remaining[u] == 0:
                _write_unit(sink, epoch, shard, pending.pop(u), canaries.pop(u))
                bar.unit_done()


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


class _progress:
    """A rich progress bar (views, views/s, units, ETA), or nothing when disabled."""

    def __init__(self, enabled: bool, total_views: int, total_units: int):
        self.enabled, self.total_views, self.total_units, self.units = enabled, total_views, total_units, 0

    def __enter__(self):
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self.p = Progress(
                TextColumn("[bold]build[/]"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TextColumn("units {task.fields[units]}"), TimeRemainingColumn(),
            )
            self.p.__enter__()
            self.task = self.p.add_task("build", total=self.total_views, rate="", units=f"0/{self.total_units}")
        return self

    def advance(self, n: int) -> None:
        if self.enabled:
            self.p.advance(self.task, n)
            speed = self.p.tasks[0].speed
            self.p.update(self.task, rate=f"{speed:,.0f} views/s" if speed else "")

    def unit_done(self) -> None:
        self.units += 1
        if self.enabled:
            self.p.update(self.task, units=f"{self.units}/{self.total_units}")

    def __exit__(self, *exc):
        if self.enabled:
            self.p.__exit__(*exc)
        return False
