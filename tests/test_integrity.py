"""Every byte read is checked: damage on storage stops ``train``, ``inspect`` and ``verify``
with one line naming the cache, epoch, unit and array; ``build --recheck`` repairs it;
caches of format versions 1 and 2 (committed ones live in tests/data/v1 and v2) still read,
checked, and train."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from cache_edit import edit_commit, edit_manifest
from main_entry import one_error_line, run_main

from logitcache.errors import CorruptCacheError
from logitcache.storage.layout import commit_path, unit_path
from logitcache.storage.reader import CacheReader

DATA = Path(__file__).resolve().parent / "data"


def _chunk(url: str, epoch: int, shard: int, array: str) -> Path:
    """The one chunk file of a unit's array (arrays are stored as one chunk)."""
    (chunk,) = [p for p in (Path(url) / unit_path(epoch, shard) / array / "c").rglob("*") if p.is_file()]
    return chunk


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


DAMAGE = {
    "flipped byte in values": ("values", lambda url: _flip_byte(_chunk(url, 0, 1, "values"))),
    "flipped byte in ids": ("ids", lambda url: _flip_byte(_chunk(url, 0, 1, "ids"))),
    "missing values chunk": ("values", lambda url: _chunk(url, 0, 1, "values").unlink()),
    "truncated ids chunk": ("ids", lambda url: _chunk(url, 0, 1, "ids").write_bytes(
        _chunk(url, 0, 1, "ids").read_bytes()[:9])),
    "garbled ids metadata": ("ids", lambda url: (Path(url) / unit_path(0, 1) / "ids" / "zarr.json").write_text("{g")),
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
    _flip_byte(_chunk(url, 1, 2, "values"))
    _chunk(url, 0, 0, "ids").unlink()
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
        for key in ("ids", "values", "tail", "plans"):
            assert np.array_equal(getattr(a, key), getattr(b, key)), (e, key)
    for e, s in ((0, 0), (1, 2)):
        assert fixed.commit(e, s) == ref.commit(e, s)


# -- format versions 1 and 2 --------------------------------------------------------------


@pytest.fixture(params=[1, 2])
def old_copy(request, tmp_path) -> tuple[int, Path]:
    """A copy of the committed cache of format 1 or 2 (``cache_v<N>.zarr``), with its data."""
    v = request.param
    dst = tmp_path / f"v{v}"
    shutil.copytree(DATA / f"v{v}", dst)
    if not (dst / "data").exists():
        shutil.copytree(DATA / "v1" / "data", dst / "data")  # both caches were built on the v1 data
    return v, dst


def test_old_caches_read_as_they_were_written(old_copy):
    v, root = old_copy
    reader = CacheReader(str(root / f"cache_v{v}.zarr"))
    assert reader.manifest.format_version == v
    assert reader.epochs() == [0, 1] and reader.committed_units(0) == [0, 1, 2]
    expected = np.load(root / f"expected_v{v}.npz")  # rows by sample index, as that version's reader gave them
    for e in (0, 1):
        ep = reader.load_epoch(e)
        assert np.array_equal(ep.ids, expected[f"{e}/topk_ids"]), (v, e)
        assert np.array_equal(ep.values, expected[f"{e}/topk_logits"]) and ep.values.dtype == np.float16
        assert np.array_equal(ep.tail, expected[f"{e}/tail_lse"])


def test_old_cache_plans_match_this_code(old_copy):
    """The plan digests computed from an old cache's stored seeds and partners equal this code's plan."""
    from logitcache.data.source import open_source
    from logitcache.replay.rows import check_plans

    v, root = old_copy
    reader = CacheReader(str(root / f"cache_v{v}.zarr"))
    source = open_source(str(root / "data"), "train")
    for e in (0, 1):
        check_plans(reader.load_epoch(e), source, reader.manifest.recipe)  # raises on any difference


def test_old_cache_damage_is_caught_on_every_read(old_copy, capsys):
    v, root = old_copy
    url = str(root / f"cache_v{v}.zarr")
    _flip_byte(_chunk(url, 1, 0, "mix_lam"))
    with pytest.raises(CorruptCacheError, match=r"epoch 1, unit 0 .*array mix_lam"):
        CacheReader(url).load_epoch(1)
    line = one_error_line(*run_main(["inspect", url], capsys))
    assert url in line and "epoch 1, unit 0" in line and "array mix_lam" in line and "--recheck" in line


def test_old_cache_trains_a_student_but_is_not_extended(old_copy, tmp_path, capsys):
    from logitcache.trainer.config import TrainConfig
    from logitcache.trainer.losses import LossConfig
    from logitcache.trainer.train import train

    v, root = old_copy
    cache = str(root / f"cache_v{v}.zarr")
    summary = train(TrainConfig(data=str(root / "data"), student="test_resnet", out=str(tmp_path / "s"),
                                cache=cache, epochs=2, batch_size=8, num_workers=0,
                                loss=LossConfig(kind="kd"), progress=False, tensorboard=False, device="cpu"))
    rows = [json.loads(line) for line in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert [r["view_epoch"] for r in rows] == [0, 1] and summary["cache"].endswith(f"cache_v{v}.zarr")
    assert all(np.isfinite(r["kd"]) and r["kd"] > 0 for r in rows)
    import timm
    from safetensors.torch import save_file

    weights = str(tmp_path / "t.safetensors")
    save_file(timm.create_model("test_resnet", num_classes=8).state_dict(), weights)
    line = one_error_line(*run_main(
        ["build", "--data", str(root / "data"), "--teacher", "test_resnet", "--teacher-weights", weights,
         "--recipe", "demo32_mix", "--epochs", "2:3", "--out", cache, "--workers", "0", "--no-progress"], capsys))
    assert f"is format {v}" in line and "build a new cache" in line
    assert CacheReader(cache).epochs() == [0, 1]


def test_new_caches_are_version_5_with_commit_groups_plan_and_manifest_digests(built_cache):
    root = zarr.open_group(built_cache, mode="r")
    manifest = root.attrs["logitcache"]
    assert manifest["format_version"] == 5
    assert sorted(root[unit_path(0, 0)].array_keys()) == ["ids", "values"]
    record = root[commit_path(0, 0)].attrs["commit"]
    assert len(record["plan"]) == 64 and record["manifest"] == manifest["manifest_sha256"]
    rest = {k: v for k, v in manifest.items() if k not in ("manifest_sha256", "created")}
    assert manifest["manifest_sha256"] == hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()
    assert sorted(root["epochs/0000/commits"].group_keys()) == ["00000", "00001", "00002"]
    assert "commit" not in root[unit_path(0, 0)].attrs


# -- view canaries ------------------------------------------------------------------------


def _tamper_canary(url: str, epoch: int, shard: int) -> None:
    """What a cache looks like to a machine whose libraries render other pixels: its recorded
    canary no longer matches, and its manifest names other library versions."""
    edit_commit(url, epoch, shard, lambda c: c["canary"]["sha256"].__setitem__(1, "0" * 64))
    edit_manifest(url, lambda m: m["library_versions"].__setitem__("timm", "0.9.0"))


def test_every_unit_records_a_canary_that_renders_again(built_cache_mix, synth_data):
    from logitcache.data.source import open_source
    from logitcache.storage.canary import CANARY_VIEWS, check_canary

    reader = CacheReader(built_cache_mix)
    source = open_source(synth_data, "train")
    for s in range(reader.num_shards):
        canary = reader.commit(0, s)["canary"]
        assert len(canary["index"]) == CANARY_VIEWS and len(set(canary["sha256"])) == CANARY_VIEWS
        start = source.shards[s].start
        assert all(start <= i < source.shards[s].stop for i in canary["index"])  # views of this unit
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
