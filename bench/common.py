"""Helpers shared by the benchmarks: the run context, timing, environment, fixtures and plots."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Ctx:
    """What every benchmark gets: the device, quick or full mode, and a scratch folder."""

    device: torch.device
    quick: bool
    workdir: Path
    tiny: bool = False  # smoke test of the suite itself: minimal sizes, meaningless numbers

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def pick(self, *, quick_cpu, full_cpu, quick_cuda=None, full_cuda=None, tiny=None):
        """A setting by (mode, device type); the CUDA values default to the CPU ones."""
        if self.tiny and tiny is not None:
            return tiny
        if self.cuda:
            q = quick_cpu if quick_cuda is None else quick_cuda
            f = full_cpu if full_cuda is None else full_cuda
            return q if self.quick else f
        return quick_cpu if self.quick else full_cpu


def package_version(name: str) -> str:
    """The installed version of distribution ``name``, or "missing"."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def environment(device: torch.device) -> dict:
    """Where and with what a result was measured."""
    from logitcache.storage.manifest import device_name

    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "device_name": device_name(device),
        "cpu": device_name("cpu"),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {n: package_version(n) for n in ("torch", "timm", "numpy", "zarr", "pillow", "logitcache")},
        "command": " ".join([Path(sys.executable).name, "-m", "bench.run", *sys.argv[1:]]),
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
    return env


