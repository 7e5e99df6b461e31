"""``logitcache publish``: write a read-only copy of a cache (or of chosen epochs) for static
hosting, in the published layout of :mod:`logitcache.storage.published`: per epoch one index
document and one pack of every unit's arrays, and one index document written last (a killed
publish leaves no index, so nothing takes the copy as complete). Every unit is read and
checked (commit record, seal) before it is published: a damaged cache is never published."""

from __future__ import annotations

import json

import numpy as np

from logitcache.errors import LogitcacheError
from logitcache.storage.published import (
    BASIS_PACK,
    INDEX_NAME,
    PUBLISHED_VERSION,
    _fs,
    epoch_index_name,
    epoch_pack_name,
    sha256_hex,
)
from logitcache.storage.reader import CacheReader


def _pack(arrays: dict[str, np.ndarray], names, pack: bytearray) -> dict:
    """Append each array's zstd frame (little-endian C-order bytes) to ``pack``; its entries."""
    from numcodecs import Zstd

    out = {}
    for name in names:
        a = np.ascontiguousarray(arrays[name])
        a = a.astype(a.dtype.newbyteorder("<"), copy=False)
        frame = Zstd(level=3).encode(a.tobytes()) if a.size else b""
        out[name] = {"dtype": a.dtype.str, "shape": list(a.shape), "offset": len(pack), "length": len(frame)}
        pack += frame
    return out


def _publish_epoch(reader: CacheReader, epoch: int, put) -> dict:
    """Write one epoch's index and pack; its entry in the published index."""
    seal, records = reader.check_seal(epoch)
    pack, units = bytearray(), []
    for s, record in enumerate(records):
        arrays = reader.read_unit(epoch, s, record)  # checked against its commit record
        units.append({"commit": record, "arrays": _pack(arrays, reader.array_names, pack)})
    doc = json.dumps({"units": units, "seal": seal}, sort_keys=True).encode()
    put(epoch_pack_name(epoch), bytes(pack))
    put(epoch_index_name(epoch), doc)
    return {"units": reader.num_shards, "sealed": seal is not None, "index_sha256": sha256_hex(doc),
            "pack_sha256": sha256_hex(bytes(pack)), "pack_bytes": len(pack)}


def publish_cache(src: str, dest: str, epochs: list[int] | None = None, storage_options: dict | None = None,
                  dest_options: dict | None = None, progress: bool = True) -> dict:
    """Publish the cache at ``src`` (its complete epochs, or ``epochs``) to ``dest`` (any fsspec
    URL). Returns ``{"index_sha256", "epochs", "bytes"}``: the index's digest names exactly what
    was published."""
    from rich.progress import Progress

    reader = CacheReader(src, storage_options)
    status = reader.epoch_status()
    if status.damaged:
        raise status.damage_error(src)
    chosen = status.complete if epochs is None else list(epochs)
    missing = sorted(set(chosen) - set(status.complete))
    if missing:
        raise LogitcacheError(f"cache {src} has no complete epoch {missing[0]} to publish (complete: "
                              f"{status.complete or 'none'})")
    if not chosen:
        raise LogitcacheError(f"cache {src} has no complete epoch to publish")
    fs, root = _fs(dest, dest_options)
    fs.makedirs(f"{root}/epochs", exist_ok=True)
    total = 0

    def put(name: str, data: bytes) -> None:
        nonlocal total
        fs.pipe_file(f"{root}/{name}", data)
        total += len(data)

    entries = {}
    with Progress(disable=not progress) as bar:
        task = bar.add_task("publishing", total=len(chosen))
        for e in chosen:
            entries[str(e)] = _publish_epoch(reader, e, put)
            bar.advance(task)
    basis, b = None, reader.feature_basis()
    if b is not None:
        data = bytearray()
        arrays = _pack({"mean": b.mean, "components": b.components}, ("mean", "components"), data)
        put(BASIS_PACK, bytes(data))
        basis = {"sha256": sha256_hex(bytes(data)), "bytes": len(data), "arrays": arrays}
    index = json.dumps({"logitcache_published": PUBLISHED_VERSION, "manifest": reader.store.manifest_document(),
                        "epochs": entries, "basis": basis}, sort_keys=True).encode()
    put(INDEX_NAME, index)  # last: the copy is a published cache from here on
    return {"index_sha256": sha256_hex(index), "epochs": chosen, "bytes": total}
