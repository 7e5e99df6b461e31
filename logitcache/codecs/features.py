"""Teacher-feature codec: what is kept of a view's pooled pre-logit teacher feature f (D floats).

Teacher features are low-rank: a few directions carry most of their variance. So by default a
linear basis is fitted once (PCA on a sample of the first epoch's views; :func:`fit_basis`,
stored in the cache and named in the manifest by :meth:`FeatureBasis.digest`), and a view keeps
its r = ``rank`` coefficients ``c = (f - mean) @ components.T``; decoding gives
``mean + c @ components``, i.e. :func:`project` of f, up to the storage rounding. Without a basis
("full") c = f, all D dims. Stored per view (width w = r or D), bytes before compression:

* ``int8``: ``feat`` (w,) int8 codes ``q = round(c / s)`` and ``feat_scale`` () float32
  ``s = max|c| / 127``: w + 4 bytes. Each coefficient is within s / 2 of the truth; the rows of
  ``components`` are orthonormal, so ``||decode - project||_2 <= sqrt(w) * s / 2``.
* ``float16``: 2 w bytes; each coefficient within 2^-11 |c| (2^-25 below 2^-14, subnormals).
* ``float32``: 4 w bytes; within 2^-24 |c| (exact for full features given as float32).

:func:`quantisation_bound` gives these bounds per view (B,); they cover the storage rounding,
not float32 arithmetic in decode/project (about D * 2^-24 * ||f||; more if TF32 is enabled).
Stored arrays are numpy; encoding runs in float64 on the teacher's device, decoding in float32 on
the training device. All functions are pure.
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass

import numpy as np
import torch

FEATURE_DTYPES = ("int8", "float16", "float32")
DEFAULT_RANK = 256
INT8_MAX = 127
#: Per float dtype: unit roundoff (relative error of a normal number) and the absolute error
#: below the normal range (half the smallest subnormal spacing).
_ROUNDING = {"float16": (2.0**-11, 2.0**-25), "float32": (2.0**-24, 2.0**-150)}


@dataclass(frozen=True)
class FeatureSpec:
    """What a cache keeps of each view's teacher feature: ``dim`` D, ``rank`` r kept PCA
    coefficients (None: all D dims, no basis), stored as ``dtype`` (see the module doc)."""

    dim: int
    rank: int | None
    dtype: str

    def __post_init__(self) -> None:
        if not isinstance(self.dim, int) or self.dim < 1:
            raise ValueError(f"feature dim must be an integer >= 1, not {self.dim!r}")
        if self.rank is not None and not (isinstance(self.rank, int) and 1 <= self.rank <= self.dim):
            raise ValueError(f"feature rank must be None (full) or in [1, {self.dim}] (the feature dim), "
                             f"not {self.rank!r}")
        if self.dtype not in FEATURE_DTYPES:
            raise ValueError(f"feature dtype must be one of {', '.join(FEATURE_DTYPES)}, not {self.dtype!r}")

    @property
    def width(self) -> int:
        """Stored values per view: r with a basis, else D."""
        return self.dim if self.rank is None else self.rank

    @property
    def label(self) -> str:
        """e.g. "pca256/int8", "full/float16"."""
        return f"{'full' if self.rank is None else f'pca{self.rank}'}/{self.dtype}"

    @property
    def raw_bytes_per_view(self) -> int:
        """Bytes a view's features take before compression: w + 4 (int8 and its scale), 2 w, 4 w."""
        return {"int8": self.width + 4, "float16": 2 * self.width, "float32": 4 * self.width}[self.dtype]

    def to_json(self) -> dict:
        return {"dim": self.dim, "rank": self.rank, "dtype": self.dtype}  # plain JSON types

    @classmethod
    def from_json(cls, d: dict) -> "FeatureSpec":
        return cls(int(d["dim"]), None if d.get("rank") is None else int(d["rank"]), str(d["dtype"]))

    def stored_arrays(self) -> dict[str, tuple[str, int | None]]:
        """Stored arrays per view: name -> (numpy dtype, width; None for a scalar per view)."""
        arrays: dict[str, tuple[str, int | None]] = {"feat": (self.dtype, self.width)}
        if self.dtype == "int8":
            arrays["feat_scale"] = ("float32", None)
        return arrays


