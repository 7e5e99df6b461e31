"""Index WebDataset tar shards from their headers: per sample its key, label and image data offset/size.

A sample is the members sharing a key (directory + basename up to its first dot): one
image member (``TAR_IMAGE_EXTS``) and one ``.cls`` member (ASCII decimal label). Offsets
and sizes are in bytes from the start of the tar file, so that an image is later read
with one seek and one read. Only ``.cls`` members are read here; every other member is
skipped unread, so nothing is unpickled. Bad input raises BadShardError (the file as a
whole) or BadSampleError (one sample), naming shard and key.
"""

from __future__ import annotations

import posixpath
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import fsspec

from logitcache.errors import BadSampleError, BadShardError

# Extensions of the image member of a tar sample (WebDataset: text after the first dot).
TAR_IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
# A .cls member is a short ASCII integer; anything longer is not a label.
MAX_CLS_BYTES = 64
# Threads used to index tar shards (hides the latency of remote stores).
INDEX_THREADS = 8


@dataclass
class TarIndex:
    """What indexing one tar shard yields; one entry per sample, in member order."""

    keys: list[str]
    labels: list[int]
    offsets: list[int]  # byte offset of the image member's data in the tar
    sizes: list[int]  # byte size of the image member's data


def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset convention: key = directory + basename up to its first dot; ext = the rest."""
    while name.startswith("./"):  # GNU tar's "./x.png" names the same member as "x.png"
        name = name[2:]
    directory, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    key = posixpath.join(directory, stem) if directory else stem
    return key, ext.lower() if dot else ""


def parse_label(raw: bytes, num_classes: int, shard: str, key: str) -> int:
    """The class index in a ``.cls`` member's bytes; BadSampleError unless a decimal in ``[0, num_classes)``."""
    try:
        text = raw.decode("ascii").strip()
        label = int(text, 10)
    except (UnicodeDecodeError, ValueError):
        raise BadSampleError(f"label is not a decimal integer: {raw[:MAX_CLS_BYTES]!r}", shard=shard, key=key) from None
    if not 0 <= label < num_classes:
        raise BadSampleError(f"label {label} out of range [0, {num_classes})", shard=shard, key=key)
    return label


def index_tars(urls: list[str], num_classes: int) -> list[TarIndex]:
    """Index every shard of ``urls``; one TarIndex per URL, in the order given."""
    # Threads only pay off against a remote store's latency; locally parsing is the cost (GIL).
    local = all("://" not in u or u.startswith("file://") for u in urls)
    if len(urls) > 1 and not local:
        with ThreadPoolExecutor(max_workers=min(INDEX_THREADS, len(urls))) as pool:
            return list(pool.map(lambda u: index_tar(u, num_classes), urls))
    return [index_tar(u, num_classes) for u in urls]


def index_tar(url: str, num_classes: int) -> TarIndex:
    """Walk the headers of one tar shard; raise BadShardError / BadSampleError on bad input."""
    try:
        with fsspec.open(url, "rb") as f:
            return _index_tar_file(f, url, num_classes)
    except FileNotFoundError:
        raise BadShardError(f"shard file not found: {url}") from None
    except tarfile.TarError as e:
        raise BadShardError(f"corrupt or truncated tar shard {url}: {e}") from None
    except OSError as e:
        raise BadShardError(f"cannot read shard {url}: {e}") from None


def _index_tar_file(f: Any, url: str, num_classes: int) -> TarIndex:
    image: dict[str, tuple[int, int]] = {}  # key -> (data offset, size)
    labels: dict[str, int] = {}
    order: list[str] = []  # keys in order of first appearance
    seen: set[str] = set()
    # Seekable mode: tarfile reads each 512-byte header and seeks past the data.
    with tarfile.open(fileobj=f, mode="r:") as tar:
        for member in tar:
            if not member.isreg():
                continue
            key, ext = split_member_name(member.name)
            if ext in TAR_IMAGE_EXTS or ext == "cls":
                if key not in seen:
                    seen.add(key)
                    order.append(key)
            if ext in TAR_IMAGE_EXTS:
                if key in image:
                    raise BadSampleError("more than one image member", shard=url, key=key)
                image[key] = (member.offset_data, member.size)
            elif ext == "cls":
                if key in labels:
                    raise BadSampleError("more than one .cls member", shard=url, key=key)
                labels[key] = _read_label(f, member, url, key, num_classes)
            # Any other member (.json, .txt, .pyd, .pth, ...) is skipped unread.
        # tarfile stops silently at a short or garbled header after the first member;
        # a complete archive ends with a zero block exactly where the walk stopped.
        end = tar.offset
    _check_end_of_archive(f, url, end)
    return _pair_members(order, image, labels, url)


def _read_label(f: Any, member: tarfile.TarInfo, url: str, key: str, num_classes: int) -> int:
    """Read and parse the data of one ``.cls`` member (moves ``f``'s position)."""
    if member.size > MAX_CLS_BYTES:
        raise BadSampleError(f".cls member of {member.size} bytes is not a label", shard=url, key=key)
    f.seek(member.offset_data)
    raw = f.read(member.size)
    if len(raw) != member.size:
        raise BadShardError(f"corrupt or truncated tar shard {url}: .cls of key {key} cut short")
    return parse_label(raw, num_classes, url, key)


def _check_end_of_archive(f: Any, url: str, end: int) -> None:
    """BadShardError unless a zero block (end-of-archive) starts at byte ``end``."""
    f.seek(end)
    block = f.read(tarfile.BLOCKSIZE)
    if len(block) != tarfile.BLOCKSIZE or block.count(0) != tarfile.BLOCKSIZE:
        raise BadShardError(f"corrupt or truncated tar shard {url}: no valid header or end-of-archive at byte {end}")


def _pair_members(order: list[str], image: dict[str, tuple[int, int]], labels: dict[str, int], url: str) -> TarIndex:
    """One entry per key in ``order``; BadSampleError for a key lacking its image or its label."""
    index = TarIndex(keys=[], labels=[], offsets=[], sizes=[])
    for key in order:
        if key not in image:
            raise BadSampleError("sample has a .cls member but no image member", shard=url, key=key)
        if key not in labels:
            raise BadSampleError("sample has an image member but no .cls member", shard=url, key=key)
        index.keys.append(key)
        index.labels.append(labels[key])
        index.offsets.append(image[key][0])
        index.sizes.append(image[key][1])
    return index
