"""The headline job's shape: ImageNet-1k (1,281,167 samples, 1,000 classes, 1,024 shards)
x 300 epochs. Planning needs keys, not pixels, so most of it runs on a *virtual* source of
that shape; one part runs the real CLI on real tiny images.

(a) Build start-up: from an empty local cache to the first teacher batch planned, for 300
    epochs (preparing 300 epoch groups, one commit listing per epoch, the O(units) batch
    table, the first unit planned): seconds and peak memory growth.
(b) Trainer: one epoch planned (every unit's pairing), shuffled into global batches and
    sliced for a rank, 1.28 M views: seconds.
(c) Resume scan of a cache whose 300 x 1,024 units are all committed: seconds and
    requests (directory listings locally; HTTP requests to a loopback S3 server, counted
    from its log, on the first epochs of the same tree).
(d) The CLI: ``logitcache build --epochs 300`` over tiny images in tar shards (128,000 in
    the full run): seconds from start to the first unit committed, and the build process's
    peak memory then.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .common import Ctx, PeakRSS

IMAGENET = {"samples": 1_281_167, "classes": 1000, "shards": 1024}


class VirtualSource:
    """ImageNet's shape without pixels: keys, labels and shard bounds (no Python object per
    sample: keys are made on demand)."""

    def __init__(self, samples: int, classes: int, shards: int):
        from logitcache.data.shard_info import ShardInfo

        edges = np.linspace(0, samples, shards + 1).astype(np.int64)
        self.shards = [ShardInfo(f"train-{s:06d}.tar", int(edges[s]), int(edges[s + 1])) for s in range(shards)]
        self.num_classes = classes
        self._labels = np.random.default_rng(0).integers(0, classes, samples)
        self.split, self.url = "train", "virtual://imagenet"

    def __len__(self) -> int:
        return len(self._labels)

    def key(self, i: int) -> str:
        return f"n{self._labels[i]:08d}/img_{i:08d}"

    def labels(self) -> np.ndarray:
        return self._labels


def build_startup(workdir: Path, epochs: int) -> dict:
    """(a): an empty local cache to the first batch of the first unit planned."""
    from logitcache.build.loop import _units_to_build
    from logitcache.build.report import BuildReport
    from logitcache.codecs.logits import create_codec
    from logitcache.storage.writer import CacheWriter
    from logitcache.views.augment import create_recipe

    from .common import synthetic_manifest

    t0 = time.perf_counter()
    source = VirtualSource(IMAGENET["samples"], IMAGENET["classes"], IMAGENET["shards"])
    open_s = time.perf_counter() - t0
    recipe = create_recipe("vanillakd_a2")
    memory = PeakRSS()
    t0 = time.perf_counter()
    manifest = synthetic_manifest(len(source), [len(s) for s in source.shards], create_codec("topk", 1000, 10), recipe)
    writer = CacheWriter(str(workdir / "startup.zarr"), manifest)
    writer.prepare_epochs(list(range(epochs)))
    t_prepared = time.perf_counter()
    units, _ = _units_to_build([writer], recipe, source, list(range(epochs)), 0, 1, 256, [BuildReport("")], False)
    t_listed = time.perf_counter()
    epoch, groups, _ = units[0]
    t1 = time.perf_counter()
    return {"epochs": epochs, "units": len(units.epochs), "batches": len(units), "first_batch_views": groups.num_views,
            "open_virtual_source_s": open_s, "prepare_epochs_s": t_prepared - t0, "list_and_table_s": t_listed - t_prepared,
            "first_batch_plan_s": t1 - t_listed, "to_first_batch_s": t1 - t0, "memory": memory.read()}


def trainer_epoch_plan(repeats: int) -> dict:
    """(b): one epoch of 1.28 M views planned, shuffled and sliced for rank 0 of 8."""
    from logitcache.replay.batches import create_train_loader, epoch_groups
    from logitcache.replay.rows import CachedRows
    from logitcache.views.augment import create_recipe

    source = VirtualSource(IMAGENET["samples"], IMAGENET["classes"], IMAGENET["shards"])
    recipe = create_recipe("vanillakd_a2")
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        groups = epoch_groups(source, recipe, r)
        loader = create_train_loader(source, recipe, r, groups, CachedRows(None, source.labels()), batch_size=2048,
                                     seed=0, epoch=r, num_workers=0, rank=0, world_size=8)
        times.append(time.perf_counter() - t0)
    return {"views": groups.num_views, "groups": len(groups), "batches": len(loader), "seconds": times,
            "median_s": float(np.median(times))}


def _commit_tree(base: Path, epochs: int, shards: int) -> None:
    """Write the commit records of a fully built cache (format 3: each record a group of its
    own, as since format 2) directly (no arrays: the scan reads only listings), as the build
    leaves them."""
    from logitcache.codecs.logits import create_codec
    from logitcache.storage.writer import CacheWriter

    from .common import synthetic_manifest

    manifest = synthetic_manifest(shards, [1] * shards, create_codec("topk", 1000, 10))
    CacheWriter(str(base), manifest).prepare_epochs(list(range(epochs)))
    meta = b'{"zarr_format": 3, "node_type": "group", "attributes": {"commit": {"n": 1, "crc32": {}, "plan": ""}}}'
    for e in range(epochs):
        root = base / "epochs" / f"{e:04d}" / "commits"
        for s in range(shards):
            (root / f"{s:05d}").mkdir()
            (root / f"{s:05d}" / "zarr.json").write_bytes(meta)


def _scan(reader, epochs: int) -> tuple[float, int]:
    """Seconds and listings of a resuming build's scan: which units are committed."""
    import logitcache.storage.layout as layout  # committed_units lists through layout.list_names

    calls = 0
    original = layout.list_names

    def counting(*args, **kwargs):
        nonlocal calls
        calls += 1
        return original(*args, **kwargs)

    layout.list_names = counting
    try:
        t0 = time.perf_counter()
        done = sum(len(reader.committed_units(e)) for e in range(epochs))
        seconds = time.perf_counter() - t0
    finally:
        layout.list_names = original
    assert done == epochs * reader.num_shards, done
    return seconds, calls


