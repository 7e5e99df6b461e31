"""Optional local copies of remote shards: set ``LOGITCACHE_SHARD_CACHE=/local/dir``.

With the variable set, a shard on a remote store (s3://, gs://, ...) is copied whole to
that directory the first time a process reads from it, and every later read, by any
process on the machine, is a local seek + read: a dataset crosses the network once per
machine instead of once per image per epoch. Local shards are never copied. Budget the
disk: the copies add up to the dataset's size (ImageNet-1k train: ~140 GB).

A copy is named ``<sha256 of the shard URL>-<size in bytes>-<file name>``, so a shard
rewritten with another size gets a new copy (delete the directory after rewriting shards
in place). One process per machine downloads a given shard (a ``flock`` on
``<copy>.lock``); the others wait for it. The download goes to a temporary name that is
renamed when complete, so no process ever sees part of a copy, also after a kill.
fsspec's ``simplecache::`` would write straight into the final name instead, where a
concurrent reader, or the next run after a kill, would take a partial file for the shard.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import threading

import fsspec
from fsspec.implementations.local import LocalFileSystem

from logitcache.errors import BadShardError

ENV_VAR = "LOGITCACHE_SHARD_CACHE"


def cache_dir() -> str | None:
    """The shard cache directory this process uses (``$LOGITCACHE_SHARD_CACHE``), or None."""
    return os.environ.get(ENV_VAR) or None


def local_copy(url: str, size: int) -> str | None:
    """Path of the local copy of remote shard ``url`` (``size`` bytes), made on first use.

    None when no cache directory is set or the shard is a local file already.
    """
    root = cache_dir()
    if root is None:
        return None
    fs, path = fsspec.core.url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        return None
    name = f"{hashlib.sha256(url.encode()).hexdigest()[:32]}-{size}-{posixpath.basename(path)}"
    dest = os.path.join(os.path.expanduser(root), name)
    if _complete(dest, size):
        return dest
    import fcntl  # POSIX only; only needed with a cache directory

    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with open(dest + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not _complete(dest, size):  # another process may have copied it meanwhile
            _download(fs, path, url, dest, size)
    return dest


def _complete(dest: str, size: int) -> bool:
    try:
        return os.path.getsize(dest) == size
    except OSError:
        return False


def _download(fs, path: str, url: str, dest: str, size: int) -> None:
    tmp = f"{dest}.{os.getpid()}.{threading.get_ident()}.part"
    try:
        fs.get_file(path, tmp)
        got = os.path.getsize(tmp)
        if got != size:
            raise BadShardError(f"shard {url} changed while it was copied to {dest} ({got} bytes, expected {size})")
        os.replace(tmp, dest)
    except FileNotFoundError:
        raise BadShardError(f"shard file not found: {url}") from None
    except OSError as e:
        raise BadShardError(f"cannot copy shard {url} to {dest}: {e}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
