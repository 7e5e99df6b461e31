"""List an image folder ``<dir>/<class_name>/<file>.{png,jpg,jpeg}`` into classes, samples and virtual shards.

Classes are the sorted sub-directory names (hidden ones skipped); a class's files are
its image files anywhere below it, sorted by path. Samples are ordered class by class,
and grouped into virtual shards of ``shard_size`` consecutive samples so that the unit
of work is the same as for tar shards. Nothing is read here, only listed.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any

from logitcache.data.shard_info import ShardInfo
from logitcache.data.urls import join_url
from logitcache.errors import LogitcacheError

# Extensions of the files of an image folder (compared lower-case).
FOLDER_IMAGE_EXTS = (".png", ".jpg", ".jpeg")


@dataclass
class FolderListing:
    """One image folder (one split), listed; per-sample lists share the global index."""

    url: str  # the folder's URL, ``<url>/<split>`` when a split was given
    classes: list[str]
    keys: list[str]  # relative path without extension, dots replaced by '_'
    files: list[str]  # URL of each sample's file
    labels: list[int]
    shards: list[ShardInfo]  # virtual shards, named ``<url>[start:stop]``
    shard_ids: list[str]  # ``[start:stop]``: names independent of where the folder lives


def list_folder(fs: Any, url: str, path: str, split: str | None, shard_size: int, num_classes: int | None) -> FolderListing:
    """List the folder at ``url`` (``path`` on filesystem ``fs``); LogitcacheError if it is not one.

    With ``split``, the folder is ``<url>/<split>``; ``num_classes``, if given, must equal
    the number of class directories.
    """
    if split is not None:
        if not fs.isdir(join_url(path, split)):
            raise LogitcacheError(f"image folder {url}: no sub-directory {split!r} for split {split!r}")
        url, path = join_url(url, split), join_url(path, split)
    names = (posixpath.basename(e["name"].rstrip("/")) for e in fs.ls(path, detail=True) if e["type"] == "directory")
    classes = sorted(n for n in names if not n.startswith("."))  # skip .ipynb_checkpoints etc.
    if not classes:
        raise LogitcacheError(f"image folder {url}: no class sub-directories")
    if num_classes is not None and num_classes != len(classes):
        raise LogitcacheError(f"image folder {url} has {len(classes)} class directories, not {num_classes}")
    keys: list[str] = []
    files: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        class_path = join_url(path, name)
        rels = sorted(
            posixpath.relpath(p, path)
            for p in fs.find(class_path)
            if posixpath.splitext(p)[1].lower() in FOLDER_IMAGE_EXTS
        )
        for rel in rels:
            # Keys keep '/', but a dot would break the WebDataset key/extension convention.
            keys.append(posixpath.splitext(rel)[0].replace(".", "_"))
            files.append(join_url(url, rel))
            labels.append(label)
    shards = virtual_shards(url, len(keys), shard_size)
    return FolderListing(
        url=url,
        classes=classes,
        keys=keys,
        files=files,
        labels=labels,
        shards=shards,
        shard_ids=[f"[{s.start}:{s.stop}]" for s in shards],
    )


def virtual_shards(url: str, num_samples: int, shard_size: int) -> list[ShardInfo]:
    """Runs of ``shard_size`` consecutive samples (the last one shorter), named ``<url>[start:stop]``."""
    shards = []
    for start in range(0, num_samples, shard_size):
        stop = min(start + shard_size, num_samples)
        shards.append(ShardInfo(name=f"{url}[{start}:{stop}]", start=start, stop=stop))
    return shards
