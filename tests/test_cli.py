"""The command line, end to end, as a user runs it: real processes, real files."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from logitcache.storage.reader import CacheReader

CLI = [sys.executable, "-m", "logitcache.cli.main"]
ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT)


def user_error_line(proc: subprocess.CompletedProcess) -> str:
    """The one line a user sees on a user error; asserts there is no traceback."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def build_args(data: str, weights: str, out: str, *extra: str) -> list[str]:
    return ["build", "--data", data, "--teacher", "test_resnet", "--teacher-weights", weights, "--recipe", "demo32",
            "--epochs", "1", "--batch-size", "16", "--workers", "0", "--no-progress", "--out", out, *extra]


def test_unreachable_pretrained_teacher_fails_fast_naming_the_flag(synth_data):
    t0 = time.perf_counter()
    proc = run_cli("build", "--data", synth_data, "--teacher", "beitv2_l", "--no-progress",
                   env={"HF_HUB_OFFLINE": "1"})
    elapsed = time.perf_counter() - t0
    line = user_error_line(proc)
    assert "--teacher-weights" in line and "beitv2_large_patch16_224" in line
    assert elapsed < 60, f"took {elapsed:.1f} s"


def test_unknown_teacher_is_a_clear_error(synth_data):
    line = user_error_line(run_cli("build", "--data", synth_data, "--teacher", "no_such_net_v9"))
    assert "no_such_net_v9" in line


