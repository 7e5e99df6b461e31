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
from pathlib import Path

import numpy as np
import torch

from .codec import CodecSpec, ValueRangeError, encode
from .errors import BadLogitsError, BadSampleError, LogitcacheError
from .loader import GroupDataset, collate_groups, create_loader
from .manifest import DatasetInfo, Manifest
from .store import CacheWriter, empty_unit, unit_path
from .teacher import Teacher, check_logits
from .views import Recipe, UnitPlan, plan_unit

DEFAULT_CACHE_ROOT = "~/.cache/logitcache"


def cache_root(flag: str | None = None) -> str:
    """The cache root: ``--cache-root``, else $LOGITCACHE_ROOT, else ~/.cache/logitcache."""
    root = flag or os.environ.get("LOGITCACHE_ROOT") or DEFAULT_CACHE_ROOT
    return os.path.expanduser(root) if "://" not in root else root


def default_cache_name(dataset: str, split: str | None, teacher: str, recipe: Recipe, codec: CodecSpec) -> str:
    short = teacher.split(".")[0]
    return f"{dataset}-{split or 'all'}-{short}-{codec.name}{codec.k}-{recipe.digest()[:8]}.zarr"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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
    url: str
    units_written: int = 0
    units_skipped: int = 0
    views: int = 0
    seconds: float = 0.0
    skipped_keys: list[str] = field(default_factory=list)

    @property
    def views_per_s(self) -> float:
        return self.views / self.seconds if self.seconds > 0 else 0.0


def plan_units(source, recipe: Recipe, epochs: list[int]) -> list[UnitPlan]:
    """Every unit of ``epochs``, in (epoch, shard) order."""
    keys = [source.key(i) for i in range(len(source))]
    return [
        plan_unit(recipe, e, s, info.start, keys[info.start:info.stop])
        for e in epochs for s, info in enumerate(source.shards)
    ]


def unit_batches(plan: UnitPlan, first_item: int, batch_size: int, group_size: int) -> list[list[int]]:
    """Item ids of the unit's batches: ``batch_size`` views (batch_size // group_size groups) each."""
    per_batch = max(1, batch_size // group_size)
    ids = list(range(first_item, first_item + len(plan.groups)))
    return [ids[i:i + per_batch] for i in range(0, len(ids), per_batch)]


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
) -> BuildReport:
    """Build (or finish, or extend) the cache at ``url``. See the module docstring.

    Several processes: call with ``rank``/``world_size`` in each and a ``barrier`` that waits
    for all ranks (logitcache.distributed); rank 0 creates the root and epoch groups before
    it, each rank then writes only its own units. ``storage_options`` go to fsspec.
    ``num_workers`` None picks :func:`default_workers` for the teacher's device.
    """
    if codec.num_classes != source.num_classes:
        raise LogitcacheError(f"codec has {codec.num_classes} classes, dataset has {source.num_classes}")
    if teacher.num_classes != source.num_classes:
        raise LogitcacheError(
            f"teacher {teacher.name} predicts {teacher.num_classes} classes but dataset {source.url} has "
            f"{source.num_classes}"
        )
    manifest = Manifest(
        teacher=teacher.name, teacher_weights=teacher.weights_label, teacher_weights_sha256=teacher.weights_sha256,
        recipe=recipe, dataset=dataset_info(source, dataset_name), codec=codec, num_classes=source.num_classes,
        build_env=teacher.runtime(),
    )
    if rank == 0:
        writer = CacheWriter(url, manifest, storage_options)
        writer.prepare_epochs(epochs)
    if barrier is not None:
        barrier()
    if rank != 0:
        writer = CacheWriter(url, manifest, storage_options)

    report = BuildReport(url=url)
    plans = [p for j, p in enumerate(plan_units(source, recipe, epochs)) if j % world_size == rank]
    todo = []
    for p in plans:
        if writer.is_committed(p.epoch, p.shard):
            report.units_skipped += 1
        else:
            todo.append(p)

    groups, batches, owner = [], [], []  # owner[item] = position of its unit in todo
    for u, p in enumerate(todo):
        batches += unit_batches(p, len(groups), batch_size, recipe.group_size)
        groups += p.groups
        owner += [u] * len(p.groups)
    labels = source.labels()
    t0 = time.perf_counter()
    for p in todo:  # an empty data shard has no batches: commit its empty unit now
        if p.num_views == 0:
            writer.write_unit(p.epoch, p.shard, empty_unit(codec))
            report.units_written += 1
    if num_workers is None:
        num_workers = default_workers(teacher.device)
    if todo:
        dataset = GroupDataset(source, recipe, groups)
        loader = create_loader(dataset, batches, num_workers=num_workers, pin_memory=teacher.device.type == "cuda")
        _run(loader, todo, owner, teacher, codec, recipe, writer, labels, source, report, progress)
    report.seconds = time.perf_counter() - t0
    return report


def _run(loader, todo, owner, teacher, codec, recipe, writer, labels, source, report, progress) -> None:
    pending: dict[int, list[dict]] = {}
    remaining = {u: p.num_views for u, p in enumerate(todo) if p.num_views}
    total_views = sum(remaining.values())
    with _progress(progress, total_views, len(todo)) as bar:
        for batch in loader:
            for err in batch["errors"]:
                raise BadSampleError(err["error"])  # already names shard and key
            u = owner[int(batch["item"][0])]
            plan = todo[u]
            where = f"{writer.url} {unit_path(plan.epoch, plan.shard)}, shard {source.shards[plan.shard].name}"
            logits = teacher(batch["images"], recipe.mean, recipe.std)
            index = batch["index"].numpy()
            check_logits(logits, codec.num_classes, [source.key(int(i)) for i in index], where)
            try:
                rows = encode(codec, logits)
            except ValueRangeError as e:
                raise BadLogitsError(f"{e} (--value-dtype float32; {where})") from None
            rows.update(
                sample_index=index,
                view_seed=batch["seed"].numpy().view(np.uint64),
                label=labels[index].astype(np.int32),
                partner_index=batch["partner"].numpy(),
                mix_lam=batch["lam"].numpy(),
            )
            pending.setdefault(u, []).append(rows)
            remaining[u] -= len(index)
            report.views += len(index)
            bar.advance(len(index))
            if remaining[u] == 0:
                parts = pending.pop(u)
                writer.write_unit(plan.epoch, plan.shard, {k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
                report.units_written += 1
                bar.unit_done()


class _progress:
    """A rich progress bar (views, views/s, units, ETA), or nothing when disabled."""

    def __init__(self, enabled: bool, total_views: int, total_units: int):
        self.enabled, self.total_views, self.total_units, self.units = enabled, total_views, total_units, 0

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

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
