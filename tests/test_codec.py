"""Tests for logitcache/codecs/logits.py: the topk / full / sampled codecs, their error bounds,
exactness at T = 1, the sampled codec's draws, spec validation and (de)serialisation.

Property tests use hypothesis with ``deadline=None`` and at most 50 examples each.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from logitcache.codecs.logits import (
    GAP_RANGE,
    UNDRAWN_LOGIT,
    CodecSpec,
    ValueRangeError,
    check_serves_loss,
    create_codec,
    decode,
    encode,
    id_dtype_for,
    rebuilt_probs,
)

SETTINGS = settings(max_examples=50, deadline=None)

#: float16 rounds |x| >= 2**-14 to within half an ulp = 2**-11 |x|; below that (subnormals)
#: the absolute error is at most half the subnormal spacing, 2**-25.
F16_REL = 2.0**-11
F16_SUBNORMAL_ABS = 2.0**-25
#: float32 arithmetic slack for logits in [-60, 60] (gaps up to 120: ulp 2**-17).
FLOAT_TOL = 1e-4


@st.composite
def logit_batches(draw, min_classes=2, max_classes=40, max_batch=4, bound=60.0):
    """(logits (B, C) float32 tensor, k in [1, C]). Values may repeat (ties), be near 0,
    or sit at the bounds (so gaps past GAP_RANGE occur)."""
    c = draw(st.integers(min_classes, max_classes))
    b = draw(st.integers(1, max_batch))
    elements = st.one_of(
        st.floats(-bound, bound, allow_nan=False, width=32),
        st.sampled_from([0.0, 1.0, -1.0, 1e-6, bound, -bound, 15.9375, -0.0625]),  # ties, tiny, extremes
    )
    z = draw(arrays(np.float32, (b, c), elements=elements))
    k = draw(st.integers(1, c))
    return torch.from_numpy(z), k


def _torch(rows: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(torch.from_numpy(np.ascontiguousarray(rows[key])) for key in ("ids", "values", "tail"))


def _decode(spec: CodecSpec, rows: dict[str, np.ndarray]) -> torch.Tensor:
    return decode(spec, *_torch(rows))


def _ids(rows: dict[str, np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(rows["ids"].astype(np.int64))


def _near_half(gap_over_step: np.ndarray, slack: float) -> np.ndarray:
    """Where a gap (in codes) lies within ``slack`` codes of a rounding boundary (x.5)."""
    frac = gap_over_step - np.floor(gap_over_step)
    return np.abs(frac - 0.5) <= slack


def _chain(rounded: list[int], max_increase: int) -> list[int]:
    """The documented chained codes, straight from the formula
    ``c_j = min(min_{i <= j} (r_i + (j - i) * max_increase), 65535)``."""
    return [min(min(rounded[i] + (j - i) * max_increase for i in range(j + 1)), 65535) for j in range(len(rounded))]


def _true_topk_gaps(z: np.ndarray, k: int) -> np.ndarray:
    """(B, k + 1) float64 gaps below each row's top: the k largest logits (sorted; the same
    multiset whichever tied ids were kept), then the fill ``tail_lse - log(C - k)``."""
    z = z.astype(np.float64)
    desc = -np.sort(-z, axis=1)
    top, kept, rest = desc[:, :1], desc[:, :k], desc[:, k:]
    fill = np.logaddexp.reduce(rest, axis=1) - math.log(z.shape[1] - k)
    return np.concatenate([top - kept, top - fill[:, None]], axis=1)


# -- the quantisation error bound ------------------------------------------------------------

#: Slack, in nats, of the fill's gap: the encoder takes tail_lse as a float32 log-sum-exp
#: (logits in [-60, 60], C <= 60: a few float32 ulps of 60, well under 2e-5). Kept logits'
#: gaps are exact (float32 values subtracted in float64).
FILL_SLACK = 2e-5


#: b in [2, 16], the extremes drawn often: b = 2 clips often, b >= 14 has codes near 2**16.
GAP_BITS = st.one_of(st.sampled_from([2, 3, 8, 14, 15, 16]), st.integers(2, 16))


@SETTINGS
@given(logit_batches(min_classes=3, max_classes=60), GAP_BITS, st.data())
def test_topk_gap_error_bound(zk, bits, data):
    """``topk`` with ``gap<b>`` values (step s = GAP_RANGE / 2**b, M = 2**b - 1), per view:

    * the codes are the chained codes of the true (float64) gaps: with r_j the gap / s of
      the j-th kept logit (j = 0: the top) or of the fill (j = k), rounded half to even,
      ``c_j = min_{i <= j} (r_i + (j - i) M)`` -- exactly for kept logits, and within 1 for
      the fill where its gap / s is within float32 slack of a .5 boundary;
    * codes start at 0 and never decrease; each is min(r_j, c_{j-1} + M) (clipped there);
    * the rebuilt top is 0, kept logit j is rebuilt as -c_j s and every tail class as
      -c_k s; where no clipping happened (c_j = r_j), and wherever no earlier consecutive
      gap increase exceeds M s, the rebuilt logit relative to the top is within s / 2 of
      the truth (+ float slack).
    """
    z, _ = zk
    b, c = z.shape
    k = data.draw(st.integers(2, c - 1), label="k")
    spec = create_codec("topk", c, k=k, values=f"gap{bits}")
    assert spec.name == "topk" and spec.k == k and spec.value_bits == bits
    step, most = GAP_RANGE / 2**bits, 2**bits - 1
    assert spec.gap_step == step
    rows = encode(spec, z)
    assert rows["ids"].shape == (b, k) and rows["ids"].dtype == np.dtype(spec.id_dtype)
    assert rows["values"].shape == (b, k) and rows["values"].dtype == np.uint16
    assert rows["tail"].shape == (b,) and rows["tail"].dtype == np.uint16
    ids = _ids(rows)
    assert all(len(set(r)) == k for r in ids.tolist())
    assert torch.all(z.gather(1, ids) >= torch.topk(z, k, dim=1).values[:, -1:])  # a top-k (ties allowed)
    assert torch.all(z.gather(1, ids)[:, :-1] >= z.gather(1, ids)[:, 1:])  # by descending logit

    got = np.concatenate([rows["values"], rows["tail"][:, None]], axis=1).astype(np.int64)  # (B, k + 1)
    gaps = _true_topk_gaps(z.numpy(), k)
    assert np.all(got[:, 0] == 0)
    fill_near = _near_half(gaps[:, -1] / step, 1e-6 + FILL_SLACK / step)
    rounded = np.round(gaps / step).astype(np.int64)  # numpy rounds half to even
    for r in range(b):
        want = _chain(rounded[r].tolist(), most)
        assert got[r, :k].tolist() == want[:k], (r, got[r].tolist(), want)
        assert got[r, k] == want[k] or (fill_near[r] and abs(got[r, k] - want[k]) <= 1), (got[r].tolist(), want)
        if fill_near[r] and got[r, k] < min(got[r, k - 1] + most, 65535):  # the fill's rounding: float32 ambiguity
            rounded[r, k] = got[r, k]
        for j in range(1, k + 1):  # the recursive form of the chain: clipped at previous + M
            assert got[r, j] == min(rounded[r, j], got[r, j - 1] + most, 65535), (r, j, got[r].tolist())
    assert np.all(np.diff(got, axis=1) >= 0), got  # codes never decrease along a row
    assert np.all(np.diff(got, axis=1) <= most), got  # each increase fits b bits

    rebuilt = _decode(spec, rows)
    assert rebuilt.shape == (b, c) and rebuilt.dtype == torch.float32
    rebuilt = rebuilt.double().numpy()
    assert np.all(rebuilt.max(axis=1) == 0)
    assert np.array_equal(np.take_along_axis(rebuilt, ids.numpy(), axis=1), -got[:, :k] * step)
    tail = np.ones((b, c), bool)
    np.put_along_axis(tail, ids.numpy(), False, axis=1)
    assert np.array_equal(rebuilt[tail].reshape(b, c - k), np.repeat(-got[:, k:] * step, c - k, axis=1))

    err = np.abs(got * step - gaps)  # rebuilt vs true logit, both relative to their top
    unclipped = got == rounded
    assert np.all(err[unclipped] <= step / 2 + FLOAT_TOL), err[unclipped].max()
    increase_ok = np.cumprod(np.diff(gaps, axis=1) <= most * step + FILL_SLACK, axis=1).astype(bool)
    within = np.concatenate([np.ones((b, 1), bool), increase_ok], axis=1) & (rounded <= 65535)  # nor past the cap
    assert np.all(err[within] <= step / 2 + FLOAT_TOL), err[within].max()
    # not vacuous: on clipped entries the rebuilt gap falls short of the truth
    assert np.all(got[~unclipped] * step <= gaps[~unclipped] - step / 2 + FLOAT_TOL)


def test_topk_gap_clipping_by_hand():
    """gap2: step 4 nats, an increase holds at most 3 codes (12 nats). Gaps 0, 10, 30 and a
    fill 40 below the top: r = 0, 2 (2.5 rounds to even), 8, 10; the 10-nat drop fits (2),
    the 20-nat drop is clipped to 2 + 3 = 5, and the fill (still 10 nats on) to 5 + 3 = 8."""
    spec = create_codec("topk", 6, k=3, values="gap2")
    assert spec.gap_step == 4.0
    z = torch.tensor([[0.0, -10.0, -30.0, -40.0, -40.0, -40.0]]) + 7.0
    rows = encode(spec, z)
    assert rows["ids"].tolist() == [[0, 1, 2]]
    assert rows["values"].tolist() == [[0, 2, 5]] and rows["tail"].tolist() == [8]
    assert _decode(spec, rows).tolist() == [[0.0, -8.0, -20.0, -32.0, -32.0, -32.0]]
    # without the big drop nothing is clipped: every gap within half a step (2 nats)
    z = torch.tensor([[0.0, -10.0, -20.0, -29.0, -29.0, -29.0]])
    rows = encode(spec, z)
    assert rows["values"].tolist() == [[0, 2, 5]] and rows["tail"].tolist() == [7]  # 29 / 4 = 7.25
    assert torch.all((_decode(spec, rows) - z).abs() <= 2.0)


def test_topk_gap_ties_at_a_rounding_boundary_keep_codes_non_decreasing():
    """gap2 (step 4): the 2nd logit and the two tail classes all sit 6 nats (1.5 steps) below
    the top, so the fill equals the 2nd logit: both round half to even to code 2. The fill
    may not get a smaller code than a kept logit above it (codes never decrease), and the
    row must go through the unit layout, which stores the increases."""
    from logitcache.storage.unit_layout import pack_unit, unpack_unit

    spec = create_codec("topk", 4, k=2, values="gap2")
    rows = encode(spec, torch.tensor([[0.0, -6.0, -6.0, -6.0]]))
    assert rows["values"].tolist() == [[0, 2]]
    assert rows["tail"].tolist() == [2], rows["tail"]
    back = unpack_unit(spec, pack_unit(spec, rows), 1)
    assert back["values"].tolist() == [[0, 2]] and back["tail"].tolist() == [2]


def test_topk_gap16_codes_of_gaps_past_16_nats():
    """gap16 (step 2**-12, an increase holds up to 65535 codes, ~16 nats): a 2nd logit 20 nats
    below the top is clipped to code 65535, and so is the tail (codes are capped at 65535:
    16 nats below the top at 16 bits), rebuilt at -16 nats, not wrapped modulo 2**16."""
    from logitcache.storage.unit_layout import pack_unit, unpack_unit

    spec = create_codec("topk", 4, k=2, values="gap16")
    rows = encode(spec, torch.tensor([[0.0, -20.0, -20.0, -20.0]]))
    kept = rows["ids"][0].tolist()
    assert kept[0] == 0 and rows["values"].tolist() == [[0, 65535]]
    out = _decode(spec, rows)[0]
    assert out[0] == 0 and out[kept[1]] == -65535 * spec.gap_step
    tail = [i for i in range(4) if i not in kept]
    assert out[tail].tolist() == [-65535 * spec.gap_step] * 2, out  # capped, not wrapped modulo 2**16
    back = unpack_unit(spec, pack_unit(spec, rows), 1)
    assert torch.equal(_decode(spec, back)[0], out)


#: Slack, in nats, of a full-codec gap: the top minus a logit is taken in float32 (ulp of 120: 2**-17).
FULL_SLACK = 1e-5


@SETTINGS
@given(logit_batches(min_classes=1, max_classes=60), GAP_BITS)
def test_full_gap_error_bound(zk, bits):
    """``full`` with ``gap<b>`` values: codes in class order, each min(round(gap / s), 2**b - 1)
    of the true (float64) gap below the top (within 1 where gap / s is within float32 slack
    of a .5 boundary), not chained; rebuilt as -code * s: the top 0, every logit relative to
    it within s / 2 (+ float slack) of the truth below the clip, exactly -(2**b - 1) s past it."""
    z, _ = zk
    b, c = z.shape
    spec = create_codec("full", c, values=f"gap{bits}")
    assert spec.name == "full" and spec.k == c
    step, most = GAP_RANGE / 2**bits, 2**bits - 1
    rows = encode(spec, z)
    assert rows["ids"].shape == (b, 0) and rows["tail"].shape == (b,)
    assert rows["values"].shape == (b, c) and rows["values"].dtype == np.uint16
    got = rows["values"].astype(np.int64)
    z64 = z.double().numpy()
    gaps = z64.max(axis=1, keepdims=True) - z64
    want = np.minimum(np.round(gaps / step), most)
    near = _near_half(gaps / step, 1e-6 + FULL_SLACK / step)
    assert np.all((got == want) | (near & (np.abs(got - want) <= 1))), (got, want)
    assert np.all(got.min(axis=1) == 0) and np.all(got <= most)
    rebuilt = _decode(spec, rows)
    assert rebuilt.shape == (b, c) and rebuilt.dtype == torch.float32
    assert np.array_equal(rebuilt.double().numpy(), -got * step)
    inside = gaps < (most + 0.5) * step - FULL_SLACK
    assert np.all(np.abs(got * step - gaps)[inside] <= step / 2 + FLOAT_TOL)
    assert np.all(got[gaps > (most + 0.5) * step + FULL_SLACK] == most)


@pytest.mark.parametrize("bits", [2, 8, 16])
def test_gap_clipping_and_rounding_by_hand(bits):
    """Hand-made full-codec gaps: exactly on codes, half-way (round half to even), past the range."""
    spec = create_codec("full", 6, values=f"gap{bits}")
    s = spec.gap_step
    last = (2**bits - 1) * s
    z = torch.tensor([[10.0, 10.0 - s, 10.0 - 3 * s, 10.0 - GAP_RANGE, 10.0 - 100.0, 10.0 - 2.5 * s]])
    rows = encode(spec, z)
    assert rows["values"].dtype == np.uint16
    assert rows["values"][0].tolist() == [0, 1, 3, 2**bits - 1, 2**bits - 1, 2]
    assert _decode(spec, rows)[0].tolist() == [0.0, -s, -3 * s, -last, -last, -2 * s]


def test_error_bound_text_states_the_numbers():
    spec = create_codec("topk", 100, k=5, values="gap8")
    text = spec.error_bound()
    assert f"{spec.gap_step / 2:.4g}" in text and f"{255 * spec.gap_step:.4g}" in text
    assert "tail fill" in text and "one logit to the next" in text and "clipped" in text
    gap2 = create_codec("topk", 100, k=5, values="gap2").error_bound()
    assert f"{4.0 / 2:.4g} nats" in gap2 and f"{3 * 4.0:.4g} nats" in gap2
    full = create_codec("full", 100, values="gap8").error_bound()
    assert "tail" not in full and "from the top" in full and f"{255 / 16:.4g}" in full
    assert f"{2.0**-11:.3g}" in create_codec("topk", 100, 5, "float16").error_bound()
    assert f"{2.0**-24:.3g}" in create_codec("topk", 100, 5, "float32").error_bound()
    assert "sqrt(p (1 - p) / 32)" in create_codec("sampled", 100, 32).error_bound()


# -- float values: exactness at T = 1 ------------------------------------------------------


@SETTINGS
@given(logit_batches(min_classes=3))
def test_float32_topk_keeps_exact_values(zk):
    z, k = zk
    c = z.shape[1]
    k = min(k, c - 1)
    spec = create_codec("topk", c, k=k, values="float32")
    rows = encode(spec, z)
    assert rows["values"].dtype == np.float32 and rows["tail"].dtype == np.float32
    ids = _ids(rows)
    assert torch.equal(torch.from_numpy(rows["values"]), z.gather(1, ids))
    assert np.all(np.diff(rows["values"], axis=1) <= 0)
    assert torch.equal(_decode(spec, rows).gather(1, ids), z.gather(1, ids))


@SETTINGS
@given(logit_batches(min_classes=3, bound=30.0))
def test_rebuilt_distribution_at_t1_has_teacher_topk_and_tail_mass(zk):
    z, k = zk
    c = z.shape[1]
    k = min(k, c - 1)
    spec = create_codec("topk", c, k=k, values="float32")
    rows = encode(spec, z)
    ids = _ids(rows)
    p = torch.softmax(z, dim=1)
    q = rebuilt_probs(spec, *_torch(rows), temperature=1.0)
    assert torch.allclose(q.sum(1), torch.ones(len(z)), atol=1e-5)
    assert torch.allclose(q.gather(1, ids), p.gather(1, ids), atol=1e-5, rtol=0)
    tail = torch.ones_like(p, dtype=torch.bool).scatter(1, ids, False)
    assert torch.allclose((q * tail).sum(1), (p * tail).sum(1), atol=1e-5, rtol=0)
    for r in range(len(z)):  # the tail is flat
        t = q[r][tail[r]]
        assert torch.allclose(t, t[0].expand_as(t), atol=1e-7, rtol=1e-5)


@SETTINGS
@given(logit_batches(min_classes=3))
def test_float16_topk_within_rounding_bound(zk):
    """Kept logits are within 2**-11 |z| (+ 2**-25 for subnormals) of the truth; so every
    rebuilt log-probability at T = 1 is within 2 * max error of the teacher's (the tail
    fill is exact in float32, and the log-sum-exp moves by at most the max error)."""
    z, k = zk
    b, c = z.shape
    k = min(k, c - 1)
    spec = create_codec("topk", c, k=k, values="float16")
    rows = encode(spec, z)
    assert rows["values"].shape == (b, k) and rows["values"].dtype == np.float16
    assert rows["tail"].shape == (b,) and rows["tail"].dtype == np.float32
    ids = _ids(rows)
    stored = torch.from_numpy(rows["values"].astype(np.float32))
    true = z.gather(1, ids)
    err_bound = F16_REL * true.abs() + F16_SUBNORMAL_ABS
    assert torch.all((stored - true).abs() <= err_bound)
    rebuilt = _decode(spec, rows)
    assert torch.equal(rebuilt.gather(1, ids), stored)
    delta = err_bound.max(dim=1, keepdim=True).values.double()
    logq = torch.log_softmax(rebuilt.double(), dim=1)
    logp = torch.log_softmax(z.double(), dim=1)
    assert torch.all((logq - logp).gather(1, ids).abs() <= 2 * delta + 1e-5)
    # the tail's total mass: log-sum-exp of the fill over C - k classes is tail_lse
    tail = torch.ones_like(z, dtype=torch.bool).scatter(1, ids, False)
    mass_q = torch.logsumexp(logq.masked_fill(~tail, -math.inf), dim=1)
    mass_p = torch.logsumexp(logp.masked_fill(~tail, -math.inf), dim=1)
    assert torch.all((mass_q - mass_p).abs() <= delta[:, 0] + 1e-5)


@SETTINGS
@given(logit_batches(min_classes=1))
def test_float32_full_codec_is_exact(zk):
    z, _ = zk
    b, c = z.shape
    spec = create_codec("full", c, values="float32")
    assert spec.k == c and spec.name == "full"
    rows = encode(spec, z)
    assert rows["ids"].shape == (b, 0) and rows["tail"].shape == (b,)
    assert np.array_equal(rows["values"], z.numpy())
    rebuilt = _decode(spec, rows)
    assert torch.equal(rebuilt, z)
    assert torch.equal(torch.softmax(rebuilt, dim=1), torch.softmax(z, dim=1))


@pytest.mark.parametrize("values", ["float16", "float32"])
@pytest.mark.parametrize("name", ["topk", "full"])
def test_float16_overflow_is_refused(name, values):
    spec = create_codec(name, 4, k=2, values=values)
    z = torch.tensor([[7.0e4, 1.0, 0.0, -1.0]])
    if values == "float16":
        with pytest.raises(ValueRangeError, match="float16"):
            encode(spec, z)
    else:
        assert np.all(np.isfinite(encode(spec, z)["values"]))


# -- ids, shapes, k edge cases, errors -------------------------------------------------------


@pytest.mark.parametrize(
    ("num_classes", "dtype", "bits"),
    [(2, "uint8", 1), (255, "uint8", 8), (256, "uint8", 8), (257, "uint16", 9), (65536, "uint16", 16),
     (65537, "uint32", 17)],
)
def test_id_dtype_is_the_smallest_that_fits(num_classes, dtype, bits):
    assert id_dtype_for(num_classes) == dtype
    spec = create_codec("topk", num_classes, k=1)
    assert spec.id_dtype == dtype and spec.id_bits == bits
    assert spec.to_dict()["id_bits"] == bits
    z = torch.zeros(2, num_classes)
    z[0, num_classes - 1] = 5.0
    z[1, num_classes // 2] = 5.0
    rows = encode(spec, z)
    assert rows["ids"].dtype == np.dtype(dtype)
    assert rows["ids"][:, 0].tolist() == [num_classes - 1, num_classes // 2]
    rebuilt = _decode(spec, rows)
    assert rebuilt[0, num_classes - 1] == 0 and rebuilt[1, num_classes // 2] == 0


@pytest.mark.parametrize("values", ["float32", "gap8"])
@pytest.mark.parametrize("c", [2, 3, 10])
@pytest.mark.parametrize("k_of", [lambda c: 1, lambda c: c - 1], ids=["k=1", "k=C-1"])
def test_decode_k_one_and_c_minus_one(c, k_of, values):
    k = k_of(c)
    z = torch.randn(5, c, generator=torch.Generator().manual_seed(c))
    spec = create_codec("topk", c, k=k, values=values)
    assert spec.name == "topk" and spec.k == k
    rows = encode(spec, z)
    ids = _ids(rows)
    out = _decode(spec, rows)
    assert out.shape == (5, c) and out.dtype == torch.float32
    tail = torch.ones_like(z, dtype=torch.bool).scatter(1, ids, False)
    if values == "float32":
        assert torch.equal(out.gather(1, ids), z.gather(1, ids))
        fill = torch.from_numpy(rows["tail"]) - math.log(c - k)
    else:
        fill = -torch.from_numpy(rows["tail"].astype(np.float32)) * spec.gap_step  # the fill's gap code
    for r in range(5):
        assert torch.equal(out[r][tail[r]], fill[r].expand(c - k))
    if k == c - 1:  # one tail class: its fill is its own logit
        ref = z if values == "float32" else z - z.max(dim=1, keepdim=True).values
        tol = 1e-6 if values == "float32" else spec.gap_step / 2 + 1e-5
        assert torch.allclose(out, ref, atol=tol, rtol=0)


def test_decode_by_hand():
    ids = torch.tensor([[3, 0]], dtype=torch.int32)
    # float16 values; tail_lse = log 2 over two tail classes -> fill 0
    spec = CodecSpec("topk", 2, 4, "float16")
    out = decode(spec, ids, torch.tensor([[2.0, 1.0]], dtype=torch.float16), torch.tensor([math.log(2.0)]))
    assert out.shape == (1, 4) and out.dtype == torch.float32
    assert torch.allclose(out, torch.tensor([[1.0, 0.0, 0.0, 2.0]]))
    # gap8 (step 1/16): codes 0, 16 -> 0, -1; the fill's code 40 (same step) -> -2.5
    spec = CodecSpec("topk", 2, 4, "gap8")
    out = decode(spec, ids, torch.tensor([[0, 16]], dtype=torch.uint16), torch.tensor([40], dtype=torch.uint16))
    assert out.tolist() == [[-1.0, -2.5, -2.5, 0.0]]
    # codes past 2**b - 1 (chained increases) decode as they are: gap2 (step 4) code 7 -> -28
    spec = CodecSpec("topk", 2, 4, "gap2")
    out = decode(spec, ids, torch.tensor([[0, 3]], dtype=torch.uint16), torch.tensor([7], dtype=torch.uint16))
    assert out.tolist() == [[-12.0, -28.0, -28.0, 0.0]]
    assert decode(spec, ids[:0], torch.zeros(0, 2, dtype=torch.uint16), torch.zeros(0, dtype=torch.uint16)).shape \
        == (0, 4)


@pytest.mark.parametrize("spec", [CodecSpec("topk", 3, 10), CodecSpec("full", 10, 10, "float32"),
                                  CodecSpec("sampled", 8, 10)], ids=lambda s: s.name)
def test_encode_rejects_a_wrong_class_count(spec):
    for bad in (torch.zeros(2, 11), torch.zeros(2, 9), torch.zeros(10), torch.zeros(1, 2, 10)):
        with pytest.raises(ValueError, match="10"):
            encode(spec, bad, seeds=np.zeros(2, np.uint64))


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
        spec = create_codec("topk", c, k=k, values="float32")
        rows = encode(spec, z)
        kls.append(_kl(p, rebuilt_probs(spec, *_torch(rows))))
    assert kls[-1] == pytest.approx(0.0, abs=1e-6)
    for a, b in zip(kls, kls[1:]):
        assert b <= a + 1e-6, kls


# -- the sampled codec ------------------------------------------------------------------------


def _dense_counts(spec: CodecSpec, rows: dict[str, np.ndarray]) -> np.ndarray:
    b = len(rows["ids"])
    out = np.zeros((b, spec.num_classes), np.int64)
    rr = np.repeat(np.arange(b), rows["ids"].shape[1])
    np.add.at(out, (rr, rows["ids"].reshape(-1).astype(np.int64)), rows["values"].reshape(-1).astype(np.int64))
    return out


def _seeds(rng: np.random.Generator, b: int) -> np.ndarray:
    return rng.integers(0, 2**64 - 1, size=b, dtype=np.uint64, endpoint=True)


@SETTINGS
@given(logit_batches(max_classes=40, bound=20.0), st.one_of(st.sampled_from([1, 7, 32, 255, 256, 300]),
                                                            st.integers(1, 400)), st.integers(0, 2**32 - 1))
def test_sampled_rows(zk, n, seed):
    z, _ = zk
    b, c = z.shape
    spec = create_codec("sampled", c, k=n)
    assert spec.name == "sampled" and spec.k == n and spec.values == "counts"
    rows = encode(spec, z, seeds=_seeds(np.random.default_rng(seed), b))
    ids, counts = rows["ids"], rows["values"]
    assert ids.shape == counts.shape == (b, n) and rows["tail"].shape == (b,)
    assert ids.dtype == np.dtype(spec.id_dtype) and counts.dtype == (np.uint8 if n < 256 else np.uint16)
    assert np.all(counts.sum(axis=1, dtype=np.int64) == n)
    present = counts > 0
    u = present.sum(axis=1)
    assert np.array_equal(present, np.arange(n)[None, :] < u[:, None])  # drawn ids first, then padding
    assert np.all(ids[~present] == 0)
    for r in range(b):
        drawn = ids[r, : u[r]].astype(np.int64)
        assert np.all(np.diff(drawn) > 0)  # ascending, distinct
        assert np.all(drawn < c)
    # decode: log(count / N) on drawn classes, UNDRAWN_LOGIT elsewhere; softmax = counts / N
    dense = _dense_counts(spec, rows)
    out = _decode(spec, rows)
    assert out.shape == (b, c) and out.dtype == torch.float32
    expected = torch.where(torch.from_numpy(dense) > 0, torch.log(torch.from_numpy(dense).float() / n),
                           torch.full((b, c), UNDRAWN_LOGIT))
    assert torch.allclose(out, expected, atol=1e-6, rtol=0)
    q = rebuilt_probs(spec, *_torch(rows), temperature=1.0)
    assert torch.allclose(q, torch.from_numpy(dense / n).float(), atol=1e-6, rtol=0)
    assert torch.all(q[torch.from_numpy(dense) == 0] == 0)


@SETTINGS
@given(st.integers(2, 50), st.sampled_from([1, 7, 32, 300]), st.integers(0, 2**32 - 1), st.floats(0.1, 5.0))
def test_sampled_draws_do_not_depend_on_batching(c, n, seed, scale):
    rng = np.random.default_rng(seed)
    z = torch.from_numpy(rng.standard_normal((10, c)).astype(np.float32) * scale)
    seeds = _seeds(rng, 10)
    spec = create_codec("sampled", c, k=n)
    whole = encode(spec, z, seeds=seeds)
    cut = int(rng.integers(1, 10))
    parts = [encode(spec, z[:cut], seeds=seeds[:cut]), encode(spec, z[cut:], seeds=seeds[cut:])]
    single = [encode(spec, z[i : i + 1], seeds=seeds[i : i + 1]) for i in (0, 9)]
    for key in ("ids", "values"):
        assert np.array_equal(whole[key], np.concatenate([p[key] for p in parts]))
        assert np.array_equal(whole[key][[0, 9]], np.concatenate([s[key] for s in single]))
    # the same seed on the same logits, in another row, gives the same draws
    again = encode(spec, z[[3, 3]], seeds=seeds[[3, 3]])
    assert np.array_equal(again["ids"][0], whole["ids"][3]) and np.array_equal(again["ids"][1], whole["ids"][3])


def test_sampled_different_seeds_draw_differently():
    spec = create_codec("sampled", 20, k=32)
    z = torch.zeros(10, 20)  # uniform: 32 draws over 20 classes
    rows = encode(spec, z, seeds=np.arange(10, dtype=np.uint64))
    distinct = {tuple(map(tuple, np.stack([rows["ids"][r], rows["values"][r]]))) for r in range(10)}
    assert len(distinct) == 10
    assert not np.array_equal(encode(spec, z[:1], seeds=np.array([11], np.uint64))["values"], rows["values"][:1])


def test_sampled_is_unbiased():
    """E[counts / N] = softmax(z): over S seeds the mean is within 5 standard errors,
    sqrt(p (1 - p) / (N S)), of the teacher's probabilities, for every class."""
    c, n, s = 20, 8, 20_000
    z = torch.randn(1, c, generator=torch.Generator().manual_seed(0)) * 1.5
    z[0, 7] = z[0, 3]  # a tie
    p = torch.softmax(z.double(), dim=1)[0].numpy()
    spec = create_codec("sampled", c, k=n)
    rows = encode(spec, z.expand(s, c), seeds=np.arange(1, s + 1, dtype=np.uint64) * np.uint64(7919))
    mean = (_dense_counts(spec, rows) / n).mean(axis=0)
    se = np.sqrt(p * (1 - p) / (n * s))
    assert np.all(np.abs(mean - p) <= 5 * se + 1e-9), (mean - p) / se
    # not trivially so: the empirical frequencies are not exactly p
    assert np.abs(mean - p).max() > 0


