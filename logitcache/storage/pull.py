"""``logitcache pull``: mirror a published cache (or some of its epochs) to local disk or
another URL. Every file is checked against the index's sha256 before it counts as present;
a file already at the destination that passes is never fetched again, so a killed pull
re-run continues where it stopped and ends byte-identical to an uninterrupted one. Files are
written under a temporary name and renamed (locally), and the destination's index is written
last: until then the copy is not a cache, never a half-pulled one."""

from __future__ import annotations

import json
import os

from logitcache.errors import CorruptCacheError, LogitcacheError
from logitcache.storage.layout import is_local
from logitcache.storage.published import (
    BASIS_PACK,
    INDEX_NAME,
    _fs,
    epoch_index_name,
    epoch_pack_name,
    fetch,
    read_index,
    sha256_hex,
)


def _present(fs, path: str, sha256: str) -> bool:
    """Whether ``path`` exists at the destination with exactly the bytes of ``sha256``."""
    try:
        return sha256_hex(fs.cat_file(path)) == sha256
    except FileNotFoundError:
        return False


def _put(fs, path: str, data: bytes, local: bool) -> None:
    if local:  # a temporary name, then an atomic rename: a kill never leaves a short file
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(f"{path}.partial", "wb") as f:
            f.write(data)
        os.replace(f"{path}.partial", path)
    else:  # object storage writes a file whole or not at all
        fs.pipe_file(path, data)


def _files(index: dict, epochs: list[int]) -> list[tuple[str, str, int]]:
    """(name, sha256, bytes or 0 when unknown) of every file of ``epochs``, then the basis."""
    out = []
    for e in epochs:
        entry = index["epochs"][str(e)]
        out += [(epoch_index_name(e), entry["index_sha256"], 0), (epoch_pack_name(e), entry["pack_sha256"],
                                                                   entry["pack_bytes"])]
    if index["basis"] is not None:
        out.append((BASIS_PACK, index["basis"]["sha256"], index["basis"]["bytes"]))
    return out


def pull_cache(url: str, dest: str, epochs: list[int] | None = None, storage_options: dict | None = None,
               dest_options: dict | None = None, progress: bool = True) -> dict:
    """Mirror the published cache at ``url`` (its epochs, or ``epochs``) to ``dest``. Returns
    ``{"epochs", "fetched", "skipped", "bytes"}`` (files fetched and already present)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    index = read_index(url, storage_options)
    if index is None:
        raise LogitcacheError(f"{url} holds no published cache ({INDEX_NAME}); publish one with `logitcache "
                              f"publish`")
    source_sha256 = index.pop("_sha256")
    published = sorted(int(e) for e in index["epochs"])
    chosen = published if epochs is None else sorted(epochs)
    missing = sorted(set(chosen) - set(published))
    if missing:
        raise LogitcacheError(f"published cache {url} has no epoch {missing[0]} (it has {len(published)}: "
                              f"{published[0]}..{published[-1]})" if published else f"{url} publishes no epoch")
    fs, root = _fs(dest, dest_options)
    local = is_local(dest)
    files = _files(index, chosen)
    done = {"fetched": 0, "skipped": 0, "bytes": 0}
    columns = ("{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task(f"pulling {len(chosen)} epochs", total=sum(n for _, _, n in files) or None)
        for name, sha256, nbytes in files:
            path = f"{root.rstrip('/')}/{name}"
            if _present(fs, path, sha256):
                done["skipped"] += 1
            else:
                try:
                    data = fetch(url, name, storage_options, sha256)  # checked (tried again on transient faults)
                except FileNotFoundError:
                    raise CorruptCacheError(f"published cache {url}: {name} is missing (the index lists it); "
                                            f"it cannot be pulled") from None
                _put(fs, path, data, local)
                done["fetched"] += 1
                done["bytes"] += len(data)
            bar.advance(task, nbytes)
    pulled = {**index, "epochs": {str(e): index["epochs"][str(e)] for e in chosen},
              "pulled_from": {"url": url, "epochs": published, "index_sha256": source_sha256}}
    _put(fs, f"{root.rstrip('/')}/{INDEX_NAME}", json.dumps(pulled, sort_keys=True).encode(), local)  # last
    return {"epochs": chosen, **done}
