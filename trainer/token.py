"""DeiT's distillation through a distillation token (``--kd deit-hard`` / ``deit-soft``):
the loss of a student with two heads, the class head and the distillation head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .losses import TOKEN_KINDS, LossConfig, hard_label_loss, kd_loss


def token_distill_loss(cfg: LossConfig, class_logits: Tensor, dist_logits: Tensor, teacher_logits: Tensor | None,
                       target: Tensor, *, teacher_top1: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """DeiT's distillation through a distillation token (Touvron et al. 2021), for students
    with two heads (timm's ``deit_*_distilled_*``: in distilled training mode the forward
    returns ``(class_logits, dist_logits)``, each (B, C)).

    ``total = hard_weight * hard(class head, target) + kd_weight * term(distillation head)``:

    * ``deit-hard``: ``term = CE(dist_logits, teacher_top1)``, the teacher's top-1 class ((B,)
      int64; default ``teacher_logits.argmax(-1)``);
    * ``deit-soft``: ``term = T^2 KL(softmax(t / T) || softmax(s / T))``, batch mean
      (:func:`kd_loss`).

    These are timm's ``TokenDistillationTask`` terms (soft: ``reduction="batchmean"``); DeiT's
    own ``DistillationLoss`` divides its soft term by B x C instead of B, and weights the terms
    ``1 - alpha`` and ``alpha`` (``hard_weight``, ``kd_weight``; the paper: 0.5 each).
    Returns ``(total, {"hard": hard, "kd": term})``, the terms unweighted.
    """
    if cfg.kind not in TOKEN_KINDS:
        raise ValueError(f"token_distill_loss serves {TOKEN_KINDS}, not {cfg.kind!r}")
    hard = hard_label_loss(class_logits, target, kind=cfg.hard_kind)
    if cfg.kind == "deit-hard":
        top1 = teacher_top1 if teacher_top1 is not None else teacher_logits.argmax(dim=-1)
        term = F.cross_entropy(dist_logits, top1.to(dist_logits.device, torch.long))
    else:
        term = kd_loss(dist_logits, teacher_logits.to(dist_logits.dtype), cfg.temperature)
    return cfg.hard_weight * hard + cfg.kd_weight * term, {"hard": hard, "kd": term}
