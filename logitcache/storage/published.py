"""A published cache: a read-only copy of a cache for static hosting (no directory listing),
opened from one index document, each epoch read with two requests whatever its unit count.

Layout (docs/FORMAT.md, "Published caches")::

    <url>/logitcache-index.json     {"logitcache_published": 1, "manifest": {...}, "epochs": {"<e>":
                                     {"units": S, "sealed": bool, "index_sha256": hex, "pack_sha256": hex,
                                     "pack_bytes": int}}, "basis": null | {"sha256", "bytes", "arrays"}}
    <url>/epochs/<EEEE>.json        {"units": [{"commit": {...}, "arrays": {name: {"dtype", "shape",
                                     "offset", "length"}}}], "seal": null | {...}}
    <url>/epochs/<EEEE>.pack        every unit's arrays, zstd frames end to end, at those offsets
    <url>/features.pack             the feature basis (mean, components), when the cache has one

The index names no path: every file's name follows from its epoch number, so nothing in it
can point outside the cache. Every file is checked against the sha256 the index gives for it
before any of its bytes are used; the commit records inside are checked as a cache's own.
Nothing is unpickled: JSON and raw little-endian arrays only.
"""

from __future__ import annotations

import hashlib
import json
import threading

import numpy as np

from logitcache.errors import CorruptCacheError
from logitcache.storage.layout import check_commit_record, count, hex64, is_local
from logitcache.storage.seals import check_seal_record

INDEX_NAME = "logitcache-index.json"
PUBLISHED_VERSION = 1
BASIS_PACK = "features.pack"
MAX_INDEX_BYTES = 1 << 28  # an index past 256 MB is refused before it is parsed
_HINT = "publish the cache again (logitcache publish), or pull it again"


def epoch_index_name(epoch: int) -> str:
    return f"epochs/{epoch:04d}.json"


def epoch_pack_name(epoch: int) -> str:
    return f"epochs/{epoch:04d}.pack"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fs(url: str, storage_options: dict | None):
    import fsspec

    return fsspec.core.url_to_fs(url.removeprefix("file://") if is_local(url) else url, **(storage_options or {}))


#: Tries of a remote file before a transient fault (connection reset, 5xx or 429, short read,
#: timeout, bytes that fail their sha256) is an error; waits double from BACKOFF_S.
TRIES = 5
BACKOFF_S = 0.1


def _transient(e: BaseException) -> bool:
    """Whether a failed GET may succeed if tried again (anything but a missing file or a 4xx)."""
    if isinstance(e, FileNotFoundError):
        return False
    status = getattr(e, "status", None)
    return status is None or status >= 500 or status == 429


def _is_json(data: bytes) -> bool:
    try:
        json.loads(data)
        return True
    except ValueError:
        return False


def fetch(url: str, name: str, storage_options: dict | None, sha256: str | None = None,
          json_document: bool = False) -> bytes:
    """The bytes of file ``name`` of the published cache at ``url``, checked against ``sha256``
    when given (``json_document``: that they parse as JSON): one GET, tried again with
    back-off on a transient fault (remote URLs). FileNotFoundError when absent; a fault that
    persists is :class:`CorruptCacheError`."""
    import time

    fs, root = _fs(url, storage_options)
    tries = 1 if is_local(url) else TRIES
    for attempt in range(tries):
        if attempt:
            time.sleep(BACKOFF_S * 2 ** (attempt - 1))
        try:
            data = fs.cat_file(f"{root.rstrip('/')}/{name}")
        except Exception as e:  # noqa: BLE001 - a transport fault: tried again, then named
            if not _transient(e):
                raise
            why = f"{type(e).__name__}: {' '.join(str(e).split())[:120]}"
            continue
        if json_document and not _is_json(data):
            why = "it is not JSON (damaged, or cut short)"
            continue
        if sha256 is None or sha256_hex(data) == sha256:
            return data
        why = "its bytes fail the index's sha256 (damaged, or cut short)"
    raise CorruptCacheError(f"published cache {url}: {name}: {why}{f' ({tries} tries)' if tries > 1 else ''}; "
                            f"{_HINT}")


def read_index(url: str, storage_options: dict | None = None) -> dict | None:
    """The published index at ``url``, checked, or None when ``url`` holds none."""
    if is_local(url):
        import os

        if not os.path.exists(os.path.join(url.removeprefix("file://"), INDEX_NAME)):
            return None
    try:
        raw = fetch(url, INDEX_NAME, storage_options, json_document=True)
    except FileNotFoundError:
        return None
    index = parse_index(raw, url)
    index["_sha256"] = sha256_hex(raw)  # what names this publication (not a field of the document)
    return index


