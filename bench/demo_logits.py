"""The demo teacher's logits for bench/frontier.py: a trained teacher on augmented views of
the embedded synthetic dataset (128 classes, 32 px, recipe ``demo32``, epoch-0 view seeds).

The demo's teacher (``demo_out/teacher/model.safetensors`` with ``demo_out/data``) when
``make demo`` has been run, otherwise a tiny teacher trained here in a few seconds (timm
``test_resnet``, AdamW, on eval-transformed training images with flips; its val top-1 is
recorded).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .common import Ctx

REPO = Path(__file__).resolve().parent.parent
DEMO_TEACHER = REPO / "demo_out" / "teacher" / "model.safetensors"
DEMO_DATA = REPO / "demo_out" / "data"
RECIPE = "demo32"
FALLBACK_MODEL = "test_resnet"


def demo_teacher_present() -> bool:
    return DEMO_TEACHER.is_file() and (DEMO_DATA / "dataset.json").is_file()


def _eval_tensors(source, recipe) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of ``source`` through the eval transform (N, 3, H, W) float32, and the
    labels (N,) int64, as one batch."""
    from logitcache.trainer.data import create_eval_loader

    return next(iter(create_eval_loader(source, recipe, batch_size=len(source), num_workers=0)))


def train_tiny_teacher(ctx: Ctx, data: str, recipe, name: str, epochs: int) -> tuple[str, dict]:
    """A quickly trained teacher saved like logitcache saves one; returns (weights path, info)."""
    import timm
    from logitcache.trainer.checkpoint import save_student

    from logitcache.data.source import open_source

    train_src, val_src = open_source(data, "train"), open_source(data, "val")
    x, y = _eval_tensors(train_src, recipe)
    xv, yv = _eval_tensors(val_src, recipe)
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=train_src.num_classes).to(ctx.device)
    bs = 128
    steps = epochs * math.ceil(len(x) / bs)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.15)
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for b in range(0, len(x), bs):
            idx = order[b:b + bs]
            xb = x[idx]
            flip = torch.rand(len(idx), generator=g) < 0.5
            xb[flip] = xb[flip].flip(-1)
            loss = F.cross_entropy(model(xb.to(ctx.device)), y[idx].to(ctx.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.inference_mode():
        acc = float((model(xv.to(ctx.device)).argmax(1).cpu() == yv).float().mean())
    path = ctx.workdir / "frontier_teacher.safetensors"
    save_student(model, path, name, train_src.num_classes, recipe)
    return str(path), {"model": name, "epochs": epochs, "train_images": len(x), "val_top1": 100 * acc,
                       "train_seconds": time.perf_counter() - t0}


def teacher_on_views(ctx: Ctx, data: str, weights: str, recipe, n_views: int, *, epochs: tuple[int, ...] = (0,),
                     features: bool = False) -> tuple[list[torch.Tensor], object]:
    """The teacher's float32 outputs on the first ``n`` training views of each of ``epochs``
    (the build's seeds), n = min(n_views, training samples): per epoch, logits (n, C), or
    with ``features`` its pooled features (n, D); and the :class:`logitcache.build.teacher.Teacher`."""
    from safetensors import safe_open

    from logitcache.build.teacher import META_MODEL, Teacher
    from logitcache.data.source import open_source
    from logitcache.views.augment import create_train_transform, render_view, rng_preserved, view_seed

    with safe_open(weights, framework="pt") as f:
        name = (f.metadata() or {})[META_MODEL]
    source = open_source(data, "train")
    teacher = Teacher(name, weights=weights, num_classes=source.num_classes, device=ctx.device)
    tf = create_train_transform(recipe)
    n = min(n_views, len(source))
    per_epoch = []
    for epoch in epochs:
        out = []
        for b in range(0, n, 256):
            with rng_preserved():
                views = torch.stack([render_view(tf, source.load_image(i),
                                                 view_seed(recipe.cache_seed, epoch, source.key(i)))
                                     for i in range(b, min(n, b + 256))])
            z = teacher(views, recipe.mean, recipe.std, features=True)[1] if features else \
                teacher(views, recipe.mean, recipe.std)
            out.append(z.cpu().float())
        per_epoch.append(torch.cat(out))
    return per_epoch, teacher


def teacher_logits(ctx: Ctx, data: str, weights: str, recipe, n_views: int) -> torch.Tensor:
    """Logits (n, C) float32 of the teacher on the first ``n`` epoch-0 training views (the
    build's seeds), n = min(n_views, training samples)."""
    return teacher_on_views(ctx, data, weights, recipe, n_views)[0][0]


def demo_logits(ctx: Ctx, n_views: int, train_per_class: int, epochs: int) -> tuple[torch.Tensor, dict]:
    """(logits (n, 128) float32, info about the teacher): the demo teacher's when
    ``demo_out/`` holds one, else a tiny teacher's trained here on ``train_per_class``
    images per class for ``epochs`` epochs."""
    from logitcache.data.synth import generate_synth
    from logitcache.views.augment import create_recipe

    recipe = create_recipe(RECIPE)
    if demo_teacher_present():
        data, weights = str(DEMO_DATA), str(DEMO_TEACHER)
        info = {"source": "demo_out/teacher/model.safetensors (make demo)"}
    else:
        data = str(generate_synth(ctx.workdir / "synth", train_per_class=train_per_class,
                                  val_per_class=max(2, train_per_class // 4)))
        weights, trained = train_tiny_teacher(ctx, data, recipe, FALLBACK_MODEL, epochs)
        info = {"source": "trained here (no demo_out)", **trained}
    z = teacher_logits(ctx, data, weights, recipe, n_views)
    return z, {**info, "recipe": RECIPE}
