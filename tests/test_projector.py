"""Projector feature distillation (`--kd projector`): the distance is the reference code's;
cached (a full float32 feature cache) and online teachers give the same losses and
gradients; whole runs agree; the projector is checkpointed and resumes exactly; runs on
caches without features, or resumed against other features, stop with one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from conftest import NUM_CLASSES
from hypothesis import given, settings
from hypothesis import strategies as st
from logitcache.trainer.config import TrainConfig
from logitcache.trainer.losses import LossConfig
from logitcache.trainer.projector import FeatureStudent, projector_distance
from logitcache.trainer.train import train
from main_entry import one_error_line, run_main
from safetensors.torch import load_file
from torch import nn


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _reference_distance(z_s_projected: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
    """OurDistillationLoss.forward_loss of roymiles/Simple-Recipe-Distillation, times 2 as in its
    forward: BatchNorm1d(affine=False, eps=1e-4) modules in training mode on both sides."""
    bn_s = nn.BatchNorm1d(z_t.shape[1], eps=0.0001, affine=False).train()
    bn_t = nn.BatchNorm1d(z_t.shape[1], eps=0.0001, affine=False).train()
    return 2.0 * torch.log((bn_s(z_s_projected) - bn_t(z_t)).abs().pow(4.0).sum())


@settings(max_examples=40, deadline=None)
@given(b=st.integers(2, 16), d=st.integers(1, 32), seed=st.integers(0, 2**31 - 1),
       scale=st.floats(1e-2, 1e3), shift=st.floats(-100, 100))
def test_distance_is_the_reference_and_ignores_the_teachers_per_dim_affine(b, d, seed, scale, shift):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(b, d, generator=g, dtype=torch.float64), torch.randn(b, d, generator=g, dtype=torch.float64)
    ours = projector_distance(s, t)
    assert rel_diff(ours, _reference_distance(s.float(), t.float())) < 1e-4
    # batch normalisation: the teacher's per-dimension scale and shift do not matter (exactly so as eps -> 0)
    if b >= 4 and d >= 2:  # (with 2 views every normalised column is +-1: a distance near 0, log of rounding)
        a, c = projector_distance(s, t * scale + shift, eps=1e-12), projector_distance(s, t, eps=1e-12)
        assert abs(float(a) - float(c)) < 1e-3, (a, c)
    with pytest.raises(ValueError, match="at least 2 views"):
        projector_distance(s[:1], t[:1])


def test_feature_student_is_the_student_plus_a_linear_projector():
    torch.manual_seed(0)
    student = timm.create_model("test_resnet", num_classes=NUM_CLASSES).eval()
    wrapped = FeatureStudent(student, 24).eval()
    x = torch.randn(3, 3, 32, 32)
    logits, projected = wrapped(x)
    assert torch.allclose(logits, student(x), atol=1e-6) and projected.shape == (3, 24)
    assert wrapped.projector.in_features == student.num_features


@pytest.fixture(scope="module")
def features_cache(tmp_path_factory, synth_data, tiny_teacher) -> str:
    """1 epoch of demo32_mix views: every logit and every feature dim stored as float32."""
    from logitcache.build.features import FeatureRequest
    from logitcache.build.loop import build
    from logitcache.build.teacher import Teacher
    from logitcache.codecs.logits import create_codec
    from logitcache.data.source import open_source
    from logitcache.views.augment import create_recipe

    url = str(tmp_path_factory.mktemp("proj") / "full_features.zarr")
    build(open_source(synth_data, "train"), dataset_name="synth", recipe=create_recipe("demo32_mix"), url=url,
          epochs=[0, 1], teacher=Teacher("test_resnet", weights=tiny_teacher, num_classes=NUM_CLASSES),
          codec=create_codec("full", NUM_CLASSES, values="float32"), batch_size=16, num_workers=0, progress=False,
          features=FeatureRequest("full", "float32"))
    return url


def _cfg(synth_data, cache, out, **kw) -> TrainConfig:
    base = dict(data=synth_data, student="test_resnet", out=str(out), cache=cache, epochs=1, batch_size=16,
                num_workers=0, device="cpu", progress=False, tensorboard=False, seed=1, limit_batches=3,
                loss=LossConfig(kind="projector", temperature=1.0))
    return TrainConfig(**{**base, **kw})


def test_cached_and_online_projector_losses_and_gradients_agree(synth_data, tiny_teacher, features_cache):
    from logitcache.trainer.losses import distill_loss
    from logitcache.trainer.step import smoothed_targets

    from logitcache.build.teacher import Teacher
    from logitcache.codecs.features import decode_features
    from logitcache.codecs.logits import decode
    from logitcache.data.source import open_source
    from logitcache.replay.batches import create_train_loader, epoch_groups
    from logitcache.replay.rows import CachedRows
    from logitcache.storage.reader import CacheReader

    reader = CacheReader(features_cache)
    recipe, source = reader.manifest.recipe, open_source(synth_data, "train")
    rows = CachedRows(reader.load_epoch(0, features=True), source.labels())
    loader = create_train_loader(source, recipe, 0, epoch_groups(source, recipe, 0), rows, batch_size=32, seed=0,
                                 epoch=0, num_workers=0, limit=1)
    batch = next(iter(loader))
    x = batch["images"]
    target = smoothed_targets(batch["label"], batch["partner_label"], batch["lam"], NUM_CLASSES, 0.0)
    cached = (decode(reader.manifest.codec, batch["ids"], batch["values"], batch["tail"]),
              decode_features(reader.manifest.feature_spec, None, batch["feat"], None))
    online = Teacher("test_resnet", weights=tiny_teacher, num_classes=NUM_CLASSES)(x, recipe.mean, recipe.std,
                                                                                   features=True)
    torch.manual_seed(1)
    model = FeatureStudent(timm.create_model("test_resnet", num_classes=NUM_CLASSES), reader.manifest.features["spec"]["dim"])
    results = []
    for logits_t, feats_t in (cached, online):
        model.zero_grad(set_to_none=True)
        logits, projected = model(x)
        loss, terms = distill_loss(LossConfig(kind="projector"), logits, logits_t, target)
        distance = projector_distance(projected, feats_t)
        (loss + distance).backward()
        results.append((loss.detach(), distance.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (lc, dc, gc), (lo, do, go) = results
    assert float(dc) != 0.0 and rel_diff(lc, lo) <= 1e-5 and rel_diff(dc, do) <= 1e-5
    # The projector's bias is cancelled by the batch normalisation: its gradient is 0 up to
    # rounding (so its relative difference is noise); every other gradient agrees.
    for g in (gc, go):
        assert g["projector.bias"].norm() <= 1e-5 * g["projector.weight"].norm()
    worst = max(rel_diff(gc[n], go[n]) for n in go if n != "projector.bias")
    assert worst <= 1e-5, worst
    assert gc["projector.weight"].abs().sum() > 0  # the projector learns


def test_whole_runs_cached_and_online_agree_and_resume_exactly(synth_data, tiny_teacher, features_cache, tmp_path):
    cached = train(_cfg(synth_data, features_cache, tmp_path / "cached", deterministic=True))
    online = train(_cfg(synth_data, features_cache, tmp_path / "online", deterministic=True, online_teacher=True,
                        teacher_weights=tiny_teacher))
    steps = [[json.loads(line) for line in (tmp_path / name / "steps.jsonl").read_text().splitlines()]
             for name in ("cached", "online")]
    for c, o in zip(*steps):
        for k in ("loss", "hard", "kd", "feature"):
            assert abs(c[k] - o[k]) <= 1e-5 * abs(o[k]), (k, c, o)
    assert cached["kd"] == "projector" and len(steps[0]) == 3
    # Resume: 2 epochs straight vs killed after the 1st epoch's checkpoint and resumed (the
    # projector's weights are in the checkpoint).
    straight = train(_cfg(synth_data, features_cache, tmp_path / "straight", epochs=2))

    class Killed(Exception):
        pass

    def kill(info):
        if info["step"] == 4:  # the 1st step of epoch 1, after the epoch-0 checkpoint
            raise Killed()

    with pytest.raises(Killed):
        train(_cfg(synth_data, features_cache, tmp_path / "halves", epochs=2), on_step=kill)
    train(_cfg(synth_data, features_cache, tmp_path / "halves", epochs=2, resume=True))
    for name in ("model.safetensors", "checkpoint/projector.safetensors"):
        a, b = load_file(str(tmp_path / "straight" / name)), load_file(str(tmp_path / "halves" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert straight["final_top1"] == json.loads((tmp_path / "halves" / "summary.json").read_text())["final_top1"]
    start = load_file(str(tmp_path / "straight" / "checkpoint" / "projector.safetensors"))
    assert not np.allclose(start["weight"].numpy(), 0)


def test_projector_user_errors_are_one_line(synth_data, tiny_teacher, features_cache, built_cache_mix, tmp_path,
                                            capsys):
    line = one_error_line(*run_main(["train", "--data", synth_data, "--cache", built_cache_mix, "--kd", "projector",
                                     "--student", "test_resnet", "--out", str(tmp_path / "a"), "--workers", "0",
                                     "--no-progress", "--epochs", "1", "--batch-size", "16"], capsys))
    assert "holds logits only" in line and "logitcache build --features" in line
    train(_cfg(synth_data, features_cache, tmp_path / "b", limit_batches=1))
    line = one_error_line(*run_main(["train", "--data", synth_data, "--cache", features_cache, "--kd", "projector",
                                     "--student", "test_resnet", "--out", str(tmp_path / "b"), "--workers", "0",
                                     "--no-progress", "--epochs", "2", "--batch-size", "16", "--limit-batches", "1",
                                     "--resume", "--online-teacher", "--teacher-weights", tiny_teacher], capsys))
    assert "--resume" in line and "trained on the features of" in line
    line = one_error_line(*run_main(["train", "--data", synth_data, "--cache", features_cache, "--kd", "projector",
                                     "--mkd-meta-every", "5", "--out", str(tmp_path / "c")], capsys))
    assert "projector" in line and "MKD" in line
