"""Published caches (issue 23, first part): ``logitcache publish`` writes a copy that a static
HTTP server (no directory listing) serves; a reader opens it with one request and reads each
epoch with two, whatever its unit count; train, inspect and verify use it by URL; a damaged
published file is one line naming the URL; nothing in the index names a path."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from http_server import static_server
from main_entry import one_error_line, run_main, run_main_output

from logitcache.errors import CorruptCacheError, LogitcacheError
from logitcache.storage.publish import publish_cache
from logitcache.storage.reader import CacheReader


def _same_epochs(a: CacheReader, b: CacheReader, features: bool = False) -> None:
    assert a.epochs() == b.epochs() and a.manifest.to_dict() == b.manifest.to_dict()
    for e in a.epochs():
        x, y = a.load_epoch(e, features=features), b.load_epoch(e, features=features)
        for key in ("ids", "values", "tail", "feat", "feat_scale", "plans"):
            u, v = getattr(x, key), getattr(y, key)
            assert (u is None and v is None) or np.array_equal(np.asarray(u), np.asarray(v)), (e, key)


@pytest.fixture(scope="module")
def published(built_cache_mix, small_feature_cache, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("published")
    out = {"root": root}
    for name, src in (("mix", built_cache_mix), ("features", small_feature_cache)):
        out[name] = publish_cache(src, str(root / name), progress=False)
    return out


def test_a_published_cache_reads_as_its_source_with_one_request_then_two_per_epoch(published, built_cache_mix,
                                                                                   small_feature_cache):
    with static_server(str(published["root"])) as (base, requests):
        for name, src, features in (("mix", built_cache_mix, False), ("features", small_feature_cache, True)):
            requests.clear()
            reader = CacheReader(f"{base}/{name}")
            assert requests == [f"GET /{name}/logitcache-index.json"]
            assert reader.epochs() == [0, 1] and reader.epoch_status().complete == [0, 1]
            assert len(requests) == 1  # the epochs, their units and seals come from the index
            requests.clear()
            _same_epochs(reader, CacheReader(src), features)
            fetched = [r for r in requests if "epochs/" in r]
            assert fetched == [f"GET /{name}/epochs/{e:04d}.{x}" for e in (0, 1) for x in ("json", "pack")], requests
        assert CacheReader(f"{base}/features").feature_basis() is not None


def test_train_inspect_and_verify_take_a_published_url(published, synth_data, tiny_teacher, tmp_path, capsys):
    with static_server(str(published["root"])) as (base, _):
        url = f"{base}/mix"
        code, out, err = run_main_output(
            ["train", "--data", synth_data, "--cache", url, "--student", "test_resnet", "--epochs", "2",
             "--batch-size", "16", "--limit-batches", "2", "--workers", "0", "--no-progress", "--no-tensorboard",
             "--device", "cpu", "--out", str(tmp_path / "run")], capsys)
        assert code == 0, err
        assert f"cache {url}: training on cached epochs 0-1" in out
        code, out, err = run_main_output(["inspect", url, "--data", synth_data], capsys)
        assert code == 0 and "2 complete: 0-1" in out and "6 committed units" in out, err
        code, out, err = run_main_output(["verify", url, "--data", synth_data, "--teacher-weights", tiny_teacher,
                                          "--sample", "16", "--device", "cpu"], capsys)
        assert code == 0 and "PASS" in out, out + err


def test_publish_chosen_epochs_and_the_cli_names_the_index_digest(built_cache, synth_data, tmp_path, capsys):
    dest = tmp_path / "one"
    code, out, err = run_main_output(["publish", built_cache, str(dest), "--epochs", "1:2", "--no-progress"],
                                     capsys)
    assert code == 0, err
    digest = hashlib.sha256((dest / "logitcache-index.json").read_bytes()).hexdigest()
    assert f"index sha256 {digest}" in out and "published 1 epochs" in out
    assert CacheReader(str(dest)).epochs() == [1]
    code, out, err = run_main_output(
        ["train", "--data", synth_data, "--cache", str(dest), "--student", "test_resnet", "--epochs", "2",
         "--reuse-epochs", "--batch-size", "16", "--limit-batches", "1", "--workers", "0", "--no-progress",
         "--no-tensorboard", "--device", "cpu", "--out", str(tmp_path / "run")], capsys)
    assert code == 0 and "training on cached epochs 1 " in out, err
    line = one_error_line(*run_main(["publish", built_cache, str(tmp_path / "two"), "--epochs", "5"], capsys))
    assert "no complete epoch 2 to publish" in line


def _copy(published: dict, tmp_path: Path) -> Path:
    dst = tmp_path / "pub"
    shutil.copytree(published["root"] / "mix", dst)
    return dst


DAMAGE = {
    "a flipped byte in a pack": (lambda p: _flip(p / "epochs" / "0000.pack"), "epoch pack epochs/0000.pack fails"),
    "a missing pack": (lambda p: (p / "epochs" / "0000.pack").unlink(), "epoch pack epochs/0000.pack is missing"),
    "a cut epoch index": (lambda p: _cut(p / "epochs" / "0000.json"), "epoch index epochs/0000.json fails"),
    "an index that is not JSON": (lambda p: _cut(p / "logitcache-index.json"), "logitcache-index.json is not JSON"),
    "an index naming a path": (lambda p: _edit_index(p, lambda d: d["epochs"]["0"].__setitem__("path", "../x")),
                               "field epochs.0 is not an epoch entry"),
}


def _flip(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    path.write_bytes(bytes(raw))


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


def _edit_index(p: Path, edit) -> None:
    doc = json.loads((p / "logitcache-index.json").read_text())
    edit(doc)
    (p / "logitcache-index.json").write_text(json.dumps(doc))


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_published_file_is_one_line_naming_the_url(damage, published, synth_data, tmp_path, capsys):
    change, names = DAMAGE[damage]
    root = _copy(published, tmp_path)
    change(root)
    with static_server(str(tmp_path)) as (base, _):
        url = f"{base}/pub"
        with pytest.raises(LogitcacheError, match=names):
            CacheReader(url).load_epoch(0)
        line = one_error_line(*run_main(
            ["train", "--data", synth_data, "--cache", url, "--student", "test_resnet", "--epochs", "1",
             "--batch-size", "16", "--limit-batches", "1", "--workers", "0", "--no-progress", "--no-tensorboard",
             "--device", "cpu", "--out", str(tmp_path / "run")], capsys))
        assert url in line and names in line, line


def test_a_damaged_cache_is_not_published(built_cache, tmp_path):
    src = tmp_path / "src.zarr"
    shutil.copytree(built_cache, src)
    shutil.rmtree(src / "epochs" / "0001" / "commits" / "00002")
    with pytest.raises(CorruptCacheError, match="epoch 1 was finished and sealed"):
        publish_cache(str(src), str(tmp_path / "pub"), progress=False)
    assert not (tmp_path / "pub" / "logitcache-index.json").exists()
