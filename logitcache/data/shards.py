"""Write samples into WebDataset tar shards plus a ``dataset.json`` (see docs/DESIGN.md).

Layout written by :func:`write_dataset`::

    <root>/dataset.json          {"name", "num_classes", "classes",
                                  "splits": {split: {"shards": [file names], "num_samples": n}}}
    <root>/<split>-000000.tar    members "<key>.png" (PNG bytes) and "<key>.cls" (ASCII decimal label)
    <root>/<split>-000000.tar.idx.json   the shard's member index (index_file.py)

The output is byte-deterministic: the same samples give byte-identical tar files and
``dataset.json`` on every run (fixed mtime, owner and mode; PNG encoding is deterministic).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import webdataset as wds
from PIL import Image

from logitcache.data.index_file import write_index
from logitcache.data.tar_index import index_tar

# Fixed tar header fields so that re-runs give byte-identical files.
_MTIME = 0  # an int: a float mtime makes tarfile add a PAX header to every member
_USER = "logitcache"
_MODE = 0o444

Sample = tuple[str, "Image.Image | bytes", int]


def png_bytes(image: Image.Image) -> bytes:
    """Encode a PIL image as PNG bytes (deterministic for the same pixels and mode)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _check_key(key: str, split: str) -> None:
    # WebDataset splits member names at the first dot of the basename: a dot in a key
    # would change what the reader sees as the key and the extension.
    if not key or "." in key or key.startswith("/") or key.endswith("/"):
        raise ValueError(f"split {split!r}: invalid sample key {key!r} (must be non-empty, no dots)")


def _chunks(samples: Iterable[Sample], size: int) -> Iterator[list[Sample]]:
    chunk: list[Sample] = []
    for sample in samples:
        chunk.append(sample)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _write_shard(path: Path, samples: list[Sample], split: str, num_classes: int, seen: set[str]) -> None:
    """Write one tar shard and its index; written to a temporary name and renamed so no half file is left."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as stream:
        # encoder=False: we hand TarWriter bytes only, so nothing is encoded by guessing.
        with wds.TarWriter(stream, user=_USER, group=_USER, mode=_MODE, encoder=False, mtime=_MTIME) as writer:
            for key, image, label in samples:
                _check_key(key, split)
                if key in seen:
                    raise ValueError(f"split {split!r}: duplicate sample key {key!r}")
                seen.add(key)
                label = int(label)
                if not 0 <= label < num_classes:
                    raise ValueError(f"split {split!r}, key {key!r}: label {label} not in [0, {num_classes})")
                data = image if isinstance(image, bytes) else png_bytes(image)
                ext = "jpg" if data[:3] == b"\xff\xd8\xff" else "png"  # already-encoded JPEG bytes keep their format
                writer.write({"__key__": key, ext: data, "cls": str(label).encode("ascii")})
    os.replace(tmp, path)
    # The index comes from walking the shard just written: exactly what a reader's walk finds.
    write_index(str(path), index_tar(str(path), num_classes), path.stat().st_size)


def write_dataset(
    root: str | Path,
    name: str,
    classes: list[str],
    splits: dict[str, Iterable[Sample]],
    shard_size: int = 1000,
) -> Path:
    """Write every split as tar shards of at most ``shard_size`` samples; return ``root``.

    ``splits`` maps a split name to an iterable of ``(key, image, label)``: ``image`` is a
    PIL image (encoded to PNG here) or already-encoded PNG or JPEG bytes (a ``.png`` or
    ``.jpg`` member), ``label`` an int in
    ``[0, len(classes))``. Keys must be unique within a split and contain no dots.
    Samples are consumed lazily, one shard at a time. ``dataset.json`` is written last,
    so a dataset root with a ``dataset.json`` is complete.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    # An old dataset.json would make a half-rewritten root look complete.
    (root / "dataset.json").unlink(missing_ok=True)
    num_classes = len(classes)
    meta_splits: dict[str, dict[str, object]] = {}
    for split, samples in splits.items():
        if not split or "/" in split or "." in split:
            raise ValueError(f"invalid split name {split!r}")
        shard_names: list[str] = []
        seen: set[str] = set()
        for i, chunk in enumerate(_chunks(samples, shard_size)):
            shard_name = f"{split}-{i:06d}.tar"
            _write_shard(root / shard_name, chunk, split, num_classes, seen)
            shard_names.append(shard_name)
        meta_splits[split] = {"shards": shard_names, "num_samples": len(seen)}
    meta = {"name": name, "num_classes": num_classes, "classes": list(classes), "splits": meta_splits}
    tmp = root / "dataset.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, root / "dataset.json")
    return root
