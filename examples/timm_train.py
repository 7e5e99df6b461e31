"""timm's ``train.py``, distilling from a logitcache cache: every change it needs, as a file that runs.

    python examples/timm_train.py --data-dir data/synth --cache caches/synth.zarr --model test_resnet --epochs 4

The flags are timm ``train.py``'s for what this uses (``--model``, ``--epochs``, ``-b``,
``--opt``, ``--lr``, ``--weight-decay``, ``--sched``, ``--warmup-epochs``, ``--min-lr``,
``--smoothing``, ``--workers``, ``--seed``), and the pieces are timm's own
(``create_model``, ``create_optimizer_v2``, ``create_scheduler_v2``, ``SoftTargetCrossEntropy``,
``create_loader`` for validation, ``timm.utils.accuracy``). What differs from ``train.py``,
each marked ``# (n)`` below:

1. the cache and its training split are opened once, before the epoch loop
   (``CachedTrainData(args.data_dir, args.cache)``), and each epoch's loader comes from it
   (``data.loader(epoch, ...)``) in place of ``create_loader`` on the training set; its
   length is the updates per epoch the scheduler needs;
2. ``--workers`` and ``--seed`` go to that loader: the batch order is a function of
   ``(seed, epoch)``, and without workers the views render in the training process;
3. timm's mixup/cutmix stays off (``train.py``'s ``--mixup 0 --cutmix 0``): the views are
   already mixed as the cache's recipe says, and each batch carries the pair's labels and
   lambda, from which ``smoothed_targets`` makes the targets;
4. batches are dicts: ``images``, the label fields and the cached teacher rows; with
   ``train.py``'s prefetcher (on by default) nothing moves them to the device, so this loop
   does (``loader(..., device=device)``: made there);
5. the loss is forced: ``train.py`` keeps its loss inside a task object
   (``timm.task.ClassificationTask``); here it is ``SoftTargetCrossEntropy`` on the mixed
   targets plus ``kd_weight x logitcache.kd_loss`` against the cached logits at
   ``--kd-temperature``, what ``logitcache train --kd kd`` adds;
6. label smoothing defaults to 0 here (``train.py``'s default is 0.1; ``logitcache train``'s
   is 0): pass ``--smoothing`` to say which;
7. validation uses the cache's normalisation, input size, crop and interpolation
   (``data.eval_config()``), not ``resolve_data_config`` of the student (timm's
   ``test_resnet`` would be evaluated at 160 px, crop 0.95, mean/std 0.5): the student is
   evaluated on what it was trained on.

With the same settings it trains what ``logitcache train --kd kd`` trains (same
initialisation, batches, schedule and loss; ``tests/test_examples.py`` compares the top-1
of every epoch).
"""

from __future__ import annotations

import argparse

import timm
import torch
from timm.data import create_loader
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import accuracy

import logitcache
from logitcache.data.source import open_source


class ValImages(torch.utils.data.Dataset):
    """The dataset's val split as timm's ``create_loader`` takes a dataset: (image, label), with
    the ``transform`` it sets. (For an image folder, ``timm.data.create_dataset`` does this.)"""

    def __init__(self, data_dir: str):
        self.source, self.transform = open_source(data_dir, "val"), None

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        return self.transform(self.source.load_image(i)), self.source.label(i)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="dataset root the cache was built from")
    p.add_argument("--cache", required=True, help="cache URL")
    p.add_argument("--model", default="test_resnet")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("-b", "--batch-size", type=int, default=128)
    p.add_argument("--opt", default="adamw")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--sched", default="cosine")
    p.add_argument("--warmup-epochs", type=int, default=1)
    p.add_argument("--warmup-lr", type=float, default=None, help="default: 1%% of --lr (logitcache train's)")
    p.add_argument("--min-lr", type=float, default=1e-5)
    p.add_argument("--smoothing", type=float, default=0.0)  # (6)
    p.add_argument("--kd-temperature", type=float, default=1.0)
    p.add_argument("--kd-weight", type=float, default=1.0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def create_val_loader(data_dir: str, data: logitcache.CachedTrainData, *, workers: int, device: torch.device):
    """timm's evaluation loader over the val split, with the cache's views' settings."""  # (7)
    return create_loader(ValImages(data_dir), batch_size=256, is_training=False, use_prefetcher=False,
                         num_workers=workers, device=device, **data.eval_config())


def main(argv: list[str] | None = None) -> tuple[list[float], torch.nn.Module]:
    """Train and validate every epoch; returns the val top-1 (%) of each epoch and the student."""
    args = parse_args(argv)
    device = torch.device(args.device)
    data = logitcache.CachedTrainData(args.data_dir, args.cache)  # (1)
    torch.manual_seed(args.seed)
    model = timm.create_model(args.model, num_classes=data.num_classes).to(device)
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                    momentum=args.momentum)

    def train_loader(epoch: int):  # (1) (2) (4)
        return data.loader(epoch, batch_size=args.batch_size, seed=args.seed, num_workers=args.workers,
                           device=device)

    updates_per_epoch = len(train_loader(0))
    scheduler, _ = create_scheduler_v2(optimizer, sched=args.sched, num_epochs=args.epochs,
                                       warmup_epochs=args.warmup_epochs, min_lr=args.min_lr,
                                       warmup_lr=args.lr * 0.01 if args.warmup_lr is None else args.warmup_lr,
                                       step_on_epochs=False, updates_per_epoch=updates_per_epoch)
    train_loss_fn = SoftTargetCrossEntropy()  # (5)
    val_loader = create_val_loader(args.data_dir, data, workers=args.workers, device=device)  # (7)
    top1s, num_updates = [], 0
    for epoch in range(args.epochs):
        model.train()
        for batch in train_loader(epoch):  # (4)
            target = logitcache.smoothed_targets(batch["label"], batch["partner_label"], batch["lam"],  # (3)
                                                 data.num_classes, args.smoothing)
            output = model(batch["images"])
            teacher = logitcache.teacher_logits(batch, data.codec, device)
            loss = train_loss_fn(output, target) + args.kd_weight * logitcache.kd_loss(output, teacher,
                                                                                       args.kd_temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            num_updates += 1
            scheduler.step_update(num_updates=num_updates)
        top1s.append(validate(model, val_loader, device))
        print(f"epoch {epoch}: val top-1 {top1s[-1]:.2f}% (cached epoch {data.view_epoch(epoch)})")
    return top1s, model


@torch.no_grad()
def validate(model: torch.nn.Module, loader, device: torch.device) -> float:
    """Top-1 (%) over the whole val split (``timm.utils.accuracy`` per batch, weighted by its size)."""
    model.eval()
    right, total = 0.0, 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        right += accuracy(model(images), labels, topk=(1,))[0].item() * len(labels) / 100.0
        total += len(labels)
    return 100.0 * right / total


if __name__ == "__main__":
    main()