def test_train_without_cache_then_build_then_kd_from_default_root(tmp_path, synth_data, tiny_teacher):
    root = tmp_path / "caches"
    env = {"LOGITCACHE_ROOT": str(root)}
    proc = run_cli("build", "--data", synth_data, "--teacher", "test_resnet", "--teacher-weights", tiny_teacher,
                   "--recipe", "demo32", "--epochs", "2", "--batch-size", "16", "--workers", "0", "--no-progress",
                   env=env)
    assert proc.returncode == 0, proc.stderr
    caches = list(root.iterdir())
    assert len(caches) == 1 and caches[0].name.endswith(".zarr")
    assert CacheReader(str(caches[0])).epochs() == [0, 1]

    out = tmp_path / "student"
    proc = run_cli("train", "--data", synth_data, "--student", "test_resnet", "--epochs", "2", "--batch-size", "16",
                   "--workers", "0", "--out", str(out), "--no-progress", env=env)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1] and all(r["kd"] > 0 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cache"] == str(caches[0]) and 0 <= summary["final_top1"] <= 100
    assert (out / "model.safetensors").stat().st_size > 0

    # More student epochs than cached epochs: a clear error naming both numbers.
    line = user_error_line(run_cli("train", "--data", synth_data, "--student", "test_resnet", "--epochs", "3",
                                   "--out", str(tmp_path / "s3"), env=env))
    assert "3 student epochs" in line and "2 complete epochs" in line and "--reuse-epochs" in line

    # A second cache for the same data: the default lookup refuses to guess.
    proc = run_cli(*build_args(synth_data, tiny_teacher, str(root / "other.zarr"), "--topk", "3"), env=env)
    assert proc.returncode == 0, proc.stderr
    line = user_error_line(run_cli("train", "--data", synth_data, "--student", "test_resnet", "--epochs", "1",
                                   "--out", str(tmp_path / "s4"), env=env))
    assert "several caches" in line and "--cache" in line


def _copy_dataset(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite_member(tar_path: Path, suffix: str, payload) -> str:
    """Replace the first member ending in ``suffix`` with ``payload`` (bytes, or a function of
    the old bytes); returns its key."""
    with tarfile.open(tar_path) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    key = None
    with tarfile.open(tar_path, "w") as tf:
        for m, data in members:
            if key is None and m.name.endswith(suffix):
                key, data = m.name[: -len(suffix)], payload(data) if callable(payload) else payload
                m.size = len(data)
            tf.addfile(m, io.BytesIO(data))
    assert key is not None
    # The shard's member index (written beside it with the data) follows the rewrite, as
    # `logitcache data index` would after editing a shard.
    from logitcache.data.index_file import index_and_write

    index_and_write([str(tar_path)], None)
    return key


def test_corrupt_image_names_shard_and_key(tmp_path, synth_data, tiny_teacher):
    data = _copy_dataset(synth_data, tmp_path / "data")
    shard = sorted(data.glob("train-*.tar"))[1]
    key = _rewrite_member(shard, ".png", b"\x89PNG\r\n\x1a\n this is not a png")
    line = user_error_line(run_cli(*build_args(str(data), tiny_teacher, str(tmp_path / "c.zarr"))))
    assert shard.name in line and key in line
    # Nothing was committed for the shard with the bad image (never a silently short cache).
    reader = CacheReader(str(tmp_path / "c.zarr"))
    assert reader.epochs() == []


def test_label_out_of_range_names_shard_and_key(tmp_path, synth_data, tiny_teacher):
    data = _copy_dataset(synth_data, tmp_path / "data")
    shard = sorted(data.glob("train-*.tar"))[0]
    key = _rewrite_member(shard, ".cls", b"999")
    line = user_error_line(run_cli(*build_args(str(data), tiny_teacher, str(tmp_path / "c.zarr"))))
    assert shard.name in line and key in line and "999" in line


def test_cache_of_another_dataset_or_recipe_is_refused(tmp_path, synth_data, tiny_teacher):
    cache = str(tmp_path / "c.zarr")
    assert run_cli(*build_args(synth_data, tiny_teacher, cache)).returncode == 0

    # Building into it with another recipe: refused, naming the field.
    args = build_args(synth_data, tiny_teacher, cache)
    args[args.index("demo32")] = "demo32_mix"
    line = user_error_line(run_cli(*args))
    assert "recipe" in line and cache in line

    # Training on other data with this cache: refused, naming the cache.
    other = _copy_dataset(synth_data, tmp_path / "other")
    _rewrite_member(sorted(other.glob("train-*.tar"))[0], ".cls", lambda old: str((int(old) + 1) % 16).encode())
    line = user_error_line(run_cli("train", "--data", str(other), "--student", "test_resnet", "--cache", cache,
                                   "--epochs", "1", "--out", str(tmp_path / "s")))
    assert "another dataset" in line and cache in line


def test_train_help_defaults_are_the_config_defaults():
    """`train --help` states each default as text (so --help imports no torch): every one that
    names a value must equal the TrainConfig / LossConfig / MKDConfig / ProKTConfig default."""
    import dataclasses

    import typer.main
    from logitcache.cli import main as cli
    from logitcache.trainer.config import MKDConfig, ProKTConfig, TrainConfig
    from logitcache.trainer.losses import LossConfig

    def defaults(cls) -> dict:
        out = {}
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
        return out

    tables = [(defaults(TrainConfig), {"workers": "num_workers"}), (defaults(LossConfig), cli._LOSS_FLAGS),
              (defaults(MKDConfig), cli._MKD_FLAGS), (defaults(ProKTConfig), cli._PROKT_FLAGS)]
    command = typer.main.get_command(cli.app).commands["train"]
    checked = 0
    for param in command.params:
        shown = param.show_default
        if not isinstance(shown, str):
            continue
        for table, names in tables:
            field = names.get(param.name, param.name if names is tables[0][1] else None)
            if field in table:
                break
        else:
            continue
        want = table[field]
        if want is None:  # a described default ("no clipping", "the cache's teacher")
            continue
        if isinstance(want, bool):
            assert shown == ("yes" if want else "no"), (param.name, shown, want)
        elif isinstance(want, (int, float)):
            assert float(shown) == want, (param.name, shown, want)
        else:
            assert shown == want, (param.name, shown, want)
        checked += 1
    assert checked >= 35, checked


def test_synth_help_states_the_smallest_image_size():
    """`data synth --help` gives the smallest image side as text (no numpy at --help time): the
    generator's own bound, not a copy that drifts (it said 25 after the bound became 8)."""
    import typer.main
    from logitcache.cli import main as cli
    from logitcache.data.synth import MIN_IMAGE_SIZE

    command = typer.main.get_command(cli.app).commands["data"].commands["synth"]
    (size,) = [p for p in command.params if p.name == "image_size"]
    assert f"at least {MIN_IMAGE_SIZE})" in size.help
