"""The comparisons behind ``logitcache verify``: cached teacher rows against the logits the
teacher gives again for the same views (the pass criterion: logitcache/verify/run.py).

Every codec is compared in logit terms: float values as stored; quantised gaps turned back
into logits relative to the *recomputed* top logit, against the recomputed logits clipped
where the codec clips (their bound is absolute, half a step); sampled rows by drawing again
from the recomputed logits with the same view seeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from logitcache.codecs.logits import CodecSpec, encode
from logitcache.verify.report import VerifyReport

#: Recomputation noise allowed per entry, relative to the largest |logit| of its row.
NOISE_REL = 2.0**-20


@dataclass
class _Cached:
    """Cached teacher rows in logit terms, float64: ``ids`` (n, k), kept logits ``c`` (n, k),
    ``tail`` (n,) tail_lse (-inf without a tail); where the codec clips, the lowest value the
    reference may take (``floor`` (n, k), ``fill_floor`` (n,), else None) and the extra absolute
    slack of a kept logit and of the tail (half a gap step for quantised values)."""

    ids: torch.Tensor
    c: torch.Tensor
    tail: torch.Tensor
    floor: torch.Tensor | None = None
    fill_floor: torch.Tensor | None = None
    kept_abs: float = 0.0
    tail_abs: float = 0.0


def _as_logits(codec: CodecSpec, r: torch.Tensor, rows: dict[str, np.ndarray]) -> _Cached:
    """The cached rows in logit terms (:class:`_Cached`); ``r`` (n, C) the recomputed logits."""
    n, c_ = r.shape
    values = torch.from_numpy(rows["values"].astype(np.float64))
    if codec.name == "full":
        order = torch.argsort(-values if not codec.quantised else values, dim=1, stable=True)
        ids, values = order, values.gather(1, order)
    else:
        ids = torch.from_numpy(rows["ids"].astype(np.int64))
    no_tail = torch.full((n,), -math.inf)
    if not codec.quantised:
        return _Cached(ids, values, torch.from_numpy(rows["tail"].astype(np.float64)) if codec.name == "topk"
                       else no_tail)
    top = r.amax(dim=1, keepdim=True)
    c = top - values * codec.gap_step
    reach = (2**codec.value_bits - 1) * codec.gap_step  # the largest gap one code (increase) can hold
    half = codec.gap_step / 2
    if codec.name == "full":
        return _Cached(ids, c, no_tail, floor=(top - reach).expand_as(c), kept_abs=half)
    # a code is clipped to the previous one plus the largest increase: the reference is clipped there too
    floor = torch.cat([torch.full((n, 1), -math.inf, dtype=c.dtype), c[:, :-1] - reach], dim=1)
    fill = top[:, 0] - torch.from_numpy(rows["tail"].astype(np.float64)) * codec.gap_step
    return _Cached(ids, c, fill + math.log(c_ - codec.k), floor=floor, fill_floor=c[:, -1] - reach,
                   kept_abs=half, tail_abs=half)


def compare_logits(report: "VerifyReport", codec: CodecSpec, r: torch.Tensor, rows: dict[str, np.ndarray],
                   tol: float, atol: float, where: list[tuple[int, str]]) -> None:
    """Fill the error fields and reasons of ``report`` (topk and full codecs); r (n, C) float64."""
    C = codec.num_classes
    cached = _as_logits(codec, r, rows)
    ids, c, tail, floor, fill_floor = cached.ids, cached.c, cached.tail, cached.floor, cached.fill_floor
    kept_abs, tail_abs = cached.kept_abs, cached.tail_abs
    k = ids.shape[1]
    report.atol = atol + kept_abs
    n = len(r)
    in_range = ((ids >= 0) & (ids < C)).all(dim=1)
    safe_ids = ids.clamp(0, C - 1)
    slack = atol + kept_abs + NOISE_REL * r.abs().amax(dim=1, keepdim=True)  # (n, 1)

    # kept logits, compared at the cached ids (quantised: against the recomputed logit, clipped as the codec clips)
    r_at = r.gather(1, safe_ids)
    if floor is not None:
        r_at = torch.maximum(r_at, floor)
    err = torch.nan_to_num((c - r_at).abs(), nan=math.inf)
    err[~in_range] = math.inf
    excess = (err - slack).clamp(min=0)
    rel = torch.where(excess > 0, excess / r_at.abs(), torch.zeros_like(excess))
    report.max_abs_err = float(err.max())
    report.max_rel_err = float(rel.max())
    ratio = err / (tol * r_at.abs() + slack)
    worst = int(ratio.argmax())
    wi, wj = divmod(worst, k)
    report.worst = {"epoch": where[wi][0], "key": where[wi][1], "class": int(ids[wi, wj]), "position": wj,
                    "cached": float(c[wi, wj]), "recomputed": float(r_at[wi, wj]), "ratio_to_bound": float(ratio[wi, wj])}
    if report.max_rel_err > tol:
        w = report.worst
        report.reasons.append(
            f"max relative error {report.max_rel_err:.3g} of kept logits exceeds the tolerance {tol:.3g} (epoch "
            f"{w['epoch']}, key {w['key']}, class {w['class']}: cached {w['cached']:.6g}, recomputed {w['recomputed']:.6g})"
        )

    # ids: equal, or a valid top-k of the recomputed logits up to ties
    top_v, top_i = torch.topk(r, k, dim=1)
    exact = (ids == top_i).all(dim=1) & in_range
    sorted_ids = ids.sort(dim=1).values
    distinct = (sorted_ids[:, 1:] != sorted_ids[:, :-1]).all(dim=1) if k > 1 else torch.ones(n, dtype=torch.bool)
    tie_ok = (r_at >= top_v - (tol * top_v.abs() + slack)).all(dim=1)
    tied = ~exact & in_range & distinct & tie_ok
    report.ids_exact, report.ids_tied = int(exact.sum()), int(tied.sum())
    report.ids_wrong = n - report.ids_exact - report.ids_tied
    if report.ids_wrong:
        bad = int((~exact & ~tied).nonzero()[0, 0])
        report.reasons.append(
            f"{report.ids_wrong} views have top-{k} ids that are not the teacher's top-{k} (first: epoch "
            f"{where[bad][0]}, key {where[bad][1]}: cached {ids[bad].tolist()}, recomputed {top_i[bad].tolist()})"
        )
    report.top1_agreement = 100.0 * float((ids[:, 0] == r.argmax(dim=1)).double().mean())

    # tail_lse, at the cached ids (so ties at the boundary do not matter)
    if k < C:
        tail_r = torch.logsumexp(r.scatter(1, safe_ids, -math.inf), dim=1)
        if fill_floor is not None:  # the fill's code is clipped like the others
            tail_r = torch.maximum(tail_r, fill_floor + math.log(C - k))
        terr = torch.nan_to_num((tail - tail_r).abs(), nan=math.inf)
        report.tail_max_abs_err = float(terr.max())
        tbad = terr > tol * tail_r.abs() + slack[:, 0] - kept_abs + tail_abs
        if tbad.any():
            b = int(tbad.nonzero()[0, 0])
            report.reasons.append(
                f"{int(tbad.sum())} views have a tail_lse off by more than the tolerance (first: epoch {where[b][0]}, "
                f"key {where[b][1]}: cached {float(tail[b]):.6g}, recomputed {float(tail_r[b]):.6g})"
            )
    else:
        report.tail_max_abs_err = float(torch.where(torch.isneginf(tail), 0.0, math.inf).max())

    # KL(teacher || rebuilt) at T = 1
    logp = torch.log_softmax(r, dim=1)
    fill = tail - math.log(C - k) if k < C else torch.zeros_like(tail)
    rebuilt = fill[:, None].expand(-1, C).clone().scatter_(1, safe_ids, c)
    logq = torch.log_softmax(rebuilt, dim=1)
    kl = torch.nan_to_num((logp.exp() * (logp - logq)).sum(dim=1), nan=math.inf)
    report.kl_mean, report.kl_max = float(kl.mean()), float(kl.max())


def compare_sampled(report: "VerifyReport", codec: CodecSpec, r: torch.Tensor, rows: dict[str, np.ndarray],
                    seeds: np.ndarray, where: list[tuple[int, str]]) -> None:
    """Draw again from the recomputed logits with each view's seed and compare the counts: a
    view passes when at most one of its N draws moved (noise can move a draw that fell within
    float rounding of a class boundary)."""
    again = encode(codec, r.float(), seeds)
    ids_c, counts_c = rows["ids"].astype(np.int64), rows["values"]
    p_cached = torch.zeros(r.shape, dtype=torch.float64).scatter_add_(
        1, torch.from_numpy(ids_c), torch.from_numpy(counts_c.astype(np.float64)))
    p_again = torch.zeros(r.shape, dtype=torch.float64).scatter_add_(
        1, torch.from_numpy(again["ids"].astype(np.int64)), torch.from_numpy(again["values"].astype(np.float64)))
    moved = (p_cached - p_again).abs().sum(dim=1) / 2  # draws that differ, per view
    report.ids_exact = int((moved == 0).sum())
    report.ids_tied = int(((moved > 0) & (moved <= 1)).sum())
    report.ids_wrong = len(r) - report.ids_exact - report.ids_tied
    report.max_abs_err = float(moved.max()) / codec.k  # total variation between cached and redrawn counts / N
    report.top1_agreement = 100.0 * float((p_cached.argmax(dim=1) == r.argmax(dim=1)).double().mean())
    if report.ids_wrong:
        bad = int((moved > 1).nonzero()[0, 0])
        report.reasons.append(f"{report.ids_wrong} views have draws that differ from drawing again (first: epoch "
                              f"{where[bad][0]}, key {where[bad][1]}: {int(moved[bad])} of {codec.k} draws moved)")


#: Recomputation noise allowed on a view's features, relative to its feature norm (float32
#: reduction order; a bf16 CUDA build needs ``--tolerance`` of about 1e-2 instead).
FEATURE_NOISE_REL = 2.0**-13


def compare_features(report: "VerifyReport", spec, basis, true: torch.Tensor, rows: dict[str, np.ndarray],
                     tol: float, where: list[tuple[int, str]]) -> None:
    """Cached features against the teacher's recomputed ``true`` (n, D) float32: the decoded
    rows must lie within the codec's rounding bound (``quantisation_bound``) of the
    projection of ``true`` onto the cache's basis, plus ``max(tol, FEATURE_NOISE_REL)`` x
    ``||true||`` for recomputation noise. Fills the ``feature_*`` fields of ``report``."""
    from logitcache.codecs.features import decode_features, project, quantisation_bound

    feat = torch.from_numpy(rows["feat"])
    scale = torch.from_numpy(rows["feat_scale"]) if "feat_scale" in rows else None
    basis_t = basis.to_torch("cpu") if basis is not None else None
    decoded = decode_features(spec, basis_t, feat, scale).double()
    target = project(basis, true).double()
    norm = true.double().norm(dim=1)
    err = torch.nan_to_num((decoded - target).norm(dim=1), nan=math.inf)
    excess = (err - quantisation_bound(spec, scale, feat).double()).clamp(min=0) / norm.clamp_min(1e-30)
    report.feature_views = len(true)
    report.feature_cos_min = float(torch.nn.functional.cosine_similarity(decoded, true.double(), dim=1).min())
    report.feature_max_excess = float(excess.max())
    limit = max(tol, FEATURE_NOISE_REL)
    if report.feature_max_excess > limit:
        e, key = where[int(excess.argmax())]
        report.reasons.append(
            f"cached features of epoch {e}, key {key} are {report.feature_max_excess:.3g} x their norm beyond the "
            f"codec's bound (allowed {limit:.3g}): not this teacher's features of this view")
