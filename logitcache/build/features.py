"""`build --features`: which features a build stores, and the basis it stores them in.

A new feature cache with a basis (``--feature-dims r``) first runs the teacher on the first
``fit_views`` views of its first epoch (units in shard order, the views the build renders
anyway) and fits a PCA basis to their features (:func:`logitcache.codecs.features.fit_basis`);
the basis is written before the manifest, which records its sha256. A build that adds to
or resumes a feature cache reads the cache's basis back (checked) instead of fitting one, so
every unit of a cache is coded in the same basis. Ranks other than 0 read what rank 0 wrote.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from logitcache.build.teacher import Teacher
from logitcache.codecs.features import (
    DEFAULT_RANK,
    FeatureBasis,
    FeatureSpec,
    create_feature_spec,
    encode_features,
    fit_basis,
)
from logitcache.errors import BadLogitsError, CacheMismatchError, CacheNotFoundError
from logitcache.views.augment import Recipe
from logitcache.views.loader import BatchDataset, create_batch_loader

#: Views of the first epoch the basis is fitted on (an ImageNet epoch has 1.28 M).
DEFAULT_FIT_VIEWS = 8192


@dataclass(frozen=True)
class FeatureRequest:
    """What ``build --features`` asks for: ``dims`` an int r (PCA components) or "full";
    ``dtype`` int8 | float16 | float32 (None: int8 with a basis, float16 for full)."""

    dims: str | int = DEFAULT_RANK
    dtype: str | None = None
    fit_views: int = DEFAULT_FIT_VIEWS


@dataclass
class BuildFeatures:
    """The features a build writes: the spec, the basis (None for full), and the manifest entry."""

    spec: FeatureSpec
    basis: FeatureBasis | None
    entry: dict

    def encode(self, feats: torch.Tensor, keys: list[str], where: str) -> dict[str, np.ndarray]:
        """A batch's features (B, D) -> the unit arrays; NaN/inf features name their views."""
        bad = ~torch.isfinite(feats).all(dim=1)
        if bad.any():
            names = [keys[i] for i in bad.nonzero().flatten().tolist()]
            raise BadLogitsError(f"teacher returned NaN/inf features for {len(names)} views ({where}; keys {names[:5]})")
        return encode_features(self.spec, self.basis, feats)

    def empty(self) -> dict[str, np.ndarray]:
        """The arrays of a unit without views."""
        return encode_features(self.spec, self.basis, torch.zeros(0, self.spec.dim))


def feature_entry(spec: FeatureSpec, basis: FeatureBasis | None, fit_views: int) -> dict:
    """The manifest's ``features`` entry."""
    return {"spec": spec.to_json(), "label": spec.label, "basis_sha256": basis.digest() if basis else None,
            "explained": basis.explained if basis else None, "fit_views": fit_views if basis else 0}


def existing_features(url: str, storage_options: dict | None):
    """(the cache's manifest features entry, its checked basis) when ``url`` holds a feature
    cache; (None, None) for a cache without features; None when there is no cache yet."""
    from logitcache.storage.reader import CacheReader

    try:
        reader = CacheReader(url, storage_options)
    except CacheNotFoundError:
        return None
    if not reader.has_features:
        return None, None
    return reader.manifest.features, reader.feature_basis()


def prepare_features(request: FeatureRequest, teacher: Teacher, source, recipe: Recipe, *, url: str,
                     storage_options: dict | None, first_epoch: int, batch_size: int,
                     num_workers: int) -> BuildFeatures:
    """Rank 0: the spec asked for, with the cache's basis when it has one of that spec, else a
    basis fitted now. A cache of another spec (or without features) gets an entry that the
    manifest check then refuses with the reason (logitcache/storage/manifest.py)."""
    spec = create_feature_spec(teacher.feature_dim, request.dims, request.dtype)
    found = existing_features(url, storage_options)
    if found is not None:
        entry, basis = found
        if entry is not None and entry["spec"] == spec.to_json():
            return BuildFeatures(spec, basis, entry)
        return BuildFeatures(spec, None, {"spec": spec.to_json(), "label": spec.label, "basis_sha256": "not fitted"})
    if spec.rank is None:
        return BuildFeatures(spec, None, feature_entry(spec, None, 0))
    sample = _fit_sample(teacher, source, recipe, first_epoch, request.fit_views, batch_size, num_workers)
    if len(sample) < spec.rank:
        raise CacheMismatchError(
            f"--feature-dims {spec.rank}: the basis needs at least {spec.rank} views to fit on, the first epoch has "
            f"{len(sample)}; ask for fewer dims or --feature-dims full")
    try:
        basis = fit_basis(sample, spec.rank)
    except ValueError as e:  # NaN/inf features among the sample
        raise BadLogitsError(f"cannot fit the feature basis of {url} on the first epoch's views: {e}") from None
    return BuildFeatures(spec, basis, feature_entry(spec, basis, len(sample)))


def adopt_features(url: str, storage_options: dict | None) -> BuildFeatures:
    """Ranks other than 0, after rank 0 created the cache: its spec and basis."""
    entry, basis = existing_features(url, storage_options)
    return BuildFeatures(FeatureSpec.from_json(entry["spec"]), basis, entry)


def _fit_sample(teacher: Teacher, source, recipe: Recipe, epoch: int, fit_views: int, batch_size: int,
                num_workers: int) -> torch.Tensor:
    """(n, D) teacher features of the first ``fit_views`` views of ``epoch`` (units in shard
    order, each unit's batches as the build cuts them); fewer when the epoch is smaller."""
    from logitcache.build.units import UnitBatches

    bounds = np.array([(s.start, s.stop) for s in source.shards], dtype=np.int64).reshape(-1, 2)
    sizes = bounds[:, 1] - bounds[:, 0]
    count = int(np.searchsorted(np.cumsum(sizes), fit_views) + 1)  # units that hold fit_views views
    shards = np.arange(min(count, len(bounds)))
    units = UnitBatches(recipe, bounds, np.full(len(shards), epoch), shards, batch_size)
    # A CPU teacher's process is the bottleneck: the workers finish its views (bench/build_fast.py).
    dataset = BatchDataset(source, recipe, finish=teacher.device.type == "cpu")
    loader = create_batch_loader(dataset, units, num_workers=num_workers, pin_memory=teacher.device.type == "cuda",
                                 device=teacher.device)
    parts, held = [], 0
    for batch in loader:
        _, feats = teacher(batch["images"], recipe.mean, recipe.std, features=True)
        parts.append(feats.cpu())
        held += len(feats)
        if held >= fit_views:
            break
    return torch.cat(parts)[:fit_views] if parts else torch.zeros(0, teacher.feature_dim)
