"""The manifest document's schema, checked before any field is used: each field's type,
the required and the known keys, sizes within bounds (checked before anything is allocated
from them), the recipe against its own digest (``recipe_sha256``) and, from format 5, the
whole document against its own digest (``manifest_sha256``, :func:`manifest_digest`), so a
damaged or hand-edited manifest is one line naming the cache and the field, never a
traceback or a silent change of what is served."""

from __future__ import annotations

import hashlib
import json

from logitcache.codecs.features import FEATURE_DTYPES, FeatureSpec
from logitcache.errors import CorruptCacheError

MAX_CLASSES = 1 << 24
MAX_SAMPLES = 1 << 40
MAX_SHARDS = 1 << 24

_STR, _INT, _DICT, _LIST = (str,), (int,), (dict,), (list,)
_OPT_STR = (str, type(None))

#: field -> allowed types; a field of the first table must be present.
REQUIRED = {"format_version": _INT, "teacher": _STR, "teacher_weights": _STR, "teacher_weights_sha256": _OPT_STR,
            "recipe": _DICT, "recipe_sha256": _STR, "dataset": _DICT, "codec": _DICT, "num_classes": _INT}
OPTIONAL = {"library_versions": _DICT, "created": _STR, "build_env": _DICT,
            "features": (dict, type(None)), "teacher_input_size": _INT}
DATASET_REQUIRED = {"name": _STR, "split": _OPT_STR, "fingerprint": _STR, "num_samples": _INT, "shards": _LIST,
                    "shard_sizes": _LIST}
DATASET_OPTIONAL = {"url": _STR}
CODEC_REQUIRED = {"name": _STR, "k": _INT, "num_classes": _INT}
CODEC_OPTIONAL = {"values": _STR, "value_dtype": _STR, "id_bits": _INT, "gap_step": (float, int),  # derived fields
                  "id_dtype": _STR}  # formats 1-2


#: The first format whose manifest carries ``manifest_sha256`` (and whose commit records name it).
DIGEST_FORMAT = 5


def canonical_json(d: object) -> bytes:
    """The canonical bytes of a JSON document, as its digests hash it: Python's
    ``json.dumps(d, sort_keys=True)`` (default separators, ASCII), UTF-8."""
    return json.dumps(d, sort_keys=True).encode()


#: Fields the manifest digest leaves out: the digest itself, and the creation time (informative,
#: and the one field in which two builds of one cache on one machine differ, so a cache's bytes
#: stay a function of what it was built from).
UNDIGESTED = ("manifest_sha256", "created")


def manifest_digest(d: dict) -> str:
    """sha256 (hex) of a manifest document without the fields of :data:`UNDIGESTED`."""
    return hashlib.sha256(canonical_json({k: v for k, v in d.items() if k not in UNDIGESTED})).hexdigest()


def check_manifest_document(d: object, where: str) -> None:
    """Raise :class:`CorruptCacheError` (one line: the cache ``where`` and the field) unless
    ``d`` is a well-formed manifest document (see the module docstring)."""
    if not isinstance(d, dict):
        raise CorruptCacheError(f"cache {where}: its manifest (root attribute 'logitcache') is a "
                                f"{type(d).__name__}, not a table of fields")
    digested = _is_int(d.get("format_version")) and d["format_version"] >= DIGEST_FORMAT
    _check_fields(d, {**REQUIRED, **({"manifest_sha256": _STR} if digested else {})}, OPTIONAL, "", where)
    _check_fields(d["dataset"], DATASET_REQUIRED, DATASET_OPTIONAL, "dataset.", where)
    _check_fields(d["codec"], CODEC_REQUIRED, CODEC_OPTIONAL, "codec.", where)
    _in_range(d["num_classes"], 2, MAX_CLASSES, "num_classes", where)
    ds = d["dataset"]
    _in_range(ds["num_samples"], 0, MAX_SAMPLES, "dataset.num_samples", where)
    _in_range(len(ds["shards"]), 0, MAX_SHARDS, "dataset.shards (count)", where)
    if len(ds["shard_sizes"]) != len(ds["shards"]):
        _bad(where, "dataset.shard_sizes", f"{len(ds['shard_sizes'])} sizes for {len(ds['shards'])} shards")
    if not all(isinstance(s, str) for s in ds["shards"]):
        _bad(where, "dataset.shards", "not a list of shard names")
    if not all(_is_int(n) and 0 <= n <= MAX_SAMPLES for n in ds["shard_sizes"]):
        _bad(where, "dataset.shard_sizes", "not a list of sample counts")
    if sum(ds["shard_sizes"]) != ds["num_samples"]:
        _bad(where, "dataset.shard_sizes", f"they sum to {sum(ds['shard_sizes'])}, not num_samples "
                                           f"{ds['num_samples']}")
    if d["codec"]["num_classes"] != d["num_classes"]:
        _bad(where, "codec.num_classes", f"{d['codec']['num_classes']}, the manifest's num_classes is "
                                         f"{d['num_classes']}")
    if d.get("features") is not None:
        check_features_entry(d["features"], where)
    digest = hashlib.sha256(canonical_json(d["recipe"])).hexdigest()
    if digest != d["recipe_sha256"]:
        _bad(where, "recipe", "it does not match recipe_sha256 (the recipe was edited or damaged): the cached views "
                              "are not that recipe's")


