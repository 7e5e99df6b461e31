"""Tests for logitcache/codecs/features.py: the teacher-feature codec (PCA basis or full; int8,
float16 or float32), its error bounds, the basis fit, spec parsing and (de)serialisation.

Property tests use hypothesis with ``deadline=None`` and at most 50 examples each; the data of
an example is drawn by a numpy generator seeded by hypothesis (fast, still shrinkable).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from logitcache.codecs.features import (
    DEFAULT_RANK,
    FEATURE_DTYPES,
    FeatureBasis,
    FeatureSpec,
    create_feature_spec,
    decode_features,
    encode_features,
    fit_basis,
    project,
    quantisation_bound,
    reconstruction_quality,
)

SETTINGS = settings(max_examples=50, deadline=None)
#: Row scales of test features: all-zero rows, tiny, unit and large magnitudes.
ROW_SCALES = [0.0, 1e-3, 1.0, 30.0, 1e3]


def _features(rng: np.random.Generator, n: int, d: int, scales=ROW_SCALES) -> np.ndarray:
    """(n, d) float32: Gaussian rows, each times a scale drawn from ``scales``, plus an offset."""
    x = rng.standard_normal((n, d)) * rng.choice(scales, size=(n, 1))
    return (x + rng.standard_normal(d) * rng.choice(scales)).astype(np.float32)


def _fit_random_basis(rng: np.random.Generator, d: int, r: int) -> FeatureBasis:
    """A basis fitted on (r + 3, d) random data with decaying variance along the axes."""
    x = rng.standard_normal((r + 3, d)) * np.geomspace(10.0, 0.01, d) + rng.standard_normal(d)
    return fit_basis(x.astype(np.float32), r)


def _round_trip(spec: FeatureSpec, basis: FeatureBasis | None, f: torch.Tensor):
    """(decoded (B, D), stored arrays as tensors)."""
    enc = encode_features(spec, basis, f)
    feat = torch.from_numpy(enc["feat"])
    scale = torch.from_numpy(enc["feat_scale"]) if "feat_scale" in enc else None
    basis_t = None if basis is None else basis.to_torch("cpu")
    return decode_features(spec, basis_t, feat, scale), feat, scale


@st.composite
def cases(draw, dtypes=FEATURE_DTYPES, full=None):
    """(spec, basis or None, features (B, D) float32 tensor)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    d = draw(st.integers(4, 64))
    b = draw(st.integers(1, 6))
    use_basis = draw(st.booleans()) if full is None else not full
    r = draw(st.integers(1, d)) if use_basis else None
    spec = FeatureSpec(d, r, draw(st.sampled_from(dtypes)))
    basis = _fit_random_basis(rng, d, r) if use_basis else None
    return spec, basis, torch.from_numpy(_features(rng, b, d))


def _tolerance(basis: FeatureBasis | None, f: torch.Tensor) -> torch.Tensor:
    """float32 arithmetic slack per view: 1e-4 x (||f|| + ||mean||) + 1e-6."""
    mean = 0.0 if basis is None else float(np.linalg.norm(basis.mean))
    return 1e-4 * (f.double().norm(dim=1) + mean) + 1e-6


# -- round trips ------------------------------------------------------------------------------


@SETTINGS
@given(cases(dtypes=("int8",)))
def test_int8_round_trip_within_bound(case):
    spec, basis, f = case
    decoded, feat, scale = _round_trip(spec, basis, f)
    assert decoded.shape == f.shape and decoded.dtype == torch.float32
    assert feat.dtype == torch.int8 and feat.shape == (f.shape[0], spec.width) and feat.abs().max() <= 127
    assert scale.dtype == torch.float32 and scale.shape == (f.shape[0],)
    err = (decoded.double() - project(basis, f).double()).norm(dim=1)
    bound = quantisation_bound(spec, scale).double()
    assert (err <= bound + _tolerance(basis, f)).all(), (err, bound)
    zero_rows = (f - (0 if basis is None else torch.from_numpy(basis.mean))).abs().amax(dim=1) == 0
    assert (scale[zero_rows] == 0).all() and (feat[zero_rows] == 0).all()


