"""ShardReader: read byte ranges ``[start, stop)`` of a source's shard files, one range per call.

* Local files: an open file per shard (an LRU of ``MAX_OPEN_HANDLES``), one seek + one read.
* Remote files (s3://, gs://, ...): one ranged GET per call (``fs.cat_file(path, start,
  stop)``): a read transfers the range and nothing more (no read-ahead block, no open or
  HEAD request per shard).
* Remote files with ``LOGITCACHE_SHARD_CACHE`` set: the shard's local copy (shard_cache.py),
  read like a local file.

Where a shard is read from is settled per process, on its first read. Picklable: open
files, and anything else bound to a process, are left behind (each process, also after a
fork, makes its own).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from logitcache.data.shard_cache import local_copy
from logitcache.errors import BadShardError

# Open shard files kept per process (bounded so thousands of shards don't exhaust fds).
MAX_OPEN_HANDLES = 16


class ShardReader:
    """Ranged reads of shard files ``urls`` (``sizes``: their sizes in bytes, for the local copies)."""

    def __init__(self, urls: list[str], sizes: list[int]) -> None:
        self.urls = list(urls)
        self.sizes = list(sizes)
        self._reset_process_state()

    def _reset_process_state(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._handles: OrderedDict[int, Any] = OrderedDict()
        self._places: dict[int, tuple[Any, str]] = {}  # shard -> (remote fs or None for a local file, path)

    def __getstate__(self) -> dict[str, Any]:
        return {"urls": self.urls, "sizes": self.sizes}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_process_state()

    def close(self) -> None:
        """Close this process's open shard files (they are re-opened on demand)."""
        if self._pid != os.getpid():
            self._reset_process_state()
            return
        with self._lock:
            for handle in self._handles.values():
                handle.close()
            self._handles.clear()

    def read(self, shard: int, start: int, stop: int) -> bytes:
        """Bytes ``[start, stop)`` of shard ``shard`` (fewer at the end of a short file).

        BadShardError when the file is missing; other OSErrors pass through.
        """
        if self._pid != os.getpid():
            # After a fork the inherited handles share their file position with the
            # parent's: drop them and re-open in this process.
            self._reset_process_state()
        fs, path = self._place(shard)
        if fs is not None:
            if stop <= start:
                return b""
            try:
                return fs.cat_file(path, start=start, end=stop)
            except FileNotFoundError:
                raise BadShardError(f"shard file not found: {self.urls[shard]}") from None
        with self._lock:
            handle = self._handle(shard, path)
            handle.seek(start)
            return handle.read(stop - start)

    def _place(self, shard: int) -> tuple[Any, str]:
        """(fs, path) for a remote read, (None, path) for a local file; settled on first use."""
        place = self._places.get(shard)
        if place is None:
            url = self.urls[shard]
            fs, path = fsspec.core.url_to_fs(url)
            if isinstance(fs, LocalFileSystem):
                place = (None, path)
            else:
                copy = local_copy(url, self.sizes[shard])
                place = (None, copy) if copy is not None else (fs, path)
            self._places[shard] = place
        return place

    def _handle(self, shard: int, path: str) -> Any:
        """This process's open file for a shard (LRU of MAX_OPEN_HANDLES); call under the lock."""
        handle = self._handles.get(shard)
        if handle is not None:
            self._handles.move_to_end(shard)
            return handle
        name = self.urls[shard]
        try:
            handle = open(path, "rb")
        except FileNotFoundError:
            raise BadShardError(f"shard file not found: {name}") from None
        except OSError as e:
            raise BadShardError(f"cannot open shard {name}: {e}") from None
        self._handles[shard] = handle
        if len(self._handles) > MAX_OPEN_HANDLES:
            _, oldest = self._handles.popitem(last=False)
            oldest.close()
        return handle
