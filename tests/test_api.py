"""The public API (``import logitcache``) and examples/own_loop.py, which uses it."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import logitcache

from conftest import BUILD_K, NUM_CLASSES

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "own_loop.py"


def test_public_names_import_and_are_documented():
    for name in logitcache.__all__:
        obj = getattr(logitcache, name)
        assert (obj.__doc__ or "").strip(), f"logitcache.{name} has no docstring"
    assert set(logitcache.__all__) <= set(dir(logitcache))
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert not [n for n in logitcache.__all__ if f"`{n}" not in readme and f" {n}(" not in readme], "not in README"
    with pytest.raises(AttributeError):
        logitcache.no_such_name  # noqa: B018


def test_import_is_light():
    code = "import sys, logitcache; print(any(m in sys.modules for m in ('torch', 'timm', 'zarr')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_loader_batches_for_ranks(synth_data, built_cache):
    data = logitcache.CachedTrainData(synth_data, logitcache.open_cache(built_cache))
    assert data.epochs == [0, 1] and data.num_classes == NUM_CLASSES and data.view_epoch(3) == 1
    whole = next(iter(data.loader(0, batch_size=16)))
    assert whole["images"].shape == (16, 3, 32, 32) and whole["images"].dtype == torch.float32
    assert whole["ids"].shape == whole["values"].shape == (16, BUILD_K)
    for key in ("label", "partner_label", "lam", "tail"):
        assert whole[key].shape == (16,)
    halves = [next(iter(data.loader(0, batch_size=16, rank=r, world_size=2))) for r in range(2)]
    assert torch.equal(torch.cat([h["index"] for h in halves]), whole["index"])
    logits = logitcache.teacher_logits(whole, data.codec)
    probs = logitcache.teacher_probs(whole, data.codec, temperature=2.0)
    assert logits.shape == probs.shape == (16, NUM_CLASSES)
    torch.testing.assert_close(probs, torch.softmax(logits / 2.0, dim=1))
    with pytest.raises(logitcache.LogitcacheError, match="multiple of 2"):
        data.loader(0, batch_size=15, world_size=2)


def _example():
    spec = importlib.util.spec_from_file_location("own_loop", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_own_loop_example_learns_from_the_cache(synth_data, built_cache, capsys):
    # The session teacher is random-init: its classes disagree with the labels, so the CE
    # term is kept small for the KD term to lead. 4 student epochs cycle the 2 cached ones.
    kd = _example().main(["--data", synth_data, "--cache", built_cache, "--epochs", "4", "--batch-size", "16",
                          "--hard-weight", "0.1", "--lr", "2e-3"])
    out = capsys.readouterr().out
    assert len(kd) == 4 and out.count("kd ") == 4
    assert kd[-1] < 0.75 * kd[0], kd  # the student moves towards the cached teacher
