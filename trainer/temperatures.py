"""MKD's learnable KD temperatures: :class:`Temperatures` (two scalars, or per-sample ones from
a small MLP on :func:`logit_features`), kept in ``[min_temperature, max_temperature]``.

Clamping: scalar temperatures live as ``log T``; after each meta step the log parameters are
projected onto ``[log min_temperature, log max_temperature]`` (so the gradient w.r.t. ``log T``
is exact inside the range). The predictor outputs
``log T = log min + (log max - log min) * sigmoid(z)``, bounded by construction.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .config import MKDConfig
from .losses import temperature_from_log

#: Number of per-sample statistics per logit tensor in :func:`logit_features`.
_FEATURES_PER_LOGITS = 4


def logit_features(logits: Tensor) -> Tensor:
    """Per-sample statistics of (B, C) logits -> (B, 4), detached.

    Columns: max softmax probability, entropy / log C (both in [0, 1]),
    ``log1p(std of the logits)`` and ``log1p(top-1 minus top-2 logit)``.
    """
    z = logits.detach().float()
    c = z.shape[-1]
    log_p = F.log_softmax(z, dim=-1)
    p = log_p.exp()
    max_p = p.max(dim=-1).values
    entropy = -(p * log_p).sum(dim=-1) / math.log(c) if c > 1 else torch.zeros_like(max_p)
    std = z.std(dim=-1, unbiased=False)
    if c > 1:
        top2 = z.topk(2, dim=-1).values
        margin = top2[:, 0] - top2[:, 1]
    else:
        margin = torch.zeros_like(max_p)
    return torch.stack([max_p, entropy, torch.log1p(std), torch.log1p(margin)], dim=-1)


class Temperatures(nn.Module):
    """The learnable KD temperatures.

    * ``predictor=False``: two 0-d parameters ``log_t_teacher`` and ``log_t_student``;
      :meth:`forward` returns 0-d ``(exp(log_t_teacher), exp(log_t_student))`` (logits are
      ignored).
    * ``predictor=True``: an MLP ``(B, 8) -> hidden -> (B, 2)`` on :func:`logit_features` of
      the student and the teacher logits (detached inputs), mapped to per-sample
      temperatures in ``[min, max]``: ``log T = log min + (log max - log min) * sigmoid(z)``.
      The output layer starts near zero with its bias set so that every sample starts at the
      initial temperatures.

    Outputs are in this module's dtype and carry gradients to its parameters.
    """

    def __init__(self, cfg: MKDConfig):
        super().__init__()
        self.predictor = cfg.predictor
        self.log_min = math.log(cfg.min_temperature)
        self.log_max = math.log(cfg.max_temperature)
        init = (math.log(cfg.init_teacher_temperature), math.log(cfg.init_student_temperature))
        if not self.predictor:
            self.log_t_teacher = nn.Parameter(torch.tensor(init[0]))
            self.log_t_student = nn.Parameter(torch.tensor(init[1]))
            self.net = None
        else:
            self.net = nn.Sequential(
                nn.Linear(2 * _FEATURES_PER_LOGITS, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, 2)
            )
            out = self.net[-1]
            nn.init.normal_(out.weight, std=1e-2)
            with torch.no_grad():
                span = self.log_max - self.log_min
                for i, v in enumerate(init):
                    frac = min(max((v - self.log_min) / span, 1e-4), 1 - 1e-4)
                    out.bias[i] = math.log(frac / (1 - frac))  # sigmoid^-1

    def forward(self, student_logits: Tensor | None = None, teacher_logits: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(T_t, T_s)``: 0-d tensors (scalar mode) or (B,) tensors (predictor).

        Args:
            student_logits: (B, C) student logits (only read by the predictor, detached).
            teacher_logits: (B, C) teacher logits (only read by the predictor, detached).
        """
        if self.net is None:
            return (
                temperature_from_log(self.log_t_teacher.clamp(self.log_min, self.log_max)),
                temperature_from_log(self.log_t_student.clamp(self.log_min, self.log_max)),
            )
        if student_logits is None or teacher_logits is None:
            raise ValueError("the temperature predictor needs student and teacher logits")
        feats = torch.cat([logit_features(student_logits), logit_features(teacher_logits)], dim=-1)
        w = self.net[0].weight
        z = self.net(feats.to(device=w.device, dtype=w.dtype))  # (B, 2)
        log_t = self.log_min + (self.log_max - self.log_min) * torch.sigmoid(z)
        t = temperature_from_log(log_t)
        return t[:, 0], t[:, 1]

    @torch.no_grad()
    def project_(self) -> None:
        """Clamp the scalar log temperatures into ``[log min, log max]`` (no-op for the predictor)."""
        if self.net is None:
            self.log_t_teacher.clamp_(self.log_min, self.log_max)
            self.log_t_student.clamp_(self.log_min, self.log_max)
