"""The cache on storage: a Zarr v3 group on any fsspec URL, written in whole units.

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

import asyncio
import hashlib
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import zarr
from zarr.codecs import ZstdCodec
from zarr.core.sync import sync

from .errors import CacheMismatchError, CacheNotFoundError, CorruptCacheError
from .manifest import ATTR_KEY, Manifest
from .unit_layout import FEATURE_ARRAYS, legacy_rows, stored_arrays, unpack_unit

#: Threads for concurrent zarr requests: units read at once by ``CacheReader.read_units``, arrays
#: written at once by ``logitcache.writer.CacheWriter.write_unit``.
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


def _numbered(names: list[str]) -> list[int]:
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
        return zarr.open_group(path, mode=mode)
    try:
        options = {"use_listings_cache": False, **(storage_options or {})}
        return zarr.open_group(url, mode=mode, storage_options=options)
    except FileNotFoundError as e:
        raise CacheNotFoundError(f"no cache at {url} ({e})") from None


def array_digest(arr: np.ndarray) -> str:
    """sha256 (hex) of the array's C-order bytes: format 1's checksum."""
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def array_crc32(arr: np.ndarray) -> int:
    """CRC-32 (``zlib.crc32``, as in zip and PNG) of the array's C-order bytes: format 2's
    checksum (GB/s, read straight from the array's memory)."""
    arr = np.ascontiguousarray(arr)
    return zlib.crc32(memoryview(arr).cast("B")) if arr.size else 0


def commit_record(arrays: dict[str, np.ndarray], n: int, format_version: int, plan: str | None = None) -> dict:
    """What a commit stores: the row count, every array's checksum and (format 3) the plan digest."""
    if format_version == 1:
        return {"n": n, "sha256": {k: array_digest(a) for k, a in arrays.items()}}
    record = {"n": n, "crc32": {k: array_crc32(a) for k, a in arrays.items()}}
    if format_version >= 3:
        record["plan"] = plan
    return record


def damaged_arrays(commit: dict, arrays: dict[str, np.ndarray]) -> list[str]:
    """The arrays whose bytes differ from the commit record's checksums (any format)."""
    if "crc32" in commit:
        return [k for k, a in arrays.items() if array_crc32(a) != commit["crc32"].get(k)]
    return [k for k, a in arrays.items() if array_digest(a) != commit.get("sha256", {}).get(k)]


async def _read_unit_arrays(root, path: str, names: tuple[str, ...], empty: bool) -> list:
    """[the unit group at ``path``, then the whole of each array ``names`` in it] from a zarr
    AsyncGroup, all opened and read concurrently: one trip through zarr's event loop per
    unit, not two per array. Whatever cannot be opened or read gives its exception in its
    place. ``empty``: a unit of 0 rows, whose arrays have no chunk: zero-length arrays of
    their dtypes."""
    async def one(key: str):
        z = await root.getitem(f"{path}/{key}")
        if empty or not z.size:
            return np.zeros((0,) + tuple(z.shape[1:]), z.dtype)
        return await z.getitem(...)

    return list(await asyncio.gather(root.getitem(path), *(one(k) for k in names), return_exceptions=True))


def _read_manifest(group: zarr.Group, url: str) -> Manifest:
    attrs = group.attrs.asdict()
    if ATTR_KEY not in attrs:
        raise CacheNotFoundError(f"{url} is a Zarr group but not a logitcache cache (no '{ATTR_KEY}' attribute)")
    return Manifest.from_dict(attrs[ATTR_KEY])


def unit_commit(root: zarr.Group, epoch: int, shard: int, format_version: int = 1, url: str = "") -> dict | None:
    """The commit record of a unit, or None when the unit is not committed.

    Format 2: a record that exists but cannot be read is damage, and raises
    :class:`CorruptCacheError`. Format 1 keeps the record in the unit's own metadata, which
    a killed writer could leave cut short: unreadable there means not committed.
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
        record = group.attrs.asdict().get("commit")
        if not isinstance(record, dict) or "crc32" not in record:
            raise CorruptCacheError(f"cache {url}: epoch {epoch}, unit {shard}: commit record "
                                    f"{commit_path(epoch, shard)} holds no checksums; {REPAIR_HINT}")
        return record
    try:
        group = root[unit_path(epoch, shard)]
        return group.attrs.asdict().get("commit")
    except (KeyError, FileNotFoundError, ValueError):
        return None


def committed_units_of(root: zarr.Group, url: str, storage_options: dict | None, format_version: int, epoch: int,
                     num_shards: int) -> list[int]:
    """Format 2: the names under ``commits/`` (one listing); format 1: each unit's metadata."""
    if format_version >= 2:
        return [s for s in _numbered(list_names(url, f"{epoch_path(epoch)}/commits", storage_options))
                if s < num_shards]
    return [s for s in range(num_shards) if unit_commit(root, epoch, s, 1) is not None]


@dataclass
class EpochArrays:
    """One epoch's teacher rows (logitcache/codec.py), row ``i`` = global sample ``i`` (N rows).

    Shapes: ``ids``, ``values`` (N, k) (sampled: k = the most distinct ids of a row, 0-padded);
    ``tail`` (N,); ``plans``: each unit's plan digest (logitcache/unit_layout.py), shard order.
    With features read (``load_epoch(..., features=True)``): ``feat`` (N, w) and, for int8
    features, ``feat_scale`` (N,) (logitcache/feature_codec.py); else None.
    """

    epoch: int
    ids: np.ndarray
    values: np.ndarray
    tail: np.ndarray
    plans: list[str]
    feat: np.ndarray | None = None
    feat_scale: np.ndarray | None = None

    @property
    def num_views(self) -> int:
        return len(self.tail)


class CacheReader:
    """Reads committed units, whole epochs at a time (never per item: zarr serves random
    single-row reads about four orders of magnitude slower than whole chunks). Every unit
    read is checked against its commit record."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url
        self.storage_options = storage_options
        self.root = open_group(url, mode="r", storage_options=storage_options)
        self.manifest = _read_manifest(self.root, url)
        self._basis = None

    @property
    def num_shards(self) -> int:
        return len(self.manifest.dataset.shards)

    @property
    def format_version(self) -> int:
        return self.manifest.format_version

    def epochs_present(self) -> list[int]:
        """Epochs that have a group in the cache, complete or not, sorted (one listing)."""
        return _numbered(list_names(self.url, "epochs", self.storage_options))

    def committed_units(self, epoch: int) -> list[int]:
        """Shards of ``epoch`` whose unit is committed, sorted (format 2: one listing)."""
        return committed_units_of(self.root, self.url, self.storage_options, self.format_version, epoch,
                                self.num_shards)

    def epochs(self) -> list[int]:
        """Epochs whose every unit is committed (only these are readable): about one
        listing per epoch on format 2 caches."""
        return [e for e in self.epochs_present() if len(self.committed_units(e)) == self.num_shards]

    def commit(self, epoch: int, shard: int) -> dict | None:
        """The unit's commit record (``n`` and every array's checksum), or None if uncommitted."""
        return unit_commit(self.root, epoch, shard, self.format_version, self.url)

    def _where(self, epoch: int, shard: int, key: str | None = None) -> str:
        array = f", array {key}" if key else ""
        return f"cache {self.url}: epoch {epoch}, unit {shard} ({unit_path(epoch, shard)}){array}"

    @property
    def array_names(self) -> tuple[str, ...]:
        """The arrays of every unit of this cache (they depend on its format, codec and features)."""
        return stored_arrays(self.manifest.codec, self.format_version, self.manifest.feature_spec)

    @property
    def has_features(self) -> bool:
        return self.manifest.features is not None

    def _names(self, features: bool) -> tuple[str, ...]:
        """The arrays to read: all of them, or all but the features."""
        if features:
            return self.array_names
        return stored_arrays(self.manifest.codec, self.format_version)

    def feature_basis(self):
        """The cache's feature basis (:class:`logitcache.feature_codec.FeatureBasis`), checked
        against the manifest's sha256, or None for full features; read once per reader."""
        from .feature_store import read_basis

        if self._basis is None and self.has_features and self.manifest.feature_spec.rank is not None:
            self._basis = read_basis(self.root, self.manifest, self.url)
        return self._basis

    def read_unit(self, epoch: int, shard: int) -> dict[str, np.ndarray]:
        """Every stored array of one committed unit, checked against its commit record.

        Raises :class:`CorruptCacheError` naming cache, epoch, unit and array when a
        chunk is missing, truncated or altered, or metadata is unreadable."""
        return self._read_checked(epoch, shard, self._commit_of(epoch, shard))

    def _commit_of(self, epoch: int, shard: int) -> dict:
        commit = self.commit(epoch, shard)
        if commit is None:
            raise CorruptCacheError(f"{self._where(epoch, shard)} is not committed (build incomplete; re-run "
                                    f"the build to finish it)")
        return commit

    def _read_checked(self, epoch: int, shard: int, commit: dict, features: bool = True) -> dict[str, np.ndarray]:
        """:meth:`read_unit` given the unit's commit record (read once by the caller);
        ``features=False`` leaves a feature cache's feature arrays unread."""
        names = self._names(features)
        # zarr's Group wraps an AsyncGroup (zarr 3); its async API reads the unit in one gather
        group, *arrays = sync(_read_unit_arrays(self.root._async_group, unit_path(epoch, shard), names,
                                                empty=not commit["n"]))
        for got in (group, *arrays):  # cancelled or interrupted: not damage, pass it on
            if isinstance(got, BaseException) and not isinstance(got, Exception):
                raise got
        if isinstance(group, Exception):  # absent or garbled metadata of a committed unit
            raise CorruptCacheError(f"{self._where(epoch, shard)}: unit metadata is missing or unreadable "
                                    f"({type(group).__name__}); {REPAIR_HINT}") from None
        for key, got in zip(names, arrays):
            if isinstance(got, Exception):  # any storage/codec failure becomes one clear error
                raise CorruptCacheError(f"{self._where(epoch, shard, key)}: cannot read it ({type(got).__name__}: "
                                        f"{got}); {REPAIR_HINT}") from None
        out = dict(zip(names, arrays))
        bad = damaged_arrays(commit, out)
        if bad:
            raise CorruptCacheError(f"{self._where(epoch, shard, bad[0])}: fails its checksum (damaged or "
                                    f"missing chunk); {REPAIR_HINT}")
        return out

    def read_rows(self, epoch: int, shard: int, features: bool = False) -> tuple[dict[str, np.ndarray], str]:
        """One committed unit's teacher rows, sorted by sample index (row r = the shard's r-th
        sample), and its plan digest; every array read is checked. Any format. ``features``:
        also the unit's ``feat`` (and ``feat_scale``) rows (a feature cache only)."""
        commit = self._commit_of(epoch, shard)
        arrays = self._read_checked(epoch, shard, commit, features)
        d = self.manifest.dataset
        start, size = sum(d.shard_sizes[:shard]), d.shard_sizes[shard]
        if self.format_version < 3:
            idx = arrays["sample_index"]
            if len(idx) != size or (size and not np.array_equal(np.sort(idx), np.arange(start, start + size))):
                raise CorruptCacheError(f"{self._where(epoch, shard)}: its rows do not cover the shard's samples "
                                        f"{start}..{start + size - 1} exactly once; {REPAIR_HINT}")
            return legacy_rows(self.manifest.codec, arrays, start)
        if int(commit["n"]) != size:
            raise CorruptCacheError(f"{self._where(epoch, shard)}: holds {commit['n']} rows for a shard of {size} "
                                    f"samples; {REPAIR_HINT}")
        try:
            rows = unpack_unit(self.manifest.codec, arrays, size)
        except ValueError as e:  # arrays too short for their row count (a writer bug, never storage damage)
            raise CorruptCacheError(f"{self._where(epoch, shard)}: {e}; {REPAIR_HINT}") from None
        return rows, str(commit.get("plan"))

    def read_units(self, epoch: int, features: bool = False) -> list[tuple[dict[str, np.ndarray], str]]:
        """Every unit of ``epoch`` as :meth:`read_rows`, in shard order, read by up to
        ``IO_THREADS`` threads.

        A unit read mostly waits on zarr's event loop and the storage (a metadata and a
        chunk request per array), so overlapping them cuts the time on a local disk and
        divides it by the thread count on object storage."""
        with ThreadPoolExecutor(max_workers=max(1, min(IO_THREADS, self.num_shards))) as pool:
            return list(pool.map(lambda s: self.read_rows(epoch, s, features), range(self.num_shards)))

    def load_epoch(self, epoch: int, features: bool = False) -> EpochArrays:
        """All views of ``epoch`` as teacher rows indexed by global sample index: units in
        shard order, each sorted by sample index, so concatenating them is the epoch.
        ``features``: the teacher features too (a feature cache only; else an error)."""
        if features and not self.has_features:
            raise CacheMismatchError(f"cache {self.url} holds no teacher features; build one with "
                                     f"`logitcache build --features`")
        units = self.read_units(epoch, features)
        # Sampled rows are as wide as their unit's most distinct ids: pad to the widest (a no-op
        # for the other codecs, whose widths are fixed; full rows have no ids).
        width = max(u["ids"].shape[1] for u, _ in units)

        def cat(key: str) -> np.ndarray:
            parts = [u[key] if u[key].shape[1] >= width else np.pad(u[key], ((0, 0), (0, width - u[key].shape[1])))
                     for u, _ in units]
            return np.concatenate(parts)

        ids, values, tail = cat("ids"), cat("values"), np.concatenate([u["tail"] for u, _ in units])
        feat = {k: np.concatenate([u[k] for u, _ in units]) for k in FEATURE_ARRAYS if k in units[0][0]}
        return EpochArrays(epoch=epoch, ids=ids, values=values, tail=tail, plans=[p for _, p in units], **feat)
