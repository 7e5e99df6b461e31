"""Where a cache keeps what: a Zarr v3 group on any fsspec URL, written in whole units, and the
commit records that say which units are complete and what their bytes must be.

A *unit* is one epoch x one data shard. One process computes and writes a unit whole,
into arrays that no other process touches (zarr loses data when processes share a
shard), and commits it last with a record of every array's checksum. Readers and
resuming builds trust committed units only, and every read checks every array against
that record, so damage on storage (a flipped byte, a missing or truncated chunk,
unreadable metadata) stops the read with one line naming the cache, epoch, unit and
array.

Layout (docs/FORMAT.md has the reader's view)::

    <cache>/zarr.json                         attrs {"logitcache": manifest}
    <cache>/features/mean, components         (`build --features` with a basis) the PCA basis,
                                              written before the manifest; its sha256 is in it
    <cache>/epochs/<EEEE>/units/<SSSSS>/      arrays of one unit
    <cache>/epochs/<EEEE>/commits/<SSSSS>/    (format 2) a group whose attrs {"commit": {...}}
                                              mark the unit committed; one listing of
                                              commits/ finds an epoch's committed units
    format 1: no commits/ group; the commit record is the unit group's "commit" attribute.
"""

from __future__ import annotations

import hashlib
import os
import zlib

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from logitcache.errors import CacheNotFoundError, CorruptCacheError
from logitcache.storage.manifest_schema import DIGEST_FORMAT

#: Threads for concurrent zarr requests: units read at once by ``CacheReader.read_units``, arrays
#: written at once by ``logitcache.storage.writer.CacheWriter.write_unit``.
IO_THREADS = 8
#: Integer ids and seeds compress well, fp16 logits a little; zstd's frame checksum makes a
#: damaged chunk fail to decode instead of decoding to other numbers.
COMPRESSOR = ZstdCodec(level=3, checksum=True)
#: How to repair a damaged committed unit (said by every error about one).
REPAIR_HINT = "re-run the same `logitcache build` command with --recheck to rebuild damaged units"


def epoch_path(epoch: int) -> str:
    return f"epochs/{epoch:04d}"


def unit_path(epoch: int, shard: int) -> str:
    return f"epochs/{epoch:04d}/units/{shard:05d}"


def commit_path(epoch: int, shard: int) -> str:
    """Where format 2 keeps a unit's commit record (a group of its own, written last)."""
    return f"epochs/{epoch:04d}/commits/{shard:05d}"


def list_names(url: str, path: str, storage_options: dict | None = None) -> list[str]:
    """Names of the entries directly under ``path`` of the cache at ``url``: one directory
    listing (one LIST request on object storage, a page per 1,000 names); [] if absent."""
    if is_local(url):
        try:
            return os.listdir(os.path.join(url.removeprefix("file://"), path))
        except FileNotFoundError:
            return []
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, **{"use_listings_cache": False, **(storage_options or {})})
    try:
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(f"{root.rstrip('/')}/{path}", detail=False)]
    except FileNotFoundError:
        return []


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


def numbered_entries(names: list[str]) -> list[int]:
    """The entries named by a number (epoch or shard groups), sorted; metadata files skipped."""
    return sorted(int(n) for n in names if n.isdigit())


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def open_group(url: str, mode: str = "r", storage_options: dict | None = None) -> zarr.Group:
    """Open the Zarr group at ``url`` (a path, file://, memory://, s3://, any fsspec URL).

    Local paths go through zarr's LocalStore (atomic writes by rename); others through
    fsspec. ``mode`` as in zarr: "r" read only, "a" read/write and create.

    ``storage_options`` go to the fsspec filesystem (e.g. ``{"endpoint_url": ...}`` for
    s3fs; without them s3fs reads AWS_ENDPOINT_URL and the other AWS_* variables).
    Listings are not cached (``use_listings_cache=False`` unless given): fsspec shares one
    filesystem instance per process, and a cached listing would hide the epochs and units
    that another process commits while a reader is open.
    """
    if is_local(url):
        path = url.removeprefix("file://")
        if mode == "r" and not os.path.exists(os.path.join(path, "zarr.json")):
            raise CacheNotFoundError(f"no cache at {url} (no zarr.json there)")
        return _opened(url, lambda: zarr.open_group(path, mode=mode))
    options = {"use_listings_cache": False, **(storage_options or {})}
    return _opened(url, lambda: zarr.open_group(url, mode=mode, storage_options=options))


