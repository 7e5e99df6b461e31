"""SampleSource: random access by global index to the samples of one split; :func:`open_source` opens one.

Three inputs are understood by :func:`open_source` (local paths or any fsspec URL):

* a dataset root holding ``dataset.json`` and WebDataset tar shards (see shards.py);
* tar shard URLs directly, with brace expansion (``.../train-{000000..000009}.tar``);
  there is no metadata, so ``num_classes`` must be given;
* an image folder ``<dir>/<class_name>/<file>.{png,jpg,jpeg}``, cut into virtual shards
  of ``shard_size`` files that mix the classes (image_folder.py).

Tar shards are indexed once per process, from the index file beside each shard when
there is one (one small read per shard, index_file.py), else from their headers
(tar_index.py). An image is then one ranged read of its member and the tar headers that
name it (shard_reader.py; remote stores: one ranged GET, no read-ahead), checked against
the index (tar_index.check_read). Only image members and ``.cls`` are ever read: nothing
is unpickled. Images come back as fully decoded RGB PIL images.
"""

from __future__ import annotations

import hashlib
import io
import json
import operator
import os
import posixpath
from typing import Any

import fsspec
import numpy as np
from braceexpand import braceexpand
from PIL import Image

from logitcache.data.image_folder import FolderListing, list_folder
from logitcache.data.index_file import index_shards
from logitcache.data.shard_info import ShardInfo
from logitcache.data.shard_reader import ShardReader
from logitcache.data.tar_index import check_read
from logitcache.data.urls import join_url, normalise_url
from logitcache.errors import BadSampleError, BadShardError, LogitcacheError

__all__ = ["SampleSource", "ShardInfo", "open_source", "tar_shard_urls"]

# Formats PIL may decode: no other decoder is ever reached, whatever the bytes say.
PIL_FORMATS = ("PNG", "JPEG", "WEBP")


def _decode_image(data: bytes, shard: str, key: str) -> Image.Image:
    """Decode fully (``load``) so that corrupt bytes fail here, not later in a transform."""
    try:
        with Image.open(io.BytesIO(data), formats=PIL_FORMATS) as im:
            im.load()
            return im if im.mode == "RGB" else im.convert("RGB")  # convert would copy an RGB image
    except Exception as e:  # PIL raises many types on bad bytes (OSError, SyntaxError, ValueError, ...)
        raise BadSampleError(f"cannot decode image: {type(e).__name__}: {e}", shard=shard, key=key) from None


def _read_file(url: str) -> bytes:
    """The bytes of one file: plain ``open`` for a local path (fsspec's URL parsing costs
    about a tenth of a small image's decode), one GET for a remote URL."""
    if "://" not in url or url.startswith("file://"):
        with open(url.removeprefix("file://"), "rb") as f:
            return f.read()
    fs, fs_path = fsspec.core.url_to_fs(url)
    return fs.cat_file(fs_path)


