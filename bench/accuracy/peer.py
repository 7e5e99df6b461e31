"""KD from the cache against timm's own online distillation, on make demo's workload.

``python -m bench.accuracy.peer [--seeds 5] [--workdir runs/accuracy] [--output bench/results/accuracy_peer.json]``

Both sides train the study's student (timm ``test_resnet``) on make demo's data with the same
optimiser and schedule (AdamW 2e-3, weight decay 0.05, cosine per update, 1 warm-up epoch
from 1% of the peak; batch 128), the same epochs and the same teacher (the shipped
ResNet-18, its 32 px views upsampled to 64 px as the build does), and are evaluated by the
same code on the same val split:

- ``logitcache``: the study's ``kd_cache`` run (vanilla KD at ``KD_TEMPERATURE``, CE + T² KL, from the top-10
  float16 cache of the demo32 views; bench/accuracy/jobs.py, found on disk when done);
- ``timm``: ``timm.data.create_loader`` over the same training images with the recipe's
  transforms (random-resized crop 0.35-1, flip, RandAugment ``rand-m6-n1-mstd0.5``), and
  ``timm.task.LogitDistillationTask`` running the teacher on every batch (the recipe has no
  mixup/cutmix, so timm's ``Mixup`` is off as it is in the cache's views).

A seed fixes the student's initialisation on both sides (``torch.manual_seed`` right before
``timm.create_model``: the same weights); the views differ (timm draws its own augmentations),
so the pairing removes the initialisation's share of the variance only. The result: each
side's val top-1 per seed, the paired differences (logitcache - timm) with their mean and 95%
interval. Runs go two at a time, one torch thread each.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from .intervals import ci95, fmt
from .jobs import build_cache, log, obtain_teacher, prepare_dataset, train_student
from .plan import FULL_EPOCHS, KD_TEMPERATURE, MAIN_K, RECIPE, STUDENT, variant_config


class TrainImages:
    """The training split as timm's ``create_loader`` takes a dataset: (PIL image, label) through
    the ``transform`` it sets."""

    def __init__(self, root: str, split: str = "train"):
        from logitcache.data.source import open_source

        self.source, self.transform = open_source(root, split), None

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        return self.transform(self.source.load_image(i)), self.source.label(i)


def _teacher_module(weights: str, recipe):
    """The shipped teacher as timm's task takes a module: the views resized to its input size (as
    the build's ``adapt_views`` does), normalisation declared in ``pretrained_cfg``."""
    import torch

    from logitcache.build.teacher import adapt_views, create_model_from_weights

    model, io = create_model_from_weights(None, weights)

    class Resized(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            self.pretrained_cfg = {"mean": tuple(recipe.mean), "std": tuple(recipe.std)}

        def forward(self, x):
            return self.model(adapt_views(x, recipe.mean, recipe.std, io))

    return Resized().eval()


def timm_online_kd(data: str, weights: str, seed: int, epochs: int, out: Path) -> dict:
    """One run of timm's loader + LogitDistillationTask; its final val top-1 (ours: evaluate)."""
    import random

    import numpy as np
    import timm
    import torch
    from logitcache.trainer.config import TrainConfig
    from logitcache.trainer.data import create_eval_loader
    from logitcache.trainer.evaluate import evaluate
    from logitcache.trainer.optim import create_optimizer_and_scheduler
    from timm.data import create_loader
    from timm.loss import SoftTargetCrossEntropy
    from timm.task import LogitDistillationTask

    from logitcache.data.source import open_source
    from logitcache.views.augment import create_recipe

    done = out / "result.json"
    if done.exists():
        return {**json.loads(done.read_text()), "reused": True}
    torch.set_num_threads(1)
    r, t0 = create_recipe(RECIPE), time.perf_counter()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    train_set = TrainImages(data)
    student = timm.create_model(STUDENT, num_classes=train_set.source.num_classes)
    student.pretrained_cfg = {**student.pretrained_cfg, "mean": tuple(r.mean), "std": tuple(r.std)}
    loader = create_loader(train_set, input_size=(3, r.input_size, r.input_size), batch_size=128, is_training=True,
                           scale=r.scale, ratio=r.ratio, hflip=r.hflip, color_jitter=r.color_jitter,
                           auto_augment=r.auto_augment, interpolation=r.interpolation, mean=r.mean, std=r.std,
                           num_workers=0, use_prefetcher=False, device=torch.device("cpu"))
    cfg = TrainConfig(data=data, student=STUDENT, epochs=epochs, batch_size=128, lr=2e-3)
    optimizer, scheduler = create_optimizer_and_scheduler(student, cfg, len(loader))
    task = LogitDistillationTask(student, _teacher_module(weights, r), criterion=SoftTargetCrossEntropy(),
                                 temperature=KD_TEMPERATURE, device=torch.device("cpu"), verbose=False)
    val = create_eval_loader(open_source(data, "val"), r, num_workers=0)
    curve, step = [], 0
    for _ in range(epochs):
        task.train()
        for x, y in loader:
            target = torch.nn.functional.one_hot(y, train_set.source.num_classes).float()
            loss = task(x, target)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            scheduler.step_update(step)
        curve.append(evaluate(student, val, torch.device("cpu"))["top1"])
    result = {"top1": curve[-1], "curve_top1": curve, "wall_s": time.perf_counter() - t0}
    out.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(result))
    return {**result, "reused": False}


