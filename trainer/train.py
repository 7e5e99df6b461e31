"""The student training loop: views regenerated from seeds, teacher logits from the cache.

No teacher weights are loaded in cached mode: the teacher's output arrives as top-k
rows that are turned back into full logits on the device (one scatter) in the step.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import timm
import torch
from safetensors.torch import save_file
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from logitcache.build import cache_root, resolve_device
from logitcache.codec import decode
from logitcache.data.source import open_source
from logitcache.errors import CacheNotFoundError, LogitcacheError
from logitcache.manifest import check_serves
from logitcache.store import CacheReader
from logitcache.teacher import META_INPUT, META_MODEL, ModelInput
from logitcache.views import Recipe, create_recipe

from .data import CachedRows, create_eval_loader, create_train_loader, epoch_groups
from .evaluate import evaluate
from .losses import LossConfig, distill_loss


@dataclass
class TrainConfig:
    """One student run. ``data`` is a dataset root (train/val splits) or image folder."""

    data: str
    student: str = "resnet50"
    out: str = "runs/student"
    cache: str | None = None  # cache URL; None = find it under the cache root (needs kd != none)
    cache_root: str | None = None
    recipe: str = "demo32"  # only used without a cache (the cache carries its own recipe)
    epochs: int = 10
    reuse_epochs: bool = False  # cycle cached epochs when training longer than the cache
    batch_size: int = 128  # global, in views
    opt: str = "adamw"
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 1
    min_lr: float = 1e-5
    clip_grad: float | None = None
    label_smoothing: float = 0.0
    loss: LossConfig = field(default_factory=LossConfig)
    num_workers: int = 2
    seed: int = 0
    device: str = "auto"
    model_kwargs: dict = field(default_factory=dict)
    progress: bool = True


def find_cache(root: str, fingerprint: str, teacher: str | None = None) -> str:
    """The one cache under ``root`` built on the data with ``fingerprint``; errors on none or several."""
    from logitcache.store import list_caches

    matches = [c for c in list_caches(root) if c.manifest.dataset.fingerprint == fingerprint
               and (teacher is None or teacher in c.manifest.teacher)]
    if not matches:
        raise CacheNotFoundError(
            f"no cache for this dataset under {root} (fingerprint {fingerprint[:12]}); build one with "
            f"`logitcache build`, or pass --cache URL"
        )
    if len(matches) > 1:
        names = ", ".join(c.url for c in matches)
        raise CacheNotFoundError(f"several caches for this dataset under {root}: {names}; choose one with --cache")
    return matches[0].url


def smoothed_targets(label: torch.Tensor, partner_label: torch.Tensor, lam: torch.Tensor, num_classes: int,
                     smoothing: float) -> torch.Tensor:
    """Mixed, smoothed label targets (B, C): lam * y(label) + (1 - lam) * y(partner), as timm's mixup_target."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    y1 = torch.full((len(label), num_classes), off, device=label.device).scatter_(1, label[:, None], on)
    y2 = torch.full((len(label), num_classes), off, device=label.device).scatter_(1, partner_label[:, None], on)
    lam = lam[:, None].to(y1.dtype)
    return y1 * lam + y2 * (1 - lam)


