"""The caches under a cache root: where the root is (:func:`cache_root`) and what it holds (:func:`list_caches`)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from logitcache.storage.layout import is_local
from logitcache.storage.manifest import Manifest
from logitcache.storage.reader import CacheReader

DEFAULT_CACHE_ROOT = "~/.cache/logitcache"


def cache_root(flag: str | None = None) -> str:
    """The cache root: ``--cache-root``, else $LOGITCACHE_ROOT, else ~/.cache/logitcache."""
    root = flag or os.environ.get("LOGITCACHE_ROOT") or DEFAULT_CACHE_ROOT
    return os.path.expanduser(root) if "://" not in root else root


@dataclass
class CacheEntry:
    url: str
    manifest: Manifest


def list_caches(root: str) -> list[CacheEntry]:
    """The caches directly under ``root`` (a local path or fsspec URL), sorted by URL.

    Folders that are not logitcache caches are ignored; an unreadable manifest is skipped
    with its error kept out of the way (``inspect`` reports it).
    """
    import fsspec

    if is_local(root):
        base = root.removeprefix("file://")
        if not os.path.isdir(base):
            return []
        children = [os.path.join(base, n) for n in sorted(os.listdir(base))]
    else:
        fs, path = fsspec.core.url_to_fs(root)
        protocol = root.split("://", 1)[0]
        children = [f"{protocol}://{p}" for p in sorted(fs.ls(path, detail=False))]
    out = []
    for child in children:
        try:
            out.append(CacheEntry(child, CacheReader(child).manifest))
        except Exception:  # noqa: BLE001 - not a cache, or not one we can read
            continue
    return out