def parse_index(raw: bytes, url: str) -> dict:
    """The index document ``raw``, its fields checked (one line naming the field otherwise)."""
    where = f"published cache {url}: {INDEX_NAME}"
    if len(raw) > MAX_INDEX_BYTES:
        raise CorruptCacheError(f"{where} is {len(raw):,} bytes, past the {MAX_INDEX_BYTES:,} an index may hold")
    try:
        index = json.loads(raw)
    except ValueError as e:
        raise CorruptCacheError(f"{where} is not JSON ({e}); {_HINT}") from None
    keys = {"logitcache_published", "manifest", "epochs", "basis"}
    if not isinstance(index, dict) or not keys <= set(index) <= keys | {"pulled_from"}:
        raise CorruptCacheError(f"{where} is not a table of logitcache_published, manifest, epochs, basis (and "
                                f"pulled_from)")
    pulled = index.get("pulled_from")
    if pulled is not None and (not isinstance(pulled, dict) or set(pulled) != {"url", "epochs", "index_sha256"}
                               or not isinstance(pulled["url"], str) or not isinstance(pulled["epochs"], list)
                               or not all(count(e) for e in pulled["epochs"]) or not hex64(pulled["index_sha256"])):
        raise CorruptCacheError(f"{where}: field pulled_from is not a table of url, epochs and index_sha256")
    if index["logitcache_published"] != PUBLISHED_VERSION:
        raise CorruptCacheError(f"{where}: version {index['logitcache_published']!r:.20} is not one this "
                                f"logitcache reads ({PUBLISHED_VERSION})")
    epochs = index["epochs"]
    if not isinstance(epochs, dict) or not all(k.isdigit() and len(k) <= 6 for k in epochs):
        raise CorruptCacheError(f"{where}: field epochs is not a table of epoch numbers")
    for e, entry in epochs.items():
        if (not isinstance(entry, dict) or set(entry) != {"units", "sealed", "index_sha256", "pack_sha256",
                                                         "pack_bytes"}
                or not count(entry["units"]) or not isinstance(entry["sealed"], bool)
                or not hex64(entry["index_sha256"]) or not hex64(entry["pack_sha256"])
                or not count(entry["pack_bytes"])):
            raise CorruptCacheError(f"{where}: field epochs.{e} is not an epoch entry (units, sealed, index_sha256, "
                                    f"pack_sha256, pack_bytes)")
    basis = index["basis"]
    if basis is not None and (not isinstance(basis, dict) or set(basis) != {"sha256", "bytes", "arrays"}
                              or not hex64(basis["sha256"]) or not count(basis["bytes"])):
        raise CorruptCacheError(f"{where}: field basis is not a basis entry (sha256, bytes, arrays)")
    return index


def decode_arrays(pack: bytes, entries: dict, names: tuple[str, ...], max_bytes: int) -> list:
    """Each array ``names`` of a unit from its epoch's ``pack`` (checked bytes) and its index
    ``entries`` (name -> dtype, shape, offset, length), or the exception in its place."""
    from numcodecs import Zstd

    out = []
    for name in names:
        try:
            e = entries[name]
            dtype, shape = np.dtype(e["dtype"]), tuple(int(d) for d in e["shape"])
            if any(d < 0 for d in shape) or int(np.prod(shape)) * dtype.itemsize > max_bytes:
                raise ValueError(f"its entry claims shape {shape} of {dtype}, more than a unit of its rows holds")
            if not all(count(v) for v in (e["offset"], e["length"])) or e["offset"] + e["length"] > len(pack):
                raise ValueError("its entry's bytes lie outside the pack")
            raw = Zstd().decode(pack[e["offset"]:e["offset"] + e["length"]]) if e["length"] else b""
            out.append(np.frombuffer(raw, dtype=dtype).reshape(shape).copy())
        except Exception as exc:  # noqa: BLE001 - any malformed entry or frame: this array's error
            out.append(exc)
    return out


def check_unit_entry(entry, epoch: int, shard: int, url: str) -> dict:
    if not isinstance(entry, dict) or set(entry) != {"commit", "arrays"} or not isinstance(entry["arrays"], dict):
        raise CorruptCacheError(f"published cache {url}: {epoch_index_name(epoch)}: unit {shard} is not a table "
                                f"of commit and arrays; {_HINT}")
    return entry


