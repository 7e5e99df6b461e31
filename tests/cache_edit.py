"""Test helpers: edit a cache's metadata the way a writer would have written it, digests and
seals recomputed, so a test reaches the check it is about (view drift, another library
version, an old format) instead of the manifest digest or the seal. Never used on a cache
whose damage is the point of the test."""

from __future__ import annotations

import zarr

from logitcache.storage.layout import commit_path, list_names, numbered_entries
from logitcache.storage.manifest_schema import manifest_digest
from logitcache.storage.seals import SEALS, seal_record, write_seal


def _records(root: zarr.Group, url: str, epoch: int) -> list[int]:
    return numbered_entries(list_names(url, f"epochs/{epoch:04d}/commits"))


def reseal(url: str, fix_records: bool = True) -> None:
    """Rewrite every existing seal from the stored documents; ``fix_records``: every commit
    record's manifest digest first."""
    root = zarr.open_group(url, mode="a")
    digest = root.attrs["logitcache"].get("manifest_sha256")
    sealed = numbered_entries(list_names(url, SEALS))
    for e in numbered_entries(list_names(url, "epochs")):
        records = []
        for s in _records(root, url, e):
            group = root[commit_path(e, s)]
            record = group.attrs["commit"]
            if fix_records and digest is not None and "manifest" in record:
                record["manifest"] = digest
                group.attrs["commit"] = record
            records.append(record)
        if e in sealed:
            write_seal(root, e, seal_record(digest, records))


def edit_manifest(url: str, edit) -> None:
    """``edit(manifest_dict)`` in place, then the manifest digest, the records and the seals rewritten."""
    root = zarr.open_group(url, mode="a")
    d = dict(root.attrs["logitcache"])
    edit(d)
    if "manifest_sha256" in d:
        d["manifest_sha256"] = manifest_digest(d)
    root.attrs["logitcache"] = d
    reseal(url)


def edit_commit(url: str, epoch: int, shard: int, edit) -> None:
    """``edit(record)`` of one unit's commit record in place, then the seals rewritten."""
    root = zarr.open_group(url, mode="a")
    group = root[commit_path(epoch, shard)]
    record = group.attrs["commit"]
    edit(record)
    group.attrs["commit"] = record
    reseal(url, fix_records=False)


def as_format(url: str, version: int) -> None:
    """Make a format 5 cache what a format ``version`` (3 or 4) build wrote: no manifest digest,
    no manifest digests in its commit records, no seals (formats 3-5 store the same units)."""
    import shutil

    root = zarr.open_group(url, mode="a")
    d = dict(root.attrs["logitcache"])
    d.pop("manifest_sha256")
    d["format_version"] = version
    root.attrs["logitcache"] = d
    for e in numbered_entries(list_names(url, "epochs")):
        for s in _records(root, url, e):
            group = root[commit_path(e, s)]
            record = group.attrs["commit"]
            record.pop("manifest", None)
            group.attrs["commit"] = record
    shutil.rmtree(f"{url}/{SEALS}", ignore_errors=True)