class MetricsLog:
    """JSON lines, one object per line, flushed as written."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "w")

    def write(self, **row) -> None:
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()


def save_student(model: torch.nn.Module, path: Path, name: str, num_classes: int, recipe: Recipe) -> None:
    """safetensors weights with what ``--teacher-weights`` needs to rebuild the model."""
    io = ModelInput(recipe.input_size, tuple(recipe.mean), tuple(recipe.std), recipe.interpolation)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={META_MODEL: name, "num_classes": str(num_classes), META_INPUT: io.to_json()})


def train(cfg: TrainConfig) -> dict:
    """Train one student; returns the summary (also written to ``<out>/summary.json``)."""
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    train_src = open_source(cfg.data, "train")
    val_src = open_source(cfg.data, "val")
    num_classes = train_src.num_classes

    reader = None
    if cfg.loss.kind != "none" or cfg.cache:
        url = cfg.cache or find_cache(cache_root(cfg.cache_root), train_src.fingerprint())
        reader = CacheReader(url)
        check_serves(reader.manifest, fingerprint=train_src.fingerprint(), num_classes=num_classes, where=url)
        recipe = reader.manifest.recipe
        cached_epochs = reader.epochs()
        if not cached_epochs:
            raise LogitcacheError(f"cache {url} has no complete epoch yet")
        if cfg.epochs > len(cached_epochs) and not cfg.reuse_epochs:
            raise LogitcacheError(
                f"{cfg.epochs} student epochs but cache {url} holds {len(cached_epochs)} complete epochs; build more "
                f"(logitcache build --epochs A:B) or pass --reuse-epochs to cycle them"
            )
    else:
        recipe = create_recipe(cfg.recipe)
        cached_epochs = list(range(cfg.epochs))

    model = timm.create_model(cfg.student, pretrained=False, num_classes=num_classes, **cfg.model_kwargs).to(device)
    labels = train_src.labels()
    groups_per_epoch = len(train_src) // recipe.group_size  # approx, for the schedule
    steps_per_epoch = max(1, groups_per_epoch * recipe.group_size // cfg.batch_size)
    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
                                       min_lr=cfg.min_lr, warmup_lr=cfg.lr * 0.01, step_on_epochs=False,
                                       updates_per_epoch=steps_per_epoch)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(out / "metrics.jsonl")
    eval_loader = create_eval_loader(val_src, recipe, num_workers=cfg.num_workers)

    history, step, images_seen, train_seconds = [], 0, 0, 0.0
    t_start = time.perf_counter()
    for epoch in range(cfg.epochs):
        view_epoch = cached_epochs[epoch % len(cached_epochs)]
        arrays = reader.load_epoch(view_epoch) if reader is not None else None
        groups = epoch_groups(train_src, recipe, view_epoch, arrays)
        loader = create_train_loader(train_src, recipe, groups, CachedRows(arrays, labels), batch_size=cfg.batch_size,
                                     seed=cfg.seed, epoch=epoch, num_workers=cfg.num_workers,
                                     pin_memory=device.type == "cuda")
        model.train()
        t0 = time.perf_counter()
        sums = {"loss": 0.0, "hard": 0.0, "kd": 0.0}
        n_batches = 0
        for batch in loader:
            if batch["errors"]:
                raise LogitcacheError(batch["errors"][0]["error"])
            x = batch["images"].to(device, non_blocking=True)
            target = smoothed_targets(batch["label"].to(device), batch["partner_label"].to(device),
                                      batch["lam"].to(device), num_classes, cfg.label_smoothing)
            teacher_logits = None
            if cfg.loss.kind != "none":
                teacher_logits = decode(batch["topk_ids"].to(device), batch["topk_logits"].to(device),
                                        batch["tail_lse"].to(device), num_classes)
            logits = model(x)
            loss, parts = distill_loss(cfg.loss, logits, teacher_logits, target, epoch=epoch + n_batches / steps_per_epoch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            optimizer.step()
            step += 1
            n_batches += 1
            scheduler.step_update(step)
            sums["loss"] += loss.item()
            sums["hard"] += parts["hard"].item()
            sums["kd"] += float(parts["kd"])
            images_seen += len(x)
        epoch_seconds = time.perf_counter() - t0
        train_seconds += epoch_seconds
        scheduler.step(epoch + 1)
        metrics = evaluate(model, eval_loader, device)
        row = {"epoch": epoch, "view_epoch": view_epoch, "step": step, **{k: v / max(n_batches, 1) for k, v in sums.items()},
               "lr": optimizer.param_groups[0]["lr"], "val_top1": metrics["top1"], "val_top5": metrics["top5"],
               "val_loss": metrics["loss"], "epoch_seconds": epoch_seconds,
               "images_per_s": n_batches * cfg.batch_size / epoch_seconds if epoch_seconds else 0.0}
        log.write(**row)
        history.append(row)
        if cfg.progress:
            print(f"epoch {epoch + 1}/{cfg.epochs}  loss {row['loss']:.3f}  val top-1 {row['val_top1']:.2f}%  "
                  f"top-5 {row['val_top5']:.2f}%  {row['images_per_s']:.0f} img/s", flush=True)

    save_student(model, out / "model.safetensors", cfg.student, num_classes, recipe)
    summary = {
        "student": cfg.student, "kd": cfg.loss.kind, "cache": reader.url if reader else None,
        "epochs": cfg.epochs, "final_top1": history[-1]["val_top1"], "final_top5": history[-1]["val_top5"],
        "best_top1": max(h["val_top1"] for h in history), "wall_seconds": time.perf_counter() - t_start,
        "train_seconds": train_seconds, "images_per_s": images_seen / train_seconds if train_seconds else 0.0,
        "config": json.loads(json.dumps(asdict(cfg), default=str)), "weights": str(out / "model.safetensors"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