def test_sampled_draws_track_a_point_mass_and_skip_impossible_classes():
    spec = create_codec("sampled", 6, k=50)
    z = torch.tensor([[0.0, 0.0, -math.inf, 0.0, -math.inf, -math.inf], [-1e4, -1e4, -1e4, -1e4, -1e4, 30.0]])
    rows = encode(spec, z, seeds=np.array([5, 6], np.uint64))
    dense = _dense_counts(spec, rows)
    assert dense[0, [2, 4, 5]].tolist() == [0, 0, 0] and dense[0].sum() == 50
    assert dense[1].tolist() == [0, 0, 0, 0, 0, 50]


def test_sampled_temperature_and_losses():
    spec = create_codec("sampled", 10, k=16)
    rows = encode(spec, torch.randn(3, 10), seeds=np.arange(3, dtype=np.uint64))
    rebuilt_probs(spec, *_torch(rows), temperature=1.0)
    with pytest.raises(ValueError, match="T = 1"):
        rebuilt_probs(spec, *_torch(rows), temperature=2.0)
    check_serves_loss(spec, "kd", 1.0)
    check_serves_loss(spec, "none", 4.0)
    check_serves_loss(spec, "ce", 4.0)
    with pytest.raises(ValueError, match="cannot serve dkd"):
        check_serves_loss(spec, "dkd", 1.0)
    with pytest.raises(ValueError, match="cannot serve dist"):
        check_serves_loss(spec, "dist", 1.0)
    with pytest.raises(ValueError, match="T = 1 only, not T = 4"):
        check_serves_loss(spec, "kd", 4.0)
    with pytest.raises(ValueError, match="MKD"):
        check_serves_loss(spec, "kd", 1.0, learns_temperature=True)
    for topk in (create_codec("topk", 10, k=3), create_codec("full", 10, values="float16")):
        rebuilt_probs(topk, *_torch(encode(topk, torch.randn(2, 10))), temperature=4.0)
        for kind in ("kd", "dkd", "dist", "none", "ce"):
            for t in (1.0, 4.0):
                check_serves_loss(topk, kind, t)
                check_serves_loss(topk, kind, t, learns_temperature=True)


