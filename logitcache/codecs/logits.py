"""Logit codecs: what is kept of a view's teacher logits, and how a distribution is rebuilt.

Three codecs (shapes: B views, C classes, k kept logits, N draws):

``topk`` keeps the k largest logits with their class ids, and the *tail* (the C - k other
classes) as one number: every tail class gets the same logit ``fill``, chosen so that the
tail's total mass is the teacher's (``fill = tail_lse - log(C - k)``, with ``tail_lse`` the
log-sum-exp of the tail logits). At T = 1 the rebuilt softmax has exactly the teacher's
top-k probabilities and tail mass; at other temperatures the tail is flat (an
approximation, measured in bench/). Values are stored one of two ways:

* ``gap<b>`` (default ``gap8``): softmax ignores a constant shift, so each kept logit is
  stored as its *gap* below the view's top logit, ``g = top - z >= 0``, rounded to a
  *code* ``round(g / step)`` with ``step = GAP_RANGE / 2**b``; the tail fill is one more
  gap (it lies below the k-th logit). A row's codes never decrease (logits are sorted),
  so each is stored as its increase over the previous one, in ``b`` bits: small numbers
  that zstd packs tightly. Worst-case error of a rebuilt logit relative to the top (see
  :meth:`CodecSpec.error_bound`): half a step, unless one increase exceeds ``2**b - 1``
  codes (about 16 nats), where it is clipped.
* ``float16`` / ``float32``: the logits themselves, and ``tail_lse`` as float32.

``full`` keeps every logit (k = C; no ids, no tail), as float16/float32 or gaps.

``sampled`` keeps N draws with replacement from the teacher's T = 1 distribution, as the
distinct class ids drawn and their counts; the rebuilt distribution is counts / N (zero
elsewhere): an unbiased estimate of the teacher's distribution (Anshumann et al., 2025,
"Sparse logit sampling"), so the KD loss at T = 1 is unbiased in expectation: the loss is
linear in the target, E[-sum (counts / N) log q] = -sum p log q. Elsewhere it is not:
at T != 1 the tempered teacher p^(1/T) / Z is not linear in p, so no function of the counts
estimates it without bias (and ``softmax(log(counts / N) / T)`` sharpens or flattens the
noise, not the teacher); DKD splits the target/non-target mass at T and renormalises the
non-target part (a ratio of estimates); DIST correlates probabilities (a nonlinear
statistic of the batch); MKD learns the temperatures. :func:`check_serves_loss` refuses
all of these with the reason; KD at T = 1 (and CE) is what a sampled cache serves.

In memory (after reading) every codec gives a view three rows, the *teacher rows*:
``ids`` (k,) class ids, ``values`` (k,) (float logits; gap codes, the top's 0 first; or draw
counts with 0 as padding), ``tail`` () (float32 tail_lse, the fill's gap code, or 0). :func:`decode` turns them into (B, C) logits on any device.
All functions are pure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from logitcache.codecs.bitpack import bits_for

FLOAT_VALUES = ("float16", "float32")
FLOAT16_MAX = 65504.0
#: b-bit gap codes have a step of GAP_RANGE / 2**b nats (8 bits: 1/16), and one increase
#: between consecutive codes covers up to GAP_RANGE nats.
GAP_RANGE = 16.0
#: The largest gap code (codes are uint16 in memory): 65535 steps below the top.
MAX_CODE = 65535
#: The logit a ``sampled`` row gives to classes never drawn: exp() of it is 0 in float32,
#: and 0 * it is 0, so KL terms of undrawn classes vanish instead of becoming NaN.
UNDRAWN_LOGIT = -1.0e4
CODECS = ("topk", "full", "sampled")


class ValueRangeError(ValueError):
    """Logits too large for the codec's value dtype (float16 holds |z| <= 65504)."""


def id_dtype_for(num_classes: int) -> str:
    """The smallest unsigned integer dtype that holds every class id (in memory)."""
    if num_classes <= 1 << 8:
        return "uint8"
    if num_classes <= 1 << 16:
        return "uint16"
    return "uint32"


def _gap_bits(values: str) -> int | None:
    """8 for "gap8"; None for float values."""
    if values in FLOAT_VALUES:
        return None
    if values.startswith("gap") and values[3:].isdigit() and 2 <= int(values[3:]) <= 16:
        return int(values[3:])
    raise ValueError(f"values must be float16, float32 or gap<bits> with 2 <= bits <= 16, not {values!r}")


