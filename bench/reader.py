"""Reader throughput: one epoch of synthetic views, written with CacheWriter, read back.

(a) ``CacheReader.load_epoch``: storage -> memory (every unit's arrays read, checked to cover
    every sample once, reordered by sample index), in views/s; also with ``verify=True``
    (sha256 of every array).
(b) per-batch row gathering once the epoch is in memory, done as the trainer does it:
    ``logitcache.loader.collate_groups`` concatenating the freshly made group items of a
    batch, then ``logitcache.trainer.data.CachedRows`` once per collated batch (inside the DataLoader
    worker in training); groups visited in index order (sequential) and in a random order
    (shuffled, as training does). One process, one thread: the cost per DataLoader worker.
    Also ``CachedRows`` alone, and for reference the same rows gathered with one
    vectorised numpy take per batch.

Target: >= 1,000,000 views/s per process once an epoch is loaded.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from logitcache.inspect import storage_bytes

from .common import Ctx, mixed_view_metadata, synthetic_manifest

NUM_CLASSES = 1000


def settings(ctx: Ctx) -> dict:
    return {
        "views": ctx.pick(quick_cpu=200_000, full_cpu=1_000_000, tiny=20_000),
        "units": ctx.pick(quick_cpu=20, full_cpu=100, tiny=4),
        "k": 10,
        "num_classes": NUM_CLASSES,
        "value_dtype": "float16",
        "batch_views": 256,
        "gather_views": ctx.pick(quick_cpu=100_000, full_cpu=200_000, tiny=10_000),  # per order
        "load_repeats": 5,
    }


def write_epoch(url: str, n: int, units: int, k: int) -> tuple[float, list[int]]:
    """One epoch of ``n`` views in ``units`` equal units; returns (seconds to write, unit sizes)."""
    from logitcache.codec import create_codec
    from logitcache.store import CacheWriter

    codec = create_codec("topk", NUM_CLASSES, k)
    sizes = [n // units + (1 if i < n % units else 0) for i in range(units)]
    writer = CacheWriter(url, synthetic_manifest(n, sizes, codec))
    writer.root.require_group("epochs")
    writer.prepare_epochs([0])
    t = 0.0
    start = 0
    for u, m in enumerate(sizes):
        rng = np.random.default_rng(u)
        arrays = mixed_view_metadata(m, start, seed=u)
        arrays["topk_ids"] = rng.integers(0, NUM_CLASSES, (m, k)).astype(np.uint16)
        arrays["topk_logits"] = np.sort(rng.normal(0, 3, (m, k)).astype(np.float16), axis=1)[:, ::-1]
        arrays["tail_lse"] = rng.normal(5, 1, m).astype(np.float32)
        t0 = time.perf_counter()
        writer.write_unit(0, u, arrays)
        t += time.perf_counter() - t0
        start += m
    return t, sizes


def gather_rate(rows, groups, order: np.ndarray, batch_groups: int, max_views: int) -> float:
    """views/s of the trainer's path: collate_groups over a batch of group items, which calls
    CachedRows once per batch (one vectorised gather), over groups in ``order``.

    As in a DataLoader worker, each batch's items are made just before they are collated
    (their index fields as ``GroupDataset`` makes them); making them is not timed, it is the
    dataset's work (rendering), not reading. "Shuffled" is then what it is in training:
    rows gathered from random places of the loaded epoch."""
    from logitcache.loader import collate_groups

    views, seconds = 0, 0.0
    for b in range(0, len(order), batch_groups):
        items = [{"index": torch.tensor(groups[i].indices), "partner": torch.tensor(groups[i].indices[::-1])}
                 for i in order[b:b + batch_groups]]
        t0 = time.perf_counter()
        batch = collate_groups(items, batch_extra=rows)
        seconds += time.perf_counter() - t0
        views += len(batch["label"])
        if views >= max_views:
            break
    return views / seconds


def rows_rate(rows, groups, order: np.ndarray, batch_groups: int, max_views: int) -> float:
    """views/s of ``CachedRows`` alone on already-collated index tensors: what reading the
    cache adds to a batch the data pipeline collates anyway."""
    batches, made = [], 0
    for b in range(0, len(order), batch_groups):
        idx = torch.tensor([i for g in order[b:b + batch_groups] for i in groups[g].indices])
        batches.append({"index": idx, "partner": idx.flip(0)})
        made += len(idx)
        if made >= max_views:
            break
    views = 0
    t0 = time.perf_counter()
    for batch in batches:
        views += len(rows(batch)["label"])
    return views / (time.perf_counter() - t0)


def vectorised_rate(arrays, order_views: np.ndarray, batch_views: int, max_views: int) -> float:
    """views/s of one fancy-index take per field per batch (what a batched lookup could do)."""
    views = 0
    t0 = time.perf_counter()
    for b in range(0, len(order_views), batch_views):
        idx = order_views[b:b + batch_views]
        out = (torch.from_numpy(arrays.topk_ids[idx]), torch.from_numpy(arrays.topk_logits[idx]),
               torch.from_numpy(arrays.tail_lse[idx]), torch.from_numpy(arrays.label[idx].astype(np.int64)))
        views += len(out[0])
        if views >= max_views:
            break
    return views / (time.perf_counter() - t0)


def run(ctx: Ctx) -> dict:
    from logitcache.store import IO_THREADS, CacheReader
    from logitcache.views import Group
    from logitcache.trainer.data import CachedRows

    s = settings(ctx)
    url = str(ctx.workdir / "reader.zarr")
    write_s, sizes = write_epoch(url, s["views"], s["units"], s["k"])
    disk = storage_bytes(url)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    try:
        loads, loads_verify = [], []
        for _ in range(s["load_repeats"]):
            reader = CacheReader(url)
            t0 = time.perf_counter()
            arrays = reader.load_epoch(0)
            loads.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            CacheReader(url).load_epoch(0, verify=True)
            loads_verify.append(time.perf_counter() - t0)
        # memory: what a loaded epoch holds, and the peak numpy allocations while loading it
        import tracemalloc

        tracemalloc.start()
        held = CacheReader(url).load_epoch(0)
        _, load_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        epoch_bytes = sum(v.nbytes for v in vars(held).values() if isinstance(v, np.ndarray))
        del held
        # where load_epoch's time goes: reading the units (zarr) vs assembling the epoch (numpy)
        read_units = []
        for _ in range(s["load_repeats"]):
            reader = CacheReader(url)
            t0 = time.perf_counter()
            reader.read_units(0)
            read_units.append(time.perf_counter() - t0)
        read_units_s = float(np.median(read_units))

        n = arrays.num_views
        labels = arrays.label.astype(np.int64)
        rows = CachedRows(arrays, labels)
        # groups as a mixing recipe makes them: pairs of sample indices
        groups = [Group((2 * i, 2 * i + 1), (0, 0), 0) for i in range(n // 2)]
        bg = s["batch_views"] // 2
        rng = np.random.default_rng(0)
        seq = gather_rate(rows, groups, np.arange(len(groups)), bg, s["gather_views"])
        shuf = gather_rate(rows, groups, rng.permutation(len(groups)), bg, s["gather_views"])
        rows_shuf = rows_rate(rows, groups, rng.permutation(len(groups)), bg, s["gather_views"])
        vec_seq = vectorised_rate(arrays, np.arange(n), s["batch_views"], s["gather_views"])
        vec_shuf = vectorised_rate(arrays, rng.permutation(n), s["batch_views"], s["gather_views"])
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
            "load_epoch_verify_views_per_s": s["views"] / float(np.median(loads_verify)),
            "load_epoch_split_s": {"read_units": read_units_s, "assemble": load_s - read_units_s},
            "read_threads": IO_THREADS,
            "epoch_bytes_in_memory": epoch_bytes,
            "epoch_bytes_per_view_in_memory": epoch_bytes / s["views"],
            "load_epoch_peak_alloc_bytes": load_peak,
            "gather_views_per_s": {"sequential": seq, "shuffled": shuf},
            "rows_only_shuffled_views_per_s": rows_shuf,
            "vectorised_views_per_s": {"sequential": vec_seq, "shuffled": vec_shuf},
        },
        "summary": {
            "load_epoch_views_per_s": s["views"] / load_s,
            "load_epoch_verify_views_per_s": s["views"] / float(np.median(loads_verify)),
            "gather_sequential_views_per_s": seq,
            "gather_shuffled_views_per_s": shuf,
            "rows_only_shuffled_views_per_s": rows_shuf,
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
        f"{s['views']:,} views in {s['units']} units (k={s['k']}, {s['num_classes']} classes, {s['value_dtype']}), "
        f"{r['bytes_per_view']:.1f} B/view on disk; written at {r['write_views_per_s']:,.0f} views/s. "
        f"One process, one thread.",
        "",
        "| what | views/s |",
        "|---|---:|",
        f"| `load_epoch` (storage -> memory) | {mark(r['load_epoch_views_per_s'])} |",
        f"| `load_epoch(verify=True)` | {r['load_epoch_verify_views_per_s']:,.0f} |",
        f"| trainer path: collate + CachedRows once per batch, sequential | {mark(g['sequential'])} |",
        f"| trainer path: collate + CachedRows once per batch, shuffled | {mark(g['shuffled'])} |",
        f"| `CachedRows` alone on collated indices, shuffled | {r['rows_only_shuffled_views_per_s']:,.0f} |",
        f"| reference: one numpy take per batch, sequential | {v['sequential']:,.0f} |",
        f"| reference: one numpy take per batch, shuffled | {v['shuffled']:,.0f} |",
        "",
        f"`load_epoch` {float(np.median(r['load_epoch_seconds'])):.3f} s (median of "
        f"{len(r['load_epoch_seconds'])}): reading the {s['units']} units through zarr (`read_units`, up to "
        f"{r.get('read_threads', '?')} threads) "
        f"{r['load_epoch_split_s']['read_units']:.3f} s, assembling the epoch (concatenate, coverage "
        f"check with one bincount, scatter by sample index) the rest. Batches of {s['batch_views']} views.",
        "",
        f"Memory: a loaded epoch holds {r['epoch_bytes_in_memory'] / 2**20:,.1f} MB "
        f"({r['epoch_bytes_per_view_in_memory']:.0f} B/view); loading it peaks at "
        f"{r['load_epoch_peak_alloc_bytes'] / 2**20:,.1f} MB of numpy allocations (tracemalloc: the units, their "
        f"concatenations and the result). The trainer holds one epoch at a time (its DataLoader workers share it "
        f"copy-on-write)."
    ])


def plot(data: dict, outdir) -> list[str]:
    return []