def _opened(url: str, open_it) -> zarr.Group:
    """``open_it()``; a missing group is CacheNotFoundError, an unreadable root document
    (damaged bytes, not JSON, not a group's) one line of CorruptCacheError."""
    try:
        return open_it()
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeNotFoundError) as e:
        raise CacheNotFoundError(f"no cache at {url} ({e})") from None
    except (ValueError, TypeError, KeyError, AttributeError, zarr.errors.BaseZarrError) as e:
        # UnicodeDecodeError and JSONDecodeError are ValueErrors; ContainsArrayError: a zarr.json of an array
        raise CorruptCacheError(f"cache {url}: its root zarr.json is not a readable Zarr group "
                                f"({type(e).__name__}: {' '.join(str(e).split())[:160]})") from None


def array_digest(arr: np.ndarray) -> str:
    """sha256 (hex) of the array's C-order bytes: format 1's checksum."""
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def array_crc32(arr: np.ndarray) -> int:
    """CRC-32 (``zlib.crc32``, as in zip and PNG) of the array's C-order bytes: format 2's
    checksum (GB/s, read straight from the array's memory)."""
    arr = np.ascontiguousarray(arr)
    return zlib.crc32(memoryview(arr).cast("B")) if arr.size else 0


def commit_record(arrays: dict[str, np.ndarray], n: int, format_version: int, plan: str | None = None,
                  manifest: str | None = None) -> dict:
    """What a commit stores: the row count, every array's checksum, (format 3) the plan digest
    and (format 5) the digest of the manifest the unit was written under."""
    if format_version == 1:
        return {"n": n, "sha256": {k: array_digest(a) for k, a in arrays.items()}}
    record = {"n": n, "crc32": {k: array_crc32(a) for k, a in arrays.items()}}
    if format_version >= 3:
        record["plan"] = plan
    if format_version >= DIGEST_FORMAT:
        record["manifest"] = manifest
    return record


def damaged_arrays(commit: dict, arrays: dict[str, np.ndarray]) -> list[str]:
    """The arrays whose bytes differ from the commit record's checksums (any format)."""
    if "crc32" in commit:
        return [k for k, a in arrays.items() if array_crc32(a) != commit["crc32"].get(k)]
    return [k for k, a in arrays.items() if array_digest(a) != commit.get("sha256", {}).get(k)]


def hex64(v) -> bool:
    """Whether ``v`` is a sha256 digest as the format writes it: 64 lowercase hex digits."""
    return isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)


def count(v) -> bool:
    """Whether ``v`` is a non-negative int below 2^40 (a row or sample count or index)."""
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 40


