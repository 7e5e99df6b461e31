"""Tests for trainer/mkd.py: MKD meta-gradients, temperature learning, side effects, checkpoints."""

from __future__ import annotations

import io
import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from logitcache.trainer.config import MKDConfig
from logitcache.trainer.losses import LossConfig, distill_loss
from logitcache.trainer.mkd import MetaTemperatureLearner, mkd_loss
from logitcache.trainer.temperatures import Temperatures, logit_features

C = 5
D = 8


def _mlp(batchnorm: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(D, 16)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(16))
    layers += [nn.Tanh(), nn.Linear(16, C)]
    return nn.Sequential(*layers).double().train()


def _batch(seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, D, generator=g, dtype=dtype)
    y = torch.randint(0, C, (12,), generator=g)
    teacher = 3 * torch.randn(12, C, generator=g, dtype=dtype)
    target = 0.9 * F.one_hot(y, C).to(dtype) + 0.1 / C  # label-smoothed
    x_meta = torch.randn(10, D, generator=g, dtype=dtype)
    y_meta = torch.randint(0, C, (10,), generator=g)
    return x, teacher, target, x_meta, y_meta


LOSS = LossConfig(kind="kd", kd_weight=1.0, hard_weight=0.5)


@pytest.fixture(autouse=True)
def _one_thread():
    """The models here are tiny: one intra-op thread is faster on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _central_difference(learner, model, batch, param, index, eps=1e-5):
    flat = param.data.view(-1)
    orig = flat[index].item()
    values = []
    for v in (orig + eps, orig - eps):
        flat[index] = v
        values.append(learner.meta_loss(model, *batch, loss_cfg=LOSS)[0].item())  # needs grad mode
    flat[index] = orig
    return (values[0] - values[1]) / (2 * eps)


# ------------------------------------------------------------------ the meta-gradient


@pytest.mark.parametrize("batchnorm", [False, True], ids=["mlp", "mlp_bn_train"])
def test_meta_gradient_matches_finite_differences(batchnorm):
    """d meta_loss / d log T from meta_step (second order, through the look-ahead) equals a
    central finite difference of the meta loss in float64."""
    model = _mlp(batchnorm)
    batch = _batch()
    cfg = MKDConfig(init_teacher_temperature=2.0, init_student_temperature=1.5, inner_lr=0.5)
    learner = MetaTemperatureLearner(cfg, C, dtype=torch.float64)
    temps = learner.temperatures
    fd = [_central_difference(learner, model, batch, p, 0) for p in (temps.log_t_teacher, temps.log_t_student)]
    learner.meta_step(model, *batch, loss_cfg=LOSS)
    analytic = [temps.log_t_teacher.grad.item(), temps.log_t_student.grad.item()]
    for a, f in zip(analytic, fd):
        assert abs(f) > 1e-4  # a meaningful gradient, not 0 == 0
        assert abs(a - f) <= 1e-6 * abs(f), (analytic, fd)


def test_predictor_meta_gradient_matches_finite_differences():
    model = _mlp()
    batch = _batch(1)
    learner = MetaTemperatureLearner(MKDConfig(inner_lr=0.5, predictor=True, hidden=8), C, dtype=torch.float64)
    net = learner.temperatures.net
    params = list(net.parameters())
    meta, _, _ = learner.meta_loss(model, *batch, loss_cfg=LOSS)
    grads = torch.autograd.grad(meta, params)
    for p, g in zip(params, grads):
        i = p.numel() - 1  # one entry per tensor (hidden weight/bias, output weight/bias)
        f = _central_difference(learner, model, batch, p, i)
        a = g.reshape(-1)[i].item()
        assert abs(a - f) <= 1e-5 * max(abs(f), 1e-4), (p.shape, i, a, f)


def test_uses_student_lr_unless_inner_lr_set():
    model = _mlp()
    batch = _batch()
    a = MetaTemperatureLearner(MKDConfig(), C, dtype=torch.float64)
    b = MetaTemperatureLearner(MKDConfig(inner_lr=0.3), C, dtype=torch.float64)
    la = a.meta_loss(model, *batch, student_lr=0.3, loss_cfg=LOSS)[0]
    lb = b.meta_loss(model, *batch, student_lr=99.0, loss_cfg=LOSS)[0]
    assert torch.allclose(la, lb)
    with pytest.raises(ValueError, match="look-ahead"):
        a.meta_loss(model, *batch, loss_cfg=LOSS)


# ------------------------------------------------------------- temperatures move


def _synthetic(teacher_kind: str, scale: float):
    g = torch.Generator().manual_seed(0)
    c, d, n = 4, 6, 64
    w = torch.randn(d, c, generator=g)
    x = torch.randn(n, d, generator=g)
    y = (x @ w).argmax(-1)
    x_meta = torch.randn(n, d, generator=g)
    y_meta = (x_meta @ w).argmax(-1)
    label = y if teacher_kind == "correct" else (y + 1) % c
    teacher = scale * F.one_hot(label, c).float()
    return c, d, x, y, teacher, x_meta, y_meta


@pytest.mark.parametrize(
    "teacher_kind, scale, teacher_up, student_up",
    [
        ("correct", 10.0, True, None),  # confident, right teacher: larger T_t = bigger useful KD step
        ("correct", 1.0, None, True),
        ("wrong", 10.0, False, False),  # confident, wrong teacher: shrink the KD gradient
    ],
)
def test_temperatures_move_in_short_run(teacher_kind, scale, teacher_up, student_up):
    c, d, x, y, teacher, x_meta, y_meta = _synthetic(teacher_kind, scale)
    torch.manual_seed(0)
    model = nn.Linear(d, c)
    loss_cfg = LossConfig(kind="kd", hard_weight=0.0)
    cfg = MKDConfig(inner_lr=0.5, meta_lr=0.1, meta_every=1)
    learner = MetaTemperatureLearner(cfg, c)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    target = F.one_hot(y, c).float()
    for step in range(20):
        assert learner.should_step(step)
        learner.meta_step(model, x, teacher, target, x_meta, y_meta, loss_cfg=loss_cfg)
        logits = model(x)
        t_t, t_s = learner.kd_temperatures(logits, teacher)
        assert not t_t.requires_grad and not t_s.requires_grad
        loss, _ = mkd_loss(loss_cfg, logits, teacher, target, t_t, t_s)
        opt.zero_grad()
        loss.backward()
        opt.step()
    t_t, t_s = (float(t.detach()) for t in learner.temperatures())
    for t in (t_t, t_s):
        assert cfg.min_temperature <= t <= cfg.max_temperature
    if teacher_up is not None:
        assert (t_t > 2.0) if teacher_up else (t_t < 0.5), t_t
    if student_up is not None:
        assert (t_s > 2.0) if student_up else (t_s < 0.5), t_s


def test_temperatures_stay_within_clamp():
    c, d, x, y, teacher, x_meta, y_meta = _synthetic("wrong", 10.0)
    torch.manual_seed(0)
    model = nn.Linear(d, c)
    cfg = MKDConfig(inner_lr=0.5, meta_lr=5.0, min_temperature=0.5, max_temperature=2.0)
    learner = MetaTemperatureLearner(cfg, c)
    seen = []
    for _ in range(5):
        learner.meta_step(model, x, teacher, F.one_hot(y, c).float(), x_meta, y_meta,
                          loss_cfg=LossConfig(kind="kd", hard_weight=0.0))
        seen += [float(t.detach()) for t in learner.temperatures()]
    eps = 1e-6
    assert all(cfg.min_temperature - eps <= t <= cfg.max_temperature + eps for t in seen)
    assert min(seen) == pytest.approx(cfg.min_temperature)  # pushed down to the bound, and held there


# ------------------------------------------------------------------ predictor


def test_predictor_per_sample_temperatures_and_gradients():
    model = _mlp().float()
    x, teacher, target, x_meta, y_meta = _batch(2, dtype=torch.float32)
    cfg = MKDConfig(predictor=True, hidden=8, inner_lr=0.5, min_temperature=0.2, max_temperature=10.0)
    learner = MetaTemperatureLearner(cfg, C)
    with torch.no_grad():
        logits = model(x)
    t_t, t_s = learner.kd_temperatures(logits, teacher)
    for t, init in ((t_t, cfg.init_teacher_temperature), (t_s, cfg.init_student_temperature)):
        assert t.shape == (x.shape[0],) and not t.requires_grad
        assert torch.all(t > 0)
        assert torch.allclose(t, torch.full_like(t, init), rtol=0.1)  # starts near the initial values
    before = [p.detach().clone() for p in learner.temperatures.parameters()]
    stats = learner.meta_step(model, x, teacher, target, x_meta, y_meta, loss_cfg=LOSS)
    assert set(stats) == {"meta_loss", "t_teacher", "t_student"}
    assert all(math.isfinite(v) for v in stats.values())
    for p, b in zip(learner.temperatures.parameters(), before):
        assert p.grad is not None and p.grad.abs().sum() > 0
        assert not torch.equal(p, b)
    # per-sample, bounded, differentiable outputs
    t_t, t_s = learner.temperatures(logits, teacher)
    assert t_t.shape == t_s.shape == (x.shape[0],) and t_t.requires_grad
    assert torch.all((t_t >= 0.2) & (t_t <= 10.0) & (t_s >= 0.2) & (t_s <= 10.0))
    assert t_t.std() > 0  # depends on the sample
    learner.kd_temperatures(logits, teacher)
    assert learner.current() == pytest.approx({"t_teacher": float(t_t.detach().mean()), "t_student": float(t_s.detach().mean())})


def test_logit_features():
    z = torch.tensor([[0.0, 0.0, 0.0], [10.0, 0.0, -10.0]])
    f = logit_features(z)
    assert f.shape == (2, 4)
    assert f[0].tolist() == pytest.approx([1 / 3, 1.0, 0.0, 0.0], abs=1e-6)
    assert f[1, 0] > 0.99 and f[1, 1] < 0.01 and f[1, 3] == pytest.approx(math.log1p(10.0))


# ---------------------------------------------------------- no side effects on the model


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("test_resnet", {"drop_rate": 0.2}),  # BatchNorm in train mode + dropout
        ("test_vit", {"img_size": 32, "patch_size": 8, "drop_rate": 0.1, "drop_path_rate": 0.1}),  # drop-path, SDPA
    ],
)
def test_meta_step_leaves_model_untouched(name, kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=C, **kwargs).train()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert any("running_mean" in k for k in state) or name == "test_vit"
    g = torch.Generator().manual_seed(0)
    x, x_meta = torch.randn(4, 3, 32, 32, generator=g), torch.randn(4, 3, 32, 32, generator=g)
    teacher = torch.randn(4, C, generator=g).half()  # cached logits may be float16
    target = F.softmax(torch.randn(4, C, generator=g), -1)
    learner = MetaTemperatureLearner(MKDConfig(inner_lr=0.1, meta_lr=0.1), C)
    stats = learner.meta_step(model, x, teacher, target, x_meta, torch.tensor([0, 1, 2, 3]), loss_cfg=LossConfig())
    assert math.isfinite(stats["meta_loss"])
    assert stats["t_teacher"] == pytest.approx(1.0) and stats["t_student"] == pytest.approx(1.0)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(p.grad is None for p in model.parameters())
    t_t, t_s = learner.temperatures()
    assert float(t_t.detach()) != 1.0 and float(t_s.detach()) != 1.0


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("predictor", [False, True])
def test_state_dict_round_trip(predictor):
    model = _mlp().float()
    batch = _batch(3, dtype=torch.float32)
    cfg = MKDConfig(inner_lr=0.5, meta_lr=0.05, predictor=predictor, hidden=8)
    a = MetaTemperatureLearner(cfg, C)
    for _ in range(3):
        a.meta_step(model, *batch, loss_cfg=LOSS)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = MetaTemperatureLearner(cfg, C)
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert b.num_meta_steps == 3
    for pa, pb in zip(a.temperatures.parameters(), b.temperatures.parameters()):
        assert torch.equal(pa, pb)
    # Adam state restored: the next step is identical
    sa = a.meta_step(model, *batch, loss_cfg=LOSS)
    sb = b.meta_step(model, *batch, loss_cfg=LOSS)
    assert sa == sb
    for pa, pb in zip(a.temperatures.parameters(), b.temperatures.parameters()):
        assert torch.equal(pa, pb)
    other = MetaTemperatureLearner(MKDConfig(predictor=not predictor), C)
    with pytest.raises(ValueError, match="predictor"):
        other.load_state_dict(a.state_dict())


# --------------------------------------------------------------------- small API


def test_mkd_loss_matches_distill_loss_at_equal_temperatures():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, C, generator=g), torch.randn(6, C, generator=g)
    target = F.softmax(torch.randn(6, C, generator=g), -1)
    cfg = LossConfig(kind="kd", temperature=2.5, kd_weight=0.7, hard_weight=0.3)
    total, parts = mkd_loss(cfg, s, t, target, 2.5, torch.tensor(2.5))
    ref, ref_parts = distill_loss(cfg, s, t, target)
    assert torch.allclose(total, ref) and torch.allclose(parts["kd"], ref_parts["kd"])
    # MKD always uses the KD term; the configured kind and temperature are ignored
    other, _ = mkd_loss(LossConfig(kind="none", temperature=9.0, kd_weight=0.7, hard_weight=0.3), s, t, target, 2.5, 2.5)
    assert torch.allclose(other, ref)


def test_scalar_kd_temperatures_and_schedule():
    learner = MetaTemperatureLearner(MKDConfig(init_teacher_temperature=4.0, init_student_temperature=2.0,
                                               meta_every=3), C)
    s = torch.randn(2, C, dtype=torch.float64)
    t_t, t_s = learner.kd_temperatures(s, s)
    assert t_t.shape == () and t_t.dtype == torch.float64
    assert float(t_t) == pytest.approx(4.0) and float(t_s) == pytest.approx(2.0)
    assert learner.current() == pytest.approx({"t_teacher": 4.0, "t_student": 2.0})
    assert [learner.should_step(i) for i in range(7)] == [True, False, False, True, False, False, True]
    assert not MetaTemperatureLearner(MKDConfig(meta_every=0), C).should_step(0)
    with pytest.raises(ValueError, match="classes"):
        learner.kd_temperatures(torch.randn(2, C + 1), torch.randn(2, C + 1))
    assert isinstance(learner.temperatures, Temperatures)


def test_config_validation():
    with pytest.raises(ValueError):
        MKDConfig(init_teacher_temperature=50.0)
    with pytest.raises(ValueError):
        MKDConfig(min_temperature=2.0, max_temperature=1.0)
    with pytest.raises(ValueError):
        MKDConfig(inner_lr=0.0)
