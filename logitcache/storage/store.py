"""Where a reader's bytes come from: a :class:`ZarrStore` (the cache as built: a Zarr group,
found by listings) or, for a published cache, :class:`logitcache.storage.published.IndexStore`
(an index document and one pack per epoch, no listing). :class:`~logitcache.storage.reader.CacheReader`
checks what either gives in the same way; :func:`open_store` picks one."""

from __future__ import annotations

import asyncio

import numpy as np
from zarr.core.sync import sync

from logitcache.errors import CacheNotFoundError
from logitcache.storage.layout import (
    committed_units_of,
    list_names,
    numbered_entries,
    open_group,
    storage_bytes,
    unit_commit,
    unit_path,
)
from logitcache.storage.manifest import ATTR_KEY
from logitcache.storage.seals import read_seal, sealed_epochs


async def _read_unit_arrays(root, path: str, names: tuple[str, ...], empty: bool, max_bytes: int) -> list:
    """[the unit group at ``path``, then the whole of each array ``names`` in it] from a zarr
    AsyncGroup, all opened and read concurrently: one trip through zarr's event loop per
    unit, not two per array. Whatever cannot be opened or read gives its exception in its
    place. ``empty``: a unit of 0 rows, whose arrays have no chunk: zero-length arrays of
    their dtypes. An array whose metadata claims more than ``max_bytes`` is refused before
    anything is allocated for it."""
    async def one(key: str):
        z = await root.getitem(f"{path}/{key}")
        if z.nbytes > max_bytes:
            raise ValueError(f"its metadata claims {z.nbytes:,} bytes, more than a unit of its rows holds")
        if empty or not z.size:
            return np.zeros((0,) + tuple(z.shape[1:]), z.dtype)
        return await z.getitem(...)

    return list(await asyncio.gather(root.getitem(path), *(one(k) for k in names), return_exceptions=True))


class ZarrStore:
    """A cache as its build wrote it: one Zarr group; epochs, commit records and seals found
    by listing (logitcache/storage/layout.py)."""

    index_sha256 = None  # not a published cache (IndexStore's: the digest of its index)
    pulled_from = None  # nor a pulled one

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url, self.storage_options = url, storage_options
        self.root = open_group(url, mode="r", storage_options=storage_options)

    def manifest_document(self):
        attrs = self.root.attrs.asdict()
        if ATTR_KEY not in attrs:
            raise CacheNotFoundError(f"{self.url} is a Zarr group but not a logitcache cache (no '{ATTR_KEY}' "
                                     f"attribute)")
        return attrs[ATTR_KEY]

    def epoch_names(self) -> list[int]:
        return numbered_entries(list_names(self.url, "epochs", self.storage_options))

    def sealed(self, format_version: int) -> list[int]:
        return sealed_epochs(self.url, self.storage_options, format_version)

    def committed(self, epoch: int, format_version: int, num_shards: int) -> list[int]:
        return committed_units_of(self.root, self.url, self.storage_options, format_version, epoch, num_shards)

    def commit(self, epoch: int, shard: int, format_version: int, manifest: str | None) -> dict | None:
        return unit_commit(self.root, epoch, shard, format_version, self.url, manifest)

    def seal(self, epoch: int, num_shards: int, manifest: str | None) -> dict | None:
        return read_seal(self.root, epoch, self.url, num_shards, manifest)

    def unit_arrays(self, epoch: int, shard: int, names: tuple[str, ...], empty: bool, max_bytes: int) -> list:
        """[the unit's group (or its exception), then each array (or its exception)]."""
        return sync(_read_unit_arrays(self.root._async_group, unit_path(epoch, shard), names, empty, max_bytes))

    def basis(self, manifest):
        from logitcache.storage.basis import read_basis

        return read_basis(self.root, manifest, self.url)

    def total_bytes(self) -> int:
        return storage_bytes(self.url, self.storage_options)


def open_store(url: str, storage_options: dict | None = None):
    """The published cache's index store when ``url`` holds a published index, else the Zarr group."""
    from logitcache.storage.published import IndexStore, read_index

    index = read_index(url, storage_options)
    if index is not None:
        return IndexStore(url, storage_options, index)
    return ZarrStore(url, storage_options)
