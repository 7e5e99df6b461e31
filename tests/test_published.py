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
    "a flipped byte in a pack": (lambda p: _flip(p / "epochs" / "0000.pack"),
                                 "epochs/0000.pack: its bytes fail the index's sha256"),
    "a missing pack": (lambda p: (p / "epochs" / "0000.pack").unlink(), "epoch pack epochs/0000.pack is missing"),
    "a cut epoch index": (lambda p: _cut(p / "epochs" / "0000.json"),
                          "epochs/0000.json: its bytes fail the index's sha256"),
    "an index that is not JSON": (lambda p: _cut(p / "logitcache-index.json"), "logitcache-index.json: it is not JSON"),
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


@pytest.mark.parametrize("fault", ["503", "drop", "truncate", "flip"])
@pytest.mark.parametrize("name", ["logitcache-index.json", "epochs/0000.pack"])
def test_a_transient_fault_is_tried_again_and_the_read_is_exact(fault, name, published, built_cache_mix):
    faults = {f"/mix/{name}": [fault, fault]}  # twice: the reader recovers on the third GET
    with static_server(str(published["root"]), faults) as (base, requests):
        reader = CacheReader(f"{base}/mix")
        _same_epochs(reader, CacheReader(built_cache_mix))
        assert requests.count(f"GET /mix/{name}") == 3, requests


def test_a_fault_that_persists_is_one_line_naming_the_url(published, synth_data, tmp_path, capsys):
    faults = {"/mix/epochs/0000.pack": ["503"] * 100}
    with static_server(str(published["root"]), faults) as (base, _):
        url = f"{base}/mix"
        with pytest.raises(CorruptCacheError, match=r"epochs/0000.pack: HTTPError|epochs/0000.pack: .*503"):
            CacheReader(url).load_epoch(0)
        line = one_error_line(*run_main(
            ["train", "--data", synth_data, "--cache", url, "--student", "test_resnet", "--epochs", "1",
             "--batch-size", "16", "--limit-batches", "1", "--workers", "0", "--no-progress", "--no-tensorboard",
             "--device", "cpu", "--out", str(tmp_path / "run")], capsys))
        assert url in line and "epochs/0000.pack" in line and "5 tries" in line, line


# -- pull ------------------------------------------------------------------------------------------


def _tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_pulled_subset_trains_and_inspect_says_what_it_holds(published, synth_data, tmp_path, capsys):
    from logitcache.storage.pull import pull_cache

    with static_server(str(published["root"])) as (base, requests):
        url = f"{base}/mix"
        out = pull_cache(url, str(tmp_path / "one"), [1], progress=False)
        assert out["epochs"] == [1] and out["fetched"] == 2 and out["skipped"] == 0
        assert not any("0000" in r for r in requests)  # only the epoch asked for is fetched
        again = pull_cache(url, str(tmp_path / "one"), [1], progress=False)
        assert again["fetched"] == 0 and again["skipped"] == 2  # verified files are never fetched again
        line = one_error_line(*run_main(["pull", url, str(tmp_path / "two"), "--epochs", "3:4"], capsys))
        assert url in line and "no epoch 3" in line
    pulled = str(tmp_path / "one")
    code, out, err = run_main_output(["inspect", pulled], capsys)
    assert code == 0 and "1 complete: 1; pulled: 1 of the 2 epochs published at http" in out, out + err
    code, out, err = run_main_output(
        ["train", "--data", synth_data, "--cache", pulled, "--student", "test_resnet", "--epochs", "2",
         "--reuse-epochs", "--batch-size", "16", "--limit-batches", "1", "--workers", "0", "--no-progress",
         "--no-tensorboard", "--device", "cpu", "--out", str(tmp_path / "run")], capsys)
    assert code == 0 and "training on cached epochs 1 " in out, err


