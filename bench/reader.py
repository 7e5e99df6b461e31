"""Reader throughput: one epoch of synthetic views, written with CacheWriter, read back.

(a) ``CacheReader.load_epoch``: storage -> memory (every unit's arrays read and checked
    against its commit record, unpacked to teacher rows, concatenated in sample order), in
    views/s; and what the checksums cost within it (the same CRC-32 of every array, timed
    alone, as a fraction of ``load_epoch``).
(b) per-batch row gathering once the epoch is in memory, done as the trainer does it:
    ``logitcache.replay.rows.CachedRows`` once per rendered batch (inside the DataLoader
    worker in training: labels and partner labels, then one gather per teacher row array,
    ``ids``, ``values``, ``tail``); groups visited in index order (sequential) and in a
    random order (shuffled, as training does). One process, one thread: the cost per
    DataLoader worker. For reference the same rows gathered with one vectorised numpy take
    per batch.

The cache is the default codec (topk, k = 10, gap8 values), format 3, rows random but
shaped like real ones (ids of 1000 classes, ascending gap codes from 0, 16-bit tail codes).

Target: >= 1,000,000 views/s per process once an epoch is loaded.
"""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
import torch

from logitcache.storage.stats import storage_bytes

from .common import Ctx, synthetic_manifest, synthetic_unit

NUM_CLASSES = 1000


def settings(ctx: Ctx) -> dict:
    return {
        "views": ctx.pick(quick_cpu=200_000, full_cpu=1_000_000, tiny=20_000),
        "units": ctx.pick(quick_cpu=20, full_cpu=100, tiny=4),
        "k": 10,
        "num_classes": NUM_CLASSES,
        "values": "gap8",
        "batch_views": 256,
        "gather_views": ctx.pick(quick_cpu=100_000, full_cpu=200_000, tiny=10_000),  # per order
        "load_repeats": 5,
    }


