"""A feature cache's basis on storage: ``<cache>/features/mean`` (D,) and
``<cache>/features/components`` (r, D), float32, one chunk each.

The basis is written once, before the manifest (which records its sha256, so the manifest
is what commits it), and read back checked against that sha256: a flipped byte, a missing
or truncated chunk is an error naming the cache and the array, like any unit's.
"""

from __future__ import annotations

import numpy as np
import zarr

from logitcache.codecs.features import FeatureBasis
from logitcache.errors import CorruptCacheError

BASIS_GROUP = "features"
BASIS_ARRAYS = ("mean", "components")
_HINT = "the basis cannot be rebuilt in place: build the cache again (another --out)"


def write_basis(root: zarr.Group, basis: FeatureBasis) -> None:
    """Write ``basis`` under ``features/`` (replacing any left by a killed build)."""
    from logitcache.storage.layout import COMPRESSOR

    group = root.create_group(BASIS_GROUP, overwrite=True)
    for key in BASIS_ARRAYS:
        arr = np.ascontiguousarray(getattr(basis, key), dtype=np.float32)
        z = group.create_array(key, shape=arr.shape, dtype=arr.dtype, chunks=arr.shape, compressors=COMPRESSOR,
                               fill_value=0)
        z[...] = arr


def read_basis(root: zarr.Group, manifest, url: str) -> FeatureBasis:
    """The basis the manifest names, checked against its sha256; raises
    :class:`CorruptCacheError` naming the cache and the array otherwise."""
    arrays = {}
    for key in BASIS_ARRAYS:
        try:
            arrays[key] = np.asarray(root[f"{BASIS_GROUP}/{key}"][...], dtype=np.float32)
        except Exception as e:  # noqa: BLE001 - any storage/codec failure becomes one clear error
            raise CorruptCacheError(f"cache {url}: feature basis, array {BASIS_GROUP}/{key}: cannot read it "
                                    f"({type(e).__name__}: {e}); {_HINT}") from None
    return check_basis(arrays["mean"], arrays["components"], manifest, url)


def check_basis(mean: np.ndarray, components: np.ndarray, manifest, url: str) -> FeatureBasis:
    """The basis of arrays ``mean`` (D,) and ``components`` (r, D), checked against the
    manifest's spec and sha256 (:class:`CorruptCacheError` otherwise)."""
    arrays = {"mean": np.asarray(mean, dtype=np.float32), "components": np.asarray(components, dtype=np.float32)}
    spec = manifest.feature_spec
    if arrays["mean"].shape != (spec.dim,) or arrays["components"].shape != (spec.rank, spec.dim):
        raise CorruptCacheError(f"cache {url}: feature basis, arrays {BASIS_GROUP}/mean and components: shapes "
                                f"{arrays['mean'].shape} and {arrays['components'].shape}, the manifest's spec needs "
                                f"({spec.dim},) and ({spec.rank}, {spec.dim}); {_HINT}")
    basis = FeatureBasis(mean=arrays["mean"], components=arrays["components"],
                         explained=float(manifest.features.get("explained") or 0.0))
    if basis.digest() != manifest.features.get("basis_sha256"):
        raise CorruptCacheError(f"cache {url}: feature basis, arrays {BASIS_GROUP}/mean and components: fail the "
                                f"manifest's sha256 (damaged); {_HINT}")
    return basis