def resume_scan(workdir: Path, epochs: int, shards: int, s3_epochs: int) -> dict:
    """(c): local and loopback-S3 scans of a fully committed cache."""
    local = workdir / "scan.zarr"
    t0 = time.perf_counter()
    _commit_tree(local, epochs, shards)
    made = time.perf_counter() - t0
    from logitcache.storage.reader import CacheReader

    local_s, local_listings = _scan(CacheReader(str(local)), epochs)
    out = {"epochs": epochs, "shards": shards, "make_tree_s": made,
           "local": {"seconds": local_s, "listings": local_listings, "listings_per_epoch": local_listings / epochs}}
    out["s3"] = _s3_scan(local, s3_epochs, shards)
    return out


def _s3_scan(local: Path, epochs: int, shards: int) -> dict:
    """Upload the metadata of the first ``epochs`` epochs of the commit tree to moto's server
    and scan it over HTTP."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import fsspec
    from s3_server import count_requests, s3_server

    with s3_server() as env:
        os.environ.update(env)
        try:
            fs = fsspec.filesystem("s3", use_listings_cache=False)
            fs.mkdir("scan")
            files = [p for p in local.rglob("zarr.json") if _in_first_epochs(p.relative_to(local).parts, epochs)]
            fs.pipe({f"scan/cache.zarr/{p.relative_to(local).as_posix()}": p.read_bytes() for p in files})
            from logitcache.storage.reader import CacheReader

            reader = CacheReader("s3://scan/cache.zarr")  # opening it is not part of the scan
            with count_requests() as counter:
                seconds, listings = _scan(reader, epochs)
        finally:
            for k in env:
                os.environ.pop(k, None)
    return {"epochs": epochs, "shards": shards, "objects": len(files), "seconds": seconds, "listings": listings,
            "requests": counter.count, "requests_per_epoch": counter.count / epochs,
            "seconds_per_epoch": seconds / epochs, "seconds_300_epochs_est": seconds / epochs * 300}


def _in_first_epochs(parts: tuple[str, ...], epochs: int) -> bool:
    """Whether a cache path (relative parts) is outside ``epochs/<EEEE>/`` or in one of the first epochs."""
    return len(parts) < 3 or parts[0] != "epochs" or int(parts[1]) < epochs


def cli_first_unit(workdir: Path, per_class: int, epochs: int, timeout: float) -> dict:
    """(d): `logitcache build --epochs N` over 128 x ``per_class`` tiny images: time to the
    first committed unit and the build process's peak memory then."""
    import timm
    import torch
    from logitcache.trainer.checkpoint import save_student

    from logitcache.data.synth import generate_synth
    from logitcache.views.augment import create_recipe

    t0 = time.perf_counter()
    data = generate_synth(workdir / "data", num_classes=128, train_per_class=per_class, val_per_class=1,
                          image_size=16, seed=0, shard_size=1000)
    make_s = time.perf_counter() - t0
    weights = workdir / "teacher.safetensors"
    save_student(timm.create_model("test_resnet", num_classes=128), weights, "test_resnet", 128,
                 create_recipe("demo32"))
    cache = workdir / "cli.zarr"
    cmd = [sys.executable, "-m", "logitcache.cli.main", "build", "--data", str(data), "--teacher", "test_resnet",
           "--teacher-weights", str(weights), "--recipe", "demo32_mix", "--aug-repeats", "3", "--epochs", str(epochs),
           "--batch-size", "250",
           "--workers", "1", "--no-progress", "--out", str(cache)]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first, peak = None, 0.0
    try:
        while time.perf_counter() - t0 < timeout and proc.poll() is None:
            peak = max(peak, _vm_hwm_mb(proc.pid))
            if any((cache / "epochs" / "0000" / "commits").glob("0*")):
                first = time.perf_counter() - t0
                break
            time.sleep(0.05)
    finally:
        peak = max(peak, _vm_hwm_mb(proc.pid))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    if first is None:
        raise RuntimeError(f"no unit committed within {timeout} s: {proc.stderr.read().decode()[-2000:]}")
    return {"images": 128 * per_class, "shards": -(-128 * per_class // 1000), "epochs": epochs,
            "make_data_s": make_s, "first_unit_committed_s": first, "build_peak_rss_mb": peak}


def _vm_hwm_mb(pid: int) -> float:
    """Peak resident memory (VmHWM) of a running process, MB; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def settings(ctx: Ctx) -> dict:
    return {
        "epochs": ctx.pick(quick_cpu=300, full_cpu=300, tiny=3),
        "scan_epochs": ctx.pick(quick_cpu=20, full_cpu=300, tiny=2),
        "scan_shards": ctx.pick(quick_cpu=1024, full_cpu=1024, tiny=16),
        "s3_scan_epochs": ctx.pick(quick_cpu=3, full_cpu=20, tiny=1),
        "plan_repeats": ctx.pick(quick_cpu=3, full_cpu=5, tiny=1),
        "cli_per_class": ctx.pick(quick_cpu=125, full_cpu=1000, tiny=4),
        "cli_timeout_s": 300,
        "recipe": "vanillakd_a2",  # VanillaKD A2's views: repeated augmentation 3, mixup/cutmix pairs
        "aug_repeats": 3,
    }


def run(ctx: Ctx) -> dict:
    from logitcache.views.augment import create_recipe

    s = settings(ctx)
    assert create_recipe(s["recipe"]).aug_repeats == s["aug_repeats"]
    startup = build_startup(ctx.workdir, s["epochs"])
    plan = trainer_epoch_plan(s["plan_repeats"])
    scan = resume_scan(ctx.workdir, s["scan_epochs"], s["scan_shards"], s["s3_scan_epochs"])
    cli = cli_first_unit(ctx.workdir, s["cli_per_class"], s["epochs"], s["cli_timeout_s"])
    return {
        "settings": {**s, **IMAGENET},
        "results": {"build_startup": startup, "trainer_epoch_plan": plan, "resume_scan": scan, "cli": cli},
        "summary": {
            "startup_to_first_batch_s": startup["to_first_batch_s"],
            "startup_peak_rss_growth_mb": startup["memory"]["rss_growth_mb"],
            "trainer_epoch_plan_s": plan["median_s"],
            "resume_scan_local_s_per_epoch": scan["local"]["seconds"] / scan["epochs"],
            "resume_scan_local_listings_per_epoch": scan["local"]["listings_per_epoch"],
            "resume_scan_s3_requests_per_epoch": scan["s3"]["requests_per_epoch"],
            "resume_scan_s3_s_300_epochs_est": scan["s3"]["seconds_300_epochs_est"],
            "cli_first_unit_s": cli["first_unit_committed_s"],
            "cli_build_peak_rss_mb": cli["build_peak_rss_mb"],
        },
    }


def markdown(data: dict) -> str:
    r = data["results"]
    a, b, c, d = r["build_startup"], r["trainer_epoch_plan"], r["resume_scan"], r["cli"]
    s3 = c["s3"]
    return "\n".join([
        f"ImageNet-1k shape: {data['settings']['samples']:,} samples, {data['settings']['shards']:,} shards; "
        f"{a['epochs']} epochs, recipe `{data['settings'].get('recipe', 'vanillakd_a2')}` (aug_repeats "
        f"{data['settings'].get('aug_repeats', 1)}). One process.",
        "",
        "| what | figure | target |",
        "|---|---:|---|",
        f"| build start-up, empty cache -> first batch planned ({a['units']:,} units) | {a['to_first_batch_s']:.2f} s "
        f"(prepare epochs {a['prepare_epochs_s']:.2f}, listings + batch table {a['list_and_table_s']:.2f}, first "
        f"unit {a['first_batch_plan_s'] * 1e3:.1f} ms) | <= 5 s |",
        f"| its peak memory growth | {a['memory']['rss_growth_mb']:.0f} MB | < 500 MB |",
        f"| trainer: one epoch planned, shuffled, sliced for rank 0 of 8 ({b['views']:,} views) | "
        f"{b['median_s']:.2f} s | <= 2 s |",
        f"| resume scan, local, {c['epochs']} x {c['shards']:,} committed units | {c['local']['seconds']:.2f} s, "
        f"{c['local']['listings_per_epoch']:.0f} listing per epoch | about 1 listing per epoch |",
        f"| resume scan, loopback S3, {s3['epochs']} x {s3['shards']:,} units | {s3['seconds']:.2f} s "
        f"({s3['requests_per_epoch']:.1f} requests per epoch; {s3['seconds_300_epochs_est']:.0f} s for 300 epochs "
        f"at this rate) | |",
        f"| `logitcache build --epochs {d['epochs']}` over {d['images']:,} tiny images ({d['shards']} shards): first "
        f"unit committed | {d['first_unit_committed_s']:.1f} s | <= 20 s |",
        f"| its build process's peak memory | {d['build_peak_rss_mb']:.0f} MB | < 1.5 GB |",
    ])


def plot(data: dict, outdir) -> list[str]:
    return []
