"""Several teachers on each view (``train --cache A --cache B``): how their logits teach the
student (:class:`TeachersConfig`, :func:`multi_teacher_loss`; pure functions).

Modes:

* ``mean-probs``: one target, the teachers' weighted mean probability at the KD temperature
  (Apple's dataset reinforcement, MEAL V2): :func:`~logitcache.replay.teachers.mean_probs_logits`.
* ``mean-logits``: one target, the teachers' weighted mean logits.
* ``per-teacher``: one distillation term per teacher, each at its own temperature, weighted.
  With vanilla KD at one shared temperature its gradient is mean-probs' (d KL(p || q) / ds =
  T (q - p) is linear in p): the two differ only with their own temperatures, or DKD / DIST.
  With MKD (``--kd mkd``), each teacher's pair of temperatures is meta-learned
  (trainer/mkd.py: ``MetaTemperatureLearner(..., teachers=K)``).
* ``ca-mkd``: Confidence-Aware Multi-Teacher KD (Zhang, Chen and Wang, ICASSP 2022,
  "Confidence-Aware Multi-Teacher Knowledge Distillation"), its logit term: per sample,
  teacher k's weight is ``w_k = (1 - softmax_k(L_CE^k)) / (K - 1)`` with ``L_CE^k`` teacher
  k's cross-entropy against the label (here the mixed, smoothed target), so the teachers
  nearer the label weigh more; ``L_KD = sum_k w_k KL_k`` (T^2-scaled). The paper's gamma
  (CE weight) and alpha (KD weight) are ``loss.hard_weight`` and ``loss.kd_weight``; its
  beta (intermediate features) is left out: caches hold logits. The authors' code
  (Rorozhl/CA-MKD, helper/loops.py) further divides the KD term by K: ``kd_weight = alpha / K``
  reproduces it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from logitcache.replay.teachers import mean_logits, mean_probs_logits, mix_weights

from .losses import LossConfig, distill_loss, distill_term, hard_label_loss, kd_per_sample

MODES = ("mean-probs", "mean-logits", "per-teacher", "ca-mkd")


@dataclass
class TeachersConfig:
    """How several caches' teachers combine (ignored with one cache).

    Attributes:
        mode: one of :data:`MODES`.
        mix: fixed teacher weights, in ``--cache`` order (normalised to sum 1); None: equal.
            Not with ``ca-mkd``, whose weights are per sample.
        temperatures: ``per-teacher``: each teacher's KD temperature; None: ``loss.temperature``.
    """

    mode: str = "mean-probs"
    mix: list[float] | None = None
    temperatures: list[float] | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown teachers mode {self.mode!r}; expected one of {', '.join(MODES)}")
        if self.temperatures is not None and (self.mode != "per-teacher" or any(not t > 0 for t in self.temperatures)):
            raise ValueError(f"teacher temperatures are per-teacher mode's, each > 0; got {self.temperatures} "
                             f"with mode {self.mode}")
        if self.mix is not None and self.mode == "ca-mkd":
            raise ValueError("ca-mkd weighs the teachers per sample: it takes no fixed teacher mix")

    def check(self, k: int) -> None:
        """Raise ValueError unless the settings fit ``k`` teachers."""
        mix_weights(self.mix, k)
        if self.temperatures is not None and len(self.temperatures) != k:
            raise ValueError(f"{len(self.temperatures)} teacher temperatures for {k} caches: give one per cache")

    def temperature_of(self, teacher: int, loss: LossConfig) -> float:
        return self.temperatures[teacher] if self.temperatures is not None else loss.temperature


def ca_mkd_weights(teacher_logits: list[Tensor], target: Tensor) -> Tensor:
    """CA-MKD's teacher weights (K, B), each column summing to 1: ``(1 - softmax over teachers
    of each teacher's cross-entropy against ``target`` (B, C) probabilities) / (K - 1)``."""
    k = len(teacher_logits)
    ce = torch.stack([-(target * F.log_softmax(z, dim=-1)).sum(dim=-1) for z in teacher_logits])  # (K, B)
    return (1.0 - F.softmax(ce, dim=0)) / (k - 1)


def multi_teacher_loss(loss: LossConfig, teachers: TeachersConfig, student_logits: Tensor,
                       teacher_logits: list[Tensor], target: Tensor, *,
                       epoch: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """The training loss from K teachers' logits (each (B, C)) on the same views, as
    :func:`~trainer.losses.distill_loss` returns it: (total, {"hard", "kd"}), ``kd`` the
    combined distillation term (unweighted)."""
    k = len(teacher_logits)
    if teachers.mode in ("mean-probs", "mean-logits"):
        w = mix_weights(teachers.mix, k)
        combined = (mean_probs_logits(teacher_logits, w, loss.temperature) if teachers.mode == "mean-probs"
                    else mean_logits(teacher_logits, w))
        return distill_loss(loss, student_logits, combined, target, epoch=epoch)
    hard = hard_label_loss(student_logits, target, kind=loss.hard_kind)
    if teachers.mode == "per-teacher":
        w = mix_weights(teachers.mix, k)
        kd = student_logits.new_zeros(())
        for i, z in enumerate(teacher_logits):
            term, factor = distill_term(loss, student_logits, z, target, epoch=epoch,
                                        temperature=teachers.temperature_of(i, loss))
            kd = kd + (w[i] * factor) * term
    else:  # ca-mkd: weights from the teachers alone (no gradient reaches them)
        weights = ca_mkd_weights(teacher_logits, target)
        per_sample = torch.stack([kd_per_sample(student_logits, z.to(student_logits.dtype), loss.temperature)
                                  for z in teacher_logits])  # (K, B)
        kd = (weights * per_sample).sum(dim=0).mean()
    return loss.hard_weight * hard + loss.kd_weight * kd, {"hard": hard, "kd": kd}