class SampleSource:
    """Random access to the samples of one split, in a stable order (shard order, then member order).

    Build with :func:`open_source`. Picklable: the index travels with the pickle, open file
    handles do not (each process opens its own, also after a fork: shard_reader.py).
    """

    url: str
    split: str | None
    num_classes: int
    classes: list[str]
    shards: list[ShardInfo]

    def __init__(
        self,
        *,
        url: str,
        split: str | None,
        classes: list[str],
        shards: list[ShardInfo],
        shard_ids: list[str],
        keys: list[str],
        labels: np.ndarray,
        offsets: np.ndarray | None = None,
        sizes: np.ndarray | None = None,
        starts: np.ndarray | None = None,
        stops: np.ndarray | None = None,
        shard_bytes: list[int] | None = None,
        files: list[str] | None = None,
    ) -> None:
        """Internal: ``offsets``/``sizes`` locate tar image members and ``[starts, stops)``
        their read ranges (tar_index.py), ``shard_bytes`` are the tar files' sizes; ``files``
        are folder file URLs.

        ``shard_ids`` name the shards independently of where the data lives (basenames or
        ``#h<n>``), for :meth:`fingerprint`.
        """
        self.url = url
        self.split = split
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.shards = list(shards)
        self._shard_ids = list(shard_ids)
        self._starts = np.array([s.start for s in self.shards], dtype=np.int64)
        self._keys = keys
        self._labels = np.asarray(labels, dtype=np.int64)
        self._offsets = offsets
        self._sizes = sizes
        self._starts_read = starts
        self._stops_read = stops
        self._files = files
        self._reader = None if files is not None else ShardReader([s.name for s in self.shards], shard_bytes or [])
        self._fingerprint: str | None = None
        self._check_unique_keys()

    def close(self) -> None:
        """Close this process's open shard files (they are re-opened on demand)."""
        if self._reader is not None:
            self._reader.close()

    # -- index ------------------------------------------------------------------------

    def _check_unique_keys(self) -> None:
        # Views are seeded by key, so a key must name one sample only.
        if len(set(self._keys)) == len(self._keys):
            return
        first: dict[str, int] = {}
        for i, key in enumerate(self._keys):
            if key in first:
                other = self.shards[self.shard_of(first[key])].name
                raise BadSampleError(f"duplicate key (also in shard {other})", shard=self.shards[self.shard_of(i)].name, key=key)
            first[key] = i

    def _check_index(self, index: int) -> int:
        index = operator.index(index)
        if not 0 <= index < len(self._keys):
            raise IndexError(f"sample index {index} out of range [0, {len(self._keys)})")
        return index

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return (
            f"SampleSource(url={self.url!r}, split={self.split!r}, samples={len(self)}, "
            f"shards={len(self.shards)}, num_classes={self.num_classes})"
        )

    def key(self, index: int) -> str:
        """Key of sample ``index`` (unique within the source; may contain '/', never '.')."""
        return self._keys[self._check_index(index)]

    def label(self, index: int) -> int:
        """Class index of sample ``index``, in ``[0, num_classes)``."""
        return int(self._labels[self._check_index(index)])

    def labels(self) -> np.ndarray:
        """All labels, shape (N,), int64 (a copy)."""
        return self._labels.copy()

    def keys(self) -> list[str]:
        """All keys, in index order (a copy)."""
        return list(self._keys)

    def shard_of(self, index: int) -> int:
        """Position in ``self.shards`` of the shard holding sample ``index``."""
        index = self._check_index(index)
        return int(np.searchsorted(self._starts, index, side="right")) - 1

    def load_image(self, index: int) -> Image.Image:
        """Sample ``index`` as a fully decoded RGB PIL image.

        Raises BadSampleError (naming shard and key) when its bytes cannot be read or
        decoded, BadShardError when its shard file cannot be opened.
        """
        index = self._check_index(index)
        shard_pos = self.shard_of(index)
        shard = self.shards[shard_pos].name
        key = self._keys[index]
        if self._files is not None:
            path = self._files[index]
            try:
                data = _read_file(path)
            except OSError as e:
                raise BadSampleError(f"cannot read {path}: {e}", shard=shard, key=key) from None
            return _decode_image(data, shard, key)
        return _decode_image(self._read_member(index, shard_pos), shard, key)

    def _read_member(self, index: int, shard_pos: int) -> bytes:
        """The image bytes of tar sample ``index``: one read of its range, checked against the index."""
        assert self._reader is not None and self._offsets is not None and self._sizes is not None
        assert self._starts_read is not None and self._stops_read is not None
        shard, key = self.shards[shard_pos].name, self._keys[index]
        start, stop = int(self._starts_read[index]), int(self._stops_read[index])
        try:
            data = self._reader.read(shard_pos, start, stop)
        except OSError as e:
            raise BadSampleError(f"cannot read image member: {e}", shard=shard, key=key) from None
        if len(data) != stop - start:
            raise BadSampleError(f"image member cut short ({len(data)} of {stop - start} bytes)", shard=shard, key=key)
        return check_read(data, start, key=key, label=int(self._labels[index]), offset=int(self._offsets[index]),
                          size=int(self._sizes[index]), shard=shard)

    def fingerprint(self) -> str:
        """sha256 hex of (num_classes, shard names, keys, labels): equal for equal data wherever it lives.

        Shard names are basenames for tar shards and ``#h<n>`` for folder shards.
        """
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(json.dumps({"num_classes": self.num_classes}).encode())
            for shard_id, shard in zip(self._shard_ids, self.shards):
                keys = self._keys[shard.start : shard.stop]
                labels = self._labels[shard.start : shard.stop].tolist()
                # JSON per shard: an unambiguous encoding of names, keys and labels.
                h.update(b"\n" + json.dumps([shard_id, keys, labels]).encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint


# -- construction ------------------------------------------------------------------------


def _from_tars(url: str, split: str | None, urls: list[str], classes: list[str]) -> SampleSource:
    """The tar shards ``urls`` concatenated in order: global index = shard order, then member order."""
    indexes, shard_bytes = index_shards(urls, len(classes))
    shards: list[ShardInfo] = []
    keys: list[str] = []
    for shard_url, index in zip(urls, indexes):
        shards.append(ShardInfo(name=shard_url, start=len(keys), stop=len(keys) + len(index.keys)))
        keys += index.keys

    def joined(name: str) -> np.ndarray:
        parts = [np.asarray(getattr(ix, name), dtype=np.int64) for ix in indexes]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    return SampleSource(
        url=url,
        split=split,
        classes=classes,
        shards=shards,
        shard_ids=[posixpath.basename(u) for u in urls],
        keys=keys,
        labels=joined("labels"),
        offsets=joined("offsets"),
        sizes=joined("sizes"),
        starts=joined("starts"),
        stops=joined("stops"),
        shard_bytes=shard_bytes,
    )


def _from_folder(listing: FolderListing, split: str | None) -> SampleSource:
    return SampleSource(
        url=listing.url,
        split=split,
        classes=listing.classes,
        shards=listing.shards,
        shard_ids=listing.shard_ids,
        keys=listing.keys,
        labels=np.array(listing.labels, dtype=np.int64),
        files=listing.files,
    )


def _read_meta(fs: Any, path: str, url: str) -> dict[str, Any]:
    """The parsed ``dataset.json`` of root ``url``; LogitcacheError when unreadable or malformed."""
    where = join_url(url, "dataset.json")
    try:
        meta = json.loads(fs.cat_file(path).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LogitcacheError(f"cannot read {where}: {e}") from None
    ok = (
        isinstance(meta, dict)
        and isinstance(meta.get("num_classes"), int)
        and isinstance(meta.get("classes"), list)
        and len(meta["classes"]) == meta["num_classes"]
        and isinstance(meta.get("splits"), dict)
        and all(isinstance(s, dict) and isinstance(s.get("shards"), list) for s in meta["splits"].values())
    )
    if not ok:
        raise LogitcacheError(f"{where}: malformed (needs num_classes, classes of that length, splits with shard lists)")
    return meta


def _open_root(url: str, split: str | None, meta: dict[str, Any], num_classes: int | None) -> SampleSource:
    available = sorted(meta["splits"])
    if split is None or split not in meta["splits"]:
        asked = "no split given" if split is None else f"no split {split!r}"
        raise LogitcacheError(f"dataset {url}: {asked}; available splits: {', '.join(available) or '(none)'}")
    if num_classes is not None and num_classes != meta["num_classes"]:
        raise LogitcacheError(f"dataset {url} has {meta['num_classes']} classes, not {num_classes}")
    entry = meta["splits"][split]
    urls = [join_url(url, str(name)) for name in entry["shards"]]
    source = _from_tars(url, split, urls, [str(c) for c in meta["classes"]])
    expected = entry.get("num_samples")
    if isinstance(expected, int) and expected != len(source):
        raise BadShardError(f"dataset {url} split {split!r}: dataset.json says {expected} samples, shards hold {len(source)}")
    return source


def open_source(
    url: str | os.PathLike[str], split: str | None = None, *, shard_size: int = 1000, num_classes: int | None = None
) -> SampleSource:
    """Open one split of a dataset for random access.

    * ``url`` is a dataset root with ``dataset.json``: ``split`` is required (the error
      lists the available ones); ``num_classes``, if given, must match.
    * ``url`` ends in ``.tar`` (brace patterns allowed): those shards, in order;
      ``num_classes`` is required, class names are "0".."n-1".
    * ``url`` is an image folder: classes are its sorted sub-directories (``<url>/<split>``
      when ``split`` is given); files are grouped into virtual shards of ``shard_size``;
      ``num_classes``, if given, must match the number of class directories.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    url = normalise_url(os.fspath(url))
    if url.endswith(".tar"):
        if num_classes is None:
            raise LogitcacheError(f"{url}: tar shards without dataset.json need num_classes")
        return _from_tars(url, split, list(braceexpand(url)), [str(i) for i in range(num_classes)])
    fs, path = fsspec.core.url_to_fs(url)
    meta_path = join_url(path, "dataset.json")
    if fs.isfile(meta_path):
        return _open_root(url, split, _read_meta(fs, meta_path, url), num_classes)
    if fs.isdir(path):
        return _from_folder(list_folder(fs, url, path, split, shard_size, num_classes), split)
    raise LogitcacheError(f"{url}: not a dataset root (no dataset.json), image folder or .tar shard URL")


def tar_shard_urls(url: str | os.PathLike[str]) -> tuple[list[str], int | None]:
    """The tar shards ``url`` names, and their class count when known.

    ``url`` is a dataset root (the shards of every split, ``num_classes`` from its
    ``dataset.json``) or tar shard URLs with brace patterns (class count unknown: None).
    """
    url = normalise_url(os.fspath(url))
    if url.endswith(".tar"):
        return list(braceexpand(url)), None
    fs, path = fsspec.core.url_to_fs(url)
    meta_path = join_url(path, "dataset.json")
    if not fs.isfile(meta_path):
        raise LogitcacheError(f"{url}: neither a dataset root (no dataset.json) nor a .tar shard URL")
    meta = _read_meta(fs, meta_path, url)
    names = [str(name) for split in meta["splits"].values() for name in split["shards"]]
    return [join_url(url, name) for name in names], int(meta["num_classes"])
