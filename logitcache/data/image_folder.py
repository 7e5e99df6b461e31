"""List an image folder ``<dir>/<class_name>/<file>.{png,jpg,jpeg}`` into classes, samples and virtual shards.

Classes are the sorted sub-directory names (hidden ones skipped); a class's files are its
image files anywhere below it. A sample's key is its path relative to the folder without
extension, dots replaced by '_'; its label is its class's position.

Samples are ordered by a hash of their key (the 8-byte blake2b digest, little-endian; ties
by key) and that order is cut into virtual shards of ``shard_size`` samples, named
``<url>#h00000``, ``#h00001``, ...: the unit of work is the same as for tar shards, and each
shard is a random mix of classes, the same on every machine and process. (Mixup/cutmix
pairs samples within a shard, so class-sorted shards would mix a class with itself.)
Global index order is shard order, then the hashed order. Nothing is read here, only listed.
"""

from __future__ import annotations

import hashlib
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
    shards: list[ShardInfo]  # virtual shards, named ``<url>#h<n>``
    shard_ids: list[str]  # ``#h<n>``: names independent of where the folder lives


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
    samples: list[tuple[int, str, str, int]] = []  # (key hash, key, file URL, label)
    for label, name in enumerate(classes):
        for p in fs.find(join_url(path, name)):
            if posixpath.splitext(p)[1].lower() in FOLDER_IMAGE_EXTS:
                rel = posixpath.relpath(p, path)
                # Keys keep '/', but a dot would break the WebDataset key/extension convention.
                key = posixpath.splitext(rel)[0].replace(".", "_")
                samples.append((key_hash(key), key, join_url(url, rel), label))
    samples.sort(key=lambda s: (s[0], s[1]))  # independent of listing order: the same everywhere
    shards = virtual_shards(url, len(samples), shard_size)
    return FolderListing(
        url=url,
        classes=classes,
        keys=[s[1] for s in samples],
        files=[s[2] for s in samples],
        labels=[s[3] for s in samples],
        shards=shards,
        shard_ids=[shard_id(i) for i in range(len(shards))],
    )


def key_hash(key: str) -> int:
    """The 8-byte blake2b digest of ``key`` (UTF-8) as a little-endian integer: stable everywhere."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def shard_id(i: int) -> str:
    """Name of virtual shard ``i`` (``#h`` for "hashed"); the shard's name is the folder URL + this."""
    return f"#h{i:05d}"


def virtual_shards(url: str, num_samples: int, shard_size: int) -> list[ShardInfo]:
    """Runs of ``shard_size`` consecutive samples (the last one shorter), named ``<url>#h<n>``."""
    shards = []
    for i, start in enumerate(range(0, num_samples, shard_size)):
        stop = min(start + shard_size, num_samples)
        shards.append(ShardInfo(name=url + shard_id(i), start=start, stop=stop))
    return shards