def random_rows(codec, m: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Teacher rows of ``m`` views for a topk gap codec (logitcache/codecs/logits.py): ``ids`` (m, k)
    random class ids, ``values`` (m, k) uint16 gap codes, ascending from the top's 0, ``tail``
    (m,) uint16 the fill's code (at or past the last kept one); every increase fits the codec."""
    k, bits = codec.k, codec.value_bits
    codes = np.cumsum(rng.integers(0, 1 << min(bits, 5), (m, k + 1)), axis=1)
    codes[:, 0] = 0
    return {"ids": rng.integers(0, codec.num_classes, (m, k)).astype(codec.id_dtype),
            "values": codes[:, :k].astype(np.uint16), "tail": codes[:, k].astype(np.uint16)}


def write_epoch(url: str, n: int, units: int, k: int, values: str) -> tuple[float, list[int]]:
    """One epoch of ``n`` views in ``units`` equal units; returns (seconds to write, unit sizes)."""
    from logitcache.codecs.logits import create_codec
    from logitcache.storage.writer import CacheWriter

    codec = create_codec("topk", NUM_CLASSES, k, values)
    sizes = [n // units + (1 if i < n % units else 0) for i in range(units)]
    writer = CacheWriter(url, synthetic_manifest(n, sizes, codec))
    writer.prepare_epochs([0])
    t = 0.0
    start = 0
    for u, m in enumerate(sizes):
        rows = random_rows(codec, m, np.random.default_rng(u))
        unit = synthetic_unit(m, start, seed=u)
        t0 = time.perf_counter()
        writer.write_unit(0, u, rows, unit["plan"], canary=unit["canary"])
        t += time.perf_counter() - t0
        start += m
    return t, sizes


def gather_rate(rows, groups, order: np.ndarray, batch_groups: int, max_views: int) -> float:
    """views/s of the trainer's path: ``CachedRows`` once per batch (labels, partner labels,
    then one vectorised gather per teacher row array) over the groups in ``order``.

    As in a DataLoader worker, each batch's index fields are made just before (as
    ``render_batch`` makes them); making them is not timed, it is the dataset's work
    (rendering), not reading. "Shuffled" is then what it is in training: rows gathered
    from random places of the loaded epoch."""
    views, seconds = 0, 0.0
    for b in range(0, len(order), batch_groups):
        batch_groups_ = groups.take(order[b:b + batch_groups])
        idx = batch_groups_.views()
        partner = np.stack([batch_groups_.second, batch_groups_.first], axis=1).reshape(-1)
        batch = {"index": torch.from_numpy(idx), "partner": torch.from_numpy(partner),
                 "repeat": torch.zeros(len(idx), dtype=torch.int64)}  # as a rendered batch holds (no repeats)
        t0 = time.perf_counter()
        out = rows(batch)
        seconds += time.perf_counter() - t0
        views += len(out["label"])
        if views >= max_views:
            break
    return views / seconds


def checksum_seconds(url: str, repeats: int) -> float:
    """Median seconds of the checksums ``load_epoch`` computes (every array of every unit
    against its commit record), timed alone on arrays already in memory."""
    from logitcache.storage.layout import damaged_arrays
    from logitcache.storage.reader import CacheReader

    reader = CacheReader(url)
    units = [reader.read_unit(0, s) for s in range(reader.num_shards)]  # the stored (packed) arrays
    commits = [reader.commit(0, s) for s in range(reader.num_shards)]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for commit, unit in zip(commits, units):
            assert not damaged_arrays(commit, unit)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def vectorised_rate(arrays, labels: np.ndarray, order_views: np.ndarray, batch_views: int, max_views: int) -> float:
    """views/s of one fancy-index take per array per batch (what a batched lookup could do):
    ``ids``, ``values``, ``tail`` and the labels (n,) int64."""
    views = 0
    t0 = time.perf_counter()
    for b in range(0, len(order_views), batch_views):
        idx = order_views[b:b + batch_views]
        out = (torch.from_numpy(arrays.ids[idx]), torch.from_numpy(arrays.values[idx]),
               torch.from_numpy(arrays.tail[idx]), torch.from_numpy(labels[idx]))
        views += len(out[0])
        if views >= max_views:
            break
    return views / (time.perf_counter() - t0)


def loaded_epoch_memory(url: str) -> tuple[int, int]:
    """(bytes a loaded epoch holds, peak numpy allocations while loading it)."""
    from logitcache.storage.reader import CacheReader

    tracemalloc.start()
    held = CacheReader(url).load_epoch(0)
    _, load_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return sum(v.nbytes for v in vars(held).values() if isinstance(v, np.ndarray)), load_peak


def read_units_seconds(url: str, repeats: int) -> float:
    """Median seconds of ``read_units``: the zarr part of ``load_epoch`` (the rest is assembling
    the epoch in numpy)."""
    from logitcache.storage.reader import CacheReader

    read_units = []
    for _ in range(repeats):
        reader = CacheReader(url)
        t0 = time.perf_counter()
        reader.read_units(0)
        read_units.append(time.perf_counter() - t0)
    return float(np.median(read_units))


def run(ctx: Ctx) -> dict:
    from logitcache.replay.rows import CachedRows
    from logitcache.storage.layout import IO_THREADS
    from logitcache.storage.reader import CacheReader
    from logitcache.views.plan import Groups

    s = settings(ctx)
    url = str(ctx.workdir / "reader.zarr")
    write_s, sizes = write_epoch(url, s["views"], s["units"], s["k"], s["values"])
    disk = storage_bytes(url)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    try:
        loads = []
        for _ in range(s["load_repeats"]):
            reader = CacheReader(url)
            t0 = time.perf_counter()
            arrays = reader.load_epoch(0)
            loads.append(time.perf_counter() - t0)
        check_s = checksum_seconds(url, s["load_repeats"])
        epoch_bytes, load_peak = loaded_epoch_memory(url)
        read_units_s = read_units_seconds(url, s["load_repeats"])

        n = arrays.num_views
        labels = np.random.default_rng(1).integers(0, NUM_CLASSES, n)  # the dataset's, (n,) int64
        rows = CachedRows(arrays, labels)
        # groups as a mixing recipe makes them: pairs of sample indices
        groups = Groups(np.arange(0, n - 1, 2, dtype=np.int64), np.arange(1, n, 2, dtype=np.int64))
        bg = s["batch_views"] // 2
        rng = np.random.default_rng(0)
        seq = gather_rate(rows, groups, np.arange(len(groups)), bg, s["gather_views"])
        shuf = gather_rate(rows, groups, rng.permutation(len(groups)), bg, s["gather_views"])
        vec_seq = vectorised_rate(arrays, labels, np.arange(n), s["batch_views"], s["gather_views"])
        vec_shuf = vectorised_rate(arrays, labels, rng.permutation(n), s["batch_views"], s["gather_views"])
    finally:
        torch.set_num_threads(threads)

    load_s = float(np.median(loads))
    return {
        "settings": {**s, "unit_sizes": [min(sizes), max(sizes)]},
        "results": {
            "write_seconds": write_s,
            "write_views_per_s": s["views"] / write_s,
            "disk_bytes": disk,
            "bytes_per_view": disk / s["views"],
            "load_epoch_seconds": loads,
            "load_epoch_views_per_s": s["views"] / load_s,
            "checksum_seconds": check_s,
            "checksum_fraction_of_load_epoch": check_s / load_s,
            "load_epoch_split_s": {"read_units": read_units_s, "assemble": load_s - read_units_s},
            "read_threads": IO_THREADS,
            "epoch_bytes_in_memory": epoch_bytes,
            "epoch_bytes_per_view_in_memory": epoch_bytes / s["views"],
            "load_epoch_peak_alloc_bytes": load_peak,
            "gather_views_per_s": {"sequential": seq, "shuffled": shuf},
            "vectorised_views_per_s": {"sequential": vec_seq, "shuffled": vec_shuf},
        },
        "summary": {
            "load_epoch_views_per_s": s["views"] / load_s,
            "checksum_fraction_of_load_epoch": check_s / load_s,
            "gather_sequential_views_per_s": seq,
            "gather_shuffled_views_per_s": shuf,
            "vectorised_shuffled_views_per_s": vec_shuf,
            "epoch_mb_in_memory": epoch_bytes / 2**20,
            "load_epoch_peak_alloc_mb": load_peak / 2**20,
        },
    }


def markdown(data: dict) -> str:
    s, r = data["settings"], data["results"]
    g, v = r["gather_views_per_s"], r["vectorised_views_per_s"]
    mark = lambda x: f"**{x:,.0f}**" + (" (< 1M)" if x < 1e6 else "")  # noqa: E731
    return "\n".join([
        f"{s['views']:,} views in {s['units']} units (topk k={s['k']}, {s['num_classes']} classes, {s['values']} "
        f"values, format 3), "
        f"{r['bytes_per_view']:.1f} B/view on disk; written at {r['write_views_per_s']:,.0f} views/s. "
        f"One process, one thread.",
        "",
        "| what | views/s |",
        "|---|---:|",
        f"| `load_epoch` (storage -> memory) | {mark(r['load_epoch_views_per_s'])} |",
        f"| trainer path: CachedRows once per batch, sequential | {mark(g['sequential'])} |",
        f"| trainer path: CachedRows once per batch, shuffled | {mark(g['shuffled'])} |",
        f"| reference: one numpy take per batch, sequential | {v['sequential']:,.0f} |",
        f"| reference: one numpy take per batch, shuffled | {v['shuffled']:,.0f} |",
        "",
        f"`load_epoch` {float(np.median(r['load_epoch_seconds'])):.3f} s (median of "
        f"{len(r['load_epoch_seconds'])}): reading and unpacking the {s['units']} units through zarr (`read_units`, up to "
        f"{r.get('read_threads', '?')} threads) "
        f"{r['load_epoch_split_s']['read_units']:.3f} s, assembling the epoch (concatenating the units' "
        f"rows, already in sample order) the rest; the CRC-32 checks of every array take "
        f"{r['checksum_seconds']:.3f} s of it ({100 * r['checksum_fraction_of_load_epoch']:.1f}%). "
        f"Batches of {s['batch_views']} views.",
        "",
        f"Memory: a loaded epoch holds {r['epoch_bytes_in_memory'] / 2**20:,.1f} MB "
        f"({r['epoch_bytes_per_view_in_memory']:.0f} B/view); loading it peaks at "
        f"{r['load_epoch_peak_alloc_bytes'] / 2**20:,.1f} MB of numpy allocations (tracemalloc: the units, their "
        f"concatenations and the result). The trainer holds one epoch at a time (its DataLoader workers share it "
        f"copy-on-write)."
    ])


def plot(data: dict, outdir) -> list[str]:
    return []
