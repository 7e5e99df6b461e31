"""Tar member indexes beside the shards (``<shard>.idx.json``): equal to the header walk, written
by the dataset writers and ``logitcache data index``, refused when stale or corrupt, and every
image read checked against them. Real files in tmp_path, no mocks."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from logitcache.cli.main import app
from logitcache.data import open_source, write_dataset
from logitcache.data.index_file import encode_index, index_url
from logitcache.data.shards import png_bytes
from logitcache.data.tar_index import index_tar
from logitcache.errors import BadSampleError, BadShardError, LogitcacheError

RERUN = "re-run `logitcache data index`"


def _image(seed: int, size: int = 12) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8), "RGB")


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    """3 classes; train: 10 samples in shards of 4 (4, 4, 2); val: 3 samples."""
    rng = np.random.default_rng(0)
    train = [(f"t{i:03d}", _image(i), int(rng.integers(3))) for i in range(10)]
    val = [(f"v{i}", _image(100 + i), i % 3) for i in range(3)]
    return write_dataset(tmp_path / "ds", "idx", ["a", "b", "c"], {"train": train, "val": val}, shard_size=4)


def _arrays(source) -> dict[str, object]:
    names = ("_labels", "_offsets", "_sizes", "_starts_read", "_stops_read")
    return {name: getattr(source, name).tolist() for name in names}


def _drop_indexes(path: Path) -> None:
    for p in path.glob("*.idx.json"):
        p.unlink()


def _rewrite(tar_path: Path, edit) -> None:
    """Rewrite a tar shard from its (TarInfo, bytes) members as ``edit`` returns them."""
    with tarfile.open(tar_path) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for m, data in edit(members):
            m.size = len(data)
            tf.addfile(m, io.BytesIO(data))


def test_writer_writes_the_index_the_walk_gives(root, tmp_path):
    shards = sorted(root.glob("*.tar"))
    assert sorted(root.glob("*.idx.json")) == sorted(Path(index_url(str(p))) for p in shards)
    for shard in shards:
        expected = encode_index(index_tar(str(shard), 3), shard.stat().st_size)
        assert Path(index_url(str(shard))).read_bytes() == expected
    indexed = open_source(root, "train")
    walked_root = shutil.copytree(root, tmp_path / "walked")
    _drop_indexes(walked_root)
    walked = open_source(walked_root, "train")
    assert indexed.keys() == walked.keys() and indexed.fingerprint() == walked.fingerprint()
    assert _arrays(indexed) == _arrays(walked)
    for i in range(len(indexed)):
        np.testing.assert_array_equal(np.asarray(indexed.load_image(i)), np.asarray(walked.load_image(i)))
    # Some shards with an index and some without: each opened its own way, same result.
    Path(index_url(str(root / "train-000001.tar"))).unlink()
    assert _arrays(open_source(root, "train")) == _arrays(walked)


def test_cli_data_index_writes_the_same_files(root, tmp_path):
    expected = {p.name: p.read_bytes() for p in root.glob("*.idx.json")}
    _drop_indexes(root)
    result = CliRunner().invoke(app, ["data", "index", str(root)])
    assert result.exit_code == 0, result.output
    assert "indexed 4 shards, 13 samples" in result.output
    assert {p.name: p.read_bytes() for p in root.glob("*.idx.json")} == expected

    _drop_indexes(root)
    result = CliRunner().invoke(app, ["data", "index", f"{root}/train-{{000000..000002}}.tar"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in root.glob("*.idx.json")) == [f"train-{i:06d}.tar.idx.json" for i in range(3)]
    # Labels are not range-checked without dataset.json: the same bytes anyway.
    assert all((root / n).read_bytes() == expected[n] for n in (f"train-{i:06d}.tar.idx.json" for i in range(3)))

    result = CliRunner().invoke(app, ["data", "index", str(tmp_path / "nowhere")])
    assert isinstance(result.exception, LogitcacheError) and "nowhere" in str(result.exception)


def test_stale_index_is_refused_naming_the_shard(root):
    shard = root / "train-000001.tar"
    extra = tarfile.TarInfo("notes.txt")
    _rewrite(shard, lambda members: members[:-2] + [(extra, bytes(30000))])  # a sample fewer, another size
    with pytest.raises(BadShardError, match=rf"train-000001\.tar.*{RERUN}"):
        open_source(root, "train")
    assert CliRunner().invoke(app, ["data", "index", str(root)]).exit_code == 0
    meta = json.loads((root / "dataset.json").read_text())
    meta["splits"]["train"]["num_samples"] = 9
    (root / "dataset.json").write_text(json.dumps(meta))
    assert len(open_source(root, "train")) == 9


@pytest.mark.parametrize(
    "damage, why",
    [
        (lambda doc: b"{not json", "not JSON"),
        (lambda doc: json.dumps({**doc, "version": 99}).encode(), "version 1"),
        (lambda doc: json.dumps({**doc, "sizes": doc["sizes"][:-1]}).encode(), "sizes must be a list of 4 integers"),
        (lambda doc: json.dumps({**doc, "offsets": [1.5] * 4}).encode(), "offsets must be a list of 4 integers"),
        (lambda doc: json.dumps({**doc, "keys": [1, 2, 3, 4]}).encode(), "keys must be"),
        (lambda doc: json.dumps({**doc, "stops": [10**9] * 4}).encode(), "outside the shard"),
    ],
)
def test_corrupt_index_is_refused_naming_the_shard(root, damage, why):
    path = Path(index_url(str(root / "train-000000.tar")))
    path.write_bytes(damage(json.loads(path.read_bytes())))
    shard = r"train-000000\.tar"
    with pytest.raises(BadShardError, match=rf"{shard}\.idx\.json of shard .*{shard}.*{why}.*{RERUN}"):
        open_source(root, "train")


def test_same_size_rewrite_is_caught_on_read(root):
    """Samples reordered (the shard's size unchanged): the index opens, but no read serves a wrong sample."""
    shard = root / "train-000000.tar"
    source = open_source(root, "train")
    before = shard.stat().st_size
    _rewrite(shard, lambda members: members[2:4] + members[0:2] + members[4:])  # swap samples 0 and 1
    assert shard.stat().st_size == before
    again = open_source(root, "train")
    for s in (source, again):
        with pytest.raises(BadShardError, match=rf"train-000000\.tar changed after it was indexed.* t000; {RERUN}"):
            s.load_image(0)
    again.load_image(2)  # samples that did not move still read


def test_label_edited_in_place_is_caught_on_read(root):
    source = open_source(root, "train")
    old = source.label(5)
    new = (old + 1) % 3

    def edit(members):
        return [(m, str(new).encode() if m.name == "t005.cls" else d) for m, d in members]

    _rewrite(root / "train-000001.tar", edit)
    with pytest.raises(BadShardError, match=rf"train-000001\.tar.*t005 \(its \.cls says {new}, the index {old}\)"):
        open_source(root, "train").load_image(5)


def _tar(path: Path, members: list[tuple[str, bytes]], fmt: int = tarfile.PAX_FORMAT) -> None:
    with tarfile.open(path, "w", format=fmt) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_read_ranges_of_other_layouts(tmp_path):
    """Long names (PAX headers), image before label, label far from its image: the walk and the
    index agree, and every read is checked and right."""
    png = [png_bytes(_image(i)) for i in range(3)]
    long_key = "d/" + "x" * 150
    _tar(tmp_path / "a.tar", [(f"{long_key}.png", png[0]), (f"{long_key}.cls", b"1"),
                              ("far.cls", b"0"), ("pad.json", bytes(20000)), ("far.png", png[1]),
                              ("plain.cls", b"2"), ("plain.png", png[2])])
    walked = open_source(str(tmp_path / "a.tar"), num_classes=3)
    assert walked.keys() == [long_key, "far", "plain"] and walked.labels().tolist() == [1, 0, 2]
    starts, stops, offsets, sizes = walked._starts_read, walked._stops_read, walked._offsets, walked._sizes
    assert stops[0] > offsets[0] + sizes[0]  # the .cls after the image joins the range
    assert offsets[0] - starts[0] > tarfile.BLOCKSIZE  # the PAX header is in the range
    assert offsets[1] - starts[1] == tarfile.BLOCKSIZE and stops[1] == offsets[1] + sizes[1]  # label too far
    result = CliRunner().invoke(app, ["data", "index", str(tmp_path / "a.tar")])
    assert result.exit_code == 0, result.output
    indexed = open_source(str(tmp_path / "a.tar"), num_classes=3)
    assert _arrays(indexed) == _arrays(walked)
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(indexed.load_image(i)), np.asarray(_image(i)))


def test_index_labels_are_checked_like_the_walk(root):
    meta = json.loads((root / "dataset.json").read_text())
    meta["num_classes"], meta["classes"] = 1, ["a"]
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(BadSampleError, match=r"label \d out of range \[0, 1\).*train-00000\d\.tar.*key t\d+"):
        open_source(root, "train")
