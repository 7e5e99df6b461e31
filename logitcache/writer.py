"""Writing a cache: :class:`CacheWriter` creates one (or checks that an existing one was
built the same way), prepares its epoch groups, and writes units whole, each committed
last with a record of its arrays' checksums (layout and records: logitcache/store.py,
docs/FORMAT.md)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .errors import CacheMismatchError
from .manifest import ATTR_KEY, Manifest
from .store import COMPRESSOR, IO_THREADS, UNIT_ARRAYS, commit_record, committed_units_of, epoch_path, open_group


class CacheWriter:
    """Writes whole units into a cache; creates the cache or checks it matches this build.

    A cache keeps the layout of the format it was created with: extending a format 1
    cache writes format 1 units."""

    def __init__(self, url: str, manifest: Manifest, storage_options: dict | None = None):
        self.url = url
        self.manifest = manifest
        self.storage_options = storage_options
        self.root = open_group(url, mode="a", storage_options=storage_options)
        existing = self.root.attrs.asdict().get(ATTR_KEY)
        if existing is None:
            if list(self.root.keys()):
                raise CacheMismatchError(f"{url} holds other data and no logitcache manifest; refusing to write there")
            self.root.attrs[ATTR_KEY] = manifest.to_dict()
            self.format_version = manifest.format_version
        else:
            built = Manifest.from_dict(existing)
            manifest.check_same_build(built, url)
            self.format_version = built.format_version

    def prepare_epochs(self, epochs: list[int]) -> None:
        """Create the epoch groups up front (one process), so unit writers never race on them.

        Top-down, one level at a time: zarr writes a new group's metadata and its missing
        parents' concurrently, so a kill in between can leave ``epochs/<EEEE>/units``
        without ``epochs/<EEEE>``; readers list epochs through the parents and would never
        see that epoch. Going top-down also repairs a cache left that way. Epochs are
        independent of each other: they are prepared ``IO_THREADS`` at a time (each group is
        a metadata write, latency-bound on object storage).
        """
        self.root.require_group("epochs")

        def prepare(e: int) -> None:
            self.root.require_group(epoch_path(e))
            self.root.require_group(f"{epoch_path(e)}/units")
            if self.format_version >= 2:
                self.root.require_group(f"{epoch_path(e)}/commits")

        with ThreadPoolExecutor(max_workers=IO_THREADS) as pool:
            list(pool.map(prepare, epochs))  # list(): re-raises the first error here

    def committed_units(self, epoch: int) -> list[int]:
        """Shards of ``epoch`` whose unit is committed (format 2: one listing)."""
        return committed_units_of(self.root, self.url, self.storage_options, self.format_version, epoch,
                                len(self.manifest.dataset.shards))

    def write_unit(self, epoch: int, shard: int, arrays: dict[str, np.ndarray], canary: dict | None = None) -> None:
        """Write one unit's arrays (rows = views), then its commit record, last (format 2:
        with the unit's ``canary``, see logitcache/canary.py).

        A unit left half-written by a killed process, or rebuilt because it was damaged,
        is replaced whole; its old commit record is removed first, so no moment exists at
        which a record vouches for arrays being rewritten.
        """
        missing = set(UNIT_ARRAYS) - set(arrays)
        if missing:
            raise ValueError(f"unit arrays missing: {sorted(missing)}")
        n = len(arrays["sample_index"])
        for key in UNIT_ARRAYS:
            if arrays[key].shape[0] != n:
                raise ValueError(f"unit array {key} has {arrays[key].shape[0]} rows, expected {n}")
        if self.format_version >= 2:
            commits = self.root.require_group(f"{epoch_path(epoch)}/commits")
            del commits[f"{shard:05d}"]  # a no-op when absent; no listing of the epoch's records
        units = self.root.require_group(f"{epoch_path(epoch)}/units")
        group = units.create_group(f"{shard:05d}", overwrite=True)

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
        record = commit_record(arrays, self.format_version)
        if self.format_version >= 2:
            if canary is not None:
                record["canary"] = canary
            commits.create_group(f"{shard:05d}", attributes={"commit": record})  # one write: its zarr.json
        else:
            group.attrs["commit"] = record