def _bad_record_field(record: dict, format_version: int, manifest: str | None) -> str | None:
    """What is wrong with a format 2+ commit record's fields (their types and shapes), or None:
    ``n`` a row count, ``crc32`` array name -> CRC-32, ``plan`` (format 3+) a sha256 hex digest,
    ``manifest`` (format 5) the manifest's digest ``manifest``, ``canary`` (storage/canary.py;
    format 5: every unit with rows) a table of up to 4 sample indices and as many sha256 hex digests."""
    digested = format_version >= DIGEST_FORMAT
    required = ("n", "crc32") + (("plan",) if format_version >= 3 else ()) + (
        ("manifest",) + (("canary",) if record.get("n") else ()) if digested else ())
    missing = [k for k in required if k not in record]
    if missing:
        return f"{missing[0]} is missing"
    known = {"n", "crc32", "canary"} | ({"plan"} if format_version >= 3 else set()) | (
        {"manifest"} if digested else set())
    unknown = sorted(set(record) - known)
    if unknown:
        return f"{unknown[0]!r:.40} is not a field of a format {format_version} commit record"
    if digested and record["manifest"] != manifest:
        return (f"manifest is {record['manifest']!r:.20}..., not this cache's manifest digest {str(manifest)[:12]}... "
                f"(the unit was written under another manifest, or the manifest was edited)")
    crc = record["crc32"]
    if not isinstance(crc, dict) or not all(isinstance(k, str) and count(v) and v < 1 << 32 for k, v in crc.items()):
        return "crc32 is not a table of array checksums"
    if not count(record.get("n")):
        return f"n is {record.get('n')!r:.40}, not a row count"
    if "plan" in record and not hex64(record["plan"]):
        return f"plan is {record['plan']!r:.40}, not a sha256 digest"
    canary = record.get("canary")
    if canary is not None:
        if not isinstance(canary, dict) or set(canary) != {"index", "sha256"}:
            return "canary is not a table of index and sha256"
        index, digests = canary["index"], canary["sha256"]
        if (not isinstance(index, list) or not isinstance(digests, list) or not 1 <= len(index) <= 4
                or len(digests) != len(index) or not all(map(count, index)) or not all(map(hex64, digests))):
            return "canary is not 1 to 4 sample indices with a sha256 digest each"
    return None


def check_commit_record(record, epoch: int, shard: int, format_version: int, url: str,
                        manifest: str | None) -> dict:
    """``record`` (a format 2+ unit's commit record), its fields checked (``_bad_record_field``);
    a malformed one is :class:`CorruptCacheError` naming cache, epoch, unit and field."""
    where = f"cache {url}: epoch {epoch}, unit {shard}: commit record {commit_path(epoch, shard)}"
    if not isinstance(record, dict) or "crc32" not in record:
        raise CorruptCacheError(f"{where} holds no checksums; {REPAIR_HINT}")
    bad = _bad_record_field(record, format_version, manifest)
    if bad:
        raise CorruptCacheError(f"{where} field {bad}; {REPAIR_HINT}")
    return record


def unit_commit(root: zarr.Group, epoch: int, shard: int, format_version: int = 1, url: str = "",
                manifest: str | None = None) -> dict | None:
    """The commit record of a unit, or None when the unit is not committed.

    Format 2: a record that exists but cannot be read is damage, and raises
    :class:`CorruptCacheError`. Format 1 keeps the record in the unit's own metadata, which
    a killed writer could leave cut short: unreadable there means not committed.
    ``manifest``: the cache's manifest digest, which a format 5 record must name.
    """
    if format_version >= 2:
        try:
            group = root[commit_path(epoch, shard)]
        except (KeyError, FileNotFoundError):
            return None
        except Exception as e:  # noqa: BLE001 - garbled metadata: any parser error
            raise CorruptCacheError(f"cache {url}: epoch {epoch}, unit {shard}: commit record "
                                    f"{commit_path(epoch, shard)} is unreadable ({type(e).__name__}); "
                                    f"{REPAIR_HINT}") from None
        return check_commit_record(group.attrs.asdict().get("commit"), epoch, shard, format_version, url, manifest)
    try:
        group = root[unit_path(epoch, shard)]
        return group.attrs.asdict().get("commit")
    except (KeyError, FileNotFoundError, ValueError):
        return None


def committed_units_of(root: zarr.Group, url: str, storage_options: dict | None, format_version: int, epoch: int,
                     num_shards: int) -> list[int]:
    """Format 2: the names under ``commits/`` (one listing); format 1: each unit's metadata.
    A record of a shard the manifest does not have is damage (an edit or a copy from another cache)."""
    if format_version >= 2:
        units = numbered_entries(list_names(url, f"{epoch_path(epoch)}/commits", storage_options))
        if units and units[-1] >= num_shards:
            raise CorruptCacheError(f"cache {url}: epoch {epoch}: commit record {commit_path(epoch, units[-1])} "
                                    f"names unit {units[-1]}, past the manifest's {num_shards} shards (not this "
                                    f"cache's: remove it)")
        return units
    return [s for s in range(num_shards) if unit_commit(root, epoch, s, 1) is not None]