class IndexStore:
    """The reader's view of a published cache (see the module docstring): the index once, then
    per epoch read its index and its pack (two requests), each checked against its sha256."""

    def __init__(self, url: str, storage_options: dict | None, index: dict):
        self.url, self.storage_options = url, storage_options
        self.index_sha256 = index.pop("_sha256", None)  # the published index's digest: what a run names
        self.index = index
        self.pulled_from = index.get("pulled_from")  # a pulled copy: its source (url, epochs, index_sha256)
        self._epoch: tuple[int, dict, bytes | None] | None = None  # the last epoch's index and pack
        self._lock = threading.Lock()  # units of an epoch are read by several threads: fetch once

    def _entry(self, epoch: int) -> dict:
        return self.index["epochs"][str(epoch)]

    def _checked(self, name: str, sha256: str, what: str) -> bytes:
        try:
            return fetch(self.url, name, self.storage_options, sha256)
        except FileNotFoundError:
            raise CorruptCacheError(f"published cache {self.url}: {what} {name} is missing; {_HINT}") from None

    def _epoch_index(self, epoch: int, pack: bool = False) -> tuple[dict, bytes | None]:
        with self._lock:
            return self._fetch_epoch(epoch, pack)

    def _fetch_epoch(self, epoch: int, pack: bool) -> tuple[dict, bytes | None]:
        if self._epoch is None or self._epoch[0] != epoch or (pack and self._epoch[2] is None):
            entry = self._entry(epoch)
            doc = self._epoch[1] if self._epoch is not None and self._epoch[0] == epoch else json.loads(
                self._checked(epoch_index_name(epoch), entry["index_sha256"], "epoch index"))
            units = doc.get("units") if isinstance(doc, dict) else None
            if not isinstance(units, list) or len(units) != entry["units"]:
                raise CorruptCacheError(f"published cache {self.url}: {epoch_index_name(epoch)} does not list the "
                                        f"{entry['units']} units the index gives; {_HINT}")
            data = self._checked(epoch_pack_name(epoch), entry["pack_sha256"], "epoch pack") if pack else None
            self._epoch = (epoch, doc, data)
        return self._epoch[1], self._epoch[2]

    def manifest_document(self):
        return self.index["manifest"]

    def epoch_names(self) -> list[int]:
        return sorted(int(e) for e in self.index["epochs"])

    def sealed(self, format_version: int) -> list[int]:
        return sorted(int(e) for e, v in self.index["epochs"].items() if v["sealed"])

    def committed(self, epoch: int, format_version: int, num_shards: int) -> list[int]:
        units = self._entry(epoch)["units"] if str(epoch) in self.index["epochs"] else 0
        if units > num_shards:
            raise CorruptCacheError(f"published cache {self.url}: epoch {epoch} lists {units} units, past the "
                                    f"manifest's {num_shards} shards")
        return list(range(units))

    def commit(self, epoch: int, shard: int, format_version: int, manifest: str | None) -> dict | None:
        if str(epoch) not in self.index["epochs"] or shard >= self._entry(epoch)["units"]:
            return None
        doc, _ = self._epoch_index(epoch)
        entry = check_unit_entry(doc["units"][shard], epoch, shard, self.url)
        return check_commit_record(entry["commit"], epoch, shard, format_version, self.url, manifest)

    def seal(self, epoch: int, num_shards: int, manifest: str | None) -> dict | None:
        if str(epoch) not in self.index["epochs"] or not self._entry(epoch)["sealed"]:
            return None
        doc, _ = self._epoch_index(epoch)
        return check_seal_record(doc.get("seal"), epoch, self.url, num_shards, manifest)

    def unit_arrays(self, epoch: int, shard: int, names: tuple[str, ...], empty: bool, max_bytes: int) -> list:
        doc, pack = self._epoch_index(epoch, pack=True)
        entry = check_unit_entry(doc["units"][shard], epoch, shard, self.url)
        return [entry, *decode_arrays(pack, entry["arrays"], names, max_bytes)]

    def basis(self, manifest):
        from logitcache.storage.basis import check_basis

        b = self.index["basis"]
        if b is None:
            raise CorruptCacheError(f"published cache {self.url}: the manifest names a basis, the index none; {_HINT}")
        data = self._checked(BASIS_PACK, b["sha256"], "feature basis")
        spec = manifest.feature_spec
        mean, comps = decode_arrays(data, b["arrays"], ("mean", "components"), 8 * spec.dim * (spec.rank + 1) + 64)
        for got in (mean, comps):
            if isinstance(got, Exception):
                raise CorruptCacheError(f"published cache {self.url}: feature basis: {got}; {_HINT}")
        return check_basis(mean, comps, manifest, self.url)

    def total_bytes(self) -> int:
        b = self.index["basis"]
        return sum(e["pack_bytes"] for e in self.index["epochs"].values()) + (b["bytes"] if b else 0)