def test_sampled_needs_one_seed_per_row():
    spec = create_codec("sampled", 10, k=4)
    for seeds in (None, np.zeros(2, np.uint64)):
        with pytest.raises(ValueError, match="seed"):
            encode(spec, torch.zeros(3, 10), seeds=seeds)


# -- specs ----------------------------------------------------------------------------------


def test_spec_validation_messages():
    with pytest.raises(ValueError, match="unknown codec 'zip'"):
        CodecSpec("zip", 3, 10)
    with pytest.raises(ValueError, match="unknown codec 'zip'"):
        create_codec("zip", 1000)
    with pytest.raises(ValueError, match="unknown codec 'zip'"):  # also where the default k = 10 >= C
        create_codec("zip", 10)
    for bad in ("gap1", "gap17", "gap0", "gap", "gapx", "int8", "bfloat16", "GAP8"):
        with pytest.raises(ValueError, match="values must be float16, float32 or gap<bits>"):
            CodecSpec("topk", 3, 10, bad)
        with pytest.raises(ValueError, match=f"not {bad!r}"):
            create_codec("full", 10, values=bad)
    for k in (0, 11, -1):
        with pytest.raises(ValueError, match=rf"k must be in \[1, 10\].*not {k}"):
            CodecSpec("topk", k, 10)
    with pytest.raises(ValueError, match="k must be in"):
        create_codec("topk", 10, k=-1)
    with pytest.raises(ValueError, match="full codec keeps k = num_classes"):
        CodecSpec("full", 3, 10)
    for n in (0, 65536):
        with pytest.raises(ValueError, match=r"draws per view must be in \[1, 65535\]"):
            CodecSpec("sampled", n, 10)
    with pytest.raises(ValueError, match="draws per view"):
        create_codec("sampled", 10, k=70000)


