"""The cache on storage: a Zarr v3 group on any fsspec URL, written in whole units.

A *unit* is one epoch x one data shard. One process computes and writes a unit whole,
into arrays that no other process touches (zarr loses data when processes share a
shard), and marks it committed last (group attribute ``commit`` with the sha256 of
every array). Readers and resuming builds trust committed units only.

Layout (docs/FORMAT.md has the reader's view)::

    <cache>/zarr.json                      attrs {"logitcache": manifest}
    <cache>/epochs/<EEEE>/units/<SSSSS>/   arrays of one unit, attrs {"commit": {...}}
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from .codec import CodecSpec
from .errors import CacheMismatchError, CacheNotFoundError, CorruptCacheError
from .manifest import ATTR_KEY, Manifest

#: Arrays of a unit, in the order they are written: name -> (rows are views).
UNIT_ARRAYS = ("sample_index", "view_seed", "label", "partner_index", "mix_lam", "topk_ids", "topk_logits", "tail_lse")
#: Threads for concurrent zarr requests: units read at once by ``CacheReader.read_units``, arrays
#: written at once by ``CacheWriter.write_unit``.
IO_THREADS = 8
COMPRESSOR = ZstdCodec(level=3)  # integer ids and seeds compress well; fp16 logits a little


def empty_unit(codec: CodecSpec) -> dict[str, np.ndarray]:
    """The arrays of a unit with no views (an empty data shard), in their stored dtypes."""
    k = codec.k
    return {
        "sample_index": np.zeros(0, np.int64), "view_seed": np.zeros(0, np.uint64), "label": np.zeros(0, np.int32),
        "partner_index": np.zeros(0, np.int64), "mix_lam": np.zeros(0, np.float32),
        "topk_ids": np.zeros((0, k), codec.id_dtype), "topk_logits": np.zeros((0, k), codec.value_dtype),
        "tail_lse": np.zeros(0, np.float32),
    }


def epoch_path(epoch: int) -> str:
    return f"epochs/{epoch:04d}"


def unit_path(epoch: int, shard: int) -> str:
    return f"epochs/{epoch:04d}/units/{shard:05d}"


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
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def _read_manifest(group: zarr.Group, url: str) -> Manifest:
    attrs = group.attrs.asdict()
    if ATTR_KEY not in attrs:
        raise CacheNotFoundError(f"{url} is a Zarr group but not a logitcache cache (no '{ATTR_KEY}' attribute)")
    return Manifest.from_dict(attrs[ATTR_KEY])


class CacheWriter:
    """Writes whole units into a cache; creates the cache or checks it matches this build."""

    def __init__(self, url: str, manifest: Manifest, storage_options: dict | None = None):
        self.url = url
        self.manifest = manifest
        self.root = open_group(url, mode="a", storage_options=storage_options)
        existing = self.root.attrs.asdict().get(ATTR_KEY)
        if existing is None:
            if list(self.root.keys()):
                raise CacheMismatchError(f"{url} holds other data and no logitcache manifest; refusing to write there")
            self.root.attrs[ATTR_KEY] = manifest.to_dict()
        else:
            manifest.check_same_build(Manifest.from_dict(existing), url)

    def prepare_epochs(self, epochs: list[int]) -> None:
        """Create the epoch groups up front (one process), so unit writers never race on them.

        Top-down, one level at a time: zarr writes a new group's metadata and its missing
        parents' concurrently, so a kill in between can leave ``epochs/<EEEE>/units``
        without ``epochs/<EEEE>``; readers list epochs through the parents and would never
        see that epoch. Going top-down also repairs a cache left that way.
        """
        self.root.require_group("epochs")
        for e in epochs:
            self.root.require_group(epoch_path(e))
            self.root.require_group(f"{epoch_path(e)}/units")

    def is_committed(self, epoch: int, shard: int) -> bool:
        return unit_commit(self.root, epoch, shard) is not None

    def write_unit(self, epoch: int, shard: int, arrays: dict[str, np.ndarray]) -> None:
        """Write one unit's arrays (rows = views), then its commit record, last.

        A unit left half-written by a killed process is replaced whole.
        """
        missing = set(UNIT_ARRAYS) - set(arrays)
        if missing:
            raise ValueError(f"unit arrays missing: {sorted(missing)}")
        n = len(arrays["sample_index"])
        for key in UNIT_ARRAYS:
            if arrays[key].shape[0] != n:
                raise ValueError(f"unit array {key} has {arrays[key].shape[0]} rows, expected {n}")
        units = self.root.require_group(f"{epoch_path(epoch)}/units")
        name = f"{shard:05d}"
        group = units.create_group(name, overwrite=True)

        def write(key: str) -> None:
            arr = np.ascontiguousarray(arrays[key])
            chunks = tuple(max(1, d) for d in arr.shape)  # one chunk; zarr needs positive sizes
            z = group.create_array(key, shape=arr.shape, dtype=arr.dtype, chunks=chunks,
                                   compressors=COMPRESSOR, fill_value=0)
            if n:
                z[...] = arr

        # The arrays are independent objects: write them at once (object storage is
        # latency-bound, two requests per array), then the commit record, strictly after.
        with ThreadPoolExecutor(max_workers=min(IO_THREADS, len(UNIT_ARRAYS))) as pool:
            list(pool.map(write, UNIT_ARRAYS))  # list(): re-raises the first error here
        group.attrs["commit"] = {"n": n, "sha256": {k: array_digest(arrays[k]) for k in UNIT_ARRAYS}}


def unit_commit(root: zarr.Group, epoch: int, shard: int) -> dict | None:
    """The commit record of a unit, or None when the unit is absent or incomplete."""
    try:
        group = root[unit_path(epoch, shard)]
        return group.attrs.asdict().get("commit")
    except (KeyError, FileNotFoundError, ValueError):
        # absent, or metadata cut short by a killed writer: not committed
        return None


@dataclass
class EpochArrays:
    """One epoch of a cache, rows indexed by global sample index (N rows).

    Shapes: topk_ids, topk_logits (N, k); everything else (N,).
    """

    epoch: int
    view_seed: np.ndarray
    label: np.ndarray
    partner_index: np.ndarray
    mix_lam: np.ndarray
    topk_ids: np.ndarray
    topk_logits: np.ndarray
    tail_lse: np.ndarray

    @property
    def num_views(self) -> int:
        return len(self.view_seed)


class CacheReader:
    """Reads committed units, whole epochs at a time (never per item: zarr serves random
    single-row reads about four orders of magnitude slower than whole chunks)."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url
        self.root = open_group(url, mode="r", storage_options=storage_options)
        self.manifest = _read_manifest(self.root, url)

    @property
    def num_shards(self) -> int:
        return len(self.manifest.dataset.shards)

    def committed_units(self, epoch: int) -> list[int]:
        return [s for s in range(self.num_shards) if unit_commit(self.root, epoch, s) is not None]

    def epochs(self) -> list[int]:
        """Epochs whose every unit is committed (only these are readable)."""
        try:
            names = sorted(self.root["epochs"].group_keys())
        except KeyError:
            return []
        return [int(n) for n in names if len(self.committed_units(int(n))) == self.num_shards]

    def read_unit(self, epoch: int, shard: int, verify: bool = False) -> dict[str, np.ndarray]:
        commit = unit_commit(self.root, epoch, shard)
        where = f"{self.url} {unit_path(epoch, shard)}"
        if commit is None:
            raise CorruptCacheError(f"unit {where} is not committed (build incomplete; re-run the build to finish it)")
        group = self.root[unit_path(epoch, shard)]
        out = {}
        for key in UNIT_ARRAYS:
            try:
                arr = group[key][...] if commit["n"] else np.zeros((0,) + group[key].shape[1:], group[key].dtype)
            except Exception as e:  # noqa: BLE001 - any storage/codec failure becomes one clear error
                raise CorruptCacheError(f"cannot read array {key} of unit {where}: {e}") from None
            if verify and array_digest(arr) != commit["sha256"][key]:
                raise CorruptCacheError(f"array {key} of unit {where} fails its sha256 checksum")
            out[key] = arr
        return out

    def read_units(self, epoch: int, verify: bool = False) -> list[dict[str, np.ndarray]]:
        """Every unit of ``epoch``, in shard order, read by up to ``IO_THREADS`` threads.

        A unit read mostly waits on zarr's event loop and the storage (a metadata and a
        chunk request per array), so overlapping them cuts the time on a local disk and
        divides it by the thread count on object storage."""
        with ThreadPoolExecutor(max_workers=max(1, min(IO_THREADS, self.num_shards))) as pool:
            return list(pool.map(lambda s: self.read_unit(epoch, s, verify=verify), range(self.num_shards)))

    def load_epoch(self, epoch: int, verify: bool = False) -> EpochArrays:
        """All views of ``epoch`` as arrays indexed by global sample index (rows = samples)."""
        n_total = self.manifest.dataset.num_samples
        k = self.manifest.codec.k
        units = self.read_units(epoch, verify=verify)
        idx = np.concatenate([u["sample_index"] for u in units])
        # n_total indices, all in range, every sample hit: a permutation (one bincount, no sort).
        covered = len(idx) == n_total and (
            n_total == 0 or (idx.min() >= 0 and idx.max() < n_total and np.bincount(idx, minlength=n_total).all()))
        if not covered:
            raise CorruptCacheError(
                f"epoch {epoch} of {self.url} does not cover samples 0..{n_total - 1} exactly once"
            )
        fields = {}
        for key in UNIT_ARRAYS:
            if key == "sample_index":
                continue
            first = units[0][key]
            out = np.empty((n_total,) + first.shape[1:], first.dtype)
            out[idx] = np.concatenate([u[key] for u in units])  # scatter by sample index: no sort
            fields[key] = out
        assert fields["topk_ids"].shape == (n_total, k)
        return EpochArrays(epoch=epoch, **fields)


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
