"""Text output of the cache tools: sizes, epoch ranges, key/value tables and JSON.

Pure functions from the dataclasses of :mod:`logitcache.storage.stats` and
:mod:`logitcache.verify.report` to the strings that ``logitcache inspect``, ``verify`` and ``ls``
print; sizes use binary units (KiB = 1024 B).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from logitcache.storage.stats import CacheStats, CacheSummary
    from logitcache.verify.report import VerifyReport


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


def _num(x: float | None, fmt: str = ".1f", suffix: str = "") -> str:
    """``x`` formatted, or '-' for a statistic that has no value (no views)."""
    return "-" if x is None else f"{x:{fmt}}{suffix}"


def _rows(pairs: list[tuple[str, str]]) -> str:
    """Key/value lines, keys padded to one width; a value's further lines indented under it."""
    width = max(len(k) for k, _ in pairs)
    out = []
    for key, value in pairs:
        lines = value.split("\n")
        out.append(f"{key:<{width}}  {lines[0]}")
        out += [f"{'':<{width}}  {line}" for line in lines[1:]]
    return "\n".join(out)


def _features_line(features: dict | None) -> str:
    """The cache's teacher features (`build --features`), in words."""
    if features is None:
        return "none (logits only; `build --features` stores them for --kd projector)"
    spec = features["spec"]
    if features.get("basis_sha256"):
        return (f"{features['label']}  D={spec['dim']}: PCA basis fitted on {features['fit_views']:,} views of the "
                f"first epoch, {100 * features['explained']:.1f}% of their variance kept; sha256 "
                f"{features['basis_sha256'][:12]}")
    return f"{features['label']}  D={spec['dim']}: every dim stored"


def format_stats(st: CacheStats) -> str:
    """The human-readable summary of a :class:`logitcache.storage.stats.CacheStats`."""
    d, c = st.dataset, st.codec
    weights = st.teacher_weights + (f"  sha256 {st.teacher_weights_sha256[:16]}" if st.teacher_weights_sha256 else "")
    recipe = st.recipe_name or "custom"
    units = "  ".join(f"{e}: {a}/{b}" for e, (a, b) in sorted(st.units.items())) or "-"
    libs = ", ".join(f"{k} {v}" for k, v in st.library_versions.items())
    pairs = [
        ("cache", st.url),
        ("created", f"{st.created}  (format {st.format_version})"),
        ("teacher", f"{st.teacher}  weights {weights}"),
        ("built on", ", ".join(f"{k} {v}" for k, v in st.build_env.items()) or "-"),
        ("recipe", f"{recipe}  cache_seed {st.recipe['cache_seed']}  input {st.recipe['input_size']} px  "
                   f"sha256 {st.recipe_sha256[:12]}"),
        ("views digest", f"{st.views_digest}  (of recipe and data: caches with this digest hold the same views)"),
        ("dataset", f"{d['name']}  split {d['split']}  {d['num_samples']} samples in {d['num_shards']} shard{'s' if d['num_shards'] != 1 else ''}  "
                    f"fingerprint {d['fingerprint'][:12]}\n{d['url']}"),
        ("codec", f"{c['name']} {'N' if c['name'] == 'sampled' else 'k'}={c['k']} of {st.num_classes} classes  "
                  f"{c['values']} values, {c['id_bits']}-bit ids\nerror: {st.error_bound}"),
        ("features", _features_line(st.features)),
        ("epochs", f"{len(st.epochs_complete)} complete: {format_ranges(st.epochs_complete)}" + (
            f"; unfinished (a build has not finished them): {format_ranges(st.epochs_unfinished)}"
            if st.epochs_unfinished else "") + (
            f"; pulled: {len(st.epochs_complete)} of the {len(st.pulled_from['epochs'])} epochs published at "
            f"{st.pulled_from['url']}" if st.pulled_from else "")),
        ("units", f"committed/total per epoch  {units}"),
        ("views", f"{st.views:,} committed"),
        ("storage", f"{format_bytes(st.bytes)}  {_num(st.bytes_per_view, '.1f')} B/view  "
                    f"(payload before zstd {_num(st.payload_bytes_per_view, '.1f', ' B/view')})"),
        ("top-1 = label", f"{_num(st.top1_agreement, '.1f', '%')} of {st.labelled_views:,} views (own label; "
                          f"mixed views count too)" if st.labelled_views else "- (give --data to compare with labels)"),
        ("entropy", f"{_num(st.mean_entropy, '.3f')} nats mean at T=1 (uniform: {st.max_entropy:.3f})"),
        ("top-1 prob", f"{_num(st.mean_top1_prob, '.3f')} mean;  mass outside the kept classes "
                       f"{_num(st.mean_tail_mass, '.3f')} mean"),
        ("libraries", libs or "-"),
        *((f"checked {name}", what) for name, what in st.checks.items()),
    ]
    return _rows(pairs)