def _ours(data: Path, work: Path, seed: int, epochs: int, teacher: dict, cache: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    cfg = variant_config("kd_cache", {MAIN_K: cache}, teacher)
    return train_student("synth", data, work, "kd_cache", seed, epochs, cfg, 0, True, None)


def run(seeds: int, work: Path, epochs: int, jobs: int = 2) -> dict:
    data = prepare_dataset("synth", work)
    teacher = obtain_teacher("synth", data, work, 0, 0, None)
    cache = build_cache("synth", data, work, teacher, MAIN_K, epochs, 2)
    with ProcessPoolExecutor(jobs) as pool:
        ours = [pool.submit(_ours, data, work, s, epochs, teacher, cache) for s in range(seeds)]
        theirs = [pool.submit(timm_online_kd, str(data), teacher["weights"], s, epochs,
                              work / "synth" / "peer" / f"e{epochs}" / f"timm_online_kd_seed{s}") for s in range(seeds)]
        ours, theirs = [f.result() for f in ours], [f.result() for f in theirs]
    a, b = [r["top1"] for r in ours], [r["top1"] for r in theirs]
    diffs = [x - y for x, y in zip(a, b)]
    return {"name": "accuracy_peer", "settings": {"student": STUDENT, "epochs": epochs, "seeds": list(range(seeds)),
                                                  "recipe": RECIPE, "teacher": teacher["weights"],
                                                  "teacher_val_top1": teacher["val_top1"], "batch_size": 128,
                                                  "opt": "adamw", "lr": 2e-3, "temperature": KD_TEMPERATURE},
            "logitcache_kd_cache": {"top1": a, **ci95(a), "curves": [r.get("curve_top1") for r in ours]},
            "timm_online_kd": {"top1": b, **ci95(b), "curves": [r.get("curve_top1") for r in theirs]},
            "paired_cache_minus_timm_pp": {"values": diffs, **ci95(diffs)},
            "seconds": {"logitcache": sum(r.get("wall_s", 0.0) for r in ours),
                        "timm": sum(r.get("wall_s", 0.0) for r in theirs)}}


def markdown(d: dict) -> str:
    s = d["settings"]
    return "\n".join([
        f"Student `{s['student']}`, {s['epochs']} epochs, seeds {s['seeds']}, batch {s['batch_size']}, AdamW "
        f"{s['lr']}, cosine, T = {s['temperature']}; teacher: the shipped ResNet-18 (val top-1 "
        f"{s['teacher_val_top1']:.2f}%). Mean [95% interval] of the final val top-1 over seeds:", "",
        "| run | val top-1 % |", "|---|---:|",
        f"| vanilla KD from the cache (`logitcache train`) | {fmt(d['logitcache_kd_cache'])} |",
        f"| timm online KD (`create_loader` + `LogitDistillationTask`) | {fmt(d['timm_online_kd'])} |",
        f"| paired by seed (same init): logitcache - timm, pp | {fmt(d['paired_cache_minus_timm_pp'], '+')} |",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.accuracy.peer", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=FULL_EPOCHS["synth"][1])
    p.add_argument("--workdir", default="runs/accuracy")
    p.add_argument("--output", default="bench/results/accuracy_peer.json")
    args = p.parse_args(argv)
    result = run(args.seeds, Path(args.workdir), args.epochs)
    result["settings"]["command"] = "python -m bench.accuracy.peer " + " ".join(argv or [])
    Path(args.output).write_text(json.dumps(result, indent=2))
    log(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(__import__("sys").argv[1:]))
