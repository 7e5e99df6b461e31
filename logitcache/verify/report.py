"""What :func:`logitcache.verify.run.verify_cache` found (:class:`VerifyReport`) and its default tolerances."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from logitcache.storage.manifest import Manifest

#: Absolute slack of a kept logit, on top of the relative tolerance (see module docstring).
DEFAULT_ATOL = 1e-6


#: Multiple of the codec's rounding bound used as default relative tolerance.
TOLERANCE_FACTOR = 4.0


@dataclass
class VerifyReport:
    """The outcome of :func:`verify_cache`. ``passed`` iff ``reasons`` is empty."""

    url: str
    device: str
    seed: int
    requested: int  # views asked for
    views_checked: int
    units_checked: int
    epochs: list[int]  # epochs the checked views come from
    tolerance: float  # relative tolerance on kept logits (and tail_lse)
    atol: float  # absolute slack (plus NOISE_REL x the row's largest |logit|)
    max_abs_err: float  # max |cached - recomputed| over kept logits
    max_rel_err: float  # max relative error beyond the absolute slack (pass iff <= tolerance)
    tail_max_abs_err: float  # max |cached tail_lse - recomputed| (0 for the full codec)
    kl_mean: float  # KL(teacher softmax || rebuilt softmax), nats, at T=1
    kl_max: float
    top1_agreement: float  # % of views whose cached top-1 id is the recomputed argmax
    ids_exact: int  # views whose top-k ids equal the recomputed ones
    ids_tied: int  # views whose ids differ only by ties (within tolerance)
    ids_wrong: int
    metadata_failures: list[str] = field(default_factory=list)  # seeds / labels / partners / lambdas
    # feature caches (``build --features``): views compared, the least cosine of decoded to
    # recomputed features, and the largest error beyond the codec's bound, relative to |f|
    feature_views: int = 0
    feature_cos_min: float | None = None
    feature_max_excess: float | None = None
    worst: dict | None = None  # the kept logit nearest to (or furthest past) its bound
    reasons: list[str] = field(default_factory=list)  # why it failed; empty when passed
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.reasons

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "passed": self.passed}


def default_tolerance(manifest: Manifest) -> float:
    """``TOLERANCE_FACTOR`` x the codec's rounding bound (2**-9 for float16, 2**-22 for float32);
    0 for quantised gaps, whose bound is absolute (half a step, added to ``atol``)."""
    values = manifest.codec.values
    return TOLERANCE_FACTOR * {"float16": 2.0**-11, "float32": 2.0**-24}.get(values, 0.0)
