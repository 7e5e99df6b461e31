"""Tar member indexes kept beside the shards (``<shard>.idx.json``): write them, and index shards from them.

One JSON object per shard; every list has one entry per sample, in member order, and
every offset is in bytes from the start of the shard::

    {"format": "logitcache-tar-index", "version": 1, "shard_bytes": int,
     "keys": [str], "labels": [int], "offsets": [int], "sizes": [int], "starts": [int], "stops": [int]}

``offsets``/``sizes`` locate each sample's image data and ``[starts, stops)`` is its read
range (see tar_index.py); the lists equal what walking the shard's headers gives, so a
dataset's fingerprint does not depend on whether its shards have indexes. An index is used
only when ``shard_bytes`` equals the size the store lists for the shard (otherwise
BadShardError: the shard was rewritten, re-run ``logitcache data index``), and every
image read checks the tar headers inside its read range besides (tar_index.check_read).

Cost of indexing ``n`` shards of one directory: one listing (sizes, and which indexes
exist; a page per 1,000 objects on S3) and one small read per index, read concurrently.
A shard without an index is walked instead, reading all its headers (with
``LOGITCACHE_SHARD_CACHE`` set, from its local copy: shard_cache.py).
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from logitcache.data.shard_cache import local_copy
from logitcache.data.tar_index import RERUN, TarIndex, check_label, index_tar
from logitcache.errors import BadShardError

__all__ = ["INDEX_SUFFIX", "decode_index", "encode_index", "index_and_write", "index_shards", "index_url",
           "write_index"]

INDEX_SUFFIX = ".idx.json"
INDEX_FORMAT = "logitcache-tar-index"
INDEX_VERSION = 1
_INT_FIELDS = ("labels", "offsets", "sizes", "starts", "stops")
# Threads used to walk tar shards (hides the latency of remote stores).
INDEX_THREADS = 8

T = TypeVar("T")


def index_url(shard_url: str) -> str:
    """Where the index of a shard lives: beside it, named ``<shard>.idx.json``."""
    return shard_url + INDEX_SUFFIX


def encode_index(index: TarIndex, shard_bytes: int) -> bytes:
    """The index file's bytes (deterministic: the same shard gives the same bytes)."""
    doc: dict[str, Any] = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "shard_bytes": int(shard_bytes)}
    doc["keys"] = list(index.keys)
    for name in _INT_FIELDS:
        doc[name] = np.asarray(getattr(index, name), dtype=np.int64).tolist()
    return (json.dumps(doc, separators=(",", ":")) + "\n").encode("utf-8")


