"""The checked reader of a cache (:class:`CacheReader`): its manifest, its epochs and committed
units, and every unit read in whole and checked against its commit record before use, so
damage on storage (a flipped byte, a missing or truncated chunk, unreadable metadata) stops
the read with one line naming the cache, epoch, unit and array. :meth:`CacheReader.load_epoch`
gives one epoch's rows indexed by sample (:class:`EpochArrays`). Paths, listings and commit
records: :mod:`logitcache.storage.layout`.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from logitcache.errors import CacheMismatchError, CorruptCacheError
from logitcache.storage.layout import (
    IO_THREADS,
    REPAIR_HINT,
    damaged_arrays,
    unit_path,
)
from logitcache.storage.manifest import Manifest
from logitcache.storage.manifest_schema import DIGEST_FORMAT
from logitcache.storage.seals import EpochStatus, check_sealed, epoch_status
from logitcache.storage.store import open_store
from logitcache.storage.unit_layout import (
    FEATURE_ARRAYS,
    array_kinds,
    legacy_rows,
    stored_arrays,
    unpack_unit,
)
from logitcache.views.plan import held_samples, plan_epoch, row_of, unit_views


@dataclass
class EpochArrays:
    """One epoch's teacher rows (logitcache/codecs/logits.py), one per view (V rows): row ``i``
    = global sample ``i`` (V = N), or with repeated augmentation rows sorted by (sample,
    repeat), ``repeats`` per sample of ``held`` (:meth:`rows_of`).

    Shapes: ``ids``, ``values`` (V, k) (sampled: k = the most distinct ids of a row, 0-padded);
    ``tail`` (V,); ``plans``: each unit's plan digest (logitcache/storage/unit_layout.py), shard order.
    With features read (``load_epoch(..., features=True)``): ``feat`` (V, w) and, for int8
    features, ``feat_scale`` (V,) (logitcache/codecs/features.py); else None.
    """

    epoch: int
    ids: np.ndarray
    values: np.ndarray
    tail: np.ndarray
    plans: list[str]
    feat: np.ndarray | None = None
    feat_scale: np.ndarray | None = None
    repeats: int = 1
    held: np.ndarray | None = None  # (V / repeats,) sorted samples with rows (repeats > 1)
    cache: str = ""  # the cache's URL (for messages)

    @property
    def num_views(self) -> int:
        return len(self.tail)

    def rows_of(self, index: np.ndarray, repeat: np.ndarray) -> np.ndarray:
        """The rows of views (sample ``index``, repeat ``repeat``), arrays of one shape."""
        return index if self.held is None else row_of(self.held, index, repeat, self.repeats)


class CacheReader:
    """Reads committed units, whole epochs at a time (never per item: zarr serves random
    single-row reads about four orders of magnitude slower than whole chunks). Every unit
    read is checked against its commit record."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url
        self.storage_options = storage_options
        self.store = open_store(url, storage_options)  # the Zarr group, or a published cache's index
        self.manifest = Manifest.from_dict(self.store.manifest_document(), url)
        self.manifest_digest = self.manifest.digest  # format 5: what every commit record names
        # what each stored array must be (format 3+; formats 1-2 are checked by their checksums only)
        self._kinds = array_kinds(self.manifest.codec, self.manifest.feature_spec) if self.format_version >= 3 else {}
        m = self.manifest  # values a row's arrays hold at most: bounds what a unit's metadata may claim
        self._row_values = m.num_classes + m.codec.k + (m.feature_spec.width if m.features else 0) + 8
        self._basis = None

    @property
    def num_shards(self) -> int:
        return len(self.manifest.dataset.shards)

    @property
    def format_version(self) -> int:
        return self.manifest.format_version

    def epochs_present(self) -> list[int]:
        """Epochs that have a group in the cache, complete or not, sorted (one listing)."""
        return self.store.epoch_names()

    def committed_units(self, epoch: int) -> list[int]:
        """Shards of ``epoch`` whose unit is committed, sorted (format 2: one listing)."""
        return self.store.committed(epoch, self.format_version, self.num_shards)

    def epochs(self) -> list[int]:
        """Epochs whose every unit is committed (only these are readable): about one
        listing per epoch on format 2 caches. Damaged epochs are not among them:
        :meth:`epoch_status` tells them from unfinished ones."""
        return self.epoch_status().complete

    def epoch_status(self) -> EpochStatus:
        """Complete, unfinished and damaged epochs (logitcache/storage/seals.py): a listing of
        the epochs, of the seals and of each epoch's commit records."""
        present = self.epochs_present()
        sealed = self.store.sealed(self.format_version)
        return epoch_status(present, sealed, {e: self.committed_units(e) for e in present}, self.num_shards)

    def commit(self, epoch: int, shard: int) -> dict | None:
        """The unit's commit record (``n`` and every array's checksum), or None if uncommitted."""
        return self.store.commit(epoch, shard, self.format_version, self.manifest_digest)

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
        """The cache's feature basis (:class:`logitcache.codecs.features.FeatureBasis`), checked
        against the manifest's sha256, or None for full features; read once per reader."""

        if self._basis is None and self.has_features and self.manifest.feature_spec.rank is not None:
            self._basis = self.store.basis(self.manifest)
        return self._basis

    def read_unit(self, epoch: int, shard: int, commit: dict | None = None) -> dict[str, np.ndarray]:
        """Every stored array of one committed unit, checked against its commit record
        (``commit``: the record, already read by :meth:`commit` or :meth:`check_seal`).

        Raises :class:`CorruptCacheError` naming cache, epoch, unit and array when a
        chunk is missing, truncated or altered, or metadata is unreadable."""
        return self._read_checked(epoch, shard, commit or self._commit_of(epoch, shard))

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
        group, *arrays = self.store.unit_arrays(epoch, shard, names, not commit["n"],
                                                (1 << 20) + 8 * self._row_values * commit["n"])
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
        for key, a in out.items():
            want = self._kinds.get(key)
            if want is not None and (a.dtype != want[0] or a.shape[1:] != want[1]):
                raise CorruptCacheError(f"{self._where(epoch, shard, key)}: is {a.dtype} of shape {a.shape}, the "
                                        f"format stores {want[0]} of shape (n{''.join(f', {d}' for d in want[1])}) "
                                        f"(its metadata was edited or damaged); {REPAIR_HINT}")
        bad = damaged_arrays(commit, out)
        if bad:
            raise CorruptCacheError(f"{self._where(epoch, shard, bad[0])}: fails its checksum (damaged or "
                                    f"missing chunk); {REPAIR_HINT}")
        return out

    def read_rows(self, epoch: int, shard: int, features: bool = False) -> tuple[dict[str, np.ndarray], str]:
        """One committed unit's teacher rows, sorted by sample index (row r = the shard's r-th
        sample; with repeated augmentation by (sample, repeat), the unit's views), and its plan
        digest; every array read is checked. Any format. ``features``: also the unit's ``feat``
        (and ``feat_scale``) rows (a feature cache only)."""
        rows, plan, _ = self._rows(epoch, shard, features)
        return rows, plan

    def _rows(self, epoch: int, shard: int, features: bool) -> tuple[dict[str, np.ndarray], str, dict]:
        """:meth:`read_rows` and the unit's commit record."""
        commit = self._commit_of(epoch, shard)
        arrays = self._read_checked(epoch, shard, commit, features)
        d = self.manifest.dataset
        start, size = sum(d.shard_sizes[:shard]), d.shard_sizes[shard]
        if self.format_version < 3:
            idx = arrays["sample_index"]
            if len(idx) != size or (size and not np.array_equal(np.sort(idx), np.arange(start, start + size))):
                raise CorruptCacheError(f"{self._where(epoch, shard)}: its rows do not cover the shard's samples "
                                        f"{start}..{start + size - 1} exactly once; {REPAIR_HINT}")
            return (*legacy_rows(self.manifest.codec, arrays, start), commit)
        views = int(unit_views(self.manifest.recipe, size))
        if int(commit["n"]) != views:
            raise CorruptCacheError(f"{self._where(epoch, shard)}: holds {commit['n']} rows for a shard of {size} "
                                    f"samples, {views} views; {REPAIR_HINT}")
        try:
            rows = unpack_unit(self.manifest.codec, arrays, views)
        except ValueError as e:  # arrays too short for their row count (a writer bug, never storage damage)
            raise CorruptCacheError(f"{self._where(epoch, shard)}: {e}; {REPAIR_HINT}") from None
        return rows, str(commit.get("plan")), commit

    def _seal(self, epoch: int) -> dict | None:
        """``epoch``'s seal (format 5; None when unsealed), checked to cover every unit."""
        if self.format_version < DIGEST_FORMAT:
            return None
        seal = self.store.seal(epoch, self.num_shards, self.manifest_digest)
        if seal is not None:
            status = epoch_status([epoch], [epoch], {epoch: self.committed_units(epoch)}, self.num_shards)
            if status.damaged:
                raise status.damage_error(self.url)
        return seal

    def check_seal(self, epoch: int) -> tuple[dict | None, list[dict]]:
        """(``epoch``'s seal or None, every unit's commit record in shard order), the records
        checked against the seal (without reading the units)."""
        seal = self._seal(epoch)
        records = [self._commit_of(epoch, s) for s in range(self.num_shards)]
        check_sealed(seal, epoch, records, self.url)
        return seal, records

    def read_units(self, epoch: int, features: bool = False) -> list[tuple[dict[str, np.ndarray], str]]:
        """Every unit of ``epoch`` as :meth:`read_rows`, in shard order, read by up to
        ``IO_THREADS`` threads; a sealed epoch's commit records are checked against its seal.

        A unit read mostly waits on zarr's event loop and the storage (a metadata and a
        chunk request per array), so overlapping them cuts the time on a local disk and
        divides it by the thread count on object storage."""
        seal = self._seal(epoch)
        with ThreadPoolExecutor(max_workers=max(1, min(IO_THREADS, self.num_shards))) as pool:
            units = list(pool.map(lambda s: self._rows(epoch, s, features), range(self.num_shards)))
        check_sealed(seal, epoch, [c for _, _, c in units], self.url)
        return [(rows, plan) for rows, plan, _ in units]

    def load_epoch(self, epoch: int, features: bool = False) -> EpochArrays:
        """All views of ``epoch`` as teacher rows indexed by global sample index (with repeats:
        :meth:`EpochArrays.rows_of`): units in shard order, each sorted by sample index, so
        concatenating them is the epoch.
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
        recipe, held = self.manifest.recipe, None
        if recipe.aug_repeats > 1:  # which samples have rows: the plan's, as the build wrote them
            bounds = np.cumsum([0, *self.manifest.dataset.shard_sizes])
            held = held_samples(plan_epoch(recipe, epoch, list(zip(bounds[:-1], bounds[1:]))))
        return EpochArrays(epoch=epoch, ids=ids, values=values, tail=tail, plans=[p for _, p in units],
                           repeats=recipe.aug_repeats, held=held, cache=self.url, **feat)