def test_a_pull_killed_and_run_again_ends_identical_to_one_uninterrupted(published, tmp_path, capsys):
    import os
    import signal
    import subprocess
    import sys
    import time

    from logitcache.storage.pull import pull_cache

    faults: dict[str, list[str]] = {}
    with static_server(str(published["root"]), faults) as (base, requests):
        url, dest = f"{base}/features", tmp_path / "killed"
        pull_cache(url, str(tmp_path / "straight"), progress=False)  # the same URL: the same index
        faults["/features/epochs/0001.pack"] = ["slow"]
        requests.clear()
        proc = subprocess.Popen([sys.executable, "-m", "logitcache.cli.main", "pull", url, str(dest),
                                 "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while "GET /features/epochs/0001.pack" not in requests and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)  # mid-pull: epoch 0 is in, epoch 1's pack is on its way
        proc.wait()
        assert (dest / "epochs" / "0000.pack").exists() and not (dest / "logitcache-index.json").exists()
        code, out, err = run_main_output(["pull", url, str(dest), "--no-progress"], capsys)
        assert code == 0, err
        assert requests.count("GET /features/epochs/0000.pack") == 1  # verified there: not fetched again
    assert _tree(dest) == _tree(tmp_path / "straight")


@pytest.mark.parametrize("fault", ["503", "truncate", "flip"])
def test_inspect_verify_and_pull_recover_from_a_transient_fault(fault, published, synth_data, tiny_teacher,
                                                                tmp_path, capsys):
    from logitcache.storage.pull import pull_cache

    faults: dict[str, list[str]] = {}
    with static_server(str(published["root"]), faults) as (base, requests):
        url = f"{base}/mix"
        for args, expect in ((["inspect", url], "2 complete: 0-1"),
                             (["verify", url, "--data", synth_data, "--teacher-weights", tiny_teacher, "--sample",
                               "8", "--device", "cpu"], "PASS")):
            faults["/mix/epochs/0000.pack"] = [fault]
            code, out, err = run_main_output(args, capsys)
            assert code == 0 and expect in out, (args[0], out + err)
        faults["/mix/epochs/0001.pack"] = [fault, fault]
        requests.clear()
        out = pull_cache(url, str(tmp_path / "copy"), progress=False)
        assert out["fetched"] == 4 and requests.count("GET /mix/epochs/0001.pack") == 3
    source = published["root"] / "mix" / "epochs" / "0001.pack"
    assert _tree(tmp_path / "copy")["epochs/0001.pack"] == source.read_bytes()


def test_inspect_verify_and_pull_name_the_url_of_a_fault_that_persists(published, synth_data, tiny_teacher, tmp_path,
                                                                       capsys):
    with static_server(str(published["root"]), {"/mix/epochs/0000.pack": ["503"] * 100}) as (base, _):
        url = f"{base}/mix"
        for args in (["inspect", url], ["verify", url, "--data", synth_data, "--teacher-weights", tiny_teacher,
                                        "--sample", "64", "--device", "cpu"], ["pull", url, str(tmp_path / "c")]):
            line = one_error_line(*run_main(args, capsys))
            assert url in line and "epochs/0000.pack" in line and "5 tries" in line, (args[0], line)
    assert not (tmp_path / "c" / "logitcache-index.json").exists()  # a failed pull is not a cache
    root = _copy(published, tmp_path)
    (root / "epochs" / "0001.pack").unlink()
    with static_server(str(tmp_path)) as (base, _):
        for args in (["pull", f"{base}/pub", str(tmp_path / "d")], ["inspect", f"{base}/pub"]):
            line = one_error_line(*run_main(args, capsys))
            assert f"{base}/pub" in line and "epochs/0001.pack is missing" in line, (args[0], line)


def test_a_run_names_the_published_index_it_trained_on(published, synth_data, tmp_path, capsys):
    import hashlib

    with static_server(str(published["root"])) as (base, _):
        code, out, err = run_main_output(
            ["train", "--data", synth_data, "--cache", f"{base}/mix", "--student", "test_resnet", "--epochs", "1",
             "--batch-size", "16", "--limit-batches", "1", "--workers", "0", "--no-progress", "--no-tensorboard",
             "--device", "cpu", "--out", str(tmp_path / "run")], capsys)
    digest = hashlib.sha256((published["root"] / "mix" / "logitcache-index.json").read_bytes()).hexdigest()
    assert code == 0 and f"is published index sha256 {digest[:16]}" in out, out + err
