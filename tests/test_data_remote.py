"""Tar datasets on a real S3-compatible server (moto, on loopback): what opening a source and
reading images cost in requests and bytes, stale indexes, the local shard cache.

Traffic is measured at the server: a WSGI wrapper around moto's app records every request
(method, path, query) with the bytes of its response body, i.e. what crossed the wire to the
client (headers aside). Request counts are also checked against moto's own request log lines
(``s3_server.count_requests``: the ``werkzeug`` logger at INFO, one line per request).
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from logitcache.data import generate_synth, open_source, write_dataset
from logitcache.data.index_file import index_and_write
from logitcache.data.source import tar_shard_urls
from logitcache.errors import BadShardError

from s3_server import count_requests, s3_server

SYNTH = dict(num_classes=16, train_per_class=6, val_per_class=2, image_size=32, seed=0, shard_size=20)
NUM_SHARDS = 5  # 96 train samples in shards of 20


@dataclass
class Traffic:
    """Every request the server answered: (method, path, query, response body bytes)."""

    requests: list[tuple[str, str, str, int]] = field(default_factory=list)

    def wrap(self, app):
        def counted(environ, start_response):
            chunks = list(app(environ, start_response))
            self.requests.append((environ["REQUEST_METHOD"], environ["PATH_INFO"], environ.get("QUERY_STRING", ""),
                                  sum(len(c) for c in chunks)))
            return chunks

        return counted

    def clear(self) -> None:
        self.requests.clear()

    def to(self, suffix: str) -> list[tuple[str, str, str, int]]:
        """The requests for objects whose name ends in ``suffix``."""
        return [r for r in self.requests if r[1].endswith(suffix)]


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> Iterator[dict]:
    """moto's server with ``remote-data/data`` (a synth dataset with its indexes) and ``remote-data/noidx``
    (the same without them); the local copy; the traffic recorder."""
    from moto.moto_server import threaded_moto_server

    local = generate_synth(tmp_path_factory.mktemp("remote") / "data", **SYNTH)
    traffic = Traffic()
    dispatcher = threaded_moto_server.DomainDispatcherApplication
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(threaded_moto_server, "DomainDispatcherApplication", lambda create: traffic.wrap(dispatcher(create)))
        with s3_server() as env:
            for k, v in env.items():
                mp.setenv(k, v)
            import s3fs

            s3fs.S3FileSystem.clear_instance_cache()  # none pointing at another test's server
            fs = s3fs.S3FileSystem(skip_instance_cache=True)
            fs.mkdir("remote-data")
            fs.put(str(local) + "/", "remote-data/data/", recursive=True)
            for path in local.iterdir():
                if not path.name.endswith(".idx.json"):
                    fs.put_file(str(path), f"remote-data/noidx/{path.name}")
            try:
                yield {"fs": fs, "local": local, "traffic": traffic}
            finally:
                s3fs.S3FileSystem.clear_instance_cache()


def _same_index(a, b) -> None:
    assert a.keys() == b.keys() and a.fingerprint() == b.fingerprint()
    for name in ("_labels", "_offsets", "_sizes", "_starts_read", "_stops_read"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def test_open_with_index_reads_one_small_object_per_shard(s3):
    traffic = s3["traffic"]
    traffic.clear()
    with count_requests() as counter:
        source = open_source("s3://remote-data/data", "train")
    assert len(source.shards) == NUM_SHARDS
    assert counter.count == len(traffic.requests)  # the recorder sees every request the server logs
    assert traffic.to(".tar") == []  # no header walk: not a byte of any shard
    assert sorted(r[1] for r in traffic.to(".idx.json")) == [
        f"/remote-data/data/train-{i:06d}.tar.idx.json" for i in range(NUM_SHARDS)]
    # dataset.json (a look and a read) and one listing of the folder; nothing else.
    assert len(traffic.requests) <= NUM_SHARDS + 4, traffic.requests
    _same_index(source, open_source(s3["local"], "train"))


def test_open_without_index_walks_the_headers(s3):
    traffic = s3["traffic"]
    traffic.clear()
    source = open_source("s3://remote-data/noidx", "train")
    assert traffic.to(".idx.json") == []  # the listing says there are none: not even a look
    tar_bytes = sum(r[3] for r in traffic.to(".tar"))
    assert tar_bytes > 0
    _same_index(source, open_source(s3["local"], "train"))


def test_an_image_read_transfers_its_member_and_headers_only(s3):
    local = open_source(s3["local"], "train")
    source = open_source("s3://remote-data/data", "train")
    traffic = s3["traffic"]
    rng = np.random.default_rng(0)
    for index in rng.choice(len(source), size=12, replace=False).tolist():
        traffic.clear()
        image = source.load_image(index)
        assert len(traffic.requests) == 1  # one ranged GET: no HEAD, no open, no read-ahead
        method, path, _, body = traffic.requests[0]
        assert method == "GET" and path == "/remote-data/data/" + Path(source.shards[source.shard_of(index)].name).name
        member = int(source._sizes[index])
        assert body <= 2 * member, (body, member)
        # The member, its tar header and its .cls member before it (a header and a block).
        assert body == member + 3 * tarfile.BLOCKSIZE
        np.testing.assert_array_equal(np.asarray(image), np.asarray(local.load_image(index)))


def _rewrite_shard(s3, tmp_path, name: str, samples: int) -> None:
    """Put a shard of ``samples`` other samples in place of ``remote-data/data/<name>`` (its index is left as it was)."""
    rng = np.random.default_rng(1)
    images = [("z%03d" % i, rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), 0) for i in range(samples)]
    from PIL import Image

    root = write_dataset(tmp_path / "other", "o", ["a"], {"x": [(k, Image.fromarray(a), y) for k, a, y in images]})
    s3["fs"].put_file(str(root / "x-000000.tar"), f"remote-data/data/{name}")


def test_stale_index_is_an_error_naming_the_shard(s3, tmp_path):
    fs = s3["fs"]
    fs.copy("remote-data/data", "remote-data/stale", recursive=True)
    fs.put_file(str(s3["local"] / "train-000000.tar"), "remote-data/keep.tar")
    try:
        _rewrite_shard(s3, tmp_path, "train-000003.tar", samples=3)
        with pytest.raises(BadShardError, match=r"s3://remote-data/data/train-000003\.tar.*re-run `logitcache data index`"):
            open_source("s3://remote-data/data", "train")
        # Re-indexing fixes it, and the next open uses the new index.
        shards, num_classes = tar_shard_urls("s3://remote-data/data")
        index_and_write(shards, num_classes)
        rewritten = open_source("s3://remote-data/data/train-{000000..000004}.tar", num_classes=16)
        assert len(rewritten) == 96 - 20 + 3 and rewritten.key(60) == "z000"
    finally:
        fs.rm("remote-data/data", recursive=True)
        fs.copy("remote-data/stale", "remote-data/data", recursive=True)
        fs.rm("remote-data/stale", recursive=True)
    assert len(open_source("s3://remote-data/data", "train")) == 96


def test_data_index_on_s3_then_open_reads_no_shard(s3):
    fs = s3["fs"]
    fs.copy("remote-data/noidx", "remote-data/fresh", recursive=True)
    try:
        shards, num_classes = tar_shard_urls("s3://remote-data/fresh")
        assert num_classes == 16 and len(shards) == NUM_SHARDS + 2  # train and val
        index_and_write(shards, num_classes)
        for name in ("train-000000.tar.idx.json", "val-000000.tar.idx.json"):
            assert fs.cat_file(f"remote-data/fresh/{name}") == (s3["local"] / name).read_bytes()
        s3["traffic"].clear()
        source = open_source("s3://remote-data/fresh", "train")
        assert s3["traffic"].to(".tar") == []
        _same_index(source, open_source(s3["local"], "train"))
    finally:
        fs.rm("remote-data/fresh", recursive=True)


def test_shard_cache_copies_each_shard_once(s3, tmp_path, monkeypatch):
    cache = tmp_path / "shards"
    monkeypatch.setenv("LOGITCACHE_SHARD_CACHE", str(cache))
    traffic = s3["traffic"]
    local = open_source(s3["local"], "train")
    wanted = [3, 4, 25, 61, 62, 95]  # shards 0, 1, 3, 4
    traffic.clear()
    first = open_source("s3://remote-data/data", "train")
    for index in wanted:
        np.testing.assert_array_equal(np.asarray(first.load_image(index)), np.asarray(local.load_image(index)))
    copied = sorted(r[1] for r in traffic.to(".tar"))
    assert copied == [f"/remote-data/data/train-{i:06d}.tar" for i in (0, 1, 3, 4)]  # one whole-file GET each
    assert sum(r[3] for r in traffic.to(".tar")) == sum(
        (s3["local"] / f"train-{i:06d}.tar").stat().st_size for i in (0, 1, 3, 4))
    assert len([p for p in cache.iterdir() if p.name.endswith(".tar")]) == 4

    traffic.clear()
    second = open_source("s3://remote-data/data", "train")  # as another process would
    for index in wanted:
        np.testing.assert_array_equal(np.asarray(second.load_image(index)), np.asarray(local.load_image(index)))
    assert traffic.to(".tar") == []  # every read was local

    # Without an index the header walk reads the local copy too.
    traffic.clear()
    open_source("s3://remote-data/noidx", "train")
    assert sorted(r[1] for r in traffic.to(".tar")) == [f"/remote-data/noidx/train-{i:06d}.tar" for i in range(NUM_SHARDS)]
    traffic.clear()
    walked = open_source("s3://remote-data/noidx", "train")
    assert traffic.to(".tar") == []
    walked.load_image(50)
    assert traffic.to(".tar") == []


def test_shard_cache_never_shows_a_partial_copy(s3, tmp_path, monkeypatch):
    """A copy cut short (a killed download) is not taken for the shard."""
    from logitcache.data.shard_cache import local_copy

    monkeypatch.setenv("LOGITCACHE_SHARD_CACHE", str(tmp_path / "c"))
    url = "s3://remote-data/data/train-000002.tar"
    size = (s3["local"] / "train-000002.tar").stat().st_size
    path = local_copy(url, size)
    assert path is not None and Path(path).read_bytes() == (s3["local"] / "train-000002.tar").read_bytes()
    Path(path).write_bytes(Path(path).read_bytes()[:1000])
    assert Path(local_copy(url, size)).stat().st_size == size
    assert not [p for p in (tmp_path / "c").iterdir() if p.name.endswith(".part")]
    assert local_copy(str(s3["local"] / "train-000002.tar"), size) is None  # local shards are read in place
