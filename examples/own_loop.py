"""Train a timm student from a logitcache cache in a plain PyTorch loop.

    python examples/own_loop.py --data data/synth --cache caches/synth.zarr --epochs 4

Loss per batch: cross entropy on the mixed label targets + vanilla KD against the cached
teacher logits. Student epochs past the cache's epochs reuse them in turn. Prints the mean
KD loss of each epoch.
"""

from __future__ import annotations

import argparse

import timm
import torch

import logitcache


def main(argv: list[str] | None = None) -> list[float]:
    """Run the loop; returns the mean KD loss (nats) of each epoch."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="dataset root the cache was built from")
    p.add_argument("--cache", required=True, help="cache URL")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--student", default="test_resnet", help="timm model name")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--hard-weight", type=float, default=1.0, help="weight of the cross entropy on labels")
    p.add_argument("--workers", type=int, default=0)
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = logitcache.CachedTrainData(args.data, args.cache)
    c = data.num_classes
    torch.manual_seed(0)
    student = timm.create_model(args.student, num_classes=c).to(device)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr)
    kd_per_epoch = []
    for epoch in range(args.epochs):
        student.train()
        total, steps = 0.0, 0
        for batch in data.loader(epoch, batch_size=args.batch_size, num_workers=args.workers):
            logits = student(batch["images"].to(device))
            target = logitcache.smoothed_targets(batch["label"], batch["partner_label"], batch["lam"], c, 0.0)
            teacher = logitcache.teacher_logits(batch, data.codec, device)
            kd = logitcache.kd_loss(logits, teacher, args.temperature)
            loss = args.hard_weight * logitcache.hard_label_loss(logits, target.to(device)) + kd
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, steps = total + kd.item(), steps + 1
        kd_per_epoch.append(total / max(steps, 1))
        print(f"epoch {epoch}: kd {kd_per_epoch[-1]:.4f} (cached epoch {data.view_epoch(epoch)})")
    return kd_per_epoch


if __name__ == "__main__":
    main()
