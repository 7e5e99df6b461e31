"""Check a cache against its teacher (:func:`verify_cache`): re-render a seeded sample of
committed views, re-run the teacher and compare with the cached logits, seeds, labels and
checksums. Returns a :class:`VerifyReport`; the CLI (``cli/format.py``) turns it into text.

Verification tolerance
----------------------
A kept logit is stored as ``c = round(b)`` where ``b`` is the float32 logit the teacher
gave at build time; verification recomputes ``r = b + d``, where ``d`` is float32
reduction-order noise (other batch composition, other kernel choice). For float16
values rounding to nearest gives ``|c - b| <= 2**-11 |b|`` for normal numbers
(``|b| >= 2**-14``) and ``<= 2**-25`` for subnormals; overflow (``|b| > 65504``) gives
``inf`` and always fails. ``d`` scales with the size of the row's logits, not with the
entry itself, so a relative bound alone fails spuriously on kept logits near zero. An
entry therefore passes when::

    |c - r| <= tol * |r| + atol + NOISE_REL * max_j |r_j|      (per view row)

with ``tol = 4 * codec.relative_tolerance()`` by default (2**-9 ~ 1.95e-3 for float16:
one half-ulp of rounding plus room for noise; 2**-22 for float32), ``atol = 1e-6``
(covers float16 subnormal rounding, 2**-25, and float32 noise of tiny logits) and
``NOISE_REL = 2**-20`` (about 8 float32 ulps of the row's largest logit). The reported
``max_rel_err`` is ``max((|c - r| - atol - NOISE_REL * scale)+ / |r|)``, so the cache
passes iff ``max_rel_err <= tol``. ``tail_lse`` (stored as float32) is held to the same
bound. The default assumes the teacher runs in the same precision as at build time: on
CUDA the teacher runs under bf16 autocast (logits differ by ~1e-2 relative from a
float32 CPU run), so verify a GPU-built cache on a GPU, or pass a larger tolerance.

Top-k ids must equal the recomputed top-k ids, except ties: a view whose ids differ still
passes when its cached ids are distinct and ``r[cached_id_j] >= r_(j) - bound`` at every
position ``j`` (``r_(j)`` the j-th largest recomputed logit), i.e. the cached ids are a
valid top-k of the recomputed logits up to the tolerance.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from logitcache.errors import (
    CacheMismatchError,
    LogitcacheError,
    WeightsUnavailableError,
)
from logitcache.storage.layout import unit_path
from logitcache.storage.manifest import Manifest
from logitcache.storage.reader import CacheReader
from logitcache.storage.stats import committed_views
from logitcache.verify.compare import compare_features, compare_logits, compare_sampled
from logitcache.verify.report import DEFAULT_ATOL, VerifyReport, default_tolerance

if TYPE_CHECKING:
    from logitcache.data.source import SampleSource


def check_teacher_weights(manifest: Manifest, teacher_weights: str | None, url: str) -> None:
    """Raise unless ``teacher_weights`` are the weights the cache was built with."""
    from logitcache.build.teacher import file_sha256

    want = manifest.teacher_weights_sha256
    if want is None:
        if teacher_weights is not None:
            raise CacheMismatchError(
                f"cache {url} was built with timm's pretrained weights ({manifest.teacher_weights}), not a weights "
                f"file; verify it without --teacher-weights ({teacher_weights} cannot be checked against it)"
            )
        return
    if teacher_weights is None:
        raise WeightsUnavailableError(
            f"cache {url} was built with the weights file {manifest.teacher_weights!r} (sha256 {want[:16]}); "
            f"pass it with --teacher-weights FILE"
        )
    if not os.path.isfile(teacher_weights):
        raise WeightsUnavailableError(f"--teacher-weights {teacher_weights}: no such file")
    got = file_sha256(teacher_weights)
    if got != want:
        raise CacheMismatchError(
            f"--teacher-weights {teacher_weights} (sha256 {got[:16]}) are not the weights cache {url} was built "
            f"with ({manifest.teacher_weights!r}, sha256 {want[:16]})"
        )


def _open_checked_source(manifest: Manifest, data: str | None, url: str) -> SampleSource:
    """The dataset the cache was built on (``data``, else the URL in the manifest), checked by fingerprint."""
    from logitcache.data.source import open_source

    where = data or manifest.dataset.url
    if not where:
        raise LogitcacheError(f"cache {url} does not record where its dataset is; pass --data")
    source = open_source(where, manifest.dataset.split)
    if source.fingerprint() != manifest.dataset.fingerprint:
        raise CacheMismatchError(
            f"dataset {source.url} split {manifest.dataset.split!r} (fingerprint {source.fingerprint()[:12]}) is not "
            f"the data cache {url} was built on ({manifest.dataset.name!r}, fingerprint "
            f"{manifest.dataset.fingerprint[:12]})"
        )
    return source


@dataclass
class _Picks:
    """The committed views to check: uniform over all committed views, seeded."""

    units: list[tuple[int, int, int]]  # (epoch, shard, views) of every non-empty committed unit
    picks: np.ndarray  # (count,) sorted view numbers, counting through ``units`` in order
    starts: np.ndarray  # (len(units) + 1,) view number of each unit's first row
    unit_of: np.ndarray  # (count,) index into ``units`` of each pick


def _pick_views(reader: CacheReader, sample: int, seed: int, url: str) -> _Picks:
    """``min(sample, committed views)`` distinct views drawn by ``numpy`` from ``seed``."""
    committed = committed_views(reader)
    units = [(e, s, n) for e, us in committed.items() for s, n in sorted(us.items()) if n > 0]
    total = sum(n for _, _, n in units)
    if total == 0:
        raise LogitcacheError(f"cache {url} has no committed views to verify")
    count = min(sample, total)
    picks = np.sort(np.random.default_rng(seed).choice(total, size=count, replace=False))
    starts = np.cumsum([0] + [n for _, _, n in units])
    unit_of = np.searchsorted(starts, picks, side="right") - 1
    return _Picks(units, picks, starts, unit_of)


def _stack(rows: list[np.ndarray]) -> np.ndarray:
    """Rows of one field, zero-padded to the widest (sampled rows differ in width per unit)."""
    width = max((np.shape(r)[0] for r in rows), default=0) if np.ndim(rows[0]) else 0
    return np.stack([np.pad(r, (0, width - len(r))) if np.ndim(r) else r for r in rows])


@dataclass
class _Regenerated:
    """The picked views rendered again, their cached teacher rows, and what did not match."""

    where: list[tuple[int, str]] = field(default_factory=list)  # (epoch, key) per checked view
    images: list[torch.Tensor] = field(default_factory=list)  # rendered view (3, H, W) per checked view
    seeds: list[int] = field(default_factory=list)  # view seed per checked view
    rows: dict[str, list] = field(default_factory=dict)  # field -> rows: ids, values, tail (+ feat, feat_scale)
    metadata_failures: list[str] = field(default_factory=list)


def _regenerate(reader: CacheReader, source: SampleSource, picked: _Picks, transform,
                complete: list[int]) -> _Regenerated:
    """Read each unit holding a picked view (checked against its commit record), check its plan
    digest against this code's plan, and re-render the picked views; the seals of the picked
    views' epochs among ``complete`` (the cache's complete epochs) are checked first."""
    from logitcache.views.plan import plan_unit, row_samples, unit_plan_digest
    from logitcache.views.render import render_batch

    m = reader.manifest
    keys_all = source.keys()
    out = _Regenerated()
    features = m.features is not None
    for e in sorted({picked.units[j][0] for j in np.unique(picked.unit_of)} & set(complete)):
        reader.check_seal(e)  # the units of a complete epoch are the ones it was sealed with
    for j in np.unique(picked.unit_of):
        e, s, _n = picked.units[j]
        # checked against its commit record: damage stops here, named
        rows, digest = reader.read_rows(e, s, features=features)
        info = source.shards[s]
        if digest != unit_plan_digest(m.recipe, e, s, info.start, info.stop, keys_all[info.start:info.stop]):
            out.metadata_failures.append(f"{unit_path(e, s)}: its plan (view seeds, mixing partners) differs from "
                                         f"the one regenerated here")
        groups = plan_unit(m.recipe, e, s, info.start, info.stop)
        reps = groups.repeats.tolist()
        group_of = {(int(i), r): g for g, (i, r) in enumerate(zip(groups.first.tolist(), reps))}
        group_of.update({(int(i), r): g for g, (i, r) in enumerate(zip(groups.second.tolist(), reps)) if i >= 0})
        held, repeats = row_samples(groups, m.recipe.aug_repeats), m.recipe.aug_repeats
        rendered: dict[int, dict] = {}
        for r in (picked.picks[picked.unit_of == j] - picked.starts[j]).tolist():
            idx = int(held[r])  # rows are sorted by (sample index, repeat)
            g = group_of[(idx, r % repeats)]
            if g not in rendered:  # a mix pair renders together: once for both views
                rendered[g] = render_batch(m.recipe, transform, source, e, groups.take([g]))
            rg = rendered[g]
            p = int(groups.first[g] != idx)  # the view's position in its group
            out.images.append(rg["images"][p])
            out.seeds.append(int(rg["seed"].numpy().view(np.uint64)[p]))
            out.where.append((e, keys_all[idx]))
            for f, v in rows.items():
                out.rows.setdefault(f, []).append(v[r])
    return out


def _rerun_teacher(teacher, views: torch.Tensor, m: Manifest, batch_size: int):
    """Logits (n, C) float64 for ``views`` (n, 3, H, W), and for a feature cache the pooled
    features (n, D) float32 (else None)."""
    features = m.features is not None
    logits, feats = [], []
    for i in range(0, len(views), batch_size):
        out = teacher(views[i:i + batch_size], m.recipe.mean, m.recipe.std, features=features)
        batch_logits, batch_feats = out if features else (out, None)
        logits.append(batch_logits.cpu())
        feats.append(batch_feats)
    return torch.cat(logits).double(), (torch.cat(feats).cpu().float() if features else None)


def verify_cache(
    url: str,
    *,
    data: str | None = None,
    teacher_weights: str | None = None,
    sample: int = 64,
    seed: int = 0,
    tolerance: float | None = None,
    atol: float = DEFAULT_ATOL,
    device: str = "auto",
    batch_size: int = 64,
    storage_options: dict | None = None,
) -> VerifyReport:
    """Re-render ``sample`` random committed views (seeded by ``seed``), re-run the teacher,
    and compare with the cache. See the module docstring for the pass criterion.

    Raises :class:`CacheMismatchError` (other weights file, other dataset) or
    :class:`WeightsUnavailableError` before any teacher work; a cache that is merely wrong
    gives a report with ``passed`` False.
    """
    from logitcache.build.teacher import Teacher
    from logitcache.distributed import resolve_device
    from logitcache.views.render import create_view_transform

    t0 = time.perf_counter()
    if sample < 1:
        raise LogitcacheError(f"--sample must be >= 1, not {sample}")
    reader = CacheReader(url, storage_options=storage_options)
    m = reader.manifest
    status = reader.epoch_status()
    if status.damaged:
        raise status.damage_error(url)
    check_teacher_weights(m, teacher_weights, url)
    source = _open_checked_source(m, data, url)
    C = m.num_classes
    tol = default_tolerance(m) if tolerance is None else float(tolerance)
    picked = _pick_views(reader, sample, seed, url)

    dev = resolve_device(device)
    teacher = Teacher(m.teacher, weights=teacher_weights, num_classes=C, device=dev, input_size=m.teacher_input_size)
    if teacher.num_classes != C:
        raise CacheMismatchError(f"teacher {teacher.name} predicts {teacher.num_classes} classes, cache {url} has {C}")
    got = _regenerate(reader, source, picked, create_view_transform(m.recipe), status.complete)

    n = len(got.images)
    report = VerifyReport(
        url=url, device=str(dev), seed=seed, requested=sample, views_checked=n,
        units_checked=len(np.unique(picked.unit_of)), epochs=sorted({e for e, _ in got.where}), tolerance=tol,
        atol=atol, max_abs_err=0.0, max_rel_err=0.0, tail_max_abs_err=0.0, kl_mean=0.0, kl_max=0.0,
        top1_agreement=100.0, ids_exact=0, ids_tied=0, ids_wrong=0,
        metadata_failures=got.metadata_failures,
    )
    if n:
        r, true = _rerun_teacher(teacher, torch.stack(got.images), m, batch_size)
        rows = {f: _stack(v) for f, v in got.rows.items()}
        if true is not None:
            compare_features(report, m.feature_spec, reader.feature_basis(), true, rows, tol, got.where)
        if m.codec.name == "sampled":
            compare_sampled(report, m.codec, r, rows, np.array(got.seeds, dtype=np.uint64), got.where)
        else:
            compare_logits(report, m.codec, r, rows, tol, atol, got.where)

    if report.metadata_failures:
        report.reasons.append(f"{len(report.metadata_failures)} units do not match their regenerated plan "
                              f"(first: {report.metadata_failures[0]})")
    report.seconds = time.perf_counter() - t0
    return report