def test_create_codec_defaults():
    assert create_codec("topk", 1000) == CodecSpec("topk", 10, 1000, "gap8")
    assert create_codec("topk", 11) == CodecSpec("topk", 10, 11, "gap8")
    assert create_codec("topk", 10) == CodecSpec("full", 10, 10)  # default k = 10 >= C: full
    assert create_codec("topk", 4, values="float16") == CodecSpec("full", 4, 4, "float16")
    assert create_codec("topk", 10, k=10) == CodecSpec("full", 10, 10)
    assert create_codec("topk", 10, k=50, values="float32") == CodecSpec("full", 10, 10, "float32")
    assert create_codec("full", 7, values="gap4") == CodecSpec("full", 7, 7, "gap4")
    assert create_codec("sampled", 100) == CodecSpec("sampled", 32, 100)
    assert create_codec("sampled", 100, k=5, values="float16").values == "counts"
    assert create_codec("sampled", 10, k=300).k == 300  # draws are not capped by C


@pytest.mark.parametrize("name", ["topk", "sampled"])
def test_create_codec_refuses_k_zero(name):
    with pytest.raises(ValueError, match="k must be in|draws per view"):
        create_codec(name, 20, k=0)


@pytest.mark.parametrize("values", ["gap8", "float32"])
def test_topk_with_k_equal_c_is_refused(values):
    with pytest.raises(ValueError, match="use the full codec"):
        CodecSpec("topk", 4, 4, values)
    with pytest.raises(ValueError, match="use the full codec"):
        CodecSpec.from_dict({"name": "topk", "k": 4, "num_classes": 4, "values": values})
    assert CodecSpec("topk", 3, 4, values).k == 3