def create_feature_spec(dim: int, dims: str | int = DEFAULT_RANK, dtype: str | None = None) -> FeatureSpec:
    """``dims``: r kept PCA components (an int or a decimal string such as "256"), or "full"
    (all D dims, no basis). r >= ``dim`` also means full: no basis, nothing to project away.
    ``dtype`` defaults to "int8" with a basis and "float16" for full."""
    text = dims.strip().lower() if isinstance(dims, str) else None
    if text == "full":
        rank = None
    elif (text or "").isdecimal() and int(text) >= 1:
        rank = int(text)
    elif isinstance(dims, (int, np.integer)) and not isinstance(dims, bool) and dims >= 1:
        rank = int(dims)
    else:
        raise ValueError(f"feature dims must be 'full' or a positive integer, not {dims!r}")
    rank = None if rank is not None and rank >= dim else rank
    return FeatureSpec(dim, rank, dtype or ("float16" if rank is None else "int8"))


@dataclass(frozen=True, eq=False)
class FeatureBasis:
    """A fitted PCA basis: ``mean`` (D,) float32, ``components`` (r, D) float32 with
    orthonormal rows by decreasing variance, ``explained`` the fraction of the fit sample's
    variance the r components keep."""

    mean: np.ndarray
    components: np.ndarray
    explained: float

    def __post_init__(self) -> None:
        if self.mean.ndim != 1 or self.components.ndim != 2 or self.components.shape[1] != self.mean.shape[0]:
            raise ValueError(f"basis shapes do not match: mean {self.mean.shape}, components {self.components.shape}")

    def digest(self) -> str:
        """sha256 hex of (D, r) as little-endian int64, then mean and components as
        little-endian float32 bytes: names the basis in the manifest."""
        h = hashlib.sha256(struct.pack("<2q", self.mean.shape[0], self.components.shape[0]))
        h.update(np.ascontiguousarray(self.mean, dtype="<f4").tobytes())
        h.update(np.ascontiguousarray(self.components, dtype="<f4").tobytes())
        return h.hexdigest()

    def to_torch(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean (D,), components (r, D)) float32 on ``device``: what :func:`decode_features` takes."""
        return (torch.as_tensor(np.asarray(self.mean, np.float32), device=device),
                torch.as_tensor(np.asarray(self.components, np.float32), device=device))


def fit_basis(features: np.ndarray | torch.Tensor, rank: int) -> FeatureBasis:
    """PCA of ``features`` (N, D), N >= max(2, rank): centre by the mean, SVD in float64, keep
    the top ``rank`` right singular vectors, each signed so its largest-|value| entry is
    positive (deterministic). Memory: N * D float64; fit on a sample (a few thousand views)."""
    x = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    if x.ndim != 2:
        raise ValueError(f"expected features of shape (N, D), got {x.shape}")
    n, d = x.shape
    if not 1 <= rank <= d:
        raise ValueError(f"basis rank must be in [1, {d}] (the feature dim), not {rank}")
    if n < max(2, rank):
        raise ValueError(f"fit the basis on at least r views (and at least 2): got {n} views for r = {rank}")
    x = x.astype(np.float64)
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or inf; cannot fit a basis")
    mean = x.mean(axis=0)
    _, sv, vt = np.linalg.svd(x - mean, full_matrices=False)
    comps = vt[:rank]
    peak = np.abs(comps).argmax(axis=1)
    comps = comps * np.where(comps[np.arange(rank), peak] < 0, -1.0, 1.0)[:, None]
    total = float(np.sum(sv**2))
    explained = 1.0 if total == 0.0 else min(1.0, float(np.sum(sv[:rank] ** 2)) / total)
    return FeatureBasis(mean.astype(np.float32), np.ascontiguousarray(comps, dtype=np.float32), explained)


def _check_basis(spec: FeatureSpec, basis: FeatureBasis | tuple | None) -> None:
    if (basis is None) != (spec.rank is None):
        raise ValueError(f"feature spec {spec.label} {'needs' if basis is None else 'takes no'} basis")
    if basis is not None:
        shape = tuple((basis.components if isinstance(basis, FeatureBasis) else basis[1]).shape)
        if shape != (spec.rank, spec.dim):
            raise ValueError(f"basis components have shape {shape}, spec {spec.label} needs ({spec.rank}, {spec.dim})")


def encode_features(spec: FeatureSpec, basis: FeatureBasis | None, features: torch.Tensor) -> dict[str, np.ndarray]:
    """Compress teacher features (B, D) (any float dtype, any device) into ``feat`` (B, width)
    of ``spec.dtype`` and, for int8, ``feat_scale`` (B,) float32 (0 for an all-zero row)."""
    _check_basis(spec, basis)
    if features.ndim != 2 or features.shape[1] != spec.dim:
        raise ValueError(f"expected features of shape (B, {spec.dim}), got {tuple(features.shape)}")
    f = features.detach().to(torch.float64)
    if not torch.isfinite(f).all():
        raise ValueError("teacher features contain NaN or inf")
    if basis is not None:
        mean, comps = (t.to(f.device, torch.float64) for t in basis.to_torch())
        f = (f - mean) @ comps.T
    if spec.dtype != "int8":
        c = f.to(getattr(torch, spec.dtype))
        if not torch.isfinite(c).all():
            raise ValueError(f"teacher features exceed the range of {spec.dtype}; use float32 or int8")
        return {"feat": c.cpu().numpy()}
    scale = (f.abs().amax(dim=1) / INT8_MAX).to(torch.float32)
    s = scale.double()[:, None]
    q = torch.where(s > 0, f / torch.where(s > 0, s, 1.0), 0.0).round().clamp(-INT8_MAX, INT8_MAX)
    return {"feat": q.to(torch.int8).cpu().numpy(), "feat_scale": scale.cpu().numpy()}


def decode_features(spec: FeatureSpec, basis_t: tuple[torch.Tensor, torch.Tensor] | None, feat: torch.Tensor,
                    feat_scale: torch.Tensor | None) -> torch.Tensor:
    """Stored ``feat`` (B, width) (+ ``feat_scale`` (B,) for int8) -> features (B, D) float32 on
    feat's device; ``basis_t`` from :meth:`FeatureBasis.to_torch` on that device."""
    _check_basis(spec, basis_t)
    if feat.ndim != 2 or feat.shape[1] != spec.width:
        raise ValueError(f"expected stored features of shape (B, {spec.width}), got {tuple(feat.shape)}")
    c = feat.float()
    if spec.dtype == "int8":
        if feat_scale is None:
            raise ValueError("int8 features need their feat_scale")
        c = c * feat_scale.float()[:, None]
    if basis_t is None:
        return c
    mean, comps = basis_t
    return c @ comps.float() + mean.float()


