"""``logitcache inspect``, ``verify`` and ``ls``: look at caches and check them.

``register(app)`` adds the three commands to the main typer app; the text they print comes
from ``cli/format.py``. Errors meant for users are raised as
:class:`logitcache.errors.LogitcacheError` (the console entry point prints them on one
line, exit 2); ``verify`` exits 1 when the cache fails verification.
"""

from __future__ import annotations

import sys
from typing import Optional

import typer
from logitcache.cli.format import format_json, format_ls, format_ranges, format_report, format_stats


def inspect_cmd(
    url: str = typer.Argument(..., metavar="URL", help="Cache URL (a path or any fsspec URL)."),
    data: Optional[str] = typer.Option(None, metavar="URL", show_default="no label statistics",
                                       help="The cache's dataset: adds the teacher's top-1 agreement with the labels."),
    split: str = typer.Option("train", metavar="TEXT", help="Split of --data the cache was built on."),
    as_json: bool = typer.Option(False, "--json", help="Print the statistics as JSON."),
):
    """Summarise a cache: manifest, codec and its error bound, completeness, size, entropy
    and (with --data) the teacher's agreement with the labels."""
    from logitcache.data.source import open_source
    from logitcache.storage.stats import inspect_cache

    st = inspect_cache(url, source=open_source(data, split) if data else None)
    print(format_json(st.to_dict()) if as_json else format_stats(st))


def verify_cmd(
    url: str = typer.Argument(..., metavar="URL", help="Cache URL (a path or any fsspec URL)."),
    sample: int = typer.Option(64, metavar="INTEGER", min=1, help="Random committed views to re-render and re-run."),
    data: Optional[str] = typer.Option(None, metavar="URL", show_default="where the cache was built from",
                                       help="Dataset root."),
    teacher_weights: Optional[str] = typer.Option(None, metavar="PATH", show_default="timm's pretrained weights", help="The weights file the cache was built with."),
    tolerance: Optional[float] = typer.Option(
        None, metavar="FLOAT", show_default="4 x the value dtype's rounding: 1.95e-3 for float16",
        help="Relative tolerance on kept logits; a feature cache's features may also be off by this times "
             "their norm (at least 2^-13) past the codec's bound."),
    seed: int = typer.Option(0, metavar="INTEGER", help="Seed of the view sample."),
    device: str = typer.Option("auto", metavar="TEXT", help="Teacher device (CUDA runs bf16 autocast, as the build does)."),
    batch_size: int = typer.Option(64, metavar="INTEGER", min=1, help="Views per teacher batch."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
):
    """Re-render random cached views, re-run the teacher, compare. Exit 1 past tolerance."""
    from logitcache.verify.run import verify_cache

    rep = verify_cache(url, data=data, teacher_weights=teacher_weights, sample=sample, seed=seed,
                       tolerance=tolerance, device=device, batch_size=batch_size)
    print(format_json(rep.to_dict()) if as_json else format_report(rep))
    if not rep.passed:
        if as_json:
            print(f"verify failed: {rep.reasons[0]}", file=sys.stderr)
        raise typer.Exit(1)


def ls_cmd(
    cache_root: Optional[str] = typer.Option(None, metavar="URL", show_default="$LOGITCACHE_ROOT or ~/.cache/logitcache",
                                         help="Where named caches live."),
    as_json: bool = typer.Option(False, "--json", help="Print the list as JSON."),
):
    """List the caches under the cache root, one line each."""
    import dataclasses

    from logitcache.storage.catalog import cache_root as root_of
    from logitcache.storage.catalog import list_caches
    from logitcache.storage.stats import summarize_cache

    root = root_of(cache_root)
    summaries = [summarize_cache(c.url) for c in list_caches(root)]
    if as_json:
        print(format_json([dataclasses.asdict(s) for s in summaries]))
    elif not summaries:
        print(f"no caches under {root}")
    else:
        print(format_ls(summaries))


def publish_cmd(
    url: str = typer.Argument(..., metavar="CACHE", help="The cache to publish (a path or any fsspec URL)."),
    dest: str = typer.Argument(..., metavar="DEST_URL", help="Where to write the published copy (any fsspec URL)."),
    epochs: Optional[str] = typer.Option(None, metavar="N|A:B", show_default="every complete epoch",
                                         help="The epochs to publish."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
):
    """Write a read-only copy of a cache for static hosting (no directory listing needed): one
    index, and per epoch one index and one pack; readers open it by URL, as any cache."""
    from logitcache.cli.build_command import parse_epochs

    from logitcache.storage.publish import publish_cache

    out = publish_cache(url, dest, parse_epochs(epochs) if epochs else None, progress=progress)
    print(f"published {len(out['epochs'])} epochs of {url} to {dest} ({out['bytes']:,} bytes); index sha256 "
          f"{out['index_sha256']}")


def pull_cmd(
    url: str = typer.Argument(..., metavar="URL", help="A published cache (https://, s3://, a path, ...)."),
    dest: str = typer.Argument(..., metavar="DEST", help="Where to mirror it (a path or any fsspec URL)."),
    epochs: Optional[str] = typer.Option(None, metavar="N|A:B", show_default="every published epoch",
                                         help="The epochs to pull."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar (bytes/s, ETA)."),
):
    """Mirror a published cache, or some of its epochs: every file checked against the index,
    resumable (a killed pull re-run fetches only what is not there and verified)."""
    from logitcache.cli.build_command import parse_epochs

    from logitcache.storage.pull import pull_cache

    out = pull_cache(url, dest, parse_epochs(epochs) if epochs else None, progress=progress)
    print(f"pulled epochs {format_ranges(out['epochs'])} of {url} to {dest}: {out['fetched']} files fetched "
          f"({out['bytes']:,} bytes), {out['skipped']} already there and verified")


def register(app: typer.Typer) -> None:
    """Add ``inspect``, ``verify``, ``ls``, ``publish`` and ``pull`` to ``app``."""
    have = {c.name for c in app.registered_commands}
    for name, fn in (("inspect", inspect_cmd), ("verify", verify_cmd), ("ls", ls_cmd), ("publish", publish_cmd),
                     ("pull", pull_cmd)):
        if name not in have:  # idempotent: registering twice adds nothing
            app.command(name)(fn)