ALL_SPECS = [create_codec("topk", 1000, k=10), create_codec("topk", 100, k=5, values="gap2"),
             create_codec("topk", 100, k=5, values="gap16"), create_codec("topk", 300, k=7, values="float16"),
             create_codec("topk", 8, k=3, values="float32"), create_codec("full", 10), create_codec("full", 10,
                                                                                                   values="float32"),
             create_codec("sampled", 1000, k=32), create_codec("sampled", 10, k=300)]


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: f"{s.name}-{s.k}-{s.values}")
def test_to_dict_from_dict_round_trip(spec):
    d = spec.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert CodecSpec.from_dict(d) == spec
    assert CodecSpec.from_dict(json.loads(json.dumps(d))) == spec
    assert d["id_bits"] == spec.id_bits and d["values"] == spec.values
    if spec.quantised:
        assert d["gap_step"] == GAP_RANGE / 2**spec.value_bits
    else:
        assert "gap_step" not in d
    assert "tail_step" not in d


def test_from_dict_accepts_the_old_format():
    old = {"name": "topk", "k": 3, "num_classes": 8, "value_dtype": "float16", "id_dtype": "uint8"}
    assert CodecSpec.from_dict(old) == CodecSpec("topk", 3, 8, "float16")
    assert CodecSpec.from_dict({**old, "value_dtype": "float32"}).values == "float32"
    assert CodecSpec.from_dict({"name": "full", "k": 8, "num_classes": 8, "value_dtype": "float32",
                                "id_dtype": "uint8"}) == CodecSpec("full", 8, 8, "float32")
    assert not CodecSpec.from_dict(old).quantised


def test_payload_bits_per_view():
    # topk gap: k ids and k code increases (k - 1 kept gaps and the fill), no separate tail
    assert create_codec("topk", 1000, k=10, values="gap8").payload_bits_per_view == 10 * 10 + 10 * 8 == 180
    assert create_codec("topk", 1000, k=10, values="gap2").payload_bits_per_view == 100 + 10 * 2
    assert create_codec("topk", 300, k=3, values="gap16").payload_bits_per_view == 3 * 9 + 3 * 16
    assert create_codec("topk", 1000, k=10, values="float16").payload_bits_per_view == 100 + 160 + 32
    assert create_codec("topk", 1000, k=10, values="float32").payload_bits_per_view == 100 + 320 + 32
    assert create_codec("full", 1000, values="gap8").payload_bits_per_view == 8000
    assert create_codec("full", 1000, values="float32").payload_bits_per_view == 32000
    assert create_codec("sampled", 1000, k=32).payload_bits_per_view is None
