"""Look inside a cache (:func:`inspect_cache`, :func:`summarize_cache`) and check it
against its teacher (:func:`verify_cache`). The functions return dataclasses; the CLI
(``cli/cache_tools.py``) only formats them.

Content statistics read whole unit arrays (never per item) and are computed per unit
with vectorised numpy.

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

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .codec import decode
from .errors import CacheMismatchError, LogitcacheError, WeightsUnavailableError
from .manifest import Manifest
from .store import UNIT_ARRAYS, CacheReader, array_digest, is_local, unit_commit, unit_path

#: Absolute slack of a kept logit, on top of the relative tolerance (see module docstring).
DEFAULT_ATOL = 1e-6
#: Recomputation noise allowed per entry, relative to the largest |logit| of its row.
NOISE_REL = 2.0**-20
#: Multiple of the codec's rounding bound used as default relative tolerance.
TOLERANCE_FACTOR = 4.0


# -- small helpers ---------------------------------------------------------------------


def format_bytes(n: float | int | None) -> str:
    """1536 -> '1.5 KiB' (binary units); 512 -> '512 B'; None -> '?'."""
    if n is None:
        return "?"
    n = float(n)
    if abs(n) < 1024:
        return f"{n:.0f} B" if n == int(n) else f"{n:.1f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if abs(n) < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} PiB"


def format_ranges(values: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'; [] -> '-'."""
    if not values:
        return "-"
    values = sorted(values)
    parts, start, prev = [], values[0], values[0]
    for v in values[1:] + [None]:  # type: ignore[list-item]
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ", ".join(parts)


def storage_bytes(url: str, storage_options: dict | None = None) -> int:
    """Bytes the cache takes on storage: a directory walk locally, ``fs.du`` elsewhere."""
    if is_local(url):
        path = url.removeprefix("file://")
        total = 0
        for dirpath, _dirs, files in os.walk(path):
            for name in files:
                try:
                    total += os.lstat(os.path.join(dirpath, name)).st_size
                except OSError:
                    pass  # removed while walking
        return total
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return int(fs.du(path, total=True))


def recipe_name(manifest: Manifest) -> str | None:
    """The name in :data:`logitcache.views.RECIPES` that the cache's recipe is (any cache_seed)."""
    from .views import RECIPES

    recipe = manifest.recipe
    for name, known in RECIPES.items():
        if dataclasses.replace(known, cache_seed=recipe.cache_seed) == recipe:
            return name
    return None


def _epochs_present(reader: CacheReader) -> list[int]:
    try:
        return sorted(int(n) for n in reader.root["epochs"].group_keys())
    except KeyError:
        return []


def _committed(reader: CacheReader) -> dict[int, dict[int, int]]:
    """{epoch: {shard: views}} of every committed unit (epochs present, complete or not)."""
    out = {}
    for e in _epochs_present(reader):
        out[e] = {}
        for s in range(reader.num_shards):
            commit = unit_commit(reader.root, e, s)
            if commit is not None:
                out[e][s] = int(commit["n"])
    return out


