"""Whole training epochs, loader included: ``logitcache train`` against the same epoch in
timm's own loop, side by side on the same images, recipe, student and worker count.

* CE: ``logitcache train`` with no teacher term (its ``epoch_seconds``: loader + steps) vs
  timm's loop: ``timm.data.create_loader`` (prefetcher, ``FastCollateMixup``, persistent
  workers) + the same student step (forward, soft-target CE on the mixed targets, AdamW).
* KD: ``logitcache train --kd kd`` from a cache of the teacher's logits vs timm's own online
  KD, ``timm.task.LogitDistillationTask`` (the teacher runs on every view) with timm's loader.

Images: 48 px JPEGs of the embedded generator in an image folder (bench/replay.py), 20 classes;
recipe ``demo32_mix`` (RandAugment, mixup/cutmix pairs); student ``test_resnet``, teacher
ResNet-18 at 32 px (random weights: speed only). Every run trains ``epochs`` epochs and the
first is left out (warm-up); figures are medians over the rest and over rounds.

Key figures: ``ce_epoch_over_timm`` (ours / timm, target <= 1.05) and
``kd_speedup_over_ideal`` = (timm online KD / ours cached KD) / (timm online KD / timm CE),
the share of the teacher's cost that the cache removes (target >= 0.9).
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from .common import Ctx

NUM_CLASSES = 20


def settings(ctx: Ctx) -> dict:
    return {
        "recipe": "demo32_mix", "student": "test_resnet", "teacher": "resnet18", "image_size": 48,
        "images": ctx.pick(quick_cpu=1600, full_cpu=3200, quick_cuda=16384, full_cuda=32768, tiny=32),
        "batch_size": ctx.pick(quick_cpu=64, full_cpu=64, quick_cuda=256, full_cuda=256, tiny=8),
        "workers": ctx.pick(quick_cpu=2, full_cpu=2, quick_cuda=15, full_cuda=15, tiny=1),
        "epochs": ctx.pick(quick_cpu=3, full_cpu=4, tiny=2),
        "rounds": ctx.pick(quick_cpu=1, full_cpu=2, tiny=1),
        "lr": 1e-3,
    }


def _data(ctx: Ctx, s: dict):
    from .replay import make_images

    root = ctx.workdir / "epoch_data"
    make_images(root / "train", s["images"], s["image_size"])
    make_images(root / "val", 64 if not ctx.tiny else 8, s["image_size"])
    return root


def _build_cache(ctx: Ctx, s: dict, root) -> str:
    import timm

    from logitcache.build.loop import build
    from logitcache.build.teacher import Teacher
    from logitcache.codecs.logits import create_codec
    from logitcache.data.source import open_source
    from logitcache.trainer.checkpoint import save_student
    from logitcache.views.augment import create_recipe

    recipe = create_recipe(s["recipe"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model(s["teacher"], num_classes=NUM_CLASSES)
    weights = ctx.workdir / "epoch_teacher.safetensors"
    save_student(model, weights, s["teacher"], NUM_CLASSES, recipe)
    teacher = Teacher(s["teacher"], weights=str(weights), num_classes=NUM_CLASSES, device=ctx.device)
    url = str(ctx.workdir / "epoch_cache.zarr")
    build(open_source(str(root), "train"), dataset_name="epoch", teacher=teacher, recipe=recipe,
          codec=create_codec("topk", NUM_CLASSES, 10), url=url, epochs=list(range(s["epochs"])),
          batch_size=s["batch_size"], num_workers=s["workers"], progress=False)
    return url


def ours(ctx: Ctx, s: dict, root, cache: str | None, tag: str) -> list[float]:
    """Epoch seconds of ``logitcache train`` (CE without a cache, KD from ``cache``)."""
    from logitcache.trainer.config import TrainConfig
    from logitcache.trainer.losses import LossConfig
    from logitcache.trainer.train import train

    out = ctx.workdir / f"epoch_run_{tag}"
    cfg = TrainConfig(data=str(root), student=s["student"], out=str(out), cache=cache, recipe=s["recipe"],
                      epochs=s["epochs"], batch_size=s["batch_size"], lr=s["lr"], warmup_epochs=0,
                      loss=LossConfig(kind="kd" if cache else "none"), num_workers=s["workers"],
                      device=ctx.device.type, tensorboard=False, progress=False)
    train(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["epoch_seconds"] for r in rows]


def timm_loop(ctx: Ctx, s: dict, root, kd: bool) -> list[float]:
    """Epoch seconds of timm's loader + the student step (``kd``: timm's LogitDistillationTask)."""
    import timm
    from timm.data import FastCollateMixup, ImageDataset, create_loader
    from timm.loss import SoftTargetCrossEntropy
    from timm.task import LogitDistillationTask

    from logitcache.views.augment import create_recipe

    r = create_recipe(s["recipe"])
    collate = FastCollateMixup(mixup_alpha=r.mixup_alpha, cutmix_alpha=r.cutmix_alpha, prob=r.mix_prob,
                               switch_prob=r.switch_prob, mode="pair", label_smoothing=0.0, num_classes=NUM_CLASSES)
    loader = create_loader(
        ImageDataset(str(root / "train")), input_size=(3, r.input_size, r.input_size), batch_size=s["batch_size"],
        is_training=True, scale=r.scale, ratio=r.ratio, hflip=r.hflip, color_jitter=r.color_jitter,
        auto_augment=r.auto_augment, interpolation=r.interpolation, mean=r.mean, std=r.std, num_workers=s["workers"],
        collate_fn=collate, device=ctx.device, use_prefetcher=True, persistent_workers=True)
    torch.manual_seed(0)
    student = timm.create_model(s["student"], num_classes=NUM_CLASSES).to(ctx.device).train()
    opt = torch.optim.AdamW(student.parameters(), lr=s["lr"], weight_decay=0.05)
    criterion = SoftTargetCrossEntropy()
    task = None
    if kd:
        teacher = timm.create_model(s["teacher"], num_classes=NUM_CLASSES).to(ctx.device).eval()
        cfg = {"mean": tuple(r.mean), "std": tuple(r.std)}
        student.pretrained_cfg = {**student.pretrained_cfg, **cfg}
        teacher.pretrained_cfg = {**teacher.pretrained_cfg, **cfg}
        task = LogitDistillationTask(student, teacher, criterion=criterion, temperature=1.0, device=ctx.device,
                                     verbose=False)
    seconds = []
    for _ in range(s["epochs"]):
        t0 = time.perf_counter()
        for x, target in loader:
            loss = task(x, target)["loss"] if task is not None else criterion(student(x), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if ctx.cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
    return seconds


def run(ctx: Ctx) -> dict:
    s = settings(ctx)
    root = _data(ctx, s)
    cache = _build_cache(ctx, s, root)
    runs = {"timm_ce": [], "ours_ce": [], "timm_kd": [], "ours_kd": []}
    for r in range(s["rounds"]):
        runs["timm_ce"].append(timm_loop(ctx, s, root, kd=False))
        runs["ours_ce"].append(ours(ctx, s, root, None, f"ce{r}"))
        runs["timm_kd"].append(timm_loop(ctx, s, root, kd=True))
        runs["ours_kd"].append(ours(ctx, s, root, cache, f"kd{r}"))
    med = {k: statistics.median([x for run in v for x in run[1:]]) for k, v in runs.items()}
    ideal = med["timm_kd"] / med["timm_ce"]
    speedup = med["timm_kd"] / med["ours_kd"]
    per_epoch = s["images"] // s["batch_size"] * s["batch_size"]
    return {
        "settings": s, "results": {"epoch_seconds": runs, "median_epoch_seconds": med, "views_per_epoch": per_epoch},
        "summary": {"ce_epoch_over_timm": med["ours_ce"] / med["timm_ce"], "kd_speedup_over_online": speedup,
                    "kd_ideal_speedup": ideal, "kd_speedup_over_ideal": speedup / ideal,
                    "ours_ce_epoch_views_per_s": per_epoch / med["ours_ce"],
                    "timm_ce_epoch_views_per_s": per_epoch / med["timm_ce"]},
    }


def markdown(data: dict) -> str:
    s, r, m = data["settings"], data["results"], data["summary"]
    med = r["median_epoch_seconds"]
    return "\n".join([
        f"One training epoch of {r['views_per_epoch']:,} views, loader included (median of epochs 2-{s['epochs']} "
        f"over {s['rounds']} round(s)): student `{s['student']}`, recipe `{s['recipe']}`, {s['image_size']} px JPEGs, "
        f"batch {s['batch_size']}, {s['workers']} workers, AdamW. timm: `create_loader` + prefetcher + "
        f"`FastCollateMixup`, persistent workers; online KD by `timm.task.LogitDistillationTask` with teacher "
        f"`{s['teacher']}` at 32 px. logitcache: `train` (CE: no teacher term; KD: from a cache of the same teacher).",
        "",
        "| epoch | timm | logitcache | ratio |",
        "|---|---:|---:|---:|",
        f"| CE | {med['timm_ce']:.2f} s | {med['ours_ce']:.2f} s | **{m['ce_epoch_over_timm']:.3f}** (ours / timm) |",
        f"| KD (timm online, ours from the cache) | {med['timm_kd']:.2f} s | {med['ours_kd']:.2f} s | "
        f"{m['kd_speedup_over_online']:.2f}x faster; ideal (timm online / timm CE) {m['kd_ideal_speedup']:.2f}x: "
        f"**{m['kd_speedup_over_ideal']:.3f} of ideal** |",
        "",
        "Targets (issue 19): CE epoch ours / timm <= 1.05; cached KD speed-up >= 0.9 x ideal.",
    ])


def plot(data: dict, outdir) -> list[str]:
    """No figure: the table says it all."""
    return []
