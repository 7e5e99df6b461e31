"""Build throughput with a fast teacher, where rendering decides: a ResNet-18 at 32 px over
32 px views (recipe ``demo32_mix``: RandAugment + mixup/cutmix pairs), batch 64, from tar
shards of 48 px JPEGs, 20 classes (the images of bench/replay.py).

Measured side by side: the raw teacher (the same :class:`~logitcache.build.teacher.Teacher`
on a pre-made batch), the renderers' cost (a build's worker items, ``BatchDataset``, and the
main process's finishing, one thread, CPU-seconds per view), and ``build()`` whole at each
worker count. What the two stages allow:

* on a CPU the teacher's threads and the renderers share the cores. The teacher's threads
  wait for each other at every op, so cores are split whole: the teacher on c cores (c
  threads, raw rate T(c), measured for every c), the renderers on the other C - c, or the
  teacher on all C and rendering between its batches:
  ``allowed = max(max_c min(T(c), (C - c) / r), 1 / (1 / T(C) + r))`` with r the render
  CPU-seconds per view;
* on a GPU machine the stages run on different hardware: ``allowed = min(raw teacher
  views/s, workers / r)``.

Key figure ``fast_build_over_allowed`` = build views/s / allowed (best worker count tried;
0 workers is the teacher on every core with rendering between its batches).
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from .common import Ctx, sync

NUM_CLASSES = 20


def settings(ctx: Ctx) -> dict:
    return {
        "teacher": "resnet18", "recipe": "demo32_mix", "input_size": 32, "image_size": 48,
        "num_classes": NUM_CLASSES, "codec": "topk", "k": 10,
        "images": ctx.pick(quick_cpu=1600, full_cpu=3200, quick_cuda=8192, full_cuda=16384, tiny=32),
        "batch_size": ctx.pick(quick_cpu=64, full_cpu=64, quick_cuda=256, full_cuda=256, tiny=8),
        "num_workers": ctx.pick(quick_cpu=[0, 2], full_cpu=[0, 1, 2], quick_cuda=[15], full_cuda=[8, 15], tiny=[1]),
    }


def _teacher(ctx: Ctx, path, recipe):
    import timm

    from logitcache.build.teacher import Teacher
    from logitcache.trainer.checkpoint import save_student

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model("resnet18", pretrained=False, num_classes=NUM_CLASSES)
    save_student(model, path, "resnet18", NUM_CLASSES, recipe)  # saved at the recipe's 32 px: no resize
    return Teacher("resnet18", weights=str(path), num_classes=NUM_CLASSES, device=ctx.device)


def render_cpu_per_view(source, recipe, batch_size: int, n_views: int) -> float:
    """CPU-seconds per view of what rendering costs a build: worker items + finishing, one thread."""
    from logitcache.build.units import UnitBatches
    from logitcache.views.loader import BatchDataset
    from logitcache.views.render import finish_batch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bounds = np.array([(s.start, s.stop) for s in source.shards], dtype=np.int64)
        units = UnitBatches(recipe, bounds, np.zeros(len(bounds), np.int64), np.arange(len(bounds)), batch_size)
        ds = BatchDataset(source, recipe)
        finish_batch(ds[units[0]], recipe)  # builds the transform, warms the page cache
        views, t0 = 0, time.process_time()
        for j in range(len(units)):
            views += len(finish_batch(ds[units[j]], recipe)["index"])
            if views >= n_views:
                break
        return (time.process_time() - t0) / views
    finally:
        torch.set_num_threads(threads)


def run_fast(ctx: Ctx) -> dict:
    from logitcache.build.loop import build
    from logitcache.codecs.logits import create_codec
    from logitcache.data.source import open_source
    from logitcache.views.augment import create_recipe

    from .replay import make_images, make_shards

    s = settings(ctx)
    folder = make_images(ctx.workdir / "fast_folder", s["images"], s["image_size"])
    source = open_source(make_shards(folder, ctx.workdir / "fast_shards"), "train")
    recipe = create_recipe(s["recipe"])
    teacher = _teacher(ctx, ctx.workdir / "fast_teacher.safetensors", recipe)
    codec = create_codec(s["codec"], NUM_CLASSES, s["k"])
    bs, views = s["batch_size"], len(source)
    batch = torch.randn(bs, 3, s["input_size"], s["input_size"], generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        teacher(batch, recipe.mean, recipe.std)

    def raw_vps(threads: int) -> float:
        n, before = max(1, views // bs), torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            teacher(batch, recipe.mean, recipe.std)
            sync(ctx.device)
            t0 = time.perf_counter()
            for _ in range(n):
                teacher(batch, recipe.mean, recipe.std)
            sync(ctx.device)
            return n * bs / (time.perf_counter() - t0)
        finally:
            torch.set_num_threads(before)

    render_s = render_cpu_per_view(source, recipe, bs, ctx.pick(quick_cpu=512, full_cpu=1024, tiny=16))
    cores = os.cpu_count() or 1
    full = torch.get_num_threads()
    counts = [full] if ctx.cuda else sorted({*range(1, cores), full})
    passes: list[dict[int, float]] = [{c: raw_vps(c) for c in counts}]
    builds = []
    for w in s["num_workers"]:
        t0 = time.perf_counter()
        report = build(source, dataset_name="fast32", teacher=teacher, recipe=recipe, codec=codec,
                       url=str(ctx.workdir / f"fast_cache_w{w}.zarr"), epochs=[0], batch_size=bs, num_workers=w,
                       progress=False)
        wall = time.perf_counter() - t0
        passes.append({c: raw_vps(c) for c in counts})
        raw = {c: (passes[-2][c] + passes[-1][c]) / 2 for c in counts}  # the raw passes either side of this build
        if ctx.cuda:
            allowed = min(raw[full], w / render_s)
        else:
            split = max((min(raw[c], (cores - c) / render_s) for c in counts if c < cores), default=0.0)
            allowed = max(split, 1 / (1 / raw[full] + render_s))
        builds.append({"num_workers": w, "views_per_s": report.views / wall, "raw_teacher_views_per_s": raw[full],
                       "raw_teacher_views_per_s_by_threads": raw,
                       "allowed_views_per_s": allowed, "build_over_allowed": report.views / wall / allowed,
                       "build_over_raw_teacher": report.views / wall / raw[full], "bound_by": report.bound_by,
                       "report_render_views_per_s": report.render_views_per_s,
                       "report_teacher_views_per_s": report.teacher_views_per_s})
    best = max(builds, key=lambda b: b["build_over_allowed"])
    return {"settings": {**s, "views": views, "cores": cores},
            "results": {"render_cpu_ms_per_view": 1000 * render_s, "raw_teacher_passes": passes, "builds": builds},
            "summary": {"fast_build_over_allowed": best["build_over_allowed"],
                        "fast_build_views_per_s": best["views_per_s"],
                        "fast_raw_teacher_views_per_s": best["raw_teacher_views_per_s"],
                        "fast_render_ms_per_view": 1000 * render_s}}


def markdown_fast(data: dict) -> str:
    s, r = data["settings"], data["results"]
    model = ("a GPU machine: the slower of the two stages, min(raw teacher, workers / render CPU-s per view)"
             if data.get("cuda") else
             f"{s['cores']} CPU cores split whole between the teacher's threads and the renderers (the best split, "
             f"or the teacher on every core with rendering between its batches; bench/build_fast.py)")
    lines = [
        f"**Fast teacher**: `{s['teacher']}` at {s['input_size']} px (random weights), recipe `{s['recipe']}`, "
        f"{s['views']} views from {s['image_size']} px JPEGs in tar shards, batch {s['batch_size']}. Rendering "
        f"costs **{r['render_cpu_ms_per_view']:.2f} CPU-ms per view** (worker item + finishing, one thread). "
        f"Allowed rate: {model}.",
        "",
        "| workers | build views/s | raw teacher views/s by threads | allowed views/s | **build / allowed** | "
        "build / raw teacher | the build's own summary says |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for b in r["builds"]:
        by = ", ".join(f"{c}: {v:,.0f}" for c, v in b.get("raw_teacher_views_per_s_by_threads", {}).items())
        lines.append(f"| {b['num_workers']} | {b['views_per_s']:,.0f} | {by} | "
                     f"{b['allowed_views_per_s']:,.0f} | **{b['build_over_allowed']:.3f}** | "
                     f"{b['build_over_raw_teacher']:.3f} | rendering {b['report_render_views_per_s']:,.0f}, teacher "
                     f"{b['report_teacher_views_per_s']:,.0f} views/s: {b['bound_by']} bounds |")
    lines += ["", "Target (issue 19): build / allowed >= 0.9."]
    return "\n".join(lines)