def topk_entropy(topk_logits: np.ndarray, tail_lse: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Entropy (nats) at T=1 of the rebuilt distribution, and its tail mass, per view.

    Closed form of ``rebuilt_probs``: the k kept logits plus C - k tail classes sharing
    ``exp(tail_lse)`` equally. O(k) per view, float64. Shapes (n, k), (n,) -> (n,), (n,).
    """
    v = topk_logits.astype(np.float64)
    t = tail_lse.astype(np.float64)
    k = v.shape[1]
    if len(v) == 0:
        return np.zeros(0), np.zeros(0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        log_z = np.logaddexp(np.logaddexp.reduce(v, axis=1), t)  # t = -inf (full codec) is fine
        logp = v - log_z[:, None]
        h = -(np.exp(logp) * logp).sum(axis=1)
        log_m = t - log_z
        mass = np.exp(log_m)
        if k < num_classes:
            h = h - np.where(mass > 0, mass * (log_m - math.log(num_classes - k)), 0.0)
    return h, np.where(np.isfinite(mass), mass, 0.0)


# -- inspect ----------------------------------------------------------------------------


@dataclass
class CacheSummary:
    """What ``logitcache ls`` shows: cheap (manifest, commit records, storage walk)."""

    url: str
    teacher: str
    dataset: str
    split: str | None
    codec: str
    k: int
    num_classes: int
    epochs_complete: list[int]
    views: int
    bytes: int | None


@dataclass
class CacheStats:
    """Everything ``logitcache inspect`` reports about one cache."""

    url: str
    format_version: int
    created: str
    teacher: str
    teacher_weights: str
    teacher_weights_sha256: str | None
    recipe_name: str | None  # a name of logitcache.views.RECIPES, or None for a custom recipe
    recipe_sha256: str
    recipe: dict
    dataset: dict  # name, split, fingerprint, num_samples, num_shards, url
    codec: dict  # name, k, num_classes, value_dtype, id_dtype
    num_classes: int
    library_versions: dict[str, str]
    build_env: dict  # Teacher.runtime() at build time: device, precision, compile, torch_threads
    epochs_complete: list[int]
    units: dict[int, tuple[int, int]]  # epoch present -> (committed units, total units)
    views: int  # committed views, all epochs
    bytes: int  # on storage (whole group: every unit, committed or not, and metadata)
    bytes_per_view: float | None  # bytes / views
    raw_bytes_per_view: int  # uncompressed payload: ids, values, tail_lse
    unmixed_views: int
    top1_agreement: float | None  # % of unmixed views whose cached top-1 is the label
    top1_agreement_major: float | None  # % of all views whose top-1 is the label of larger weight
    mean_entropy: float | None  # nats, rebuilt distribution at T=1, all committed views
    max_entropy: float  # log(C), for reference
    mean_top1_prob: float | None  # mean teacher probability of its top-1 class
    mean_tail_mass: float | None  # mean probability outside the kept top-k

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def summarize_cache(url: str, storage_options: dict | None = None, with_bytes: bool = True) -> CacheSummary:
    """Manifest, complete epochs and committed views of a cache, without reading arrays."""
    reader = CacheReader(url, storage_options=storage_options)
    m = reader.manifest
    committed = _committed(reader)
    complete = [e for e, units in committed.items() if len(units) == reader.num_shards]
    return CacheSummary(
        url=url, teacher=m.teacher, dataset=m.dataset.name, split=m.dataset.split, codec=m.codec.name, k=m.codec.k,
        num_classes=m.num_classes, epochs_complete=complete,
        views=sum(n for units in committed.values() for n in units.values()),
        bytes=storage_bytes(url, storage_options) if with_bytes else None,
    )


def inspect_cache(url: str, storage_options: dict | None = None) -> CacheStats:
    """Manifest, completeness, size and teacher statistics of the cache at ``url``.

    Statistics cover every committed unit (also of incomplete epochs); each unit is read
    whole, once.
    """
    reader = CacheReader(url, storage_options=storage_options)
    m = reader.manifest
    committed = _committed(reader)
    n_shards = reader.num_shards
    C = m.num_classes

    views = unmixed = agree_unmixed = agree_major = 0
    sum_h = sum_top1 = sum_tail = 0.0
    for e, units in committed.items():
        for s in units:
            u = reader.read_unit(e, s)
            n = len(u["label"])
            if n == 0:
                continue
            views += n
            top1 = u["topk_ids"][:, 0].astype(np.int64)
            label = u["label"].astype(np.int64)
            lam = u["mix_lam"]
            plain = lam == 1.0
            unmixed += int(plain.sum())
            agree_unmixed += int((top1[plain] == label[plain]).sum())
            # the partner is in the same unit (pairing is shard-local): its label from this unit
            order = np.argsort(u["sample_index"])
            pos = np.searchsorted(u["sample_index"], u["partner_index"], sorter=order).clip(0, n - 1)
            partner_pos = order[pos]
            found = u["sample_index"][partner_pos] == u["partner_index"]
            partner_label = np.where(found, label[partner_pos], -1)
            major = np.where(lam >= 0.5, label, partner_label)
            agree_major += int((top1 == major).sum())
            h, mass = topk_entropy(u["topk_logits"], u["tail_lse"], C)
            sum_h += float(h.sum())
            sum_tail += float(mass.sum())
            v = u["topk_logits"].astype(np.float64)
            log_z = np.logaddexp(np.logaddexp.reduce(v, axis=1), u["tail_lse"].astype(np.float64))
            sum_top1 += float(np.exp(v[:, 0] - log_z).sum())

    nbytes = storage_bytes(url, storage_options)
    d = m.dataset
    return CacheStats(
        url=url, format_version=m.format_version, created=m.created, teacher=m.teacher,
        teacher_weights=m.teacher_weights, teacher_weights_sha256=m.teacher_weights_sha256,
        recipe_name=recipe_name(m), recipe_sha256=m.recipe.digest(), recipe=m.recipe.to_dict(),
        dataset={"name": d.name, "split": d.split, "fingerprint": d.fingerprint, "num_samples": d.num_samples,
                 "num_shards": len(d.shards), "url": d.url},
        codec=m.codec.to_dict(), num_classes=C, library_versions=dict(m.library_versions),
        build_env=dict(m.build_env), epochs_complete=[e for e, units in committed.items() if len(units) == n_shards],
        units={e: (len(units), n_shards) for e, units in committed.items()},
        views=views, bytes=nbytes, bytes_per_view=nbytes / views if views else None,
        raw_bytes_per_view=m.codec.bytes_per_view,
        unmixed_views=unmixed,
        top1_agreement=100.0 * agree_unmixed / unmixed if unmixed else None,
        top1_agreement_major=100.0 * agree_major / views if views else None,
        mean_entropy=sum_h / views if views else None, max_entropy=math.log(C),
        mean_top1_prob=sum_top1 / views if views else None,
        mean_tail_mass=sum_tail / views if views else None,
    )


# -- verify -----------------------------------------------------------------------------


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
    checksum_failures: list[str] = field(default_factory=list)
    metadata_failures: list[str] = field(default_factory=list)  # seeds / labels / partners / lambdas
    worst: dict | None = None  # the kept logit nearest to (or furthest past) its bound
    reasons: list[str] = field(default_factory=list)  # why it failed; empty when passed
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.reasons

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "passed": self.passed}


def default_tolerance(manifest: Manifest) -> float:
    """``TOLERANCE_FACTOR`` x the codec's rounding bound (2**-9 for float16, 2**-22 for float32)."""
    return TOLERANCE_FACTOR * manifest.codec.relative_tolerance()


def check_teacher_weights(manifest: Manifest, teacher_weights: str | None, url: str) -> None:
    """Raise unless ``teacher_weights`` are the weights the cache was built with."""
    from .teacher import file_sha256

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


def _open_checked_source(manifest: Manifest, data: str | None, url: str):
    from .data.source import open_source

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
    from .build import resolve_device
    from .teacher import Teacher
    from .views import create_train_transform, plan_unit, render_group

    t0 = time.perf_counter()
    if sample < 1:
        raise LogitcacheError(f"--sample must be >= 1, not {sample}")
    reader = CacheReader(url, storage_options=storage_options)
    m = reader.manifest
    check_teacher_weights(m, teacher_weights, url)
    source = _open_checked_source(m, data, url)
    C, k = m.num_classes, m.codec.k
    tol = default_tolerance(m) if tolerance is None else float(tolerance)

    # -- which views: uniform over committed views, seeded ------------------------------
    committed = _committed(reader)
    units = [(e, s, n) for e, us in committed.items() for s, n in sorted(us.items()) if n > 0]
    total = sum(n for _, _, n in units)
    if total == 0:
        raise LogitcacheError(f"cache {url} has no committed views to verify")
    count = min(sample, total)
    picks = np.sort(np.random.default_rng(seed).choice(total, size=count, replace=False))
    starts = np.cumsum([0] + [n for _, _, n in units])
    unit_of = np.searchsorted(starts, picks, side="right") - 1

    dev = resolve_device(device)
    teacher = Teacher(m.teacher, weights=teacher_weights, num_classes=C, device=dev)
    if teacher.num_classes != C:
        raise CacheMismatchError(f"teacher {teacher.name} predicts {teacher.num_classes} classes, cache {url} has {C}")
    transform = create_train_transform(m.recipe)
    keys_all = source.keys()
    labels_all = source.labels()

    checksum_failures, metadata_failures = [], []
    rows = {name: [] for name in ("topk_ids", "topk_logits", "tail_lse")}
    where, images = [], []  # per checked view: (epoch, key); its rendered image
    for j in np.unique(unit_of):
        e, s, _n = units[j]
        name = unit_path(e, s)
        u = reader.read_unit(e, s)
        commit = unit_commit(reader.root, e, s) or {}
        bad = [key for key in UNIT_ARRAYS if array_digest(u[key]) != commit.get("sha256", {}).get(key)]
        if bad:
            checksum_failures.append(f"{name}: {', '.join(bad)}")
        info = source.shards[s]
        plan = plan_unit(m.recipe, e, s, info.start, keys_all[info.start:info.stop])
        group_of = {i: g for g in plan.groups for i in g.indices}
        rendered = {}
        for r in (picks[unit_of == j] - starts[j]).tolist():
            idx = int(u["sample_index"][r])
            g = group_of.get(idx)
            if g is None:
                metadata_failures.append(f"{name} row {r}: sample index {idx} is not in shard {s}")
                continue
            if id(g) not in rendered:
                rendered[id(g)] = render_group(m.recipe, transform, source.load_image, g)
            rg = rendered[id(g)]
            p = g.indices.index(idx)
            key = keys_all[idx]
            expect = {"view_seed": np.uint64(g.seeds[p]), "label": labels_all[idx],
                      "partner_index": int(rg.partner[p]), "mix_lam": np.float32(float(rg.lam[p]))}
            diffs = [f for f, v in expect.items() if u[f][r] != v]
            if diffs:
                metadata_failures.append(f"{name} key {key}: {', '.join(diffs)} differ from the regenerated view")
            images.append(rg.images[p])
            where.append((e, key))
            for f in rows:
                rows[f].append(u[f][r])

    n = len(images)
    report = VerifyReport(
        url=url, device=str(dev), seed=seed, requested=sample, views_checked=n, units_checked=len(np.unique(unit_of)),
        epochs=sorted({e for e, _ in where}), tolerance=tol, atol=atol, max_abs_err=0.0, max_rel_err=0.0,
        tail_max_abs_err=0.0, kl_mean=0.0, kl_max=0.0, top1_agreement=100.0, ids_exact=0, ids_tied=0, ids_wrong=0,
        checksum_failures=checksum_failures, metadata_failures=metadata_failures,
    )
    if n:
        views = torch.stack(images)
        r = torch.cat([teacher(views[i:i + batch_size], m.recipe.mean, m.recipe.std).cpu()
                       for i in range(0, n, batch_size)]).double()
        ids = torch.from_numpy(np.stack(rows["topk_ids"]).astype(np.int64))
        c = torch.from_numpy(np.stack(rows["topk_logits"]).astype(np.float64))
        tail = torch.from_numpy(np.stack(rows["tail_lse"]).astype(np.float64))
        _compare(report, r, ids, c, tail, C, k, tol, atol, where)

    if report.checksum_failures:
        report.reasons.append(f"{len(report.checksum_failures)} units fail their sha256 checksums "
                              f"(first: {report.checksum_failures[0]})")
    if report.metadata_failures:
        report.reasons.append(f"{len(report.metadata_failures)} views do not match their regenerated seeds/labels "
                              f"(first: {report.metadata_failures[0]})")
    report.seconds = time.perf_counter() - t0
    return report


def _compare(report: VerifyReport, r: torch.Tensor, ids: torch.Tensor, c: torch.Tensor, tail: torch.Tensor,
             C: int, k: int, tol: float, atol: float, where: list[tuple[int, str]]) -> None:
    """Fill the error fields and reasons of ``report``. r (n, C) recomputed, ids/c (n, k), tail (n,); float64."""
    n = len(r)
    in_range = ((ids >= 0) & (ids < C)).all(dim=1)
    safe_ids = ids.clamp(0, C - 1)
    slack = atol + NOISE_REL * r.abs().amax(dim=1, keepdim=True)  # (n, 1)

    # kept logits, compared at the cached ids
    r_at = r.gather(1, safe_ids)
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
        terr = torch.nan_to_num((tail - tail_r).abs(), nan=math.inf)
        report.tail_max_abs_err = float(terr.max())
        tbad = terr > tol * tail_r.abs() + slack[:, 0]
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
    logq = torch.log_softmax(decode(safe_ids, c, tail, C).double(), dim=1)
    kl = torch.nan_to_num((logp.exp() * (logp - logq)).sum(dim=1), nan=math.inf)
    report.kl_mean, report.kl_max = float(kl.mean()), float(kl.max())