def decode_index(data: bytes, shard: str, shard_bytes: int, num_classes: int) -> TarIndex:
    """The TarIndex in an index file's bytes, checked against the shard's listed size and ``num_classes``.

    BadShardError naming the shard when the index is stale or malformed; BadSampleError
    for a label out of range (as walking the headers would give).
    """
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _corrupt(shard, f"not JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != INDEX_FORMAT or doc.get("version") != INDEX_VERSION:
        raise _corrupt(shard, f"not a {INDEX_FORMAT} version {INDEX_VERSION} file")
    recorded = doc.get("shard_bytes")
    if recorded != shard_bytes:
        raise BadShardError(
            f"shard {shard} has {shard_bytes} bytes but its tar index {index_url(shard)} was made for {recorded}: "
            f"the shard was rewritten or cut short since; {RERUN}"
        )
    keys = doc.get("keys")
    if not isinstance(keys, list) or not all(isinstance(k, str) and k for k in keys):
        raise _corrupt(shard, "keys must be a list of non-empty strings")
    arrays = {name: _int_array(doc.get(name), len(keys), name, shard) for name in _INT_FIELDS}
    starts, stops, offsets, sizes = arrays["starts"], arrays["stops"], arrays["offsets"], arrays["sizes"]
    if len(keys) and not (
        (starts >= 0).all() and (starts <= offsets).all() and (sizes >= 0).all()
        and (offsets + sizes <= stops).all() and (stops <= shard_bytes).all()
    ):
        raise _corrupt(shard, "a read range lies outside the shard or misses its image")
    bad = np.flatnonzero((arrays["labels"] < 0) | (arrays["labels"] >= num_classes))
    if len(bad):
        check_label(int(arrays["labels"][bad[0]]), num_classes, shard, keys[bad[0]])
    return TarIndex(keys=keys, **arrays)


def _int_array(value: Any, n: int, name: str, shard: str) -> np.ndarray:
    """``value`` as an (n,) int64 array; BadShardError unless a list of n integers."""
    if not isinstance(value, list) or len(value) != n:
        raise _corrupt(shard, f"{name} must be a list of {n} integers")
    array = np.asarray(value) if n else np.zeros(0, np.int64)
    if array.dtype.kind not in "iu" or array.shape != (n,):
        raise _corrupt(shard, f"{name} must be a list of {n} integers")
    return array.astype(np.int64)


def _corrupt(shard: str, why: str) -> BadShardError:
    return BadShardError(f"tar index {index_url(shard)} of shard {shard} is unreadable ({why}); {RERUN}")


# -- which shards exist, their sizes, their indexes ---------------------------------------


@dataclass
class _Listed:
    """One shard as found in its directory's listing."""

    size: int  # bytes
    index: bytes | None  # its index file's bytes; None when it has none


def _map(fn: Callable[[int], T], n: int, remote: bool) -> list[T]:
    """``[fn(i) for i in range(n)]``, on threads for a remote store (latency, not CPU, is the cost)."""
    if n > 1 and remote:
        with ThreadPoolExecutor(max_workers=min(INDEX_THREADS, n)) as pool:
            return list(pool.map(fn, range(n)))
    return [fn(i) for i in range(n)]


def _listing(fs: Any, path: str) -> dict[str, int]:
    """File path -> size in directory ``path``; empty when the store cannot list it."""
    try:
        fs.invalidate_cache(path)  # a listing cached earlier in this process may predate a rewrite
        entries = fs.ls(path, detail=True)
    except (OSError, NotImplementedError, ValueError):
        return {}
    files = (e for e in entries if e.get("type") == "file" and isinstance(e.get("size"), int))
    return {e["name"].rstrip("/"): e["size"] for e in files}


def _size(fs: Any, path: str, url: str) -> int:
    try:
        size = fs.info(path).get("size")
    except FileNotFoundError:
        raise BadShardError(f"shard file not found: {url}") from None
    except OSError as e:
        raise BadShardError(f"cannot read shard {url}: {e}") from None
    if not isinstance(size, int):
        raise BadShardError(f"cannot read shard {url}: the store gives no size")
    return size


def _list_shards(urls: list[str], read_indexes: bool) -> list[_Listed]:
    """Size (and, if asked, index bytes) of every shard: one listing per directory, then the indexes at once."""
    out: list[_Listed | None] = [None] * len(urls)
    by_dir: dict[str, list[int]] = {}
    for i, url in enumerate(urls):
        by_dir.setdefault(url.rsplit("/", 1)[0], []).append(i)
    for directory, positions in by_dir.items():
        fs, dir_path = fsspec.core.url_to_fs(directory)
        listed = _listing(fs, dir_path)
        wanted: dict[str, int] = {}  # index path -> position, for indexes that are listed or may exist
        for i in positions:
            path = fsspec.core.url_to_fs(urls[i])[1]
            known = path in listed
            out[i] = _Listed(size=listed[path] if known else _size(fs, path, urls[i]), index=None)
            if read_indexes and (not known or path + INDEX_SUFFIX in listed):
                wanted[path + INDEX_SUFFIX] = i
        if wanted:
            for path, data in fs.cat(list(wanted), on_error="return").items():
                if isinstance(data, FileNotFoundError):
                    continue
                i = wanted[path]
                if isinstance(data, BaseException):
                    raise BadShardError(f"cannot read tar index {index_url(urls[i])}: {data}")
                out[i].index = data  # type: ignore[union-attr]
    return out  # type: ignore[return-value]


def _is_remote(urls: list[str]) -> bool:
    return any("://" in u and not u.startswith("file://") for u in urls)


def index_shards(urls: list[str], num_classes: int) -> tuple[list[TarIndex], list[int]]:
    """Index every shard of ``urls`` (in order) from its index file, or from its headers when it has none.

    Returns the indexes and the shards' sizes in bytes. Errors name the shard (and key).
    """
    listed = _list_shards(urls, read_indexes=True)

    def one(i: int) -> TarIndex:
        url, shard = urls[i], listed[i]
        if shard.index is not None:
            return decode_index(shard.index, url, shard.size, num_classes)
        return index_tar(url, num_classes, read_from=local_copy(url, shard.size))

    return _map(one, len(urls), _is_remote(urls)), [s.size for s in listed]


def write_index(shard_url: str, index: TarIndex, shard_bytes: int) -> str:
    """Write ``<shard>.idx.json`` beside the shard; return its URL. Whole or not at all."""
    url = index_url(shard_url)
    data = encode_index(index, shard_bytes)
    fs, path = fsspec.core.url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)  # one PUT: an object store shows it whole
    return url


def index_and_write(urls: list[str], num_classes: int | None) -> list[TarIndex]:
    """Walk the headers of every shard of ``urls`` and write its index beside it (``logitcache data index``).

    ``num_classes`` None leaves labels unchecked (they are checked when a source opens).
    """
    listed = _list_shards(urls, read_indexes=False)

    def one(i: int) -> TarIndex:
        index = index_tar(urls[i], num_classes, read_from=local_copy(urls[i], listed[i].size))
        write_index(urls[i], index, listed[i].size)
        return index

    return _map(one, len(urls), _is_remote(urls))

