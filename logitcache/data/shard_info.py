"""ShardInfo: one shard of a source (a tar file or a run of image-folder files) as a range of global indices."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ShardInfo:
    """One shard: a tar file, or a run of files of an image folder.

    ``name`` is the shard's URL or path (what error messages print); the shard holds the
    samples with global indices ``start <= index < stop``.
    """

    name: str
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start
