"""Tests for logitcache/storage/stats.py, logitcache/verify/run.py, cli/format.py and cli/cache_tools.py on
real caches (no mocks).

A tiny synth dataset (16 classes, 96 train samples in 3 shards) and a random-init timm
``test_resnet`` teacher saved to a weights file; two caches are built once per module.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import zarr
from cache_edit import reseal
from logitcache.cli.cache_tools import register
from logitcache.cli.format import format_bytes, format_ranges
from logitcache.cli.main import app, main
from logitcache.trainer.checkpoint import save_student
from typer.testing import CliRunner

from logitcache.build.loop import build
from logitcache.build.teacher import Teacher
from logitcache.codecs.logits import create_codec, encode, rebuilt_probs
from logitcache.data.source import open_source
from logitcache.data.synth import generate_synth
from logitcache.errors import (
    CacheMismatchError,
    CorruptCacheError,
    WeightsUnavailableError,
)
from logitcache.storage.layout import array_crc32, commit_path, unit_path
from logitcache.storage.reader import CacheReader
from logitcache.storage.stats import inspect_cache, row_stats
from logitcache.storage.unit_layout import pack_unit, unpack_unit
from logitcache.verify.report import DEFAULT_ATOL
from logitcache.verify.run import verify_cache
from logitcache.views.augment import create_recipe

register(app)
runner = CliRunner()
N_TRAIN = 16 * 6


def _weights(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", num_classes=16)
    save_student(model, path, "test_resnet", 16, create_recipe("demo32"))
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: one thread is several times faster here
    tmp = tmp_path_factory.mktemp("cache_tools")
    data = generate_synth(tmp / "data", num_classes=16, train_per_class=6, val_per_class=2, image_size=32, seed=0,
                          shard_size=40)
    weights = _weights(tmp / "teacher.safetensors", 0)
    other = _weights(tmp / "other.safetensors", 1)
    source = open_source(str(data), "train")
    teacher = Teacher("test_resnet", weights=str(weights))
    root = tmp / "caches"
    common = dict(dataset_name="synth", teacher=teacher, recipe=create_recipe("demo32"), batch_size=16,
                  num_workers=0, progress=False)
    a = str(root / "a.zarr")
    b = str(root / "b.zarr")
    build(source, codec=create_codec("topk", 16, 5), url=a, epochs=[0, 1], **common)
    build(source, codec=create_codec("topk", 16, 3, "float16"), url=b, epochs=[0], **common)
    (root / "not-a-cache").mkdir()
    (root / "not-a-cache" / "notes.txt").write_text("hello")
    zarr.open_group(str(root / "plain.zarr"), mode="w")  # a Zarr group, but no manifest
    yield {"tmp": tmp, "data": str(data), "weights": str(weights), "other": str(other), "source": source,
           "root": str(root), "a": a, "b": b}
    torch.set_num_threads(threads)


def _copy(src: str, dst: Path) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def _rewrite(url: str, epoch: int, shard: int, key: str, values: np.ndarray, fix_sha: bool) -> None:
    """Overwrite one array of a committed unit; optionally fix its commit record's checksum
    so readers trust it (what a wrong but self-consistent cache looks like)."""
    root = zarr.open_group(url, mode="a")
    root[unit_path(epoch, shard)][key][...] = values
    if fix_sha:
        record = root[commit_path(epoch, shard)]
        commit = record.attrs["commit"]
        commit["crc32"][key] = array_crc32(values)
        record.attrs["commit"] = commit
        reseal(url)


# -- helpers -----------------------------------------------------------------------------


def test_format_helpers():
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 * 1024**3) == "3.0 GiB"
    assert format_bytes(None) == "?"
    assert format_ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"
    assert format_ranges([]) == "-"


def test_row_stats_match_rebuilt_probs():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 16, generator=g) * 3
    for spec in (create_codec("topk", 16, 1), create_codec("topk", 16, 5, "float32"), create_codec("full", 16),
                 create_codec("sampled", 16, 8)):
        rows = encode(spec, logits, np.arange(50, dtype=np.uint64))
        st = row_stats(spec, rows)
        t = {k: torch.from_numpy(v) for k, v in rows.items()}
        p = rebuilt_probs(spec, t["ids"].long(), t["values"], t["tail"]).double()
        np.testing.assert_allclose(st["entropy"], -(p * p.clamp_min(1e-300).log()).sum(1).numpy(), rtol=1e-5,
                                   atol=1e-6)
        np.testing.assert_array_equal(st["top1"], p.argmax(1).numpy())
        kept = p.gather(1, t["ids"].long()).sum(1).numpy() if spec.name == "topk" else 1.0
        np.testing.assert_allclose(st["tail_mass"], np.clip(1 - kept, 0, None), atol=1e-6)


# -- inspect -----------------------------------------------------------------------------


def test_inspect_numbers(env):
    st = inspect_cache(env["a"], source=env["source"])
    assert st.views == 2 * N_TRAIN
    assert st.epochs_complete == [0, 1]
    assert st.units == {0: (3, 3), 1: (3, 3)}
    assert st.bytes > 0 and st.bytes_per_view == pytest.approx(st.bytes / st.views)
    assert st.recipe_name == "demo32" and st.teacher == "test_resnet"
    assert st.teacher_weights == "teacher.safetensors" and st.teacher_weights_sha256
    # how the teacher ran is recorded: CPU, float32, eager, this process's thread count
    assert st.build_env["device"].startswith("cpu: ") and st.build_env["precision"] == "float32"
    assert st.build_env["compile"] is False and st.build_env["torch_threads"] >= 1
    assert st.dataset["num_samples"] == N_TRAIN and st.dataset["num_shards"] == 3
    assert st.codec["k"] == 5 and st.codec["values"] == "gap8"
    assert st.payload_bytes_per_view == (5 * 4 + 5 * 8) / 8  # 4-bit ids; 8-bit gap increases (4 kept, the fill)
    assert "0.03125 nats" in st.error_bound  # half a step of 1/16 nats
    assert st.labelled_views == st.views and 0 <= st.top1_agreement <= 100
    assert 0 < st.mean_entropy <= math.log(16) + 1e-9 and st.max_entropy == pytest.approx(math.log(16))

    # the same numbers computed independently, from whole epochs through CacheReader
    reader = CacheReader(env["a"])
    labels = env["source"].labels()
    agree, ent = [], []
    for e in (0, 1):
        ep = reader.load_epoch(e)
        p = rebuilt_probs(reader.manifest.codec, torch.from_numpy(ep.ids.astype(np.int64)),
                          torch.from_numpy(ep.values), torch.from_numpy(ep.tail)).double()
        agree.append(p.argmax(1).numpy() == labels)
        ent.append(-(p * p.log()).sum(1).numpy())
    assert st.top1_agreement == pytest.approx(100 * np.concatenate(agree).mean())
    assert st.mean_entropy == pytest.approx(np.concatenate(ent).mean(), rel=1e-5)
    assert inspect_cache(env["a"]).top1_agreement is None  # labels need the dataset


def test_inspect_cli_text_and_json(env):
    res = runner.invoke(app, ["inspect", env["a"]])
    assert res.exit_code == 0, res.output
    assert "2 complete: 0-1" in res.output and "192 committed" in res.output and "demo32" in res.output
    res = runner.invoke(app, ["inspect", env["a"], "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert d["views"] == 192 and d["epochs_complete"] == [0, 1] and d["units"] == {"0": [3, 3], "1": [3, 3]}


def test_inspect_partial_cache(env, tmp_path):
    url = _copy(env["a"], tmp_path / "partial.zarr")
    shutil.rmtree(Path(url) / commit_path(1, 2))  # epoch 1's last unit is not committed, nor is it sealed:
    shutil.rmtree(Path(url) / "seals" / "0001")  # what a build killed before its last unit leaves
    st = inspect_cache(url)
    assert st.epochs_complete == [0] and st.units == {0: (3, 3), 1: (2, 3)} and st.epochs_unfinished == [1]
    assert st.views == N_TRAIN + 80
    assert st.checks["seals"] == "1 complete epoch against its seal" and "pass --data" in st.checks["plans"]
    res = runner.invoke(app, ["inspect", url])
    assert res.exit_code == 0 and "unfinished (a build has not finished them): 1" in res.output

    shutil.rmtree(Path(url) / "epochs")  # a cache with no unit at all
    shutil.rmtree(Path(url) / "seals")
    st = inspect_cache(url)
    assert st.views == 0 and st.epochs_complete == [] and st.top1_agreement is None and st.mean_entropy is None
    res = runner.invoke(app, ["inspect", url])
    assert res.exit_code == 0 and "0 complete: -" in res.output


# -- verify ------------------------------------------------------------------------------


def test_verify_passes_on_intact_cache(env):
    # 8-bit gaps: an absolute bound of half a step (1/32 nats), no relative one
    rep = verify_cache(env["a"], teacher_weights=env["weights"], sample=64, seed=3, device="cpu", batch_size=24)
    assert rep.passed, rep.reasons
    assert rep.views_checked == 64 and rep.epochs == [0, 1]
    assert rep.tolerance == 0 and rep.atol == pytest.approx(DEFAULT_ATOL + 2.0**-5)
    assert rep.max_rel_err == 0 and rep.max_abs_err <= 2.0**-5 + 1e-4
    assert rep.ids_wrong == 0 and rep.top1_agreement == 100.0
    assert 0 <= rep.kl_mean <= rep.kl_max < 0.05
    # float16 values, all views (sample larger than the cache is clamped)
    rep = verify_cache(env["b"], teacher_weights=env["weights"], sample=10_000, device="cpu")
    assert rep.passed, rep.reasons
    assert rep.views_checked == N_TRAIN
    assert rep.tolerance == pytest.approx(4 * 2.0**-11) and rep.atol == DEFAULT_ATOL and rep.max_abs_err < 1e-3


def test_verify_cli_pass_exit_0(env):
    res = runner.invoke(app, ["verify", env["a"], "--sample", "16", "--teacher-weights", env["weights"],
                              "--data", env["data"], "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert res.output.rstrip().endswith("PASS")


def _unit_rows(url: str, epoch: int, shard: int) -> tuple[dict, object]:
    reader = CacheReader(url)
    return unpack_unit(reader.manifest.codec, reader.read_unit(epoch, shard), reader.commit(epoch, shard)["n"]), \
        reader.manifest.codec


def test_verify_fails_on_a_perturbed_gap_code(env, tmp_path):
    url = _copy(env["a"], tmp_path / "gap.zarr")
    rows, spec = _unit_rows(url, 1, 1)
    r = int(np.argmax(rows["tail"].astype(int) - rows["values"][:, 4] >= 2))  # room below the 5th logit
    rows["values"][r, 4] += 2  # one kept logit 2 steps (1/8 nats) lower than the teacher gave
    _rewrite(url, 1, 1, "values", pack_unit(spec, rows)["values"], fix_sha=True)
    rep = verify_cache(url, teacher_weights=env["weights"], sample=192, device="cpu")
    assert not rep.passed and rep.max_abs_err >= 2 * spec.gap_step - 2.0**-5 - 1e-4
    assert "max relative error" in rep.reasons[0] and rep.worst["epoch"] == 1


def test_verify_fails_on_perturbed_logits(env, tmp_path):
    url = _copy(env["b"], tmp_path / "bad.zarr")
    group = zarr.open_group(url, mode="r")[unit_path(0, 1)]
    logits = group["values"][...]
    logits[7, 2] = np.float16(float(logits[7, 2]) * 1.01 + 0.01)  # one kept logit, ~1 % off
    _rewrite(url, 0, 1, "values", logits, fix_sha=True)
    CacheReader(url).read_unit(0, 1)  # checksums pass: only verify can catch it

    rep = verify_cache(url, teacher_weights=env["weights"], sample=192, device="cpu")
    assert not rep.passed
    assert rep.max_rel_err > rep.tolerance
    assert "max relative error" in rep.reasons[0] and rep.worst["epoch"] == 0

    res = runner.invoke(app, ["verify", url, "--sample", "192", "--teacher-weights", env["weights"],
                              "--device", "cpu"])
    assert res.exit_code == 1
    assert res.output.strip().splitlines()[-1].startswith("FAIL: max relative error")
    # a loose enough tolerance lets it through
    res = runner.invoke(app, ["verify", url, "--sample", "192", "--teacher-weights", env["weights"],
                              "--device", "cpu", "--tolerance", "0.5"])
    assert res.exit_code == 0, res.output


def test_verify_fails_on_wrong_ids_and_checksum(env, tmp_path):
    url = _copy(env["b"], tmp_path / "ids.zarr")
    rows, spec = _unit_rows(url, 0, 0)
    ids = rows["ids"]
    ids[3] = ids[3][::-1]  # same classes, wrong order: values no longer fit them
    ids[5, 0] = (int(ids[5, 0]) + 1) % 16 if (int(ids[5, 0]) + 1) % 16 not in ids[5] else (int(ids[5, 0]) + 2) % 16
    stream = pack_unit(spec, rows)["ids"]

    _rewrite(url, 0, 0, "ids", stream, fix_sha=False)
    with pytest.raises(CorruptCacheError, match=r"epoch 0, unit 0 .*array ids: fails its checksum"):
        verify_cache(url, teacher_weights=env["weights"], sample=N_TRAIN, device="cpu")

    _rewrite(url, 0, 0, "ids", stream, fix_sha=True)
    rep = verify_cache(url, teacher_weights=env["weights"], sample=N_TRAIN, device="cpu")
    assert not rep.passed
    assert rep.ids_wrong == 2 and any("top-3 ids" in r for r in rep.reasons)


def test_verify_and_train_refuse_another_plan(env, tmp_path, capsys):
    url = _copy(env["b"], tmp_path / "plan.zarr")
    record = zarr.open_group(url, mode="a")[commit_path(0, 2)]
    commit = record.attrs["commit"]
    commit["plan"] = "0" * 64  # as if this unit's views had been planned by other code
    record.attrs["commit"] = commit
    reseal(url)
    rep = verify_cache(url, teacher_weights=env["weights"], sample=N_TRAIN, device="cpu")
    assert not rep.passed and len(rep.metadata_failures) == 1 and "00002: its plan" in rep.metadata_failures[0]
    from main_entry import one_error_line, run_main

    line = one_error_line(*run_main(["train", "--data", env["data"], "--student", "test_resnet", "--cache", url,
                                     "--epochs", "1", "--batch-size", "16", "--workers", "0", "--no-progress",
                                     "--out", str(tmp_path / "s")], capsys))
    assert url in line and "epoch 0, unit 2" in line and "planned otherwise" in line


def test_verify_other_weights_is_a_clear_mismatch(env):
    with pytest.raises(CacheMismatchError, match="are not the weights cache .* was built with"):
        verify_cache(env["a"], teacher_weights=env["other"], sample=4, device="cpu")
    with pytest.raises(WeightsUnavailableError, match="pass it with --teacher-weights"):
        verify_cache(env["a"], sample=4, device="cpu")


def test_verify_other_dataset_is_a_clear_mismatch(env):
    other = generate_synth(env["tmp"] / "other-data", num_classes=16, train_per_class=6, val_per_class=2,
                           image_size=32, seed=1, shard_size=40)
    with pytest.raises(CacheMismatchError, match="is not the data cache"):
        verify_cache(env["a"], data=str(other), teacher_weights=env["weights"], sample=4, device="cpu")


def test_console_exit_codes(env, monkeypatch, capsys):
    """The console entry point: a user error is one line on stderr and exit 2."""
    monkeypatch.setattr(sys, "argv", ["logitcache", "verify", env["a"], "--sample", "4", "--teacher-weights",
                                      env["other"], "--device", "cpu"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --teacher-weights") and "\n" not in err
    monkeypatch.setattr(sys, "argv", ["logitcache", "inspect", str(env["tmp"] / "nowhere.zarr")])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2 and "no cache at" in capsys.readouterr().err


# -- ls ----------------------------------------------------------------------------------


def test_train_finds_the_one_cache_of_its_data_under_the_root(env, tmp_path):
    from logitcache.trainer.inputs import find_cache

    from logitcache.errors import CacheNotFoundError

    fingerprint = env["source"].fingerprint()
    with pytest.raises(CacheNotFoundError, match="several caches for this dataset .*a.zarr.*b.zarr.*--cache"):
        find_cache(env["root"], fingerprint)
    root = tmp_path / "one"
    root.mkdir()
    shutil.copytree(env["a"], root / "a.zarr")
    (root / "not-a-cache").mkdir()
    assert find_cache(str(root), fingerprint) == str(root / "a.zarr")
    with pytest.raises(CacheNotFoundError, match="no cache for this dataset under .*logitcache build"):
        find_cache(str(root), "0" * 64)



def test_ls_lists_caches_only(env, tmp_path):
    res = runner.invoke(app, ["ls", "--cache-root", env["root"]])
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    assert lines[0].split() == ["URL", "TEACHER", "DATASET", "VIEWS-DIGEST", "EPOCHS", "CODEC", "VIEWS", "SIZE"]
    assert len(lines) == 3 and "not-a-cache" not in res.output and "plain.zarr" not in res.output
    assert lines[1].startswith(env["a"]) and "topk5" in lines[1] and "2 (0-1)" in lines[1] and " 192 " in lines[1]
    assert lines[2].startswith(env["b"]) and "topk3" in lines[2] and "1 (0)" in lines[2]
    assert "synth/train" in lines[1]

    res = runner.invoke(app, ["ls", "--cache-root", env["root"], "--json"])
    assert [d["views"] for d in json.loads(res.output)] == [192, 96]

    empty = str(tmp_path / "empty")
    res = runner.invoke(app, ["ls"], env={"LOGITCACHE_ROOT": empty})  # the default root
    assert res.exit_code == 0 and f"no caches under {empty}" in res.output


def test_fsspec_url(env):
    """A cache on an fsspec URL (memory://): inspect sizes it with fs.du, ls finds it, verify reads it."""
    import fsspec

    url = "memory://cache_tools_test/m.zarr"
    build(env["source"], dataset_name="synth", teacher=Teacher("test_resnet", weights=env["weights"]),
          recipe=create_recipe("demo32"), codec=create_codec("topk", 16, 4), url=url, epochs=[0], batch_size=32,
          num_workers=0, progress=False)
    try:
        st = inspect_cache(url)
        assert st.views == N_TRAIN and st.bytes > 0 and st.epochs_complete == [0]
        res = runner.invoke(app, ["ls", "--cache-root", "memory://cache_tools_test"])
        assert res.exit_code == 0 and "m.zarr" in res.output and "topk4" in res.output
        assert verify_cache(url, teacher_weights=env["weights"], sample=8, device="cpu").passed
    finally:
        fsspec.filesystem("memory").rm("/cache_tools_test", recursive=True)