FEATURES_REQUIRED = {"spec": _DICT, "label": _STR, "basis_sha256": _OPT_STR, "explained": (float, int, type(None)),
                     "fit_views": _INT}
SPEC_REQUIRED = {"dim": _INT, "rank": (int, type(None)), "dtype": _STR}
MAX_FEATURE_DIM = 1 << 20


def check_features_entry(f: dict, where: str) -> None:
    """The manifest's ``features`` entry (logitcache/build/features.py:feature_entry): its
    fields, a spec of a bounded dim, and a basis digest exactly when the spec keeps a rank."""
    _check_fields(f, FEATURES_REQUIRED, {}, "features.", where)
    _check_fields(f["spec"], SPEC_REQUIRED, {}, "features.spec.", where)
    spec = f["spec"]
    if spec["dtype"] not in FEATURE_DTYPES:
        _bad(where, "features.spec.dtype", f"{spec['dtype']!r:.40} is not one of {', '.join(FEATURE_DTYPES)}")
    _in_range(spec["dim"], 1, MAX_FEATURE_DIM, "features.spec.dim", where)
    if spec["rank"] is not None:
        _in_range(spec["rank"], 1, spec["dim"], "features.spec.rank", where)
    if (spec["rank"] is None) != (f["basis_sha256"] is None):
        _bad(where, "features.basis_sha256", "a basis digest goes with a rank (PCA features), none without")
    _in_range(f["fit_views"], 0, MAX_SAMPLES, "features.fit_views", where)
    label = FeatureSpec(spec["dim"], spec["rank"], spec["dtype"]).label  # the fields are checked above
    if f["label"] != label:
        _bad(where, "features.label", f"{f['label']!r:.40}, but the spec gives {label!r}")


def check_manifest_digest(d: dict, where: str) -> None:
    """Raise unless a format 5 manifest document matches its ``manifest_sha256`` (checked after
    its fields parse, so a field that cannot be read is named first)."""
    if d["format_version"] >= DIGEST_FORMAT and manifest_digest(d) != d["manifest_sha256"]:
        _bad(where, "manifest_sha256", "the manifest does not match its digest (a field was edited or damaged): "
                                       "nothing in this cache is served")


def field_error(where: str, name: str, error: Exception) -> CorruptCacheError:
    """The one-line error for a manifest field that does not parse (``error``: the parser's)."""
    return CorruptCacheError(f"cache {where}: manifest field {name} is invalid ({' '.join(str(error).split())})")


def _check_fields(d: dict, required: dict, optional: dict, prefix: str, where: str) -> None:
    missing = [k for k in required if k not in d]
    if missing:
        _bad(where, prefix + missing[0], "missing")
    unknown = sorted(set(d) - set(required) - set(optional))
    if unknown:
        _bad(where, prefix + unknown[0], "not a field of the format")
    for k, types in {**required, **optional}.items():
        if k in d and not _is_a(d[k], types):
            _bad(where, prefix + k, f"{d[k]!r:.60} is a {type(d[k]).__name__}, not "
                                    f"{' or '.join('null' if t is type(None) else t.__name__ for t in types)}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_a(v, types: tuple) -> bool:
    if int in types and _is_int(v):
        return True
    return any(t is not int and isinstance(v, t) for t in types)


def _in_range(v: int, lo: int, hi: int, name: str, where: str) -> None:
    if not lo <= v <= hi:
        _bad(where, name, f"{v} is outside [{lo}, {hi}]")


def _bad(where: str, name: str, why: str) -> None:
    raise CorruptCacheError(f"cache {where}: manifest field {name}: {why}")