@SETTINGS
@given(cases(dtypes=("float32",), full=True))
def test_float32_full_round_trip_is_exact(case):
    spec, basis, f = case
    decoded, feat, _ = _round_trip(spec, basis, f)
    assert feat.dtype == torch.float32
    assert torch.equal(decoded, f)
    assert (quantisation_bound(spec, None, feat) <= 1e-6 * f.norm(dim=1) + 1e-30).all()


@SETTINGS
@given(cases(dtypes=("float16", "float32")))
def test_float_round_trip_within_bound(case):
    spec, basis, f = case
    decoded, feat, _ = _round_trip(spec, basis, f)
    err = (decoded.double() - project(basis, f).double()).norm(dim=1)
    bound = quantisation_bound(spec, None, feat).double()
    slack = 1e-12 * bound if basis is None else _tolerance(basis, f)  # full: no arithmetic, the bound alone
    assert (err <= bound + slack).all(), (err, bound)


def test_float16_full_bound_is_tight_enough():
    """The float16 bound is not vacuous: about 2^-11 of the norm."""
    f = torch.randn(8, 32) * 100
    spec = create_feature_spec(32, "full")
    _, feat, _ = _round_trip(spec, None, f)
    bound = quantisation_bound(spec, None, feat)
    assert (bound <= 2.0**-10 * f.norm(dim=1)).all()


def test_float16_overflow_raises():
    spec = create_feature_spec(4, "full", "float16")
    with pytest.raises(ValueError, match="range of float16"):
        encode_features(spec, None, torch.tensor([[1e5, 0.0, 0.0, 0.0]]))


def test_encode_accepts_other_float_dtypes():
    f = torch.randn(3, 8, dtype=torch.float64)
    for dt in (torch.float64, torch.bfloat16, torch.float16):
        enc = encode_features(create_feature_spec(8, "full", "float32"), None, f.to(dt))
        assert enc["feat"].dtype == np.float32
        np.testing.assert_array_equal(enc["feat"], f.to(dt).float().numpy())


# -- fit_basis --------------------------------------------------------------------------------


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(2, 40), st.data())
def test_fit_basis_orthonormal_and_explained(seed, d, data):
    rng = np.random.default_rng(seed)
    r = data.draw(st.integers(1, d))
    n = data.draw(st.integers(max(2, r), 3 * d))
    basis = fit_basis(_features(rng, n, d, scales=[1.0, 30.0]), r)
    c = basis.components.astype(np.float64)
    assert basis.mean.dtype == np.float32 and basis.components.dtype == np.float32
    assert basis.components.shape == (r, d) and basis.mean.shape == (d,)
    np.testing.assert_allclose(c @ c.T, np.eye(r), atol=1e-5)
    assert 0.0 <= basis.explained <= 1.0
    peaks = c[np.arange(r), np.abs(c).argmax(axis=1)]
    assert (peaks > 0).all()  # deterministic signs


def test_full_rank_basis_is_identity():
    rng = np.random.default_rng(0)
    x = _features(rng, 50, 16, scales=[1.0])
    basis = fit_basis(x, 16)
    assert basis.explained == pytest.approx(1.0)
    f = torch.from_numpy(x[:5])
    torch.testing.assert_close(project(basis, f), f, atol=1e-4, rtol=0)


def test_explained_grows_with_rank():
    x = _features(np.random.default_rng(1), 80, 20, scales=[1.0])
    ex = [fit_basis(x, r).explained for r in range(1, 21)]
    assert all(a <= b + 1e-12 for a, b in zip(ex, ex[1:])) and 0 < ex[0] < 1


@pytest.mark.parametrize("k", [1, 3, 7])
def test_subspace_data_is_reconstructed(k):
    rng = np.random.default_rng(k)
    d = 48
    directions = np.linalg.qr(rng.standard_normal((d, k)))[0].T  # (k, d) orthonormal
    mean = rng.standard_normal(d) * 5
    x = (rng.standard_normal((200, k)) * 10 @ directions + mean).astype(np.float32)
    basis = fit_basis(x, k)
    assert basis.explained > 0.9999
    f = torch.from_numpy(x[:20])
    for dtype in ("float32", "int8"):
        decoded, _, _ = _round_trip(FeatureSpec(d, k, dtype), basis, f)
        q = reconstruction_quality(f, decoded)
        assert q["cosine"] > 0.9999, (dtype, q)
    assert reconstruction_quality(f, project(basis, f))["rel_l2"] < 1e-4


