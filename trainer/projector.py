"""Projector feature distillation (Miles & Mikolajczyk, "Understanding the Role of the
Projector in Knowledge Distillation", AAAI 2024; reference code roymiles/Simple-Recipe-
Distillation, ``OurDistillationLoss``).

The paper's three ingredients, as its reference code has them:

* **projection layer**: a trainable ``nn.Linear(s_dim, t_dim)`` from the student's pooled
  pre-logit features (B, s_dim) to the teacher's feature space (B, t_dim);
* **normalisation**: both sides through batch normalisation without affine parameters
  (``BatchNorm1d(t_dim, eps=1e-4, affine=False)``, batch statistics), which the paper
  shows is tightly coupled with the projector's training dynamics;
* **soft maximum**: the distance ``2 * log(sum_{b,d} |z_s - z_t|^4)`` over the batch,
  whose gradient weights the largest differences most (the paper's answer to large
  capacity gaps). ``log(sum)`` differs from ``log(mean)`` by ``log(B * t_dim)``: the same
  gradient.

The reference adds logit KD at T = 1; here that is ``--kd-weight`` (and ``--temperature``)
on the usual KD term, and the feature term has its own ``--feature-weight``. Teacher
features come from the cache (``build --features``; logitcache/codecs/features.py) or from
the online teacher; they are targets (no gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from logitcache.build.teacher import logits_and_features, pre_logits_dim

#: BatchNorm's epsilon in the reference code.
BN_EPS = 1e-4
#: The soft maximum's power in the reference code.
POWER = 4.0


def normalise(features: Tensor, eps: float = BN_EPS) -> Tensor:
    """(B, D) -> (B, D): batch normalisation with batch statistics and no affine parameters
    (biased variance, as ``BatchNorm1d(affine=False)`` in training mode)."""
    return F.batch_norm(features, None, None, training=True, eps=eps)


def projector_distance(projected: Tensor, teacher_features: Tensor, eps: float = BN_EPS) -> Tensor:
    """The soft-maximum distance ``2 * log(sum |BN(projected) - BN(teacher)|^4)`` (nats-free,
    0-d). ``projected``: the student's features through the projector, (B, t_dim);
    ``teacher_features``: (B, t_dim), treated as a target (detached). Needs B >= 2."""
    if projected.ndim != 2 or projected.shape != teacher_features.shape:
        raise ValueError(f"expected projected student and teacher features of the same shape (B, D), got "
                         f"{tuple(projected.shape)} and {tuple(teacher_features.shape)}")
    if projected.shape[0] < 2:
        raise ValueError("the projector distance normalises over the batch: it needs at least 2 views per step")
    diff = normalise(projected.float(), eps) - normalise(teacher_features.detach().float(), eps)
    return 2.0 * torch.log(diff.abs().pow(POWER).sum())


class FeatureStudent(nn.Module):
    """The student with its projector: ``forward(x) -> (logits (B, C), projected features
    (B, t_dim))`` from one trunk pass (timm's forward_features, forward_head(pre_logits=True),
    then the classifier on those features). DDP wraps this module, so the projector's
    gradients are averaged like the student's; the optimiser steps both."""

    def __init__(self, student: nn.Module, teacher_dim: int):
        super().__init__()
        self.source: dict | None = None  # where the teacher features come from (trainer.train.feature_source)
        self.student = student
        self.projector = nn.Linear(pre_logits_dim(student), teacher_dim)
        head = student.get_classifier()
        if not isinstance(head, nn.Module):
            raise ValueError(f"student {type(student).__name__}: its classifier is not one module; --kd projector "
                             f"needs one")

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logits, feats = logits_and_features(self.student, x)
        return logits, self.projector(feats)

    def no_weight_decay(self) -> set[str]:
        """The student's no-weight-decay names under this module's prefix (timm's optimiser
        factory reads them)."""
        inner = getattr(self.student, "no_weight_decay", lambda: set())()
        return {f"student.{n}" for n in inner}
