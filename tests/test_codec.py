"""Tests for logitcache/codec.py: round trips, exactness at T = 1, id dtypes, shapes, errors.

Property tests use hypothesis with ``deadline=None`` and at most 50 examples each.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from logitcache.codec import CodecSpec, create_codec, decode, encode, id_dtype_for, rebuilt_probs

SETTINGS = settings(max_examples=50, deadline=None)

#: float16 rounds |x| >= 2**-14 to within half an ulp = 2**-11 |x|; below that (subnormals)
#: the absolute error is at most half the subnormal spacing, 2**-25.
F16_SUBNORMAL_ABS = 2.0**-25


@st.composite
def logit_batches(draw, min_classes=2, max_classes=40, max_batch=4, bound=60.0):
    """(logits (B, C) float32 tensor, k in [1, C]). Values may repeat (ties) and be near 0."""
    c = draw(st.integers(min_classes, max_classes))
    b = draw(st.integers(1, max_batch))
    elements = st.one_of(
        st.floats(-bound, bound, allow_nan=False, width=32),
        st.sampled_from([0.0, 1.0, -1.0, 1e-6]),  # ties and tiny values
    )
    z = draw(arrays(np.float32, (b, c), elements=elements))
    k = draw(st.integers(1, c))
    return torch.from_numpy(z), k


def _decode(spec: CodecSpec, rows: dict[str, np.ndarray]) -> torch.Tensor:
    return decode(torch.from_numpy(rows["topk_ids"].astype(np.int64)), torch.from_numpy(rows["topk_logits"]),
                  torch.from_numpy(rows["tail_lse"]), spec.num_classes)


# -- round trips -------------------------------------------------------------------------


@SETTINGS
@given(logit_batches(), st.sampled_from(["float16", "float32"]))
def test_round_trip_keeps_topk_within_tolerance(zk, value_dtype):
    z, k = zk
    b, c = z.shape
    spec = create_codec("topk", c, k=k, value_dtype=value_dtype)
    rows = encode(spec, z)
    assert rows["topk_ids"].shape == (b, spec.k) and rows["topk_ids"].dtype == np.dtype(spec.id_dtype)
    assert rows["topk_logits"].shape == (b, spec.k) and rows["topk_logits"].dtype == np.dtype(value_dtype)
    assert rows["tail_lse"].shape == (b,) and rows["tail_lse"].dtype == np.float32
    ids = torch.from_numpy(rows["topk_ids"].astype(np.int64))
    # ids are distinct per row, values sorted in descending order
    assert all(len(set(r)) == spec.k for r in ids.tolist())
    stored = rows["topk_logits"].astype(np.float32)
    assert np.all(np.diff(stored, axis=1) <= 0)
    # the kept ids are a top-k of z (ties allowed), their values within the stated tolerance
    kth = torch.topk(z, spec.k, dim=1).values[:, -1:]
    true = z.gather(1, ids)
    assert torch.all(true >= kth)
    rtol = spec.relative_tolerance()
    slack = F16_SUBNORMAL_ABS if value_dtype == "float16" else 0.0
    assert torch.all((torch.from_numpy(stored) - true).abs() <= rtol * true.abs() + slack)
    # decode puts the stored values back at their ids
    rebuilt = _decode(spec, rows)
    assert rebuilt.shape == (b, c) and rebuilt.dtype == torch.float32
    assert torch.equal(rebuilt.gather(1, ids), torch.from_numpy(stored))


@SETTINGS
@given(logit_batches())
def test_float32_full_codec_is_exact(zk):
    z, _ = zk
    c = z.shape[1]
    spec = create_codec("full", c, value_dtype="float32")
    assert spec.k == c and spec.name == "full"
    rows = encode(spec, z)
    assert np.all(np.isneginf(rows["tail_lse"]))
    rebuilt = _decode(spec, rows)
    assert torch.equal(rebuilt, z)
    assert torch.equal(torch.softmax(rebuilt, dim=1), torch.softmax(z, dim=1))
    # ordering: the rows are z sorted descending, with ids the permutation
    ids = rows["topk_ids"].astype(np.int64)
    assert np.array_equal(np.sort(ids, axis=1), np.broadcast_to(np.arange(c), ids.shape))
    assert np.array_equal(rows["topk_logits"], np.take_along_axis(z.numpy(), ids, axis=1))


@SETTINGS
@given(logit_batches(min_classes=3))
def test_float32_topk_keeps_exact_values(zk):
    z, k = zk
    c = z.shape[1]
    k = min(k, c - 1)
    spec = create_codec("topk", c, k=k, value_dtype="float32")
    rows = encode(spec, z)
    ids = torch.from_numpy(rows["topk_ids"].astype(np.int64))
    assert torch.equal(torch.from_numpy(rows["topk_logits"]), z.gather(1, ids))
    assert torch.equal(_decode(spec, rows).gather(1, ids), z.gather(1, ids))


@SETTINGS
@given(logit_batches(min_classes=3, bound=30.0))
def test_rebuilt_distribution_at_t1_has_teacher_topk_and_tail_mass(zk):
    z, k = zk
    c = z.shape[1]
    k = min(k, c - 1)
    spec = create_codec("topk", c, k=k, value_dtype="float32")
    rows = encode(spec, z)
    ids = torch.from_numpy(rows["topk_ids"].astype(np.int64))
    p = torch.softmax(z, dim=1)
    q = rebuilt_probs(ids, torch.from_numpy(rows["topk_logits"]), torch.from_numpy(rows["tail_lse"]), c, 1.0)
    assert torch.allclose(q.sum(1), torch.ones(len(z)), atol=1e-5)
    assert torch.allclose(q.gather(1, ids), p.gather(1, ids), atol=1e-5, rtol=0)
    tail = torch.ones_like(p, dtype=torch.bool).scatter(1, ids, False)
    assert torch.allclose((q * tail).sum(1), (p * tail).sum(1), atol=1e-5, rtol=0)
    # the tail is flat: every tail class gets the same probability
    for r in range(len(z)):
        t = q[r][tail[r]]
        assert torch.allclose(t, t[0].expand_as(t), atol=1e-7, rtol=1e-5)


# -- ids, shapes, k edge cases, errors ---------------------------------------------------


@pytest.mark.parametrize(
    ("num_classes", "dtype"),
    [(2, "uint8"), (255, "uint8"), (256, "uint8"), (257, "uint16"), (65536, "uint16"), (65537, "uint32")],
)
def test_id_dtype_is_the_smallest_that_fits(num_classes, dtype):
    assert id_dtype_for(num_classes) == dtype
    spec = create_codec("topk", num_classes, k=1)
    assert spec.id_dtype == dtype
    assert spec.to_dict()["id_dtype"] == dtype
    # the largest class id survives the narrow dtype
    z = torch.zeros(2, num_classes)
    z[0, num_classes - 1] = 5.0
    z[1, num_classes // 2] = 5.0
    rows = encode(spec, z)
    assert rows["topk_ids"].dtype == np.dtype(dtype)
    assert rows["topk_ids"][:, 0].tolist() == [num_classes - 1, num_classes // 2]
    assert np.iinfo(np.dtype(dtype)).max >= num_classes - 1


@pytest.mark.parametrize("c", [2, 3, 10])
@pytest.mark.parametrize("k_of", [lambda c: 1, lambda c: c - 1], ids=["k=1", "k=C-1"])
def test_decode_k_one_and_c_minus_one(c, k_of):
    k = k_of(c)
    z = torch.randn(5, c, generator=torch.Generator().manual_seed(c))
    spec = create_codec("topk", c, k=k, value_dtype="float32")
    assert spec.name == "topk" and spec.k == k
    rows = encode(spec, z)
    ids = torch.from_numpy(rows["topk_ids"].astype(np.int64))
    out = _decode(spec, rows)
    assert out.shape == (5, c) and out.dtype == torch.float32
    assert torch.equal(out.gather(1, ids), z.gather(1, ids))
    tail = torch.ones_like(z, dtype=torch.bool).scatter(1, ids, False)
    fill = torch.from_numpy(rows["tail_lse"]) - math.log(c - k)
    for r in range(5):
        assert torch.equal(out[r][tail[r]], fill[r].expand(c - k))
    if k == c - 1:  # one tail class: its logit is the lse of itself
        assert torch.allclose(out, z, atol=1e-6, rtol=0)


def test_decode_shapes_and_device_dtype():
    ids = torch.tensor([[3, 0]], dtype=torch.int32)
    values = torch.tensor([[2.0, 1.0]], dtype=torch.float16)
    tail = torch.tensor([math.log(2.0)])
    out = decode(ids, values, tail, 4)
    assert out.shape == (1, 4) and out.dtype == torch.float32
    assert torch.allclose(out, torch.tensor([[1.0, 0.0, 0.0, 2.0]]))
    assert decode(ids[:0], values[:0], tail[:0], 4).shape == (0, 4)


def test_encode_rejects_a_wrong_class_count():
    spec = create_codec("topk", 10, k=3)
    for bad in (torch.zeros(2, 11), torch.zeros(2, 9), torch.zeros(10), torch.zeros(1, 2, 10)):
        with pytest.raises(ValueError, match="10"):
            encode(spec, bad)


def test_spec_validation():
    with pytest.raises(ValueError):
        CodecSpec("topk", 0, 10)
    with pytest.raises(ValueError):
        CodecSpec("topk", 11, 10)
    with pytest.raises(ValueError):
        CodecSpec("zip", 3, 10)
    with pytest.raises(ValueError):
        CodecSpec("topk", 3, 10, "bfloat16")
    with pytest.raises(ValueError):
        CodecSpec("full", 3, 10)
    assert create_codec("topk", 10, k=10) == CodecSpec("full", 10, 10)
    assert create_codec("topk", 5).k == 5  # default 10, capped at C
    spec = create_codec("topk", 1000, k=10)
    assert CodecSpec.from_dict(spec.to_dict()) == spec
    assert spec.bytes_per_view == 10 * (2 + 2) + 4
    assert CodecSpec("topk", 1, 2, "float16").relative_tolerance() == 2.0**-11
    assert CodecSpec("topk", 1, 2, "float32").relative_tolerance() == 2.0**-24


# -- KL(full || rebuilt) shrinks as k grows ----------------------------------------------


def _kl(p: torch.Tensor, q: torch.Tensor) -> float:
    p, q = p.double(), q.double()
    return float(torch.sum(torch.where(p > 0, p * (p.log() - q.log()), torch.zeros_like(p))))


@SETTINGS
@given(st.integers(2, 64), st.integers(0, 2**31 - 1), st.floats(0.5, 8.0))
def test_kl_decreases_with_k(c, seed, scale):
    """At T = 1, q_k (top-k exact, flat tail of the true mass) is the KL(p || .)-closest
    distribution that is flat on the C - k tail classes; these families grow with k, so
    KL(p || q_k) cannot increase with k, and is 0 at k = C."""
    z = torch.randn(1, c, generator=torch.Generator().manual_seed(seed)) * scale
    p = torch.softmax(z.double(), dim=1)
    kls = []
    for k in range(1, c + 1):
        spec = create_codec("topk", c, k=k, value_dtype="float32")
        rows = encode(spec, z)
        q = rebuilt_probs(torch.from_numpy(rows["topk_ids"].astype(np.int64)), torch.from_numpy(rows["topk_logits"]),
                          torch.from_numpy(rows["tail_lse"]), c, 1.0)
        kls.append(_kl(p, q))
    assert kls[-1] == pytest.approx(0.0, abs=1e-6)
    for a, b in zip(kls, kls[1:]):
        assert b <= a + 1e-6, kls


# -- a library bug: float16 overflow -------------------------------------------------------


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_float16_overflow_is_not_silent():
    spec = create_codec("topk", 4, k=2, value_dtype="float16")
    z = torch.tensor([[7.0e4, 1.0, 0.0, -1.0]])
    try:
        rows = encode(spec, z)
    except ValueError:
        return  # refusing is fine
    assert np.all(np.isfinite(rows["topk_logits"])), rows["topk_logits"]
