"""The cache manifest: what a cache was built from, stored in the root group's attributes."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import importlib.metadata
from dataclasses import dataclass, field

from logitcache.codecs.logits import CodecSpec
from logitcache.errors import CacheMismatchError, CorruptCacheError
from logitcache.storage.manifest_schema import (
    DIGEST_FORMAT,
    check_manifest_digest,
    check_manifest_document,
    field_error,
    manifest_digest,
)
from logitcache.views.augment import Recipe

#: The layout new caches are written in; every version in READABLE_VERSIONS still reads.
#: 2: per-unit commit records under epochs/<EEEE>/commits/ (found by listing) with CRC-32
#: checksums of every array, checked on every read.
#: 3: rows sorted by sample index; only what cannot be recomputed is stored (compact codecs:
#: bit-packed ids, quantised gaps, sampled counts; logitcache/storage/unit_layout.py) with a digest of
#: each unit's plan in its commit record.
#: 4: format 3 plus the teacher's features (``build --features``): the manifest's ``features``
#: entry, the basis under ``features/``, ``feat`` (and ``feat_scale``) in every unit. A cache
#: without features stays format 3, so a logitcache that predates features still extends it,
#: and refuses to extend a feature cache with featureless units.
#: 5: checked metadata, with or without features: the manifest carries its own digest
#: (``manifest_sha256``), every commit record names it (``manifest``) and carries a canary
#: (non-empty units), and a finished epoch is sealed (logitcache/storage/seals.py).
FORMAT_VERSION = 5
READABLE_VERSIONS = (1, 2, 3, 4, 5)
ATTR_KEY = "logitcache"  # the root group attribute holding the manifest

_VERSIONED = ("torch", "torchvision", "timm", "pillow", "numpy", "zarr", "logitcache")


def library_versions() -> dict[str, str]:
    """Versions of the libraries that decide pixels and logits (Pillow's resize changed across majors)."""
    out = {}
    for name in _VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def device_name(device) -> str:
    """The GPU's name for a CUDA device, else the CPU model (from /proc/cpuinfo on Linux)."""
    import platform

    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass
class DatasetInfo:
    """Which data a cache covers. ``fingerprint`` hashes shard names, keys and labels."""

    name: str
    split: str | None
    fingerprint: str
    num_samples: int
    shards: list[str]  # shard names, in unit order
    shard_sizes: list[int]
    url: str = ""  # where it was read from (informative; not compared)


@dataclass
class Manifest:
    """Everything needed to decide whether a cache can serve a given student run."""

    teacher: str  # timm model name
    teacher_weights: str  # "timm:<pretrained tag>" or the file name given
    teacher_weights_sha256: str | None
    recipe: Recipe
    dataset: DatasetInfo
    codec: CodecSpec
    num_classes: int
    format_version: int = FORMAT_VERSION
    library_versions: dict[str, str] = field(default_factory=library_versions)
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    build_env: dict = field(default_factory=dict)  # Teacher.runtime(): device, precision, ... (informative)
    # `build --features`: {"spec": FeatureSpec.to_json(), "label": "pca256/int8", "basis_sha256": str | None,
    # "explained": float | None, "fit_views": int}
    # (logitcache/codecs/features.py); None: the cache holds logits only.
    features: dict | None = None
    # `build --teacher-input-size`: the square input size the teacher ran at, in pixels; None:
    # its own (recorded in its weights file, else timm's default).
    teacher_input_size: int | None = None

    def to_dict(self) -> dict:
        d = self._fields()
        return {**d, "manifest_sha256": manifest_digest(d)} if self.format_version >= DIGEST_FORMAT else d

    @property
    def digest(self) -> str | None:
        """``manifest_sha256``: what every commit record of a format 5 cache names; None before."""
        return self.to_dict().get("manifest_sha256")

    def _fields(self) -> dict:
        return {
            "format_version": self.format_version,
            "teacher": self.teacher,
            "teacher_weights": self.teacher_weights,
            "teacher_weights_sha256": self.teacher_weights_sha256,
            "recipe": self.recipe.to_dict(),
            "recipe_sha256": self.recipe.digest(),
            "dataset": dataclasses.asdict(self.dataset),
            "codec": self.codec.to_dict(),
            "num_classes": self.num_classes,
            "library_versions": self.library_versions,
            "created": self.created,
            "build_env": self.build_env,
            **({"features": self.features} if self.features is not None else {}),
            **({"teacher_input_size": self.teacher_input_size} if self.teacher_input_size is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: dict, where: str = "") -> "Manifest":
        """The manifest of document ``d`` (the cache ``where``), its every field checked first
        (logitcache/storage/manifest_schema.py): a damaged one is a one-line CorruptCacheError."""
        if isinstance(d, dict) and d.get("format_version") not in READABLE_VERSIONS:
            raise CacheMismatchError(
                f"cache {where + ': ' if where else ''}format version {d.get('format_version')!r} is not supported "
                f"(this logitcache reads {', '.join(map(str, READABLE_VERSIONS))})"
            )
        check_manifest_document(d, where)
        m = cls(
            teacher=d["teacher"],
            teacher_weights=d["teacher_weights"],
            teacher_weights_sha256=d["teacher_weights_sha256"],
            recipe=_parsed("recipe", Recipe.from_dict, d["recipe"], where),
            dataset=DatasetInfo(**d["dataset"]),
            codec=_codec(d["codec"], where),
            num_classes=int(d["num_classes"]),
            format_version=d["format_version"],
            library_versions=d.get("library_versions", {}),
            created=d.get("created", ""),
            build_env=d.get("build_env", {}),
            features=d.get("features"),
            teacher_input_size=_input_size_field(d.get("teacher_input_size"), where),
        )
        check_manifest_digest(d, where)
        if m.format_version >= DIGEST_FORMAT:  # the document is the canonical form of what was parsed
            again = m.to_dict()
            diff = sorted(k for k in set(d) | set(again) if d.get(k) != again.get(k))
            if diff:
                raise field_error(where, diff[0], ValueError("it is not in the form this format writes"))
        return m

    def identity(self) -> dict:
        """The fields that must be equal for two builds to write into one cache."""
        return {
            "teacher": self.teacher,
            "teacher_weights_sha256": self.teacher_weights_sha256,
            "recipe": self.recipe.to_dict(),
            "dataset_fingerprint": self.dataset.fingerprint,
            "codec": self.codec.to_dict(),
            "num_classes": self.num_classes,
            "features": self.feature_identity(),
            "teacher_input_size": self.teacher_input_size,
        }

    def add_features(self, entry: dict) -> None:
        """Make this a feature cache's manifest: ``entry`` as :attr:`features` documents."""
        self.features = entry

    def feature_identity(self) -> dict | None:
        """What must match for two builds' features to share a cache: their spec and basis."""
        if self.features is None:
            return None
        return {"spec": self.features["spec"], "basis_sha256": self.features.get("basis_sha256")}

    @property
    def feature_spec(self):
        """The cache's :class:`logitcache.codecs.features.FeatureSpec`, or None without features."""
        from logitcache.codecs.features import FeatureSpec

        return FeatureSpec.from_json(self.features["spec"]) if self.features is not None else None

    def check_same_build(self, other: "Manifest", where: str) -> None:
        """Raise :class:`CacheMismatchError` naming every field that differs."""
        mine, theirs = self.identity(), other.identity()
        diffs = [k for k in mine if mine[k] != theirs[k]]
        if diffs == ["features"]:
            raise CacheMismatchError(_feature_mismatch(other.features, self.features, where))
        if diffs:
            detail = "; ".join(f"{k}: cache has {theirs[k]!r}, this build has {mine[k]!r}" for k in diffs)
            raise CacheMismatchError(f"cache {where} was built differently ({detail}). Use another --out.")


def _parsed(name: str, parse, value, where: str):
    """``parse(value)``, its errors as the one line naming the cache and the field."""
    try:
        return parse(value)
    except (ValueError, TypeError, KeyError) as e:
        raise field_error(where, name, e) from None


def _codec(d: dict, where: str) -> CodecSpec:
    """The codec entry, its derived fields (id_bits, gap_step) checked against what its
    name, k, classes and values give."""
    spec = _parsed("codec", CodecSpec.from_dict, d, where)
    derived = {k: v for k, v in spec.to_dict().items() if k in ("id_bits", "gap_step")}
    for k, v in derived.items():
        if k in d and d[k] != v:
            raise field_error(where, f"codec.{k}", ValueError(f"{d[k]!r}, but the codec gives {v!r}"))
    return spec


def _input_size_field(value, where: str) -> int | None:
    """The manifest's ``teacher_input_size``: absent, or an int of 8 to 65,536 pixels."""
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 8 <= value <= 1 << 16):
        raise CorruptCacheError(f"cache {where}: manifest field teacher_input_size is {value!r:.40}: not an input "
                                f"size in pixels (8 to 65536)")
    return value


def _feature_mismatch(cached: dict | None, asked: dict | None, where: str) -> str:
    """The one line for a build whose features differ from the cache's (logits otherwise the same)."""
    if cached is None:
        return (f"cache {where} was built without --features; features cannot be added to its committed epochs "
                f"(their units are written whole). Build a new cache with --features (another --out)")
    label = cached.get("label", cached["spec"])
    if asked is None:
        return f"cache {where} was built with --features ({label}); add --features to extend it, or use another --out"
    return (f"cache {where} holds features {label} (basis {str(cached.get('basis_sha256'))[:12]}); this build asks "
            f"for {asked.get('label', asked['spec'])}: use the cache's --feature-dims/--feature-dtype or "
            f"another --out")


def check_serves(manifest: Manifest, *, fingerprint: str, num_classes: int, where: str) -> None:
    """Raise unless the cache was built on the dataset a student run trains on."""
    import re

    if manifest.dataset.fingerprint != fingerprint:
        # Image-folder shards used to be runs of consecutive files, named "<folder>[start:stop]".
        if any(re.search(r"\[\d+:\d+\]$", name) for name in manifest.dataset.shards):
            raise CacheMismatchError(
                f"cache {where} was built on an image folder cut into shards of consecutive files; image folders "
                f"are now sharded across classes by a hash of each file's key, so the cache must be rebuilt "
                f"(logitcache build)"
            )
        raise CacheMismatchError(
            f"cache {where} was built on another dataset (dataset {manifest.dataset.name!r} split "
            f"{manifest.dataset.split!r}, fingerprint {manifest.dataset.fingerprint[:12]}; the training data has "
            f"fingerprint {fingerprint[:12]})"
        )
    if manifest.num_classes != num_classes:
        raise CacheMismatchError(
            f"cache {where} has {manifest.num_classes} classes but the training data has {num_classes}"
        )
