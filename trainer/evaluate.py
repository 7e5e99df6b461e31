"""Evaluation: top-1 / top-5 accuracy (percent) on a validation loader."""

from __future__ import annotations

import torch


def _heads(model: torch.nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The eval-mode logits (B, C) under ``"avg"``; for a student with a distillation head
    (timm's ``deit_*_distilled_*``), each head alone too: ``"class_head"``, ``"dist_head"``
    (their mean is what the model itself returns in eval mode)."""
    if not hasattr(model, "head_dist"):
        return {"avg": model(images).float()}
    feats = model.forward_features(images)
    cls = model.head(model.head_drop(feats[:, 0])).float()
    dist = model.head_dist(model.head_drop(feats[:, 1])).float()
    return {"avg": (cls + dist) / 2, "class_head": cls, "dist_head": dist}


@torch.inference_mode()
def evaluate(model: torch.nn.Module, loader, device: torch.device) -> dict[str, float]:
    """Returns {"top1": %, "top5": %, "loss": mean CE} over every sample of ``loader``; for a
    distilled student (two heads) these are of the averaged heads, as timm evaluates them,
    plus "top1_class_head" and "top1_dist_head": each head alone."""
    was_training = model.training
    model.eval()
    correct: dict[str, int] = {}
    correct5 = n = 0
    loss_sum = 0.0
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        heads = _heads(model, images)
        logits = heads["avg"]
        loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct5 += (top == labels[:, None]).any(dim=1).sum().item()
        for name, out in heads.items():
            correct[name] = correct.get(name, 0) + (out.argmax(dim=1) == labels).sum().item()
        n += len(labels)
    model.train(was_training)
    if n == 0:  # an empty validation split: nothing to measure
        return {"top1": float("nan"), "top5": float("nan"), "loss": float("nan")}
    out = {"top1": 100.0 * correct.pop("avg") / n, "top5": 100.0 * correct5 / n, "loss": loss_sum / n}
    out.update({f"top1_{name}": 100.0 * c / n for name, c in correct.items()})
    return out
