"""Evaluation: top-1 / top-5 accuracy (percent) on a validation loader."""

from __future__ import annotations

import torch


@torch.inference_mode()
def evaluate(model: torch.nn.Module, loader, device: torch.device) -> dict[str, float]:
    """Returns {"top1": %, "top5": %, "loss": mean CE} over every sample of ``loader``."""
    was_training = model.training
    model.eval()
    correct1 = correct5 = n = 0
    loss_sum = 0.0
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        logits = model(images).float()
        loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top == labels[:, None]
        correct1 += hit[:, 0].sum().item()
        correct5 += hit.any(dim=1).sum().item()
        n += len(labels)
    model.train(was_training)
    if n == 0:  # an empty validation split: nothing to measure
        return {"top1": float("nan"), "top5": float("nan"), "loss": float("nan")}
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "loss": loss_sum / n}
