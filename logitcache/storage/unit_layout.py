"""How a unit's teacher rows are laid out in stored arrays, per format version.

Format 3 stores only what cannot be recomputed. Rows are sorted by sample index, so row
``r`` of unit ``s`` is sample ``start_s + r``; view seeds, labels, mixing partners and
lambdas are regenerated from the plan (logitcache/views/plan.py) and the dataset, and the commit
record holds a digest of the plan (:func:`logitcache.views.plan.plan_digest`) so a reader that plans otherwise is
refused. The arrays (n rows; streams are logitcache/codecs/bitpack.py bit streams):

=========  =========================  ==================================================
codec      array (dtype, shape)       content
=========  =========================  ==================================================
topk       ids (uint8, stream)        n * k class ids of ``id_bits`` bits, row by row,
                                      each row's ids by descending logit
topk gap   values (uint8, stream)     n * k code increases of ``b`` bits, row by row: the
                                      2nd .. k-th kept logits' and the fill's gap codes,
                                      each minus the previous one (the top's code is 0)
topk fp    values ((n, k) float)      the logits, descending; tail (float32, (n,)) tail_lse
full gap   values (uint8, stream)     n * C gap codes of ``b`` bits, in class order
full fp    values ((n, C) float)      the logits, in class order
sampled    unique (uint8/16, (n,))    distinct classes drawn per row, u_r
sampled    ids (uint8, stream)        sum(u_r) class ids, row by row, ascending
sampled    counts (uint8, stream)     sum(u_r) draw counts minus 1, of ceil(log2 N) bits
features   feat ((n, w) int8/f16/f32) `build --features`: each view's teacher feature, as
                                      w basis coefficients or all D dims
                                      (logitcache/codecs/features.py)
features   feat_scale (float32, (n,)) int8 features only: the per-view scale
=========  =========================  ==================================================

Formats 1 and 2 stored eight arrays per unit in build order (docs/FORMAT.md);
:func:`legacy_rows` turns them into the same teacher rows, sorted by sample index.
"""

from __future__ import annotations

import numpy as np

from logitcache.codecs.bitpack import pack_bits, unpack_bits
from logitcache.codecs.logits import CodecSpec
from logitcache.views.plan import plan_digest

#: The arrays of a format 1 or 2 unit, in the order they were written.
LEGACY_ARRAYS = ("sample_index", "view_seed", "label", "partner_index", "mix_lam", "topk_ids", "topk_logits",
                 "tail_lse")


#: The arrays a feature cache adds to every unit (``feat_scale`` with int8 features only).
FEATURE_ARRAYS = ("feat", "feat_scale")


def stored_arrays(spec: CodecSpec, format_version: int, features=None) -> tuple[str, ...]:
    """Names of a unit's arrays, in the order they are written; ``features`` is the cache's
    :class:`logitcache.codecs.features.FeatureSpec` (None: logits only)."""
    if format_version < 3:
        return LEGACY_ARRAYS
    return _logit_arrays(spec) + (tuple(features.stored_arrays()) if features is not None else ())


def array_kinds(spec: CodecSpec, features=None) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """Format 3+: each stored array's dtype and shape past its first axis (``()`` for 1-D
    arrays and streams), as :func:`pack_unit` writes them: what a stored array must be, so an
    edited dtype (same bytes read as other numbers) is damage, not other values."""
    import torch

    from logitcache.codecs.logits import encode

    rows = encode(spec, torch.zeros(1, spec.num_classes), np.zeros(1, np.uint64))
    kinds = {k: (a.dtype, a.shape[1:]) for k, a in _pack_logits(spec, rows).items()}
    for key, (dtype, width) in (features.stored_arrays().items() if features is not None else ()):
        kinds[key] = (np.dtype(dtype), () if width is None else (width,))
    return kinds


def _logit_arrays(spec: CodecSpec) -> tuple[str, ...]:
    if spec.name == "sampled":
        return ("unique", "ids", "counts")
    if spec.name == "full":
        return ("values",)
    return ("ids", "values") if spec.quantised else ("ids", "values", "tail")


