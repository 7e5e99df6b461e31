"""How sources spell locations: normalise a path or fsspec URL, join a name onto one."""

from __future__ import annotations

import os


def normalise_url(url: str) -> str:
    """Absolute local path (so spawned workers with another cwd agree) or the URL as given."""
    url = url.rstrip("/") or "/"
    if "://" in url or "::" in url:
        return url
    return os.path.abspath(os.path.expanduser(url))


def join_url(base: str, name: str) -> str:
    """``base/name`` with exactly one '/' between them (local paths and URLs alike)."""
    return f"{base.rstrip('/')}/{name}"