class Clock:
    """Wall and CPU seconds from now on: this process, and its finished children (DataLoader
    workers, pool processes, subprocesses) apart."""

    def __init__(self):
        self.wall = time.perf_counter()
        self.cpu = self._cpu()

    @staticmethod
    def _cpu() -> tuple[float, float]:
        me = resource.getrusage(resource.RUSAGE_SELF)
        ch = resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime, ch.ru_utime + ch.ru_stime

    def read(self) -> dict:
        main, children = self._cpu()
        return {"wall_s": time.perf_counter() - self.wall, "cpu_main_s": main - self.cpu[0],
                "cpu_workers_s": children - self.cpu[1]}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Seconds one call of ``fn()`` takes, device work included."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def interleaved(fns: dict, *, warmup: int, reps: int, device: torch.device) -> dict[str, list[float]]:
    """Time each of ``fns`` (name -> callable) ``reps`` times, interleaved A B C C B A A B C ...

    Warm-up calls are made (interleaved the same way) and dropped. Alternating the order
    every round cancels slow drift (thermal, other load) and position effects.
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            timed(fns[n], device)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for n in (names if r % 2 == 0 else names[::-1]):
            out[n].append(timed(fns[n], device))
    return out


def stats(samples: list[float]) -> dict:
    """Median, min, max and inter-quartile range of timing samples (seconds)."""
    s = sorted(samples)
    q = statistics.quantiles(s, n=4, method="inclusive") if len(s) >= 2 else [s[0], s[0], s[0]]
    return {"median": statistics.median(s), "min": s[0], "max": s[-1], "q1": q[0], "q3": q[2], "n": len(s),
            "samples": samples}


# --- peak memory ---------------------------------------------------------------------------

def _status_mb(field: str) -> float | None:
    """A ``/proc/self/status`` field (VmRSS, VmHWM) in MB, or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _maxrss_mb(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux: KiB


class PeakRSS:
    """Peak resident memory of this process from now on, and how much it grew.

    ``PeakRSS()`` resets the kernel's high-water mark (``echo 5 > /proc/self/clear_refs``) so
    that an earlier peak (imports, other benchmarks) does not hide what follows; ``read()``
    gives ``peak_rss_mb``, ``rss_growth_mb`` (peak minus the RSS at the start), whether the
    reset worked (else the peak is the process's lifetime maximum), and
    ``max_child_peak_rss_mb``: the largest peak of any finished child process so far
    (DataLoader workers; the kernel keeps no per-interval figure for children)."""

    def __init__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.reset = True
        except OSError:
            self.reset = False
        self.base = (_status_mb("VmRSS") if self.reset else None) or _maxrss_mb()

    def read(self) -> dict:
        peak = (_status_mb("VmHWM") if self.reset else None) or _maxrss_mb()
        return {"peak_rss_mb": peak, "rss_growth_mb": peak - self.base, "peak_reset": self.reset,
                "max_child_peak_rss_mb": _maxrss_mb(resource.RUSAGE_CHILDREN)}


def save_figure(fig, path: Path, dpi: int = 110) -> Path:
    """Lay out ``fig``, write it to ``path`` and close it (pyplot keeps open figures alive)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def codec_for_k(k: int | str, num_classes: int, values: str = "float16"):
    """The codec that keeps ``k`` logits per view; ``k == "full"`` keeps every class.
    ``values``: "float16" (the default here, as the accuracy study's caches), "float32" or
    "gap<b>" (logitcache/codecs/logits.py; the library's own default is "gap8")."""
    from logitcache.codecs.logits import create_codec

    full = k == "full"
    return create_codec("full" if full else "topk", num_classes, None if full else k, values)


# --- realistic teacher logits ----------------------------------------------------------

def teacher_like_logits(n: int, num_classes: int = 1000, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(logits (n, C) float32, label (n,) int64) shaped like a trained ImageNet teacher's.

    Per view: Gaussian noise on every class (sigma 1.3), a per-view offset (logits are
    shift-invariant, real ones are not centred), a margin of about 9 nats on the true
    class, and 0-6 "confusable" classes close to it in id order (as ImageNet's related
    classes mostly are: dog breeds, ...) with margins of 2-7 nats. Mean top-1 probability
    comes out near 0.69, top-10 mass near 0.8, entropy near 2 nats: a teacher on strongly
    augmented, mixed views (bench/frontier.py records these statistics with its results).
    """
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.3, (n, num_classes)).astype(np.float32)
    z += rng.normal(0.0, 2.0, (n, 1)).astype(np.float32)
    label = rng.integers(0, num_classes, n)
    rows = np.arange(n)
    z[rows, label] += rng.normal(9.0, 2.0, n).astype(np.float32)
    for j in range(6):
        present = rng.random(n) < 0.8 ** (j + 1) * 1.2
        near = np.clip(label + rng.integers(-20, 21, n), 0, num_classes - 1)
        z[rows[present], near[present]] += rng.uniform(2.0, 7.0, int(present.sum())).astype(np.float32)
    return z, label


def mixed_view_plan(n: int, *, seed: int, mixing: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The plan of a unit of ``n`` samples as a mixing recipe makes it, rows in sample order:
    ``view_seeds`` (n,) uint64 (random 64-bit seeds) and ``partner`` (n,) int64, each
    sample's mixing partner as a position in the unit (samples paired at random; an odd
    leftover, or every sample without ``mixing``, is its own partner)."""
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)
    partner = np.arange(n, dtype=np.int64)
    if mixing:
        order = rng.permutation(n)
        m = n - n % 2
        a, b = order[0:m:2], order[1:m:2]
        partner[a], partner[b] = b, a
    return seeds, partner


def synthetic_unit(n: int, start: int, *, seed: int, mixing: bool = True) -> dict:
    """What a build writes with a unit of ``n`` samples (global indices ``start ..``) besides
    its teacher rows: ``view_seeds`` (n,) uint64 (the sampled codec draws from them), ``plan``
    (the sha256 hex of :func:`logitcache.views.plan.plan_digest`) and a ``canary`` shaped like
    logitcache/storage/canary.py's (4 sample indices, 4 sha256 hex strings of 64 characters), so
    that bytes on disk are a real build's."""
    from logitcache.storage.canary import CANARY_VIEWS
    from logitcache.views.plan import plan_digest

    seeds, partner = mixed_view_plan(n, seed=seed, mixing=mixing)
    rng = np.random.default_rng([seed, 1])
    first = rng.permutation(n)[:CANARY_VIEWS] + start
    canary = {"index": [int(i) for i in first], "sha256": [rng.bytes(32).hex() for _ in range(len(first))]}
    return {"view_seeds": seeds, "plan": plan_digest(seeds, partner), "canary": canary}


def synthetic_manifest(num_samples: int, shard_sizes: list[int], codec, recipe=None):
    """A manifest for a cache written directly with CacheWriter (no real dataset behind it)."""
    from logitcache.storage.manifest import DatasetInfo, Manifest
    from logitcache.views.augment import create_recipe

    recipe = recipe or create_recipe("vanillakd_a2_norepeat")
    shards = [f"train-{i:06d}.tar" for i in range(len(shard_sizes))]
    info = DatasetInfo(name="bench-synthetic", split="train", fingerprint=f"bench-{num_samples}", num_samples=num_samples,
                       shards=shards, shard_sizes=list(shard_sizes))
    return Manifest(teacher="bench-synthetic-teacher", teacher_weights="none", teacher_weights_sha256=None,
                    recipe=recipe, dataset=info, codec=codec, num_classes=codec.num_classes)
