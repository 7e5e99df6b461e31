"""Build throughput: ``logitcache.build.loop.build`` against the bare teacher on the same machine.

``build`` is timed whole (DataLoader workers decoding PNGs and rendering RandAugment +
mixup/cutmix views, the teacher, the codec, the zarr writes). The reference is the same
:class:`~logitcache.build.teacher.Teacher` object called on pre-made tensors of the same batch and
input size for the same number of batches (``inference_mode``, same threads), timed
before, between and after the builds; each build is compared with the mean of the raw
passes on either side of it (cancels slow drift; their spread is reported).

Key figure ``build_over_raw_teacher`` = build views/s (views / wall time of the whole
``build()`` call) / raw teacher views/s (best worker count; every count tried is reported). Where the time goes: the teacher is wrapped in a
thin timing proxy (the same object underneath), so each build's wall time splits into
teacher calls, the wait before the first batch, and the gaps between calls (waiting for
views + checking + encoding + writing); rendering, encoding and writing are also timed
on their own.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np
import torch

from .build_fast import markdown_fast, run_fast
from .common import Ctx, PeakRSS, save_figure, sync

NUM_CLASSES = 1000
IMAGE_SIZE = 256  # stored PNGs; views are 224 px random-resized crops


def settings(ctx: Ctx) -> dict:
    return {
        "teacher": "resnet18" if ctx.tiny else "resnet152",
        "recipe": "vanillakd_a2_norepeat",
        "codec": "topk",
        "k": 10,
        "input_size": 224,
        "image_size": IMAGE_SIZE,
        "num_classes": NUM_CLASSES,
        "shards": 2,
        "images": ctx.pick(quick_cpu=128, full_cpu=256, quick_cuda=2048, full_cuda=8192, tiny=8),
        "batch_size": ctx.pick(quick_cpu=16, full_cpu=16, quick_cuda=128, full_cuda=128, tiny=2),
        "num_workers": ctx.pick(quick_cpu=[0, 1], full_cpu=[2, 1, 0], quick_cuda=[8, 16], full_cuda=[8, 16]),
        "epochs": 1,
    }


# --- fixtures ----------------------------------------------------------------------------

def make_dataset(root, n: int, *, shards: int, seed: int = 0, unique: int = 256):
    """``n`` structured 256x256 PNGs (the synth generator's shapes/textures) with random labels
    out of 1000 classes, in ``shards`` tar shards. At most ``unique`` distinct images are
    drawn (about 0.1 s each); beyond that their PNG bytes repeat under new keys (new views)."""
    from logitcache.data.shards import png_bytes, write_dataset
    from logitcache.data.synth import render_image

    pngs: list[bytes] = []

    def samples():
        for i in range(n):
            rng = np.random.default_rng([seed, i])
            label = int(rng.integers(NUM_CLASSES))
            if i < unique:
                pngs.append(png_bytes(render_image(label % 128, rng, IMAGE_SIZE)))
            yield f"img{i:06d}", pngs[i % unique], label

    classes = [f"class{i:04d}" for i in range(NUM_CLASSES)]
    return write_dataset(root, "bench224", classes, {"train": samples()}, shard_size=math.ceil(n / shards))


def make_teacher_weights(path, name: str, input_size: int = 224) -> str:
    """A random-init timm model saved as logitcache writes a trained one (safetensors + metadata)."""
    import timm
    from logitcache.trainer.checkpoint import save_student

    from logitcache.views.augment import create_recipe

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES)
    save_student(model, path, name, NUM_CLASSES, create_recipe("vanillakd_a2_norepeat", input_size=input_size))
    return str(path)


class TimedTeacher:
    """The same Teacher, with the start and end of every call recorded (device work included)."""

    def __init__(self, teacher):
        self._teacher = teacher
        self.calls: list[tuple[float, float, int]] = []

    def __getattr__(self, name):
        return getattr(self._teacher, name)

    def __call__(self, views, src_mean, src_std):
        t0 = time.perf_counter()
        out = self._teacher(views, src_mean, src_std)
        sync(self._teacher.device)
        self.calls.append((t0, time.perf_counter(), len(views)))
        return out


# --- measurements --------------------------------------------------------------------------

def raw_teacher(teacher, batch: torch.Tensor, n_batches: int, mean, std) -> float:
    """Seconds for ``n_batches`` teacher calls on the pre-made ``batch``."""
    sync(teacher.device)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        teacher(batch, mean, std)
        sync(teacher.device)
    return time.perf_counter() - t0


def timed_build(ctx: Ctx, source, teacher, recipe, codec, *, batch_size: int, num_workers: int, url: str) -> dict:
    from logitcache.build.loop import build

    proxy = TimedTeacher(teacher)
    memory = PeakRSS()
    t0 = time.perf_counter()
    report = build(source, dataset_name="bench224", teacher=proxy, recipe=recipe, codec=codec, url=url, epochs=[0],
                   batch_size=batch_size, num_workers=num_workers, progress=False)
    t1 = time.perf_counter()
    calls = proxy.calls
    teacher_s = sum(e - s for s, e, _ in calls)
    gaps = [calls[i + 1][0] - calls[i][1] for i in range(len(calls) - 1)]
    return {
        "num_workers": num_workers,
        "views": report.views,
        "teacher_calls": len(calls),
        "seconds": report.seconds,  # BuildReport's clock: starts after the manifest and the unit plans
        "wall_seconds": t1 - t0,  # the whole build() call: what the key figure uses
        "views_per_s": report.views / (t1 - t0),
        "report_views_per_s": report.views_per_s,
        "teacher_seconds": teacher_s,
        "before_first_call_s": calls[0][0] - t0 if calls else None,
        "between_calls_s": sum(gaps),
        "max_gap_s": max(gaps) if gaps else 0.0,
        "after_last_call_s": t1 - calls[-1][1] if calls else None,
        "memory": memory.read(),  # main process (teacher already loaded) + the largest worker
    }


def render_profile(source, recipe, n_views: int) -> dict:
    """Per-view CPU cost of what a DataLoader worker does, one thread (as in a worker):
    a whole batch of the build (``BatchDataset.__getitem__``: seeds, decode, transform to uint8,
    mixing parameters; finishing is the main process's),
    and each stage of the transform separately."""
    from logitcache.build.units import UnitBatches
    from logitcache.views.augment import (
        create_train_transform,
        derive_seed,
        mix_pair,
        mix_params,
        rng_preserved,
        seed_all,
        seeded,
    )
    from logitcache.views.loader import BatchDataset

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bounds = np.array([(s.start, s.stop) for s in source.shards], dtype=np.int64)
        units = UnitBatches(recipe, bounds, np.zeros(len(bounds), np.int64), np.arange(len(bounds)), 16)
        ds = BatchDataset(source, recipe)
        ds[units[0]]  # builds the transform
        t0 = time.perf_counter()
        views = 0
        for j in range(len(units)):
            views += len(ds[units[j]]["index"])
            if views >= n_views:
                break
        item_s = (time.perf_counter() - t0) / views

        stages = {"decode_png": 0.0}
        transform = create_train_transform(recipe)
        n = min(n_views, len(source))
        for i in range(n):
            t = time.perf_counter()
            img = source.load_image(i)
            stages["decode_png"] += time.perf_counter() - t
            with seeded(1000 + i):
                x = img
                for tf in transform.transforms:
                    t = time.perf_counter()
                    x = tf(x)
                    name = type(tf).__name__
                    stages[name] = stages.get(name, 0.0) + time.perf_counter() - t
        # per-view overheads of replay: seeding the three generators (their states are saved
        # and restored once per batch), and the pair's mixing (params + mix)
        t = time.perf_counter()
        with rng_preserved():
            for i in range(n):
                seed_all(2000 + i)
        stages["seed_all"] = time.perf_counter() - t
        pairs = [derive_seed(recipe.cache_seed, 0, "pair", j) for j in range(max(1, n // 2))] if recipe.mixes else []
        a = b = x
        t = time.perf_counter()
        for pair_seed in pairs:
            mix_pair(a, b, mix_params(recipe, pair_seed))
        stages["mix_params+mix_pair"] = (time.perf_counter() - t) * n / (2 * len(pairs)) if pairs else 0.0
    finally:
        torch.set_num_threads(threads)
    return {"item_ms_per_view": 1000 * item_s, "stage_ms_per_view": {k: 1000 * v / n for k, v in stages.items()}}


def encode_write_cost(codec, logits: torch.Tensor, unit_views: int, workdir) -> dict:
    """Seconds to encode one batch of logits, and to write one unit of ``unit_views`` views."""
    from logitcache.codecs.logits import encode
    from logitcache.storage.writer import CacheWriter

    from .common import synthetic_manifest, synthetic_unit

    seeds = np.arange(len(logits), dtype=np.uint64)  # used by the sampled codec only
    encode(codec, logits, seeds=seeds)
    t0 = time.perf_counter()
    for _ in range(5):
        encode(codec, logits, seeds=seeds)
    enc = (time.perf_counter() - t0) / 5
    reps = math.ceil(unit_views / len(logits))
    unit = synthetic_unit(unit_views, 0, seed=0)
    rows = encode(codec, logits.repeat(reps, 1)[:unit_views], seeds=unit["view_seeds"])
    writer = CacheWriter(str(workdir / "write_cost.zarr"), synthetic_manifest(unit_views, [unit_views], codec))
    writer.prepare_epochs([0])
    t0 = time.perf_counter()
    writer.write_unit(0, 0, rows, unit["plan"], canary=unit["canary"])
    return {"encode_s_per_batch": enc, "write_s_per_unit": time.perf_counter() - t0}


def run(ctx: Ctx) -> dict:
    from logitcache.build.teacher import Teacher
    from logitcache.codecs.logits import create_codec
    from logitcache.data.source import open_source
    from logitcache.views.augment import create_recipe

    s = settings(ctx)
    t_setup = time.perf_counter()
    data = make_dataset(ctx.workdir / "data224", s["images"], shards=s["shards"])
    source = open_source(str(data), "train")
    recipe = create_recipe(s["recipe"])
    weights = make_teacher_weights(ctx.workdir / "teacher.safetensors", s["teacher"])
    teacher = Teacher(s["teacher"], weights=weights, num_classes=NUM_CLASSES, device=ctx.device)
    codec = create_codec(s["codec"], NUM_CLASSES, s["k"])
    setup_s = time.perf_counter() - t_setup

    bs = s["batch_size"]
    unit_sizes = [sh.stop - sh.start for sh in source.shards]
    n_batches = sum(math.ceil(u / bs) for u in unit_sizes)  # what the build feeds the teacher
    g = torch.Generator().manual_seed(0)
    batch = torch.randn(bs, 3, s["input_size"], s["input_size"], generator=g)
    if ctx.cuda:
        batch = batch.pin_memory()
    for _ in range(2):  # warm-up (allocator, cuDNN autotuning): shared by raw and build
        teacher(batch, recipe.mean, recipe.std)
    sync(ctx.device)

    # raw, build, raw, build, raw: each build is compared with the raw passes on either side of it
    raws = [raw_teacher(teacher, batch, n_batches, recipe.mean, recipe.std)]
    builds = []
    for nw in s["num_workers"]:
        builds.append(timed_build(ctx, source, teacher, recipe, codec, batch_size=bs, num_workers=nw,
                                  url=str(ctx.workdir / f"cache_nw{nw}.zarr")))
        raws.append(raw_teacher(teacher, batch, n_batches, recipe.mean, recipe.std))
    for i, b in enumerate(builds):
        around = (raws[i] + raws[i + 1]) / 2
        b["raw_teacher_seconds_around"] = around
        b["build_over_raw_teacher"] = b["views_per_s"] / (n_batches * bs / around)
        b["teacher_slowdown_in_build"] = (b["teacher_seconds"] / b["teacher_calls"]) / (around / n_batches)
    raw_s = sum(raws) / len(raws)
    raw_vps = n_batches * bs / raw_s  # every batch full here; the build's may be partial

    prof = render_profile(source, recipe, ctx.pick(quick_cpu=32, full_cpu=64, quick_cuda=64, full_cuda=128, tiny=4))
    logits = teacher(batch, recipe.mean, recipe.std).cpu()
    cost = encode_write_cost(codec, logits, max(unit_sizes), ctx.workdir)
    views = sum(unit_sizes)
    cores = os.cpu_count() or 1
    render_total = prof["item_ms_per_view"] / 1000 * views
    other = cost["encode_s_per_batch"] * n_batches + cost["write_s_per_unit"] * len(unit_sizes)
    # If the teacher's threads and the workers shared the cores perfectly (CPU only):
    predicted = raw_s / (raw_s + render_total / cores + other) if not ctx.cuda else None

    best = max(builds, key=lambda b: b["build_over_raw_teacher"])
    fast = run_fast(ctx)
    fast["cuda"] = ctx.cuda
    return {
        "settings": {**s, "views": views, "teacher_batches": n_batches, "setup_seconds": setup_s},
        "results": {
            "raw_teacher": {"seconds_each": raws, "seconds": raw_s, "views_per_s": raw_vps,
                            "spread": (max(raws) - min(raws)) / raw_s},
            "builds": builds,
            "render": prof,
            "encode_write": cost,
            "cpu_model": {"render_cpu_seconds": render_total, "encode_write_seconds": other,
                          "predicted_build_over_raw": predicted},
            "best_num_workers": best["num_workers"],
            "fast_teacher": fast,
        },
        "summary": {
            "build_over_raw_teacher": best["build_over_raw_teacher"],
            **{f"build_over_raw_teacher_nw{b['num_workers']}": b["build_over_raw_teacher"] for b in builds},
            "build_views_per_s": best["views_per_s"],
            "raw_teacher_views_per_s": raw_vps,
            "render_ms_per_view": prof["item_ms_per_view"],
            "teacher_slowdown_in_build": best["teacher_slowdown_in_build"],
            **fast["summary"],
        },
    }


# --- report ------------------------------------------------------------------------------

def markdown(data: dict) -> str:
    s, r = data["settings"], data["results"]
    raw = r["raw_teacher"]
    lines = [
        f"Teacher `{s['teacher']}` (random weights), recipe `{s['recipe']}`, {s['codec']} k={s['k']}, "
        f"{s['views']} views of {s['input_size']} px from {s['image_size']} px PNGs in {s['shards']} shards, "
        f"batch {s['batch_size']}, {s['teacher_batches']} teacher batches per build.",
        "",
        f"Raw teacher (pre-made tensors, same Teacher object), timed before, between and after the builds: "
        f"**{raw['views_per_s']:.2f} views/s** (passes differ by up to {100 * raw['spread']:.1f}%; each build "
        f"is compared with the mean of the raw passes on either side of it).",
        "",
        "| num_workers | build views/s | **build / raw teacher** | teacher time | before 1st batch | between batches |"
        " after last | teacher slowdown in build | peak RSS (growth) | largest worker |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b in r["builds"]:
        m = b.get("memory", {})
        mem = f"{m['peak_rss_mb']:,.0f} MB (+{m['rss_growth_mb']:,.0f})" if m else "-"
        worker = f"{m['max_child_peak_rss_mb']:,.0f} MB" if m and b["num_workers"] else "-"
        lines.append(
            f"| {b['num_workers']} | {b['views_per_s']:.2f} | **{b['build_over_raw_teacher']:.3f}** | "
            f"{b['teacher_seconds']:.1f} s | {b['before_first_call_s']:.2f} s | {b['between_calls_s']:.2f} s | "
            f"{b['after_last_call_s']:.2f} s | x{b['teacher_slowdown_in_build']:.2f} | {mem} | {worker} |"
        )
    prof = r["render"]
    stages = ", ".join(f"{k} {v:.1f}" for k, v in prof["stage_ms_per_view"].items())
    ew = r["encode_write"]
    lines += [
        "",
        f"Worker cost, one thread: **{prof['item_ms_per_view']:.1f} ms per view** (whole item incl. mixing); "
        f"stages (ms/view): {stages}. Encode {1000 * ew['encode_s_per_batch']:.1f} ms per batch, "
        f"zarr write {1000 * ew['write_s_per_unit']:.1f} ms per unit.",
        "",
        "Memory: peak RSS of the build process over the build (the teacher is already loaded: the growth is "
        "the build's own), and the largest peak of any DataLoader worker so far (the kernel keeps one "
        "lifetime figure for all finished children).",
    ]
    cm = r["cpu_model"]
    if cm["predicted_build_over_raw"] is not None:
        lines += [
            "",
            f"CPU budget model: rendering needs {cm['render_cpu_seconds']:.1f} CPU-s for this build, encode+write "
            f"{cm['encode_write_seconds']:.2f} s; if workers and teacher threads shared the cores perfectly the "
            f"ratio would be {cm['predicted_build_over_raw']:.3f}. 'Teacher slowdown in build' is the mean "
            f"teacher call inside the build over the raw one: the workers' rendering steals cores from the "
            f"teacher's threads.",
        ]
    if "fast_teacher" in r:
        lines += ["", markdown_fast(r["fast_teacher"])]
    return "\n".join(lines)


def plot(data: dict, outdir) -> list[str]:
    import matplotlib.pyplot as plt

    r = data["results"]
    names = ["raw teacher"] + [f"build nw={b['num_workers']}" for b in r["builds"]]
    vals = [r["raw_teacher"]["views_per_s"]] + [b["views_per_s"] for b in r["builds"]]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(names, vals, color=["#888"] + ["#2a7"] * len(r["builds"]))
    ax.set_ylabel("views/s")
    ax.set_title(f"build vs raw teacher ({data['settings']['teacher']}, {data['meta']['device']})")
    return [save_figure(fig, outdir / "build_throughput.png").name]
