"""Several teachers' rows in one batch, and the fixed ways to combine their outputs into one
target (pure functions on (B, C) tensors).

A batch from K caches on the same views holds teacher 0's rows under ``ids``, ``values``,
``tail`` (as a one-cache batch does) and teacher ``i``'s under ``ids_i``, ``values_i``,
``tail_i`` (:func:`row_keys`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

ROW_ARRAYS = ("ids", "values", "tail")


def row_keys(teacher: int) -> tuple[str, str, str]:
    """The batch keys of teacher ``teacher``'s rows: (ids, values, tail)."""
    return ROW_ARRAYS if teacher == 0 else tuple(f"{k}_{teacher}" for k in ROW_ARRAYS)


def teacher_count(batch: dict) -> int:
    """How many teachers' rows ``batch`` holds (0: none)."""
    k = 0
    while all(key in batch for key in row_keys(k)):
        k += 1
    return k


def mix_weights(weights: Sequence[float] | None, k: int) -> list[float]:
    """The teachers' mixing weights, summing to 1: ``weights`` normalised (None: 1/k each)."""
    if weights is None:
        return [1.0 / k] * k
    if len(weights) != k or any(not w >= 0 for w in weights) or not sum(weights) > 0:
        raise ValueError(f"teacher weights must be {k} numbers >= 0 with a positive sum, got {list(weights)}")
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def mean_probs_logits(logits: Sequence[torch.Tensor], weights: Sequence[float], temperature: float = 1.0) -> torch.Tensor:
    """Logits (B, C) of the teachers' weighted mean distribution at temperature T:
    ``T * log(sum_i w_i softmax(z_i / T))``, so that ``softmax(result / T)`` is exactly
    ``sum_i w_i softmax(z_i / T)`` (the ensemble Apple's dataset reinforcement and MEAL V2
    distil from) and a KD loss at T on them distils that mixture. ``weights`` sum to 1."""
    parts = [F.log_softmax(z / temperature, dim=-1) + math.log(w) for z, w in zip(logits, weights) if w > 0]
    return temperature * torch.logsumexp(torch.stack(parts), dim=0)


def mean_logits(logits: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """The teachers' weighted mean logits (B, C): ``sum_i w_i z_i`` (``weights`` sum to 1)."""
    return sum(w * z for z, w in zip(logits, weights))