def format_report(rep: VerifyReport) -> str:
    """The human-readable result of a :class:`logitcache.verify.report.VerifyReport`."""
    w = rep.worst
    worst = "-" if w is None else (f"epoch {w['epoch']} key {w['key']} class {w['class']}: cached {w['cached']:.6g}, "
                                   f"recomputed {w['recomputed']:.6g} ({w['ratio_to_bound']:.2f} x bound)")
    meta = "ok (view seeds, mixing partners)" if not rep.metadata_failures else f"{len(rep.metadata_failures)} units differ"
    pairs = [
        ("cache", rep.url),
        ("checked", f"{rep.views_checked} views (asked {rep.requested}, seed {rep.seed}) from {rep.units_checked} "
                    f"units of epochs {format_ranges(rep.epochs)}; teacher on {rep.device}, {rep.seconds:.1f} s"),
        ("kept logits", f"max abs err {rep.max_abs_err:.3g}  max rel err {rep.max_rel_err:.3g}  "
                        f"(tolerance {rep.tolerance:.3g} + abs slack {rep.atol:.0e})"),
        ("worst entry", worst),
        ("tail_lse", f"max abs err {rep.tail_max_abs_err:.3g}"),
        ("top-k ids", f"{rep.ids_exact} exact, {rep.ids_tied} tied, {rep.ids_wrong} wrong"),
        ("top-1", f"{rep.top1_agreement:.1f}% cached = recomputed"),
        ("KL(t||rebuilt)", f"mean {rep.kl_mean:.3g}  max {rep.kl_max:.3g} nats (T=1)"),
        *([("features", f"{rep.feature_views} views: least cosine {rep.feature_cos_min:.4f}; max error past the "
                          f"codec's bound {rep.feature_max_excess:.3g} x |f|")] if rep.feature_views else []),
        ("checksums", "ok (every unit read, and its epoch's seal, was checked)"),
        ("plan", meta),
    ]
    verdict = "PASS" if rep.passed else f"FAIL: {rep.reasons[0]}" + (
        f" (and {len(rep.reasons) - 1} more)" if len(rep.reasons) > 1 else "")
    return _rows(pairs) + "\n" + verdict


def format_ls(summaries: list[CacheSummary]) -> str:
    """One line per :class:`logitcache.storage.stats.CacheSummary`, aligned columns."""
    head = ("URL", "TEACHER", "DATASET", "VIEWS-DIGEST", "EPOCHS", "CODEC", "VIEWS", "SIZE")
    rows = [head] + [
        (s.url, s.teacher, f"{s.dataset}/{s.split or 'all'}", s.views_digest,
         f"{len(s.epochs_complete)} ({format_ranges(s.epochs_complete)})" if s.epochs_complete else "0",
         f"{s.codec}{s.k}/{s.values}" + (f"+feat:{s.features}" if s.features else ""), f"{s.views:,}",
         format_bytes(s.bytes))
        for s in summaries
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    right = {6, 7}
    return "\n".join(
        "  ".join(v.rjust(widths[i]) if i in right else v.ljust(widths[i]) for i, v in enumerate(r)).rstrip()
        for r in rows
    )


def _json(obj) -> str:
    return json.dumps(obj, indent=2, default=str)


def format_json(obj: object) -> str:
    """``obj`` as indented JSON; values JSON lacks (paths, numpy scalars) as their str()."""
    return json.dumps(obj, indent=2, default=str)
