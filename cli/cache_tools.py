"""``logitcache inspect``, ``verify`` and ``ls``: look at caches and check them.

``register(app)`` adds the three commands to the main typer app. Errors meant for users
are raised as :class:`logitcache.errors.LogitcacheError` (the console entry point prints
them on one line, exit 2); ``verify`` exits 1 when the cache fails verification.
"""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer


def _num(x: float | None, fmt: str = ".1f", suffix: str = "") -> str:
    return "-" if x is None else f"{x:{fmt}}{suffix}"


def _rows(pairs: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in pairs)
    out = []
    for key, value in pairs:
        lines = value.split("\n")
        out.append(f"{key:<{width}}  {lines[0]}")
        out += [f"{'':<{width}}  {line}" for line in lines[1:]]
    return "\n".join(out)


def format_stats(st) -> str:
    """The human-readable summary of a :class:`logitcache.inspect.CacheStats`."""
    from logitcache.inspect import format_bytes, format_ranges

    d, c = st.dataset, st.codec
    weights = st.teacher_weights + (f"  sha256 {st.teacher_weights_sha256[:16]}" if st.teacher_weights_sha256 else "")
    recipe = st.recipe_name or "custom"
    units = "  ".join(f"{e}: {a}/{b}" for e, (a, b) in sorted(st.units.items())) or "-"
    major = _num(st.top1_agreement_major, ".1f", "%")
    libs = ", ".join(f"{k} {v}" for k, v in st.library_versions.items())
    pairs = [
        ("cache", st.url),
        ("created", f"{st.created}  (format {st.format_version})"),
        ("teacher", f"{st.teacher}  weights {weights}"),
        ("built on", ", ".join(f"{k} {v}" for k, v in st.build_env.items()) or "-"),
        ("recipe", f"{recipe}  cache_seed {st.recipe['cache_seed']}  input {st.recipe['input_size']} px  "
                   f"sha256 {st.recipe_sha256[:12]}"),
        ("dataset", f"{d['name']}  split {d['split']}  {d['num_samples']} samples in {d['num_shards']} shards  "
                    f"fingerprint {d['fingerprint'][:12]}\n{d['url']}"),
        ("codec", f"{c['name']} k={c['k']} of {st.num_classes} classes  {c['value_dtype']} values, {c['id_dtype']} ids"),
        ("epochs", f"{len(st.epochs_complete)} complete: {format_ranges(st.epochs_complete)}"),
        ("units", f"committed/total per epoch  {units}"),
        ("views", f"{st.views:,} committed"),
        ("storage", f"{format_bytes(st.bytes)}  {_num(st.bytes_per_view, '.1f')} B/view  "
                    f"(raw payload {st.raw_bytes_per_view} B/view)"),
        ("top-1 = label", f"{_num(st.top1_agreement, '.1f', '%')} of {st.unmixed_views:,} unmixed views; "
                          f"{major} of all views (label of larger weight)"),
        ("entropy", f"{_num(st.mean_entropy, '.3f')} nats mean at T=1 (uniform: {st.max_entropy:.3f})"),
        ("top-1 prob", f"{_num(st.mean_top1_prob, '.3f')} mean;  mass outside top-{c['k']} "
                       f"{_num(st.mean_tail_mass, '.3f')} mean"),
        ("libraries", libs or "-"),
    ]
    return _rows(pairs)


def format_report(rep) -> str:
    """The human-readable result of a :class:`logitcache.inspect.VerifyReport`."""
    from logitcache.inspect import format_ranges

    w = rep.worst
    worst = "-" if w is None else (f"epoch {w['epoch']} key {w['key']} class {w['class']}: cached {w['cached']:.6g}, "
                                   f"recomputed {w['recomputed']:.6g} ({w['ratio_to_bound']:.2f} x bound)")
    checks = "ok" if not rep.checksum_failures else f"{len(rep.checksum_failures)} units FAIL"
    meta = "ok" if not rep.metadata_failures else f"{len(rep.metadata_failures)} views differ"
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
        ("checksums", f"{checks} (units read)"),
        ("seeds/labels", meta),
    ]
    verdict = "PASS" if rep.passed else f"FAIL: {rep.reasons[0]}" + (
        f" (and {len(rep.reasons) - 1} more)" if len(rep.reasons) > 1 else "")
    return _rows(pairs) + "\n" + verdict