def project(basis: FeatureBasis | None, features: torch.Tensor) -> torch.Tensor:
    """``mean + ((f - mean) @ C.T) @ C`` (B, D) float32 (computed in float64): what decode gives
    without storage rounding; ``features`` as float32 without a basis."""
    if basis is None:
        return features.float()
    mean, comps = (t.to(features.device, torch.float64) for t in basis.to_torch())
    return (((features.double() - mean) @ comps.T) @ comps + mean).float()


def quantisation_bound(spec: FeatureSpec, feat_scale: torch.Tensor | None,
                       feat: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) bound on ``||decode(encode(f)) - project(f)||_2`` from the storage rounding (the
    components are orthonormal, so the coefficients' error norm carries over). int8:
    ``sqrt(width) * feat_scale / 2``. float16/float32 need the stored ``feat`` (B, width):
    per entry ``u |c| / (1 - u) + a`` (u: unit roundoff, a: subnormal half-spacing), summed
    in quadrature; float32 full features given as float32 are stored exactly."""
    if spec.dtype == "int8":
        if feat_scale is None:
            raise ValueError("the int8 bound needs feat_scale")
        return math.sqrt(spec.width) * feat_scale.float() / 2
    if feat is None:
        raise ValueError(f"the {spec.dtype} bound needs the stored feat values")
    u, a = _ROUNDING[spec.dtype]
    err = feat.double().abs() * (u / (1 - u)) + a
    return err.square().sum(dim=1).sqrt().float()


def reconstruction_quality(true: torch.Tensor, decoded: torch.Tensor) -> dict[str, float]:
    """Mean over views (B, D) of the cosine similarity ("cosine") and of the relative L2 error
    ``||d - t|| / ||t||`` ("rel_l2"; a zero true row counts its error norm)."""
    t, d = true.double(), decoded.double()
    cos = torch.nn.functional.cosine_similarity(d, t, dim=1, eps=1e-12)
    norm, err = t.norm(dim=1), (d - t).norm(dim=1)
    rel = torch.where(norm > 0, err / norm.clamp_min(1e-300), err)
    return {"cosine": float(cos.mean()), "rel_l2": float(rel.mean())}