@dataclass(frozen=True)
class CodecSpec:
    """What a cache keeps per view. ``k``: kept logits (topk), C (full) or draws N (sampled);
    ``values``: "gap<b>" (quantised gaps), "float16" or "float32" (unused by sampled)."""

    name: str
    k: int
    num_classes: int
    values: str = "gap8"

    def __post_init__(self) -> None:
        if self.name not in CODECS:
            raise ValueError(f"unknown codec {self.name!r}; use one of {', '.join(CODECS)}")
        if self.name == "sampled":
            if not 1 <= self.k <= 65535:
                raise ValueError(f"draws per view must be in [1, 65535], not {self.k}")
            object.__setattr__(self, "values", "counts")
            return
        _gap_bits(self.values)
        if not 1 <= self.k <= self.num_classes:
            raise ValueError(f"k must be in [1, {self.num_classes}] (the class count), not {self.k}")
        if self.name == "full" and self.k != self.num_classes:
            raise ValueError("the full codec keeps k = num_classes logits")
        if self.name == "topk" and self.k == self.num_classes:
            raise ValueError(f"topk keeps k < {self.num_classes} (the class count) logits; use the full codec")

    @property
    def value_bits(self) -> int | None:
        """Bits per quantised gap, or None (float values, or counts)."""
        return None if self.name == "sampled" else _gap_bits(self.values)

    @property
    def quantised(self) -> bool:
        return self.value_bits is not None

    @property
    def gap_step(self) -> float:
        """Nats per gap code (quantised values only)."""
        return GAP_RANGE / (1 << self.value_bits)

    @property
    def id_bits(self) -> int:
        """Bits of a stored class id: ceil(log2 C)."""
        return bits_for(self.num_classes)

    @property
    def count_bits(self) -> int:
        """Bits of a stored draw count minus one (sampled): ceil(log2 N)."""
        return bits_for(self.k)

    @property
    def id_dtype(self) -> str:
        return id_dtype_for(self.num_classes)

    @property
    def payload_bits_per_view(self) -> float | None:
        """Bits per view before zstd (ids, values, tail); None for sampled (data-dependent)."""
        if self.name == "sampled":
            return None
        ids = 0 if self.name == "full" else self.k * self.id_bits
        if not self.quantised:
            return ids + self.k * 8 * np.dtype(self.values).itemsize + (32 if self.name == "topk" else 0)
        return ids + self.k * self.value_bits  # topk: k - 1 kept gaps and the fill

    def error_bound(self) -> str:
        """The worst-case error of a rebuilt logit, in words (shown by ``inspect``)."""
        if self.name == "sampled":
            return (f"unbiased: E[counts / N] = teacher probabilities at T = 1; each probability's standard "
                    f"error is sqrt(p (1 - p) / {self.k})")
        if self.quantised:
            s, top = self.gap_step, (2**self.value_bits - 1) * self.gap_step
            what = "kept logits and the tail fill" if self.name == "topk" else "logits"
            step = "one logit to the next" if self.name == "topk" else "the top"
            return (f"{what} within {s / 2:.4g} nats of the truth (relative to the top logit) while no gap from "
                    f"{step} exceeds {top:.4g} nats and none from the top exceeds {MAX_CODE * s:.4g}; larger gaps "
                    f"are clipped there")
        rel = 2.0**-11 if self.values == "float16" else 2.0**-24
        return f"kept logits within {rel:.3g} x |logit| (float rounding); tail_lse float32"

    def to_dict(self) -> dict:
        d = {"name": self.name, "k": self.k, "num_classes": self.num_classes, "values": self.values,
             "id_bits": self.id_bits}
        if self.quantised:
            d.update(gap_step=self.gap_step)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CodecSpec":
        values = d.get("values", d.get("value_dtype", "float16"))  # format 1/2 named it value_dtype
        return cls(d["name"], int(d["k"]), int(d["num_classes"]), values)


def create_codec(name: str, num_classes: int, k: int | None = None, values: str = "gap8") -> CodecSpec:
    """``topk`` with ``k`` (default 10; k >= C means full), ``full``, or ``sampled`` with ``k``
    draws per view (default 32)."""
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; use one of {', '.join(CODECS)}")
    if name == "sampled":
        return CodecSpec("sampled", 32 if k is None else k, num_classes)
    k = 10 if k is None else k
    if name == "full" or k >= num_classes:
        return CodecSpec("full", num_classes, num_classes, values)
    return CodecSpec(name, k, num_classes, values)


# -- encode: float32 logits (B, C) -> teacher rows ------------------------------------------