def format_ls(summaries) -> str:
    """One line per cache, aligned columns."""
    from logitcache.inspect import format_bytes, format_ranges

    head = ("URL", "TEACHER", "DATASET", "EPOCHS", "CODEC", "VIEWS", "SIZE")
    rows = [head] + [
        (s.url, s.teacher, f"{s.dataset}/{s.split or 'all'}",
         f"{len(s.epochs_complete)} ({format_ranges(s.epochs_complete)})" if s.epochs_complete else "0",
         f"{s.codec}{s.k}", f"{s.views:,}", format_bytes(s.bytes))
        for s in summaries
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    right = {5, 6}
    return "\n".join(
        "  ".join(v.rjust(widths[i]) if i in right else v.ljust(widths[i]) for i, v in enumerate(r)).rstrip()
        for r in rows
    )


def _json(obj) -> str:
    return json.dumps(obj, indent=2, default=str)


def inspect_cmd(
    url: str = typer.Argument(..., help="Cache URL (a path or any fsspec URL)."),
    as_json: bool = typer.Option(False, "--json", help="Print the statistics as JSON."),
):
    """Summarise a cache: manifest, completeness, size, teacher agreement and entropy."""
    from logitcache.inspect import inspect_cache

    st = inspect_cache(url)
    print(_json(st.to_dict()) if as_json else format_stats(st))


def verify_cmd(
    url: str = typer.Argument(..., help="Cache URL (a path or any fsspec URL)."),
    sample: int = typer.Option(64, help="Random committed views to re-render and re-run."),
    data: Optional[str] = typer.Option(None, help="Dataset root (default: where the cache was built from)."),
    teacher_weights: Optional[str] = typer.Option(None, help="The weights file the cache was built with."),
    tolerance: Optional[float] = typer.Option(
        None, help="Relative tolerance on kept logits (default 4 x the value dtype's rounding: 1.95e-3 for float16)."),
    seed: int = typer.Option(0, help="Seed of the view sample."),
    device: str = typer.Option("auto", help="Teacher device (CUDA runs bf16 autocast, as the build does)."),
    batch_size: int = typer.Option(64, help="Views per teacher batch."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
):
    """Re-render random cached views, re-run the teacher, compare. Exit 1 past tolerance."""
    from logitcache.inspect import verify_cache

    rep = verify_cache(url, data=data, teacher_weights=teacher_weights, sample=sample, seed=seed,
                       tolerance=tolerance, device=device, batch_size=batch_size)
    print(_json(rep.to_dict()) if as_json else format_report(rep))
    if not rep.passed:
        if as_json:
            print(f"verify failed: {rep.reasons[0]}", file=sys.stderr)
        raise typer.Exit(1)


def ls_cmd(
    cache_root: Optional[str] = typer.Option(None, help="Default $LOGITCACHE_ROOT or ~/.cache/logitcache."),
    as_json: bool = typer.Option(False, "--json", help="Print the list as JSON."),
):
    """List the caches under the cache root, one line each."""
    import dataclasses

    from logitcache.build import cache_root as root_of
    from logitcache.inspect import summarize_cache
    from logitcache.store import list_caches

    root = root_of(cache_root)
    summaries = [summarize_cache(c.url) for c in list_caches(root)]
    if as_json:
        print(_json([dataclasses.asdict(s) for s in summaries]))
    elif not summaries:
        print(f"no caches under {root}")
    else:
        print(format_ls(summaries))


def register(app: typer.Typer) -> None:
    """Add ``inspect``, ``verify`` and ``ls`` to ``app``."""
    have = {c.name for c in app.registered_commands}
    for name, fn in (("inspect", inspect_cmd), ("verify", verify_cmd), ("ls", ls_cmd)):
        if name not in have:  # idempotent: registering twice adds nothing
            app.command(name)(fn)
