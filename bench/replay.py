"""Replay loader against timm's own: views/s of a training epoch's loader, side by side.

The same images (an image folder of JPEGs, what timm's ``ImageDataset`` reads; logitcache
also from the same images as tar shards), the same recipe (RandomResizedCrop, flip,
RandAugment, mixup/cutmix per pair) and the same worker count. timm:
``timm.data.create_loader(..., use_prefetcher=True)`` with ``FastCollateMixup`` (views stay
uint8 through the workers, mixed in the collate, normalised by the prefetcher on the
device), persistent workers. logitcache: ``logitcache.replay.batches.create_train_loader``,
the trainer's path (a new DataLoader per epoch, views rendered from their seeds and mixed in
the workers, plus the cached rows of every view: a loaded epoch of random top-k rows).

Each round times one epoch of each loader back to back (after one warm-up epoch each);
``views_per_s`` is views / wall seconds from asking for the first batch to receiving the
last (so logitcache's loader start-up counts). The key figure ``ours_over_timm`` is the
median over rounds of the ratio within a round.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from .common import Ctx

NUM_CLASSES = 20


def settings(ctx: Ctx) -> dict:
    return {
        "sizes": {"32": {"image": 48, "recipe": "demo32_mix",
                         "images": ctx.pick(quick_cpu=1600, full_cpu=3200, tiny=32)},
                  "224": {"image": 256, "recipe": "vanillakd_a2_norepeat",
                          "images": ctx.pick(quick_cpu=192, full_cpu=768, quick_cuda=1024, full_cuda=2048, tiny=8)}},
        "workers": ctx.pick(quick_cpu=[2], full_cpu=[1, 2], quick_cuda=[8], full_cuda=[8, 15], tiny=[1]),
        "batch_size": ctx.pick(quick_cpu=64, full_cpu=64, quick_cuda=128, full_cuda=128, tiny=4),
        "rounds": ctx.pick(quick_cpu=3, full_cpu=5, tiny=1),
    }


def make_images(root, n: int, size: int) -> str:
    """``n`` synth images (the embedded generator's shapes and textures) of ``size`` px as
    JPEGs in an image folder of NUM_CLASSES classes; returns the folder."""
    import io


    from logitcache.data.synth import render_image

    for i in range(n):
        label = i % NUM_CLASSES
        rng = np.random.default_rng([7, i])
        folder = root / f"class{label:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        render_image(label, rng, size).save(buf, format="JPEG", quality=90)
        (folder / f"img{i:06d}.jpg").write_bytes(buf.getvalue())
    return str(root)


def make_shards(folder: str, root) -> str:
    """The same images as a dataset root of tar shards (logitcache's own input format)."""
    from pathlib import Path

    from logitcache.data.shards import write_dataset

    classes = sorted(p.name for p in Path(folder).iterdir())
    samples = ((p.stem, p.read_bytes(), c) for c, name in enumerate(classes)
               for p in sorted((Path(folder) / name).iterdir()))
    write_dataset(root, "replay", classes, {"train": samples}, shard_size=500)
    return str(root)


def random_rows(source, recipe, epoch: int):
    """A loaded epoch of random top-10 rows for ``source`` (what the trainer gathers per batch),
    with each unit's plan digest as this code plans it (so the loader's plan check passes)."""
    from logitcache.storage.reader import EpochArrays
    from logitcache.views.plan import unit_plan_digest

    n, rng = len(source), np.random.default_rng(0)
    plans = [unit_plan_digest(recipe, epoch, s, sh.start, sh.stop, [source.key(i) for i in range(sh.start, sh.stop)])
             for s, sh in enumerate(source.shards)]
    return EpochArrays(epoch, rng.integers(0, NUM_CLASSES, (n, 10), dtype=np.uint16),
                       rng.integers(0, 255, (n, 10), dtype=np.uint8), rng.random(n, dtype=np.float32), plans)


def ours(source, recipe, *, batch_size: int, workers: int):
    """An epoch function: logitcache's replay loader over ``source``, as the trainer makes it."""
    from logitcache.replay.batches import create_train_loader, epoch_groups
    from logitcache.replay.rows import CachedRows

    groups = epoch_groups(source, recipe, 0)
    rows = CachedRows(random_rows(source, recipe, 0), np.array(source.labels()))

    kept = {}

    def epoch(e: int) -> int:
        kept["loader"] = create_train_loader(source, recipe, 0, groups, rows, batch_size=batch_size, seed=0,
                                             epoch=e, num_workers=workers, reuse=kept.get("loader"))
        return sum(len(b["index"]) for b in kept["loader"])

    return epoch


def timm_loader(folder: str, recipe, *, batch_size: int, workers: int):
    """An epoch function: timm's create_loader with its prefetcher and FastCollateMixup."""
    from timm.data import FastCollateMixup, ImageDataset, create_loader

    collate = None
    if recipe.mixes:
        collate = FastCollateMixup(mixup_alpha=recipe.mixup_alpha, cutmix_alpha=recipe.cutmix_alpha,
                                   prob=recipe.mix_prob, switch_prob=recipe.switch_prob, mode="pair",
                                   label_smoothing=0.0, num_classes=NUM_CLASSES)
    loader = create_loader(
        ImageDataset(folder), input_size=(3, recipe.input_size, recipe.input_size), batch_size=batch_size,
        is_training=True, scale=recipe.scale, ratio=recipe.ratio, hflip=recipe.hflip, color_jitter=recipe.color_jitter,
        auto_augment=recipe.auto_augment, interpolation=recipe.interpolation, mean=recipe.mean, std=recipe.std,
        re_prob=recipe.re_prob, re_mode=recipe.re_mode, re_count=recipe.re_count, num_workers=workers,
        collate_fn=collate, device=torch.device("cpu"), use_prefetcher=True, persistent_workers=True)

    def epoch(e: int) -> int:
        return sum(len(x) for x, _ in loader)

    return epoch


def _rate(fn, e: int) -> float:
    t0 = time.perf_counter()
    views = fn(e)
    return views / (time.perf_counter() - t0)


def run(ctx: Ctx) -> dict:
    from logitcache.data.source import open_source
    from logitcache.views.augment import create_recipe

    s = settings(ctx)
    results = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the main process only moves batches, as in training (timm normalises here)
    try:
        for size, cfg in s["sizes"].items():
            folder = make_images(ctx.workdir / f"folder{size}", cfg["images"], cfg["image"])
            shards = make_shards(folder, ctx.workdir / f"shards{size}")
            recipe = create_recipe(cfg["recipe"])
            for w in s["workers"]:
                fns = {"timm": timm_loader(folder, recipe, batch_size=s["batch_size"], workers=w),
                       "ours_folder": ours(open_source(folder), recipe, batch_size=s["batch_size"], workers=w),
                       "ours_shards": ours(open_source(shards, "train"), recipe, batch_size=s["batch_size"],
                                           workers=w)}
                for fn in fns.values():
                    fn(0)  # warm-up: timm's persistent workers start, files in the page cache
                rates = {k: [] for k in fns}
                for r in range(s["rounds"]):
                    for k, fn in fns.items():
                        rates[k].append(_rate(fn, 1 + r))
                ratio = [o / t for o, t in zip(rates["ours_folder"], rates["timm"])]
                ratio_shards = [o / t for o, t in zip(rates["ours_shards"], rates["timm"])]
                results[f"{size}px_w{w}"] = {
                    "views_per_s": {k: float(np.median(v)) for k, v in rates.items()}, "rounds": rates,
                    "ours_over_timm": float(np.median(ratio)), "ours_shards_over_timm": float(np.median(ratio_shards)),
                }
    finally:
        torch.set_num_threads(threads)
    summary = {}
    for name, r in results.items():
        summary[f"ours_over_timm_{name}"] = r["ours_over_timm"]
        summary[f"ours_shards_over_timm_{name}"] = r["ours_shards_over_timm"]
        summary[f"timm_views_per_s_{name}"] = r["views_per_s"]["timm"]
        summary[f"ours_views_per_s_{name}"] = r["views_per_s"]["ours_folder"]
    return {"settings": s, "results": results, "summary": summary}


def markdown(data: dict) -> str:
    s, r = data["settings"], data["results"]
    images = ", ".join(f"{c['images']} of {c['image']} px for the {k} px recipe `{c['recipe']}`"
                       for k, c in s["sizes"].items())
    lines = [
        f"Loader views/s over one epoch, side by side (median of {s['rounds']} rounds; batch {s['batch_size']}). "
        f"Images: {images} (JPEG, {NUM_CLASSES} classes). timm: `create_loader` + prefetcher + `FastCollateMixup`, "
        "persistent workers. logitcache: `create_train_loader` (the trainer's), from the same image folder and from "
        "the same images as tar shards, with cached rows.",
        "",
        "| views | workers | timm views/s | logitcache views/s (folder) | ours / timm (folder) | "
        "ours / timm (tar shards) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, x in r.items():
        size, w = name.split("px_w")
        v = x["views_per_s"]
        lines.append(f"| {size} px | {w} | {v['timm']:,.0f} | {v['ours_folder']:,.0f} | "
                     f"**{x['ours_over_timm']:.2f}** | {x['ours_shards_over_timm']:.2f} |")
    lines += ["", "Target (issue 19): ours / timm >= 1.0 at 32 px and 224 px with 2 workers."]
    return "\n".join(lines)


def plot(data: dict, outdir) -> list[str]:
    """No figure: the table says it all."""
    return []