def encode(spec: CodecSpec, logits: torch.Tensor, seeds: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Compress teacher logits (B, C) into teacher rows ``ids`` (B, k), ``values`` (B, k),
    ``tail`` (B,) (see the module doc). ``seeds`` (B,) uint64: the views' seeds, which fix
    the draws of the sampled codec (required there, ignored otherwise)."""
    if logits.ndim != 2 or logits.shape[1] != spec.num_classes:
        raise ValueError(f"expected logits of shape (B, {spec.num_classes}), got {tuple(logits.shape)}")
    logits = logits.detach().float().cpu()
    if spec.name == "sampled":
        if seeds is None or len(seeds) != len(logits):
            raise ValueError("the sampled codec needs one view seed per row")
        return _encode_sampled(spec, logits, np.asarray(seeds, dtype=np.uint64))
    if spec.name == "full":  # class order; ids implicit, no tail
        ids = np.zeros((len(logits), 0), spec.id_dtype)
        return {"ids": ids, "values": _encode_values(spec, logits), "tail": np.zeros(len(logits), np.uint8)}
    values, ids = torch.topk(logits, spec.k, dim=1, largest=True, sorted=True)
    tail = torch.logsumexp(logits.scatter(1, ids, -math.inf), dim=1)  # the C - k others
    ids = ids.numpy().astype(spec.id_dtype)
    if not spec.quantised:
        return {"ids": ids, "values": _encode_values(spec, values), "tail": tail.numpy().astype(np.float32)}
    fill = tail.double() - math.log(spec.num_classes - spec.k)
    gaps = values[:, :1].double() - torch.cat([values.double(), fill[:, None]], dim=1)  # (B, k + 1)
    gaps = torch.cummax(gaps, dim=1).values  # ascending; the float32 tail_lse may put the fill a hair above
    codes = _chained_codes(gaps, spec.gap_step, 2**spec.value_bits - 1)
    return {"ids": ids, "values": codes[:, :-1], "tail": codes[:, -1]}


def _chained_codes(gaps: torch.Tensor, step: float, max_increase: int) -> np.ndarray:
    """(B, m) ascending gaps (the first 0) -> uint16 codes, each ``round(gap / step)`` except
    that no code exceeds the previous one by more than ``max_increase`` (an increase is
    stored in b bits), ``c_j = min_{i <= j} (r_i + (j - i) * max_increase)``, and none
    exceeds ``MAX_CODE`` (65535: a gap of 4096 nats at 8 bits, 16 nats at 16 bits)."""
    rounded = torch.round(gaps / step).numpy().astype(np.int64)
    j = np.arange(gaps.shape[1], dtype=np.int64) * max_increase
    return np.minimum(np.minimum.accumulate(rounded - j, axis=1) + j, MAX_CODE).astype(np.uint16)


def _encode_values(spec: CodecSpec, values: torch.Tensor) -> np.ndarray:
    """(B, C) float32 logits of the full codec -> their gap codes below each row's top
    (clipped at 2**b - 1), or (B, m) float16/32 values."""
    if spec.quantised:
        top = values.max(dim=1, keepdim=True).values if values.numel() else values[:, :1]
        codes = torch.round((top.double() - values.double()) / spec.gap_step).clamp_(0, 2**spec.value_bits - 1)
        return codes.numpy().astype(np.uint16)
    if spec.values == "float16" and values.numel() and values.abs().max() > FLOAT16_MAX:
        raise ValueRangeError(f"logits up to {float(values.abs().max()):.4g} do not fit float16 (max {FLOAT16_MAX}); "
                              f"use float32 values")
    return values.numpy().astype(spec.values)


def _uniforms(seeds: np.ndarray, n: int) -> np.ndarray:
    """(B, n) float64 uniforms in [0, 1), a pure function of each row's seed (SplitMix64 over
    seed + (j + 1) * golden ratio), so draws do not depend on batching or workers."""
    with np.errstate(over="ignore"):
        x = seeds[:, None] + np.arange(1, n + 1, dtype=np.uint64)[None, :] * np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _encode_sampled(spec: CodecSpec, logits: torch.Tensor, seeds: np.ndarray) -> dict[str, np.ndarray]:
    """N draws per row by inverse CDF; rows of distinct ids (ascending) and counts, 0-padded."""
    b, n = len(logits), spec.k
    cdf = torch.softmax(logits.double(), dim=1).cumsum(dim=1)
    u = torch.from_numpy(_uniforms(seeds, n)) * cdf[:, -1:]
    draws = torch.searchsorted(cdf, u, right=True).clamp_(max=spec.num_classes - 1)
    draws, _ = draws.sort(dim=1)
    starts = torch.ones_like(draws, dtype=torch.bool)
    starts[:, 1:] = draws[:, 1:] != draws[:, :-1]
    slot = starts.long().cumsum(dim=1) - 1  # which distinct id each draw counts for
    ids = torch.zeros(b, n, dtype=torch.long).scatter_(1, slot, draws)  # same id for every draw of a slot
    counts = torch.zeros(b, n, dtype=torch.long).scatter_add_(1, slot, torch.ones_like(draws))
    return {"ids": ids.numpy().astype(spec.id_dtype),
            "values": counts.numpy().astype(np.uint8 if n < 256 else np.uint16),
            "tail": np.zeros(b, np.uint8)}


# -- decode: teacher rows -> (B, C) logits, on the rows' device ----------------------------


def decode(spec: CodecSpec, ids: torch.Tensor, values: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    """Rebuild (B, C) float32 logits from teacher rows ``ids`` (B, k), ``values`` (B, k),
    ``tail`` (B,), on their device (a fill, one scatter). Quantised codecs give logits
    relative to the view's top (top = 0), which softmax does not see; ``sampled`` gives
    log(counts / N) on the drawn classes and ``UNDRAWN_LOGIT`` elsewhere."""
    b, c = ids.shape[0], spec.num_classes
    if spec.name == "sampled":
        counts = values.float()
        logp = torch.where(counts > 0, torch.log(counts.clamp_min(1) / spec.k), torch.full_like(counts, UNDRAWN_LOGIT))
        out = torch.full((b, c), UNDRAWN_LOGIT, device=ids.device)
        return out.scatter_reduce_(1, ids.long(), logp, reduce="amax")
    kept = -values.float() * spec.gap_step if spec.quantised else values.float()
    if spec.name == "full":
        return kept.contiguous()
    fill = -tail.float() * spec.gap_step if spec.quantised else tail.float() - math.log(c - spec.k)
    out = fill[:, None].expand(-1, c).contiguous()
    return out.scatter_(1, ids.long(), kept)


def rebuilt_probs(spec: CodecSpec, ids: torch.Tensor, values: torch.Tensor, tail: torch.Tensor,
                  temperature: float = 1.0) -> torch.Tensor:
    """softmax(decode(...) / T): the teacher distribution as the student losses see it."""
    if spec.name == "sampled" and temperature != 1.0:
        raise ValueError(f"a sampled cache serves the teacher distribution at T = 1 only, not T = {temperature}")
    return torch.softmax(decode(spec, ids, values, tail) / temperature, dim=1)


def check_serves_loss(spec: CodecSpec, kind: str, temperature: float, learns_temperature: bool = False) -> None:
    """Refuse, with the reason, a loss a codec cannot serve: a sampled cache holds an unbiased
    estimate of the T = 1 distribution, so only KD (and CE) at T = 1 use it unbiasedly."""
    if spec.name != "sampled" or kind in ("none", "ce"):
        return
    if learns_temperature:
        raise ValueError("a sampled cache cannot serve MKD: its counts / N estimate the teacher at T = 1 only, "
                         "and MKD learns other temperatures (build a topk cache)")
    if kind not in ("kd", "deit-soft"):
        raise ValueError(f"a sampled cache cannot serve {kind}: only KD at T = 1 is unbiased from counts / N "
                         f"(build a topk cache for {kind})")
    if temperature != 1.0:
        raise ValueError(f"a sampled cache serves KD at T = 1 only, not T = {temperature}: counts / N estimate the "
                         f"T = 1 distribution (use --temperature 1 or a topk cache)")


def teacher_top1(spec: CodecSpec, ids: torch.Tensor, values: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    """(B,) int64: the teacher's top-1 class of each cached row, exactly (DeiT's hard target).

    top-k rows: the first stored id, the build's ``torch.topk`` first (its logits sorted
    descending, so where two logits tie exactly at the top, the one topk ranked first; the
    gaps, quantised, could tie rows the teacher did not, so the decoded logits are not used).
    full rows: the argmax of the stored values (float16 values may tie where the teacher's
    float32 did not: the lower class wins, as ``argmax`` breaks ties). Sampled rows hold draws,
    not the top-1: refused."""
    if spec.name == "topk":
        return ids[:, 0].long()
    if spec.name == "full":
        return decode(spec, ids, values, tail).argmax(dim=1)
    raise ValueError(f"a {spec.name} cache holds no exact top-1 class (build a topk or full cache)")
