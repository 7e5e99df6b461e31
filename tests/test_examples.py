"""examples/timm_train.py: timm's train.py pieces distilling from a cache train what
``logitcache train --kd kd`` trains, epoch for epoch, and evaluate on the cache's views."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import logitcache

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "timm_train.py"


def _example():
    spec = importlib.util.spec_from_file_location("timm_train", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("cache_fixture", ["built_cache", "built_cache_mix"])
def test_timm_train_example_equals_logitcache_train(request, synth_data, tmp_path, cache_fixture):
    """Same seed, batch, optimiser, schedule, loss and epochs: the same val top-1 every epoch
    (plain views and mixup/cutmix views), evaluated with the cache's normalisation."""
    from logitcache.trainer.config import TrainConfig
    from logitcache.trainer.losses import LossConfig
    from logitcache.trainer.train import train

    cache = request.getfixturevalue(cache_fixture)
    top1, student = _example().main(["--data-dir", synth_data, "--cache", cache, "--model", "test_resnet",
                                     "--epochs", "2", "-b", "16", "--workers", "0", "--seed", "3", "--device", "cpu"])
    out = tmp_path / "run"
    train(TrainConfig(data=synth_data, cache=cache, student="test_resnet", out=str(out), epochs=2, batch_size=16,
                      loss=LossConfig(kind="kd"), num_workers=0, seed=3, device="cpu", tensorboard=False,
                      progress=False))
    ours = [json.loads(line)["val_top1"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert top1 == pytest.approx(ours, abs=1e-9) and len(top1) == 2
    weights = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(v, weights[k]) for k, v in student.state_dict().items())  # bit for bit


def test_timm_train_example_evaluates_on_the_views_logitcache_train_evaluates_on(synth_data, built_cache):
    from logitcache.trainer.data import create_eval_loader

    from logitcache.data.source import open_source

    data = logitcache.CachedTrainData(synth_data, built_cache)
    theirs = next(iter(_example().create_val_loader(synth_data, data, workers=0, device=torch.device("cpu"))))
    ours = next(iter(create_eval_loader(open_source(synth_data, "val"), data.recipe, num_workers=0)))
    assert torch.equal(theirs[0], ours[0]) and torch.equal(theirs[1], ours[1])


def test_eval_config_is_the_caches_not_the_students(synth_data, built_cache):
    """timm's resolve_data_config of test_resnet gives 160 px, crop 0.95, mean/std 0.5; the cache's
    views are 32 px with the recipe's ImageNet statistics: eval_config gives the latter."""
    import timm
    from timm.data import resolve_data_config

    data = logitcache.CachedTrainData(synth_data, built_cache)
    cfg = data.eval_config()
    assert cfg == {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": tuple(data.recipe.mean),
                   "std": tuple(data.recipe.std), "crop_pct": data.recipe.crop_pct}
    student = resolve_data_config({}, model=timm.create_model("test_resnet", num_classes=data.num_classes))
    assert student["input_size"] != cfg["input_size"] and student["mean"] != cfg["mean"]
