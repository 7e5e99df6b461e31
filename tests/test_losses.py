"""Tests for trainer/losses.py: properties, hand computations and timm cross-checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from logitcache.trainer.losses import (
    LossConfig,
    dist_loss,
    distill_loss,
    dkd_loss,
    dkd_warmup_factor,
    hard_label_loss,
    kd_loss,
    temperature_from_log,
)

SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def logit_pair(draw, max_b: int = 6, max_c: int = 10, bound: float = 20.0):
    """Two float64 (B, C) logit tensors of the same shape."""
    b = draw(st.integers(1, max_b))
    c = draw(st.integers(2, max_c))
    elems = st.floats(-bound, bound, allow_nan=False, allow_infinity=False, width=64)
    s = draw(arrays(np.float64, (b, c), elements=elems))
    t = draw(arrays(np.float64, (b, c), elements=elems))
    return torch.from_numpy(s), torch.from_numpy(t)


temperatures = st.floats(0.25, 8.0, allow_nan=False)


def _rand(*shape: int, seed: int, scale: float = 3.0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype) * scale


# --------------------------------------------------------------------------- kd_loss


@SETTINGS
@given(logit_pair(), temperatures)
def test_kd_nonnegative(pair, temp):
    s, t = pair
    assert kd_loss(s, t, temp).item() >= -1e-12


@SETTINGS
@given(logit_pair(), temperatures)
def test_kd_zero_when_student_equals_teacher(pair, temp):
    s, _ = pair
    assert abs(kd_loss(s, s.clone(), temp).item()) <= 1e-6


@SETTINGS
@given(logit_pair(), temperatures, st.data())
def test_kd_invariant_to_per_row_shift(pair, temp, data):
    s, t = pair
    shift_s = torch.tensor(data.draw(st.lists(st.floats(-50, 50), min_size=len(s), max_size=len(s))))
    shift_t = torch.tensor(data.draw(st.lists(st.floats(-50, 50), min_size=len(s), max_size=len(s))))
    base = kd_loss(s, t, temp)
    shifted = kd_loss(s + shift_s[:, None], t + shift_t[:, None], temp)
    torch.testing.assert_close(shifted, base, rtol=1e-9, atol=1e-9)


@SETTINGS
@given(logit_pair(), temperatures)
def test_kd_temperature_scaling(pair, temp):
    # Dividing the logits by T and using T = 1 gives the same KL; the loss carries T^2 on top.
    s, t = pair
    torch.testing.assert_close(kd_loss(s, t, temp), temp**2 * kd_loss(s / temp, t / temp, 1.0))


def test_kd_high_temperature_limit():
    # Hinton et al.: as T -> inf, T^2 KL -> (1 / 2C) sum_c (d_c - mean d)^2 with d = s - t
    # (batch mean), i.e. KD becomes logit matching.
    s, t = _rand(5, 7, seed=0), _rand(5, 7, seed=1)
    d = s - t
    limit = ((d - d.mean(dim=1, keepdim=True)) ** 2).sum(dim=1).div(2 * 7).mean()
    torch.testing.assert_close(kd_loss(s, t, 1e4), limit, rtol=1e-3, atol=0)
    # ... and T = 1 is genuinely different from the limit.
    assert not math.isclose(kd_loss(s, t, 1.0).item(), limit.item(), rel_tol=0.05)


@SETTINGS
@given(logit_pair(), temperatures)
def test_kd_gradient_matches_analytic(pair, temp):
    s, t = pair
    s = s.clone().requires_grad_(True)
    kd_loss(s, t, temp).backward()
    expected = (torch.softmax(s.detach() / temp, -1) - torch.softmax(t / temp, -1)) * temp / s.shape[0]
    torch.testing.assert_close(s.grad, expected, rtol=1e-7, atol=1e-10)


def test_kd_handles_large_teacher_logits():
    s = torch.tensor([[0.0, 1.0, -1.0]])
    t = torch.tensor([[1e4, -1e4, 0.0]])
    loss = kd_loss(s.requires_grad_(True), t, 1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    torch.testing.assert_close(loss, -F.log_softmax(s.detach(), -1)[0, 0])  # teacher is one-hot on class 0


class _LinearClassifier(nn.Module):
    """Tiny timm-looking classifier: (B, 3, 1, 1) images -> (B, C) logits via nn.Linear."""

    def __init__(self, num_classes: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(3, num_classes)
        with torch.no_grad():
            self.fc.weight.mul_(4.0)  # spread the logits so the KL is far from 0
        self.num_classes = num_classes
        self.in_chans = 3
        # Same normalisation as DistillationTeacher's default, so normalize_input is a no-op.
        self.pretrained_cfg = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("temp", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kd_matches_timm_logit_distillation_task(temp, dtype):
    from timm.task import LogitDistillationTask

    num_classes, batch = 10, 16
    student = _LinearClassifier(num_classes, seed=0).to(dtype)
    teacher = _LinearClassifier(num_classes, seed=1).to(dtype)
    task = LogitDistillationTask(
        student, teacher, criterion=nn.CrossEntropyLoss(), temperature=temp, dtype=dtype, verbose=False
    )
    x = _rand(batch, 3, 1, 1, seed=2, scale=1.0, dtype=dtype)
    y = torch.randint(0, num_classes, (batch,), generator=torch.Generator().manual_seed(3))
    out = task(x, y)

    with torch.no_grad():
        s, t = student(x), teacher(x)
    ours = kd_loss(s, t, temp)
    assert out["kd_loss"].item() > 1e-3
    torch.testing.assert_close(ours, out["kd_loss"].detach(), rtol=1e-6, atol=0)

    # The whole timm objective (CE + 1 x KD) equals distill_loss with one-hot CE targets.
    total, parts = distill_loss(
        LossConfig(kind="kd", temperature=temp), s, t, F.one_hot(y, num_classes).to(dtype)
    )
    torch.testing.assert_close(parts["hard"], out["task_loss"].detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(total, out["loss"].detach(), rtol=1e-6, atol=0)


def test_kd_temperature_gradient_matches_finite_difference():
    s, t = _rand(4, 6, seed=4), _rand(4, 6, seed=5)
    temp = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    kd_loss(s, t, temp).backward()
    h = 1e-6
    fd = (kd_loss(s, t, 1.7 + h) - kd_loss(s, t, 1.7 - h)) / (2 * h)
    assert temp.grad is not None and abs(temp.grad.item()) > 1e-3
    torch.testing.assert_close(temp.grad, fd, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("shape", [(4,), (4, 1)])
def test_kd_per_sample_temperatures(shape):
    s, t = _rand(4, 6, seed=6), _rand(4, 6, seed=7)
    log_tt = torch.tensor([0.1, -0.3, 0.7, 0.0], dtype=torch.float64).reshape(shape).requires_grad_(True)
    log_ts = torch.tensor([0.2, 0.5, -0.4, 0.3], dtype=torch.float64).reshape(shape).requires_grad_(True)
    tt, ts = temperature_from_log(log_tt), temperature_from_log(log_ts)
    loss = kd_loss(s, t, tt, student_temperature=ts)

    # Reference: one sample at a time with scalar temperatures, then the batch mean.
    rows = []
    for i in range(4):
        a, b = tt.reshape(-1)[i].item(), ts.reshape(-1)[i].item()
        p_t = torch.softmax(t[i] / a, -1)
        kl = (p_t * (torch.log(p_t) - torch.log_softmax(s[i] / b, -1))).sum()
        rows.append(a * b * kl)
    torch.testing.assert_close(loss, torch.stack(rows).mean())

    # Gradients w.r.t. the per-sample log-temperatures: central finite differences.
    loss.backward()
    for param, grad in ((log_tt, log_tt.grad), (log_ts, log_ts.grad)):
        for i in range(4):
            fd = []
            for sign in (1, -1):
                with torch.no_grad():
                    bumped = param.detach().clone().reshape(-1)
                    bumped[i] += sign * 1e-6
                    bumped = bumped.reshape(shape)
                    if param is log_tt:
                        v = kd_loss(s, t, bumped.exp(), student_temperature=ts.detach())
                    else:
                        v = kd_loss(s, t, tt.detach(), student_temperature=bumped.exp())
                fd.append(v)
            torch.testing.assert_close(grad.reshape(-1)[i], (fd[0] - fd[1]) / 2e-6, rtol=1e-5, atol=1e-9)


def test_kd_student_temperature_equal_to_teacher_is_default():
    s, t = _rand(3, 5, seed=8), _rand(3, 5, seed=9)
    torch.testing.assert_close(kd_loss(s, t, 2.5, student_temperature=2.5), kd_loss(s, t, 2.5))
    assert not math.isclose(kd_loss(s, t, 2.5, student_temperature=1.0).item(), kd_loss(s, t, 2.5).item())


def test_kd_rejects_bad_shapes():
    with pytest.raises(ValueError):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3))


# --------------------------------------------------------------------------- DKD

_S = [[1.0, 2.0, 0.5, -1.0], [0.3, -0.2, 2.5, 1.1], [-1.5, 0.0, 0.7, 3.0]]
_T = [[2.0, 0.5, 1.5, -0.5], [1.0, 0.0, 3.0, -2.0], [0.2, 1.8, -0.3, 2.2]]
_Y = [1, 2, 0]


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    z = sum(e)
    return [v / z for v in e]


def _kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def _dkd_by_hand(s, t, y, alpha, beta, temp):
    total = 0.0
    for zs, zt, k in zip(s, t, y):
        ps = _softmax([v / temp for v in zs])
        pt = _softmax([v / temp for v in zt])
        tckd = _kl([pt[k], 1 - pt[k]], [ps[k], 1 - ps[k]])
        qs = _softmax([v / temp for j, v in enumerate(zs) if j != k])
        qt = _softmax([v / temp for j, v in enumerate(zt) if j != k])
        nckd = _kl(qt, qs)
        total += temp**2 * (alpha * tckd + beta * nckd)
    return total / len(s)


@pytest.mark.parametrize("alpha,beta,temp", [(1.0, 1.0, 1.0), (1.5, 0.7, 2.0), (0.0, 8.0, 4.0)])
def test_dkd_matches_hand_computation(alpha, beta, temp):
    s = torch.tensor(_S, dtype=torch.float64)
    t = torch.tensor(_T, dtype=torch.float64)
    y = torch.tensor(_Y)
    expected = _dkd_by_hand(_S, _T, _Y, alpha, beta, temp)
    got = dkd_loss(s, t, y, alpha=alpha, beta=beta, temperature=temp)
    assert math.isclose(got.item(), expected, rel_tol=1e-10)


@SETTINGS
@given(logit_pair(max_b=1), temperatures, st.data())
def test_dkd_decomposes_kd(pair, temp, data):
    # Per sample: KL(p_t || p_s) = TCKD + (1 - p_target^teacher) NCKD (Zhao et al., eq. 5).
    s, t = pair
    y = torch.tensor([data.draw(st.integers(0, s.shape[1] - 1))])
    tckd = dkd_loss(s, t, y, alpha=1.0, beta=0.0, temperature=temp)
    nckd = dkd_loss(s, t, y, alpha=0.0, beta=1.0, temperature=temp)
    p_gt = torch.softmax(t / temp, -1)[0, y.item()]
    torch.testing.assert_close(tckd + (1 - p_gt) * nckd, kd_loss(s, t, temp), rtol=1e-7, atol=1e-9)


def test_dkd_finite_with_confident_teacher():
    s = torch.tensor(_S, dtype=torch.float32, requires_grad=True)
    t = torch.tensor(_T, dtype=torch.float32)
    y = torch.tensor(_Y)
    t = t.scatter(1, y[:, None], 1e4)  # teacher is certain of the target class
    loss = dkd_loss(s, t, y, beta=2.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    assert s.grad.abs().sum() > 0


def test_dkd_warmup_factor():
    assert dkd_warmup_factor(0.0, 20.0) == 0.0
    assert dkd_warmup_factor(5.0, 20.0) == 0.25
    assert dkd_warmup_factor(25.0, 20.0) == 1.0
    assert dkd_warmup_factor(3.0, 0.0) == 1.0


# --------------------------------------------------------------------------- DIST


def _pearson(a, b, eps=1e-8):
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    na = math.sqrt(sum((x - ma) ** 2 for x in a))
    nb = math.sqrt(sum((y - mb) ** 2 for y in b))
    return cov / (na * nb + eps)


def _dist_by_hand(s, t, beta, gamma, temp):
    ps = [_softmax([v / temp for v in row]) for row in s]
    pt = [_softmax([v / temp for v in row]) for row in t]
    n_b, n_c = len(s), len(s[0])
    inter = 1 - sum(_pearson(ps[i], pt[i]) for i in range(n_b)) / n_b
    cols_s = [[ps[i][c] for i in range(n_b)] for c in range(n_c)]
    cols_t = [[pt[i][c] for i in range(n_b)] for c in range(n_c)]
    intra = 1 - sum(_pearson(cols_s[c], cols_t[c]) for c in range(n_c)) / n_c
    return temp**2 * (beta * inter + gamma * intra)


@pytest.mark.parametrize("beta,gamma,temp", [(1.0, 1.0, 1.0), (2.0, 0.5, 3.0)])
def test_dist_matches_hand_computation(beta, gamma, temp):
    s = torch.tensor(_S, dtype=torch.float64)
    t = torch.tensor(_T, dtype=torch.float64)
    expected = _dist_by_hand(_S, _T, beta, gamma, temp)
    got = dist_loss(s, t, beta=beta, gamma=gamma, temperature=temp)
    assert expected > 0.1
    assert math.isclose(got.item(), expected, rel_tol=1e-10)


@SETTINGS
@given(logit_pair(bound=5.0), temperatures)
def test_dist_properties(pair, temp):
    s, t = pair
    loss = dist_loss(s, t, temperature=temp)
    # 1 - correlation lies in [0, 2] for each of the two terms.
    assert -1e-9 <= loss.item() <= 4 * temp**2 + 1e-9
    # Invariant to per-row logit shifts (softmax is).
    torch.testing.assert_close(dist_loss(s + 3.0 * torch.arange(len(s))[:, None], t, temperature=temp), loss)


def test_dist_zero_for_identical_logits():
    s = _rand(8, 5, seed=10)
    assert abs(dist_loss(s, s.clone()).item()) < 1e-6


# --------------------------------------------------------------------------- hard labels


def test_hard_ce_matches_cross_entropy_one_hot():
    s = _rand(6, 9, seed=11)
    y = torch.tensor([0, 3, 8, 3, 1, 5])
    got = hard_label_loss(s, F.one_hot(y, 9).to(s.dtype), kind="ce")
    torch.testing.assert_close(got, F.cross_entropy(s, y))


def test_hard_ce_matches_timm_soft_target_with_mixup():
    from timm.data.mixup import mixup_target
    from timm.loss import SoftTargetCrossEntropy

    s = _rand(6, 9, seed=12, dtype=torch.float32)
    y = mixup_target(torch.tensor([0, 3, 8, 3, 1, 5]), 9, lam=0.7, smoothing=0.1)
    torch.testing.assert_close(hard_label_loss(s, y, kind="ce"), SoftTargetCrossEntropy()(s, y))


def test_hard_bce_matches_timm():
    from timm.data.mixup import mixup_target
    from timm.loss import BinaryCrossEntropy

    s = _rand(6, 9, seed=13, dtype=torch.float32)
    y = mixup_target(torch.tensor([0, 3, 8, 3, 1, 5]), 9, lam=0.6, smoothing=0.1)
    got = hard_label_loss(s, y, kind="bce")
    torch.testing.assert_close(got, BinaryCrossEntropy()(s, y))  # default smoothing is not reapplied to dense targets
    torch.testing.assert_close(got, F.binary_cross_entropy_with_logits(s, y))
    manual = -(y * F.logsigmoid(s) + (1 - y) * F.logsigmoid(-s)).mean()
    torch.testing.assert_close(got, manual)


def test_hard_label_loss_rejects_bad_input():
    with pytest.raises(ValueError):
        hard_label_loss(torch.zeros(2, 3), torch.zeros(2, 3), kind="focal")
    with pytest.raises(ValueError):
        hard_label_loss(torch.zeros(2, 3), torch.zeros(2))


# --------------------------------------------------------------------------- distill_loss


def _batch(seed: int, dtype=torch.float64):
    from timm.data.mixup import mixup_target

    s, t = _rand(4, 4, seed=seed, dtype=dtype), _rand(4, 4, seed=seed + 1, dtype=dtype)
    # lam < 0.5: the argmax of the mixed target is the *partner's* class (flip(0) pairing).
    y = mixup_target(torch.tensor([1, 2, 0, 3]), 4, lam=0.3, smoothing=0.1).to(dtype)
    return s, t, y


def test_distill_loss_kd_weights():
    s, t, y = _batch(20)
    cfg = LossConfig(kind="kd", temperature=2.0, kd_weight=0.7, hard_weight=0.4, hard_kind="bce")
    total, parts = distill_loss(cfg, s, t, y)
    torch.testing.assert_close(parts["hard"], hard_label_loss(s, y, kind="bce"))
    torch.testing.assert_close(parts["kd"], kd_loss(s, t, 2.0))
    torch.testing.assert_close(total, 0.4 * parts["hard"] + 0.7 * parts["kd"])


def test_distill_loss_dkd_uses_argmax_class_and_warmup():
    s, t, y = _batch(22)
    cfg = LossConfig(kind="dkd", dkd_alpha=1.0, dkd_beta=2.0, dkd_warmup_epochs=5.0, kd_weight=1.5)
    total, parts = distill_loss(cfg, s, t, y, epoch=2.0)
    target_class = torch.tensor([3, 0, 2, 1])  # partners of [1, 2, 0, 3] under flip(0)
    torch.testing.assert_close(parts["kd"], dkd_loss(s, t, target_class, alpha=1.0, beta=2.0))
    torch.testing.assert_close(total, parts["hard"] + 1.5 * 0.4 * parts["kd"])
    late, _ = distill_loss(cfg, s, t, y, epoch=9.0)
    torch.testing.assert_close(late, parts["hard"] + 1.5 * parts["kd"])


def test_distill_loss_dist_and_none():
    s, t, y = _batch(24)
    total, parts = distill_loss(LossConfig(kind="dist", kd_weight=2.0, dist_gamma=0.5), s, t, y)
    torch.testing.assert_close(parts["kd"], dist_loss(s, t, gamma=0.5))
    torch.testing.assert_close(total, parts["hard"] + 2.0 * parts["kd"])

    total, parts = distill_loss(LossConfig(kind="none", hard_weight=0.5), s, None, y)
    torch.testing.assert_close(total, 0.5 * hard_label_loss(s, y))
    assert parts["kd"].item() == 0.0


def test_distill_loss_half_precision_teacher_and_gradients():
    s, t, y = _batch(26, dtype=torch.float32)
    s.requires_grad_(True)
    total, _ = distill_loss(LossConfig(kind="kd"), s, t.half(), y)
    total.backward()
    assert total.dtype == torch.float32 and torch.isfinite(s.grad).all()


def test_distill_loss_rejects_bad_config():
    s, _, y = _batch(28)
    with pytest.raises(ValueError):
        LossConfig(kind="mkd")
    with pytest.raises(ValueError):
        LossConfig(hard_kind="mse")
    with pytest.raises(ValueError):
        distill_loss(LossConfig(kind="kd"), s, None, y)
