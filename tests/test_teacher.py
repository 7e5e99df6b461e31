"""Teacher weights from the files people have: safetensors (with or without logitcache's
metadata), a plain state dict, and training checkpoints (EMA entry, DDP/compile prefixes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from main_entry import one_error_line, run_main, run_main_output
from safetensors.torch import save_file

from logitcache.build.teacher import (
    META_MODEL,
    Teacher,
    create_model_from_weights,
    read_state_dict,
)
from logitcache.errors import LogitcacheError, WeightsUnavailableError


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_resnet", num_classes=7)


def _same(state: dict, model: torch.nn.Module) -> bool:
    ref = model.state_dict()
    return set(state) == set(ref) and all(torch.equal(state[k], ref[k]) for k in ref)


def test_safetensors_keeps_its_metadata(model, tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={META_MODEL: "test_resnet", "num_classes": "7"})
    state, meta = read_state_dict(path)
    assert _same(state, model) and meta[META_MODEL] == "test_resnet"
    rebuilt, _ = create_model_from_weights(None, path)  # architecture and classes from the metadata
    assert rebuilt.num_classes == 7 and _same(rebuilt.state_dict(), model)


def test_plain_state_dict(model, tmp_path):
    path = tmp_path / "t.pth"
    torch.save(model.state_dict(), path)
    state, meta = read_state_dict(path)
    assert _same(state, model) and meta == {}


def test_training_checkpoint_prefers_ema_and_strips_wrapper_prefixes(model, tmp_path):
    prefixed = {f"module.{k}": v for k, v in model.state_dict().items()}
    compiled = {f"_orig_mod.{k}": torch.zeros_like(v) for k, v in model.state_dict().items()}
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 3, "state_dict": compiled, "state_dict_ema": prefixed}, path)
    state, _ = read_state_dict(path)
    assert _same(state, model)  # the EMA entry, with DDP's "module." removed
    torch.save({"model": compiled}, path)
    state, _ = read_state_dict(path)
    assert set(state) == set(model.state_dict()) and all(not v.any() for v in state.values())


class Payload:
    """What a hostile checkpoint would carry: an object of an arbitrary class."""


def test_timm_train_py_checkpoint_with_its_args_namespace(model, tmp_path):
    """timm's train.py saves the run's argparse.Namespace beside the weights; it loads without
    unpickling anything else (weights_only), and a non-tensor object beyond that is refused."""
    import argparse

    path = tmp_path / "model_best.pth.tar"
    args = argparse.Namespace(model="test_resnet", lr=0.1, input_size=(3, 32, 32), mean=None, amp=True)
    torch.save({"epoch": 9, "arch": "test_resnet", "version": 2, "args": args, "metric": 51.2,
                "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    teacher = Teacher("test_resnet", weights=str(path), num_classes=7)
    assert _same(teacher.model.state_dict(), model)

    torch.save({"state_dict": model.state_dict(), "extra": Payload()}, path)  # an arbitrary class to construct
    with pytest.raises(WeightsUnavailableError, match="model_best.pth.tar"):
        read_state_dict(path)


def test_teacher_from_a_checkpoint(model, tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    teacher = Teacher("test_resnet", weights=str(path), num_classes=7)
    assert teacher.num_classes == 7 and _same(teacher.model.state_dict(), model)


def test_unreadable_or_missing_weights_are_one_clear_error(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsUnavailableError, match="bad.pth"):
        read_state_dict(bad)
    with pytest.raises(WeightsUnavailableError, match="no such file"):
        read_state_dict(tmp_path / "missing.safetensors")


def _build(data: str, weights: Path, out: Path, capsys) -> tuple[int, str]:
    return run_main(["build", "--data", data, "--teacher", "test_resnet", "--teacher-weights", str(weights),
                     "--recipe", "demo32", "--epochs", "1", "--topk", "5", "--batch-size", "32", "--workers", "0",
                     "--no-progress", "--out", str(out)], capsys)


def test_users_own_teachers_build_caches_with_the_datasets_class_count(synth_data, tmp_path, capsys):
    """A teacher fine-tuned elsewhere on the 16-class data, saved without logitcache's metadata:
    a plain state dict, and a DDP training checkpoint; both build a cache."""
    from logitcache.storage.reader import CacheReader

    torch.manual_seed(1)
    mine = timm.create_model("test_resnet", num_classes=16)
    plain = tmp_path / "plain.pth"
    torch.save(mine.state_dict(), plain)
    ddp = tmp_path / "ddp.pth.tar"
    torch.save({"epoch": 9, "state_dict": {f"module.{k}": v for k, v in mine.state_dict().items()}}, ddp)
    for weights in (plain, ddp):
        code, err = _build(synth_data, weights, tmp_path / f"{weights.stem}.zarr", capsys)
        assert code == 0, err
        reader = CacheReader(str(tmp_path / f"{weights.stem}.zarr"))
        assert reader.epochs() == [0] and reader.manifest.num_classes == 16


def test_a_teacher_of_another_class_count_is_one_line_naming_both(synth_data, tmp_path, capsys):
    torch.save(timm.create_model("test_resnet", num_classes=128).state_dict(), tmp_path / "t128.pth")
    code, err = _build(synth_data, tmp_path / "t128.pth", tmp_path / "c.zarr", capsys)
    line = one_error_line(code, err)
    assert "predicts 128 classes but the dataset has 16" in line and "t128.pth" in line


def test_the_build_says_when_views_are_resized_for_the_teacher_and_which_stage_bounds_it(synth_data, tmp_path,
                                                                                         capsys, model):
    """A plain state dict carries no input spec, so the teacher runs at its timm default (160 px
    for test_resnet) over the 32 px views: the build says so, with the cost, before it starts.
    The same weights saved by logitcache (metadata: 32 px) are taken as they are. The summary
    gives each stage's rate and names the slower one."""
    from logitcache.trainer.checkpoint import save_model

    from logitcache.build.teacher import ModelInput

    torch.manual_seed(1)
    mine = timm.create_model("test_resnet", num_classes=16)
    torch.save(mine.state_dict(), tmp_path / "plain.pth")
    save_model(mine, tmp_path / "ours.safetensors", "test_resnet", 16,
               ModelInput(32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    args = ["build", "--data", synth_data, "--teacher", "test_resnet", "--recipe", "demo32", "--epochs", "1",
            "--topk", "5", "--batch-size", "32", "--workers", "0", "--no-progress"]
    code, out, err = run_main_output([*args, "--teacher-weights", str(tmp_path / "plain.pth"),
                                      "--out", str(tmp_path / "a.zarr")], capsys)
    assert code == 0, err
    assert "teacher test_resnet takes 160 px input (its timm default): the 32 px views are resized to it on the " \
           "device, 25.0x the pixels per view" in out
    stages = [ln for ln in out.splitlines() if ln.startswith("stages: ")]
    assert len(stages) == 1 and "(0 workers)" in stages[0] and stages[0].endswith("bounds this build"), out
    render, teacher = (float(stages[0].split(w)[0].split()[-1].replace(",", "")) for w in (" views/s (", " views/s:"))
    assert render > 0 and teacher > 0
    assert ("rendering bounds" in stages[0]) == (render < teacher)
    code, out, err = run_main_output([*args, "--teacher-weights", str(tmp_path / "ours.safetensors"),
                                      "--out", str(tmp_path / "b.zarr")], capsys)
    assert code == 0, err
    assert "resized" not in out and "stages: " in out


def test_teacher_input_size_sets_the_teachers_input_and_is_part_of_the_cache(synth_data, tmp_path, capsys):
    """--teacher-input-size runs a plain state dict at the views' 32 px instead of its timm
    default (no resize, other logits than at 160 px); the manifest records it, verify and an
    online teacher run at it, and adding to the cache without it (or with another) is refused."""
    from logitcache.storage.reader import CacheReader
    from logitcache.verify.run import verify_cache

    torch.manual_seed(1)
    torch.save(timm.create_model("test_resnet", num_classes=16).state_dict(), tmp_path / "plain.pth")
    args = ["build", "--data", synth_data, "--teacher", "test_resnet", "--teacher-weights", str(tmp_path / "plain.pth"),
            "--recipe", "demo32", "--topk", "5", "--batch-size", "32", "--workers", "0", "--no-progress"]
    url = str(tmp_path / "c.zarr")
    code, out, err = run_main_output([*args, "--epochs", "1", "--teacher-input-size", "32", "--out", url], capsys)
    assert code == 0, err
    assert "resized" not in out
    manifest = CacheReader(url).manifest
    assert manifest.teacher_input_size == 32 and manifest.identity()["teacher_input_size"] == 32
    assert verify_cache(url, data=synth_data, teacher_weights=str(tmp_path / "plain.pth"), sample=8).passed
    for extra in ([], ["--teacher-input-size", "48"]):
        code, out, err = run_main_output([*args, "--epochs", "0:2", *extra, "--out", url], capsys)
        line = one_error_line(code, err)
        assert "teacher_input_size: cache has 32" in line, line
    at_32 = Teacher("test_resnet", weights=str(tmp_path / "plain.pth"), num_classes=16, input_size=32)
    at_default = Teacher("test_resnet", weights=str(tmp_path / "plain.pth"), num_classes=16)
    assert at_32.io.input_size == 32 and at_default.io.input_size == 160 and at_32.resize_note(32) is None
    views = torch.randn(4, 3, 32, 32)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    assert not torch.allclose(at_32(views, mean, std), at_default(views, mean, std))
    from logitcache.errors import CorruptCacheError
    from logitcache.storage.manifest import Manifest

    for bad in ("32", 4, True, 32.0):  # an edited manifest: refused, naming the field
        with pytest.raises(CorruptCacheError, match="teacher_input_size"):
            Manifest.from_dict({**manifest.to_dict(), "teacher_input_size": bad})
    assert Manifest.from_dict(manifest.to_dict()).teacher_input_size == 32
    with pytest.raises(LogitcacheError, match="at least 8 px"):
        Teacher("test_resnet", weights=str(tmp_path / "plain.pth"), num_classes=16, input_size=4)


def test_a_model_built_with_extra_arguments_loads_as_a_teacher(tmp_path):
    """A ViT trained at 32 px with patches of 4 (``train``'s model_kwargs) is rebuilt with those
    arguments from its weights file; a damaged record of them is one clear error."""
    from logitcache.trainer.checkpoint import save_student

    from logitcache.build.teacher import META_KWARGS, Teacher
    from logitcache.views.augment import create_recipe

    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=10, img_size=32, patch_size=4).eval()
    path = tmp_path / "vit.safetensors"
    save_student(model, path, "test_vit", 10, create_recipe("demo32"), {"img_size": 32, "patch_size": 4})
    teacher = Teacher("test_vit", weights=str(path))
    views, recipe = torch.randn(3, 3, 32, 32), create_recipe("demo32")
    with torch.no_grad():  # views normalised as the model's own input: they reach it unchanged
        expected = model(views)
    assert torch.allclose(teacher(views, recipe.mean, recipe.std), expected, atol=1e-5)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(state, str(tmp_path / "bad.safetensors"), metadata={**meta, META_KWARGS: "[1, 2"})
    with pytest.raises(WeightsUnavailableError, match="not a JSON object of model arguments"):
        Teacher("test_vit", weights=str(tmp_path / "bad.safetensors"))