def pack_unit(spec: CodecSpec, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Teacher rows (sorted by sample index; see logitcache/codecs/logits.py) -> format 3 arrays.
    Feature arrays (``feat``, ``feat_scale``), when present, are stored as they are."""
    features = {k: np.ascontiguousarray(rows[k]) for k in FEATURE_ARRAYS if k in rows}
    return {**_pack_logits(spec, rows), **features}


def _pack_logits(spec: CodecSpec, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    ids, values, tail = rows["ids"], rows["values"], rows["tail"]
    if spec.name == "sampled":
        present = values > 0
        return {"unique": present.sum(axis=1).astype(values.dtype),
                "ids": pack_bits(ids[present], spec.id_bits),
                "counts": pack_bits(values[present].astype(np.uint32) - 1, spec.count_bits)}
    if spec.name == "full":
        return {"values": pack_bits(values, spec.value_bits) if spec.quantised else np.ascontiguousarray(values)}
    out = {"ids": pack_bits(ids, spec.id_bits)}
    if spec.quantised:  # codes (the top's 0, the rest, the fill) never decrease: store the increases
        codes = np.concatenate([values, tail[:, None]], axis=1).astype(np.int64)
        out["values"] = pack_bits(np.diff(codes, axis=1), spec.value_bits)
    else:
        out.update(values=np.ascontiguousarray(values), tail=np.ascontiguousarray(tail))
    return out


def unpack_unit(spec: CodecSpec, arrays: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """Format 3 arrays of ``n`` rows -> teacher rows (``ids``, ``values``, ``tail``, and the
    feature arrays when read).

    Raises ``ValueError`` when the arrays hold fewer values than ``n`` rows need."""
    features = {k: arrays[k] for k in FEATURE_ARRAYS if k in arrays}
    for key, arr in features.items():
        if len(arr) != n:
            raise ValueError(f"array {key} holds {len(arr)} rows, not {n}")
    return {**_unpack_logits(spec, arrays, n), **features}


def _unpack_logits(spec: CodecSpec, arrays: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    c, k = spec.num_classes, spec.k
    if spec.name == "sampled":
        unique = arrays["unique"].astype(np.int64)
        total = int(unique.sum())
        flat_ids = unpack_bits(arrays["ids"], total, spec.id_bits)
        flat_counts = unpack_bits(arrays["counts"], total, spec.count_bits) + 1
        width = int(unique.max()) if n else 0
        mask = np.arange(width)[None, :] < unique[:, None]  # row-major: the same order as packing
        ids = np.zeros((n, width), spec.id_dtype)
        counts = np.zeros((n, width), arrays["unique"].dtype)
        ids[mask], counts[mask] = flat_ids, flat_counts
        return {"ids": ids, "values": counts, "tail": np.zeros(n, np.uint8)}
    if spec.name == "full":
        values = (unpack_bits(arrays["values"], n * c, spec.value_bits).astype(np.uint16).reshape(n, c)
                  if spec.quantised else arrays["values"].reshape(n, c))
        return {"ids": np.zeros((n, 0), spec.id_dtype), "values": values, "tail": np.zeros(n, np.uint8)}
    ids = unpack_bits(arrays["ids"], n * k, spec.id_bits).astype(spec.id_dtype).reshape(n, k)
    if not spec.quantised:
        return {"ids": ids, "values": arrays["values"].reshape(n, k), "tail": arrays["tail"]}
    increases = unpack_bits(arrays["values"], n * k, spec.value_bits).reshape(n, k)
    codes = np.zeros((n, k + 1), np.uint16)
    np.cumsum(increases, axis=1, out=codes[:, 1:])
    return {"ids": ids, "values": codes[:, :k], "tail": codes[:, k]}


def legacy_rows(spec: CodecSpec, arrays: dict[str, np.ndarray], start: int) -> tuple[dict[str, np.ndarray], str]:
    """A format 1/2 unit (rows in build order) -> (teacher rows sorted by sample index, the
    digest of its plan, as :func:`logitcache.views.plan.plan_digest` computes it from the stored seeds and partners)."""
    order = np.argsort(arrays["sample_index"], kind="stable")
    values, ids = arrays["topk_logits"][order], arrays["topk_ids"][order]
    if spec.name == "full":  # stored by descending logit with ids; teacher rows are in class order
        values = np.take_along_axis(values, np.argsort(ids, axis=1), axis=1)
        ids = np.zeros((len(order), 0), spec.id_dtype)
    rows = {"ids": ids, "values": values, "tail": arrays["tail_lse"][order]}
    digest = plan_digest(arrays["view_seed"][order], arrays["partner_index"][order] - start)
    return rows, digest
