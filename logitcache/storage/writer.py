"""Writing a cache: :class:`CacheWriter` creates one (or checks that an existing one was
built the same way), prepares its epoch groups, and writes units whole, each committed
last with a record of its arrays' checksums (layout and records: logitcache/storage/layout.py,
docs/FORMAT.md)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from logitcache.errors import CacheMismatchError, CorruptCacheError
from logitcache.storage.basis import BASIS_GROUP, write_basis
from logitcache.storage.layout import (
    COMPRESSOR,
    IO_THREADS,
    commit_record,
    committed_units_of,
    epoch_path,
    open_group,
    unit_commit,
)
from logitcache.storage.manifest import ATTR_KEY, Manifest
from logitcache.storage.manifest_schema import DIGEST_FORMAT
from logitcache.storage.seals import SEALS, read_seal, remove_seal, seal_record, sealed_epochs, write_seal
from logitcache.storage.unit_layout import pack_unit
from logitcache.views.plan import unit_views


class CacheWriter:
    """Writes whole units into a cache; creates the cache or checks it matches this build.

    Units are written in the current format only: a cache of an earlier format still reads
    and trains, but adding to it is refused (build a new cache)."""

    def __init__(self, url: str, manifest: Manifest, storage_options: dict | None = None, basis=None):
        """``basis``: a new feature cache's :class:`logitcache.codecs.features.FeatureBasis`,
        written before the manifest (which records its sha256); unused when the cache exists."""
        self.url = url
        self.manifest = manifest
        self.storage_options = storage_options
        self.root = open_group(url, mode="a", storage_options=storage_options)
        existing = self.root.attrs.asdict().get(ATTR_KEY)
        if existing is None:
            if set(self.root.keys()) - {BASIS_GROUP}:  # a killed build may have left its basis only
                raise CacheMismatchError(f"{url} holds other data and no logitcache manifest; refusing to write there")
            if basis is not None:
                write_basis(self.root, basis)
            self.root.attrs[ATTR_KEY] = manifest.to_dict()
            self.format_version = manifest.format_version
            self.manifest_digest = manifest.digest
        else:
            built = Manifest.from_dict(existing, url)
            if built.features != manifest.features:  # also decides the format (3 or 4): name the features
                manifest.check_same_build(built, url)
            if built.format_version != manifest.format_version:
                raise CacheMismatchError(
                    f"cache {url} is format {built.format_version}; this logitcache writes format "
                    f"{manifest.format_version} units only. The cache still reads and trains as it is; to add "
                    f"epochs, build a new cache (another --out)")
            manifest.check_same_build(built, url)
            self.format_version = built.format_version
            self.manifest_digest = built.digest  # the stored manifest's (its created time, versions, ...)

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
        if self.format_version >= DIGEST_FORMAT:
            self.root.require_group(SEALS)  # before any unit writer seals an epoch into it

        def prepare(e: int) -> None:
            self.root.require_group(epoch_path(e))
            self.root.require_group(f"{epoch_path(e)}/units")
            self.root.require_group(f"{epoch_path(e)}/commits")

        with ThreadPoolExecutor(max_workers=IO_THREADS) as pool:
            list(pool.map(prepare, epochs))  # list(): re-raises the first error here

    def committed_units(self, epoch: int) -> list[int]:
        """Shards of ``epoch`` whose unit is committed (format 2: one listing)."""
        return committed_units_of(self.root, self.url, self.storage_options, self.format_version, epoch,
                                len(self.manifest.dataset.shards))

    def write_unit(self, epoch: int, shard: int, rows: dict[str, np.ndarray], plan: str,
                   canary: dict | None = None) -> None:
        """Write one unit's teacher rows (sorted by (sample index, repeat), one per view of the unit;
        logitcache/codecs/logits.py), then its commit record, last, with the plan digest ``plan``
        (logitcache/storage/unit_layout.py) and the unit's ``canary`` (logitcache/storage/canary.py).

        A unit left half-written by a killed process, or rebuilt because it was damaged,
        is replaced whole; its old commit record is removed first, so no moment exists at
        which a record vouches for arrays being rewritten.
        """
        n = len(rows["tail"])
        size = int(unit_views(self.manifest.recipe, self.manifest.dataset.shard_sizes[shard]))
        expected = ("ids", "values", *(self.manifest.feature_spec.stored_arrays() if self.manifest.features else ()))
        if n != size or any(k not in rows or len(rows[k]) != n for k in expected):
            raise ValueError(f"unit {shard} needs {size} rows (its shard's views), got "
                             f"{ {k: len(v) for k, v in rows.items()} }")
        if n and canary is None and self.format_version >= DIGEST_FORMAT:
            raise ValueError(f"unit {shard} has rows and no canary (storage/canary.py:canary_of)")
        arrays = pack_unit(self.manifest.codec, rows)
        commits = self.root.require_group(f"{epoch_path(epoch)}/commits")
        del commits[f"{shard:05d}"]  # a no-op when absent; no listing of the epoch's records
        units = self.root.require_group(f"{epoch_path(epoch)}/units")
        group = units.create_group(f"{shard:05d}", overwrite=True)

        def write(key: str) -> None:
            arr = np.ascontiguousarray(arrays[key])
            chunks = tuple(max(1, d) for d in arr.shape)  # one chunk; zarr needs positive sizes
            z = group.create_array(key, shape=arr.shape, dtype=arr.dtype, chunks=chunks,
                                   compressors=COMPRESSOR, fill_value=0)
            if arr.size:
                z[...] = arr

        # The arrays are independent objects: write them at once (object storage is
        # latency-bound, two requests per array), then the commit record, strictly after.
        with ThreadPoolExecutor(max_workers=min(IO_THREADS, len(arrays))) as pool:
            list(pool.map(write, list(arrays)))  # list(): re-raises the first error here
        record = commit_record(arrays, n, self.format_version, plan, self.manifest_digest)
        if canary is not None:
            record["canary"] = canary
        commits.create_group(f"{shard:05d}", attributes={"commit": record})  # one write: its zarr.json

    def unseal(self, epochs: list[int]) -> None:
        """Remove the seals of ``epochs`` (units of them are about to be written again); one listing."""
        for e in set(epochs) & set(sealed_epochs(self.url, self.storage_options, self.format_version)):
            remove_seal(self.root, e)

    def seal_if_complete(self, epoch: int) -> bool:
        """Seal ``epoch`` (logitcache/storage/seals.py) when every unit is committed, replacing a seal
        that names other commit records; False when it is not complete (or the format has no seals).
        Whichever process commits an epoch's last unit seals it: each calls this after its own."""
        num_shards = len(self.manifest.dataset.shards)
        if self.format_version < DIGEST_FORMAT or len(self.committed_units(epoch)) < num_shards:
            return False
        with ThreadPoolExecutor(max_workers=min(IO_THREADS, num_shards)) as pool:
            records = list(pool.map(lambda s: unit_commit(self.root, epoch, s, self.format_version, self.url,
                                                          self.manifest_digest), range(num_shards)))
        seal = seal_record(self.manifest_digest, records)
        try:
            same = read_seal(self.root, epoch, self.url, num_shards, self.manifest_digest) == seal
        except CorruptCacheError:  # a damaged seal is replaced
            same = False
        if not same:
            write_seal(self.root, epoch, seal)
        return True

    def seal_finished(self, epochs: list[int]) -> None:
        """Seal those of ``epochs`` that are complete and unsealed (a build killed between an
        epoch's last commit and its seal leaves one): one listing, then one per unsealed epoch."""
        sealed = set(sealed_epochs(self.url, self.storage_options, self.format_version))
        for e in epochs:
            if e not in sealed:
                self.seal_if_complete(e)