def test_fit_basis_deterministic_and_digest():
    x = _features(np.random.default_rng(2), 30, 12, scales=[1.0, 30.0])
    a, b = fit_basis(x, 5), fit_basis(x.copy(), 5)
    assert a.mean.tobytes() == b.mean.tobytes() and a.components.tobytes() == b.components.tobytes()
    assert a.digest() == b.digest() and len(a.digest()) == 64
    assert fit_basis(torch.from_numpy(x), 5).digest() == a.digest()  # tensors accepted
    y = x.copy()
    y[3, 4] += 1.0
    assert fit_basis(y, 5).digest() != a.digest()
    assert fit_basis(x, 4).digest() != a.digest()
    mean, comps = a.to_torch("cpu")
    assert mean.dtype == comps.dtype == torch.float32 and comps.shape == (5, 12)


def test_fit_basis_errors():
    x = np.random.default_rng(3).standard_normal((6, 10)).astype(np.float32)
    with pytest.raises(ValueError, match=r"at least r views.*6 views for r = 8"):
        fit_basis(x, 8)
    with pytest.raises(ValueError, match="at least 2"):
        fit_basis(x[:1], 1)
    bad = x.copy()
    bad[2, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        fit_basis(bad, 3)
    bad[2, 2] = np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        fit_basis(bad, 3)
    with pytest.raises(ValueError, match="rank"):
        fit_basis(x, 11)


# -- spec -------------------------------------------------------------------------------------


def test_spec_json_round_trip_and_label():
    for spec in (FeatureSpec(1024, 256, "int8"), FeatureSpec(2048, None, "float16"), FeatureSpec(8, 8, "float32")):
        assert FeatureSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    assert FeatureSpec(1024, 256, "int8").label == "pca256/int8"
    assert FeatureSpec(2048, None, "float16").label == "full/float16"
    assert FeatureSpec(1024, 256, "int8").width == 256 and FeatureSpec(2048, None, "float16").width == 2048


def test_create_feature_spec_parsing():
    assert create_feature_spec(1024) == FeatureSpec(1024, DEFAULT_RANK, "int8")
    assert create_feature_spec(1024, "256") == FeatureSpec(1024, 256, "int8")
    assert create_feature_spec(1024, 64, "float16") == FeatureSpec(1024, 64, "float16")
    assert create_feature_spec(2048, "full") == FeatureSpec(2048, None, "float16")
    assert create_feature_spec(2048, "full", "int8") == FeatureSpec(2048, None, "int8")
    assert create_feature_spec(128, 256) == FeatureSpec(128, None, "float16")  # r >= D: full
    assert create_feature_spec(128, "128") == FeatureSpec(128, None, "float16")


@pytest.mark.parametrize("dims, dtype, match", [
    ("abc", None, "'full' or a positive integer"), (0, None, "positive integer"), (-3, None, "positive integer"),
    ("-3", None, "positive integer"), ("", None, "positive integer"), (True, None, "positive integer"),
    (2.5, None, "positive integer"), (16, "int4", "dtype must be one of"), ("full", "bf16", "dtype must be one of"),
])
def test_create_feature_spec_errors(dims, dtype, match):
    with pytest.raises(ValueError, match=match):
        create_feature_spec(64, dims, dtype)


@pytest.mark.parametrize("dim, rank, dtype, match", [
    (0, None, "int8", "dim"), (8, 0, "int8", "rank"), (8, 9, "int8", r"rank.*\[1, 8\]"), (8, 4, "uint8", "dtype"),
])
def test_spec_validation(dim, rank, dtype, match):
    with pytest.raises(ValueError, match=match):
        FeatureSpec(dim, rank, dtype)


def test_stored_arrays():
    assert FeatureSpec(1024, 256, "int8").stored_arrays() == {"feat": ("int8", 256), "feat_scale": ("float32", None)}
    assert FeatureSpec(2048, None, "float16").stored_arrays() == {"feat": ("float16", 2048)}
    assert FeatureSpec(64, 8, "float32").stored_arrays() == {"feat": ("float32", 8)}
    spec = FeatureSpec(16, 4, "int8")
    enc = encode_features(spec, _fit_random_basis(np.random.default_rng(4), 16, 4), torch.randn(3, 16))
    assert {k: (str(v.dtype), v.shape[1] if v.ndim == 2 else None) for k, v in enc.items()} == spec.stored_arrays()
    # bytes before compression = the encoded arrays' bytes per view
    cases = ((spec, _fit_random_basis(np.random.default_rng(4), 16, 4)), (FeatureSpec(16, None, "float16"), None),
             (FeatureSpec(16, None, "float32"), None))
    for spec, basis in cases:
        enc = encode_features(spec, basis, torch.randn(3, 16))
        assert spec.raw_bytes_per_view == sum(v.nbytes for v in enc.values()) // 3


# -- errors -----------------------------------------------------------------------------------


def test_encode_errors():
    basis = _fit_random_basis(np.random.default_rng(5), 8, 3)
    spec, full = FeatureSpec(8, 3, "int8"), FeatureSpec(8, None, "int8")
    f = torch.randn(2, 8)
    for bad in (float("nan"), float("inf")):
        g = f.clone()
        g[1, 2] = bad
        with pytest.raises(ValueError, match="NaN or inf"):
            encode_features(spec, basis, g)
    with pytest.raises(ValueError, match=r"shape \(B, 8\)"):
        encode_features(spec, basis, torch.randn(2, 9))
    with pytest.raises(ValueError, match=r"shape \(B, 8\)"):
        encode_features(spec, basis, torch.randn(8))
    with pytest.raises(ValueError, match="needs basis"):
        encode_features(spec, None, f)
    with pytest.raises(ValueError, match="takes no basis"):
        encode_features(full, basis, f)
    with pytest.raises(ValueError, match=r"\(4, 8\)"):
        encode_features(FeatureSpec(8, 4, "int8"), basis, f)


def test_decode_errors():
    spec = FeatureSpec(8, None, "int8")
    with pytest.raises(ValueError, match="feat_scale"):
        decode_features(spec, None, torch.zeros(2, 8, dtype=torch.int8), None)
    with pytest.raises(ValueError, match=r"shape \(B, 8\)"):
        decode_features(spec, None, torch.zeros(2, 7, dtype=torch.int8), torch.ones(2))
    with pytest.raises(ValueError, match="needs basis"):
        decode_features(FeatureSpec(8, 2, "int8"), None, torch.zeros(2, 2, dtype=torch.int8), torch.ones(2))
    with pytest.raises(ValueError, match="needs the stored feat"):
        quantisation_bound(FeatureSpec(8, None, "float16"), None)


# -- reconstruction_quality -------------------------------------------------------------------


def test_reconstruction_quality():
    t = torch.randn(5, 16)
    q = reconstruction_quality(t, t.clone())
    assert q["cosine"] == pytest.approx(1.0) and q["rel_l2"] == 0.0
    q = reconstruction_quality(t, -t)
    assert q["cosine"] == pytest.approx(-1.0) and q["rel_l2"] == pytest.approx(2.0)
    q = reconstruction_quality(t, 1.1 * t)
    assert q["cosine"] == pytest.approx(1.0) and q["rel_l2"] == pytest.approx(0.1, rel=1e-5)


def test_int8_row_at_the_mean_has_zero_scale():
    basis = _fit_random_basis(np.random.default_rng(6), 10, 4)
    f = torch.stack([torch.from_numpy(basis.mean), torch.from_numpy(basis.mean) + 1])
    spec = FeatureSpec(10, 4, "int8")
    decoded, feat, scale = _round_trip(spec, basis, f)
    assert scale[0] == 0 and (feat[0] == 0).all() and scale[1] > 0
    torch.testing.assert_close(decoded[0], f[0])
