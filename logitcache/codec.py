"""Logit codecs: what is stored per view, and how a full distribution is rebuilt.

``topk`` keeps the k largest logits exactly (up to the value dtype) with their class
ids, plus ``tail_lse`` = log-sum-exp of the C - k logits outside the top k. The rebuilt
logit vector puts the top-k logits back and gives every tail class the same logit
``tail_lse - log(C - k)``, so that at T = 1 the rebuilt softmax has exactly the
teacher's top-k probabilities and exactly the teacher's tail mass. At other
temperatures the tail is approximated as flat (its measured error is in bench/).

``full`` is ``topk`` with k = C: every logit is stored, ``tail_lse`` is -inf.

All functions are pure; shapes use B = views, C = classes, k = kept logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

VALUE_DTYPES = ("float16", "float32")
FLOAT16_MAX = 65504.0


class ValueRangeError(ValueError):
    """Logits too large for the codec's value dtype (float16 holds |z| <= 65504)."""


def id_dtype_for(num_classes: int) -> str:
    """The smallest unsigned integer dtype that holds every class id."""
    if num_classes <= 1 << 8:
        return "uint8"
    if num_classes <= 1 << 16:
        return "uint16"
    return "uint32"


@dataclass(frozen=True)
class CodecSpec:
    """What a cache stores per view: ``k`` logits as ``value_dtype`` and their ids."""

    name: str  # "topk" | "full"
    k: int
    num_classes: int
    value_dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.name not in ("topk", "full"):
            raise ValueError(f"unknown codec {self.name!r}; use 'topk' or 'full'")
        if self.value_dtype not in VALUE_DTYPES:
            raise ValueError(f"value dtype must be one of {VALUE_DTYPES}, not {self.value_dtype!r}")
        if not 1 <= self.k <= self.num_classes:
            raise ValueError(f"k must be in [1, {self.num_classes}] (the class count), not {self.k}")
        if self.name == "full" and self.k != self.num_classes:
            raise ValueError("the full codec stores k = num_classes logits")

    @property
    def id_dtype(self) -> str:
        return id_dtype_for(self.num_classes)

    @property
    def bytes_per_view(self) -> int:
        """Raw (uncompressed) payload bytes per view: ids, values and tail_lse."""
        return self.k * (np.dtype(self.id_dtype).itemsize + np.dtype(self.value_dtype).itemsize) + 4

    def relative_tolerance(self) -> float:
        """Max |stored - true| / |true| of a kept logit (half an ulp of the value dtype)."""
        return 2.0**-11 if self.value_dtype == "float16" else 2.0**-24

    def to_dict(self) -> dict:
        return {"name": self.name, "k": self.k, "num_classes": self.num_classes,
                "value_dtype": self.value_dtype, "id_dtype": self.id_dtype}

    @classmethod
    def from_dict(cls, d: dict) -> "CodecSpec":
        return cls(d["name"], int(d["k"]), int(d["num_classes"]), d["value_dtype"])


def create_codec(name: str, num_classes: int, k: int | None = None, value_dtype: str = "float16") -> CodecSpec:
    """``topk`` with ``k`` (default 10, capped at C) or ``full``; k = C with topk means full."""
    if name == "full" or (k is not None and k >= num_classes):
        return CodecSpec("full", num_classes, num_classes, value_dtype)
    return CodecSpec(name, min(k or 10, num_classes), num_classes, value_dtype)


def encode(spec: CodecSpec, logits: torch.Tensor) -> dict[str, np.ndarray]:
    """Compress teacher logits (B, C) float32 into numpy arrays.

    Returns ``topk_ids`` (B, k) ``spec.id_dtype``, ``topk_logits`` (B, k) ``spec.value_dtype``
    sorted in descending order, and ``tail_lse`` (B,) float32 (-inf when k = C).
    """
    if logits.ndim != 2 or logits.shape[1] != spec.num_classes:
        raise ValueError(f"expected logits of shape (B, {spec.num_classes}), got {tuple(logits.shape)}")
    logits = logits.detach().float().cpu()
    values, ids = torch.topk(logits, spec.k, dim=1, largest=True, sorted=True)
    if spec.value_dtype == "float16" and values.abs().max() > FLOAT16_MAX:
        raise ValueRangeError(
            f"logits up to {float(values.abs().max()):.4g} do not fit float16 (max {FLOAT16_MAX}); use float32 values"
        )
    if spec.k == spec.num_classes:
        tail = torch.full((logits.shape[0],), -math.inf)
    else:
        masked = logits.scatter(1, ids, -math.inf)
        tail = torch.logsumexp(masked, dim=1)
    return {
        "topk_ids": ids.numpy().astype(spec.id_dtype),
        "topk_logits": values.numpy().astype(spec.value_dtype),
        "tail_lse": tail.numpy().astype(np.float32),
    }


def decode(ids: torch.Tensor, values: torch.Tensor, tail_lse: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Rebuild full logits (B, C) float32 from ``ids`` (B, k), ``values`` (B, k), ``tail_lse`` (B,).

    Runs on whatever device the inputs are on: one ``full`` and one ``scatter``.
    """
    k = ids.shape[1]
    if k == num_classes:
        fill = torch.zeros_like(tail_lse, dtype=torch.float32)
    else:
        fill = tail_lse.float() - math.log(num_classes - k)
    out = fill[:, None].expand(-1, num_classes).contiguous()
    return out.scatter_(1, ids.long(), values.float())


def rebuilt_probs(ids: torch.Tensor, values: torch.Tensor, tail_lse: torch.Tensor, num_classes: int,
                  temperature: float = 1.0) -> torch.Tensor:
    """softmax(decode(...) / T): the teacher distribution as the student losses see it."""
    return torch.softmax(decode(ids, values, tail_lse, num_classes) / temperature, dim=1)
