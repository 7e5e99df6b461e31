"""Every byte read is checked: damage on storage stops ``train``, ``inspect`` and ``verify``
with one line naming the cache, epoch, unit and array; ``build --recheck`` repairs it;
caches of format version 1 (a committed one lives in tests/data/v1) still read, checked."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from logitcache.errors import CorruptCacheError
from logitcache.store import UNIT_ARRAYS, CacheReader, commit_path, unit_path
from main_entry import one_error_line, run_main

V1 = Path(__file__).resolve().parent / "data" / "v1"


def _chunk(url: str, epoch: int, shard: int, array: str) -> Path:
    return Path(url) / unit_path(epoch, shard) / array / "c" / ("0/0" if array.startswith("topk_") else "0")


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


DAMAGE = {
    "flipped byte in topk_logits": ("topk_logits", lambda url: _flip_byte(_chunk(url, 0, 1, "topk_logits"))),
    "flipped byte in topk_ids": ("topk_ids", lambda url: _flip_byte(_chunk(url, 0, 1, "topk_ids"))),
    "missing label chunk": ("label", lambda url: _chunk(url, 0, 1, "label").unlink()),
    "truncated tail_lse chunk": ("tail_lse", lambda url: _chunk(url, 0, 1, "tail_lse").write_bytes(
        _chunk(url, 0, 1, "tail_lse").read_bytes()[:9])),
    "garbled unit metadata": (None, lambda url: (Path(url) / unit_path(0, 1) / "zarr.json").write_text("{garbled")),
    "garbled commit record": (None, lambda url: (Path(url) / commit_path(0, 1) / "zarr.json").write_text("{x")),
}


@pytest.fixture()
def damaged(request, tmp_path, built_cache) -> tuple[str, str | None]:
    url = str(tmp_path / "damaged.zarr")
    shutil.copytree(built_cache, url)
    array, damage = DAMAGE[request.param]
    damage(url)
    return url, array


def _names_the_damage(line: str, url: str, array: str | None) -> None:
    assert url in line and "epoch 0" in line and "unit 1" in line, line
    if array is not None:
        assert f"array {array}" in line, line
    assert "--recheck" in line, line  # says how to repair


@pytest.mark.parametrize("damaged", sorted(DAMAGE), indirect=True)
def test_damage_stops_the_reader_train_inspect_and_verify(damaged, capsys, synth_data, tiny_teacher, tmp_path):
    url, array = damaged
    with pytest.raises(CorruptCacheError) as info:
        CacheReader(url).load_epoch(0)
    _names_the_damage(str(info.value), url, array)
    assert CacheReader(url).load_epoch(1).num_views == 96  # the other epoch is intact

    _names_the_damage(one_error_line(*run_main(["inspect", url], capsys)), url, array)
    _names_the_damage(one_error_line(*run_main(
        ["verify", url, "--data", synth_data, "--teacher-weights", tiny_teacher, "--sample", "1000", "--device",
         "cpu"], capsys)), url, array)
    line = one_error_line(*run_main(
        ["train", "--data", synth_data, "--student", "test_resnet", "--cache", url, "--epochs", "1",
         "--batch-size", "16", "--workers", "0", "--no-progress", "--out", str(tmp_path / "student")], capsys))
    _names_the_damage(line, url, array)


def test_recheck_rebuilds_damaged_units_to_the_same_bytes(tmp_path, built_cache, synth_data, tiny_teacher, capsys):
    url = str(tmp_path / "repair.zarr")
    shutil.copytree(built_cache, url)
    _flip_byte(_chunk(url, 1, 2, "topk_logits"))
    (Path(url) / unit_path(0, 0) / "label" / "c" / "0").unlink()
    args = ["build", "--data", synth_data, "--teacher", "test_resnet", "--teacher-weights", tiny_teacher,
            "--recipe", "demo32", "--epochs", "2", "--topk", "5", "--batch-size", "16", "--workers", "0",
            "--no-progress", "--out", url]
    from logitcache.cli.main import main  # noqa: F401 - imported before capturing stdout below

    code, _ = run_main(args, capsys)  # without --recheck: committed units are trusted, nothing is written
    assert code == 0
    with pytest.raises(CorruptCacheError):
        CacheReader(url).load_epoch(1)
    code, err = run_main([*args, "--recheck"], capsys)
    assert code == 0, err
    fixed, ref = CacheReader(url), CacheReader(built_cache)
    for e in (0, 1):
        a, b = fixed.load_epoch(e), ref.load_epoch(e)
        for key in UNIT_ARRAYS[1:]:
            assert np.array_equal(getattr(a, key), getattr(b, key)), (e, key)
    for e, s in ((0, 0), (1, 2)):
        assert fixed.commit(e, s) == ref.commit(e, s)


# -- format version 1 ---------------------------------------------------------------------


@pytest.fixture()
def v1_copy(tmp_path) -> Path:
    dst = tmp_path / "v1"
    shutil.copytree(V1, dst)
    return dst


def test_version_1_cache_reads_as_it_was_written(v1_copy):
    reader = CacheReader(str(v1_copy / "cache_v1.zarr"))
    assert reader.manifest.format_version == 1
    assert reader.epochs() == [0, 1] and reader.committed_units(0) == [0, 1, 2]
    expected = np.load(v1_copy / "expected_v1.npz")
    for e in (0, 1):
        ep = reader.load_epoch(e)
        for name in ("view_seed", "label", "partner_index", "mix_lam", "topk_ids", "topk_logits", "tail_lse"):
            assert np.array_equal(getattr(ep, name), expected[f"{e}/{name}"]), (e, name)


def test_version_1_damage_is_caught_on_every_read(v1_copy, capsys):
    url = str(v1_copy / "cache_v1.zarr")
    _flip_byte(_chunk(url, 1, 0, "mix_lam"))
    with pytest.raises(CorruptCacheError, match=r"epoch 1, unit 0 .*array mix_lam"):
        CacheReader(url).load_epoch(1)
    line = one_error_line(*run_main(["inspect", url], capsys))
    assert url in line and "epoch 1, unit 0" in line and "array mix_lam" in line and "--recheck" in line


def test_version_1_cache_trains_a_student(v1_copy, tmp_path):
    from logitcache.trainer.config import TrainConfig
    from logitcache.trainer.losses import LossConfig
    from logitcache.trainer.train import train

    summary = train(TrainConfig(data=str(v1_copy / "data"), student="test_resnet", out=str(tmp_path / "s"),
                                cache=str(v1_copy / "cache_v1.zarr"), epochs=2, batch_size=8, num_workers=0,
                                loss=LossConfig(kind="kd"), progress=False, tensorboard=False, device="cpu"))
    rows = [json.loads(line) for line in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert [r["view_epoch"] for r in rows] == [0, 1] and summary["cache"].endswith("cache_v1.zarr")
    assert all(np.isfinite(r["kd"]) and r["kd"] > 0 for r in rows)


def test_new_caches_are_version_2_with_commit_groups(built_cache):
    root = zarr.open_group(built_cache, mode="r")
    assert root.attrs["logitcache"]["format_version"] == 2
    assert sorted(root["epochs/0000/commits"].group_keys()) == ["00000", "00001", "00002"]
    assert "commit" not in root[unit_path(0, 0)].attrs


# -- view canaries ------------------------------------------------------------------------


def _tamper_canary(url: str, epoch: int, shard: int) -> None:
    """What a cache looks like to a machine whose libraries render other pixels: its recorded
    canary no longer matches, and its manifest names other library versions."""
    root = zarr.open_group(url, mode="a")
    record = root[commit_path(epoch, shard)]
    commit = record.attrs["commit"]
    commit["canary"]["sha256"][1] = "0" * 64
    record.attrs["commit"] = commit
    manifest = root.attrs["logitcache"]
    manifest["library_versions"]["timm"] = "0.9.0"
    root.attrs["logitcache"] = manifest


def test_every_unit_records_a_canary_that_renders_again(built_cache_mix, synth_data):
    from logitcache.canary import CANARY_VIEWS, check_canary
    from logitcache.data.source import open_source

    reader = CacheReader(built_cache_mix)
    source = open_source(synth_data, "train")
    for s in range(reader.num_shards):
        canary = reader.commit(0, s)["canary"]
        assert len(canary["index"]) == CANARY_VIEWS and len(set(canary["sha256"])) == CANARY_VIEWS
        first = reader.read_unit(0, s)["sample_index"][:CANARY_VIEWS].tolist()
        assert canary["index"] == first  # the unit's first views, in build order
        assert check_canary(reader.commit(0, s), reader.manifest, source, 0, s, built_cache_mix)


def test_view_drift_is_refused_by_train_and_by_an_extending_build(tmp_path, built_cache, synth_data, tiny_teacher,
                                                                   capsys):
    url = str(tmp_path / "drift.zarr")
    shutil.copytree(built_cache, url)
    _tamper_canary(url, 0, 0)
    train_args = ["train", "--data", synth_data, "--student", "test_resnet", "--cache", url, "--epochs", "1",
                  "--batch-size", "16", "--workers", "0", "--limit-batches", "1", "--no-progress",
                  "--no-tensorboard", "--out", str(tmp_path / "student")]
    line = one_error_line(*run_main(train_args, capsys))
    assert "differ from the views the teacher saw" in line and "timm 0.9.0 -> " in line, line
    assert "epoch 0, unit 0" in line and "--allow-view-drift" in line
    build_args = ["build", "--data", synth_data, "--teacher", "test_resnet", "--teacher-weights", tiny_teacher,
                  "--recipe", "demo32", "--epochs", "2:3", "--topk", "5", "--batch-size", "16", "--workers", "0",
                  "--no-progress", "--out", url]
    line = one_error_line(*run_main(build_args, capsys))
    assert "differ from the views the teacher saw" in line
    assert CacheReader(url).epochs() == [0, 1]  # nothing was added
    code, err = run_main([*train_args, "--allow-view-drift"], capsys)
    assert code == 0, err
