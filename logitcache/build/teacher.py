"""Teachers: timm models by name or alias, weights from timm's pretrained source or a file.

A teacher sees exactly the view the student will see, mapped to its own normalisation
and input size. It runs in eval mode under ``torch.inference_mode``; on CUDA with bf16
autocast and channels_last.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
import torch.nn.functional as F

from logitcache.errors import BadLogitsError, LogitcacheError, WeightsUnavailableError

#: Short names for the teachers people use most (timm names with pretrained tags).
TEACHER_ALIASES: dict[str, str] = {
    "beitv2_l": "beitv2_large_patch16_224.in1k_ft_in22k_in1k",
    "beitv2_b": "beitv2_base_patch16_224.in1k_ft_in22k_in1k",
    "resnet152": "resnet152.a1h_in1k",
}

#: safetensors metadata keys that logitcache writes with every model it trains.
META_MODEL, META_INPUT = "logitcache_model", "logitcache_input"
#: ... and with a model built with extra ``timm.create_model`` arguments (``train``'s
#: ``model_kwargs``, e.g. a ViT's img_size and patch_size): those, as a JSON object.
META_KWARGS = "logitcache_model_kwargs"


def resolve_name(name: str) -> str:
    return TEACHER_ALIASES.get(name, name)


@dataclass(frozen=True)
class ModelInput:
    """What a model expects: square input size in pixels and its normalisation."""

    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"

    def to_json(self) -> str:
        return json.dumps({"input_size": self.input_size, "mean": list(self.mean), "std": list(self.std),
                           "interpolation": self.interpolation})

    @classmethod
    def from_json(cls, text: str) -> "ModelInput":
        d = json.loads(text)
        return cls(int(d["input_size"]), tuple(d["mean"]), tuple(d["std"]), d.get("interpolation", "bicubic"))

    @classmethod
    def from_timm(cls, model: torch.nn.Module) -> "ModelInput":
        cfg = timm.data.resolve_data_config({}, model=model)
        return cls(int(cfg["input_size"][-1]), tuple(cfg["mean"]), tuple(cfg["std"]), cfg.get("interpolation", "bicubic"))


def adapt_views(views: torch.Tensor, src_mean, src_std, target: ModelInput) -> torch.Tensor:
    """Map views (B, 3, H, W) normalised with (src_mean, src_std) to ``target``'s normalisation
    and input size. One affine map per channel, then a resize only if the sizes differ."""
    dev, dt = views.device, views.dtype
    sm, ss = torch.tensor(src_mean, device=dev, dtype=dt), torch.tensor(src_std, device=dev, dtype=dt)
    tm, ts = torch.tensor(target.mean, device=dev, dtype=dt), torch.tensor(target.std, device=dev, dtype=dt)
    if not (torch.equal(sm, tm) and torch.equal(ss, ts)):
        scale, shift = ss / ts, (sm - tm) / ts
        views = views * scale[:, None, None] + shift[:, None, None]
    if views.shape[-1] != target.input_size or views.shape[-2] != target.input_size:
        mode = "bicubic" if target.interpolation == "bicubic" else "bilinear"
        views = F.interpolate(views, size=(target.input_size, target.input_size), mode=mode,
                              align_corners=False, antialias=True)
    return views


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the model hub answers at all; avoids a minute of download retries offline."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _in_local_cache(name: str) -> bool:
    """Whether timm's pretrained weights for ``name`` are already in the Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(name)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        return False
    files = ("model.safetensors", "open_clip_pytorch_model.bin", "pytorch_model.bin")
    return any(isinstance(try_to_load_from_cache(repo, f), str) for f in files)


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Weights from a safetensors file, a plain state dict or a training checkpoint, through
    timm's ``load_state_dict`` (``weights_only=True``: nothing is unpickled beyond tensors; the
    ``state_dict_ema``/``model_ema``/``state_dict``/``model`` entry of a checkpoint; DDP's
    ``module.`` and torch.compile's ``_orig_mod.`` prefixes stripped). Returns (state dict,
    safetensors metadata or {})."""
    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailableError(f"--teacher-weights {path}: no such file")
    try:
        state = timm.models.load_state_dict(str(path), use_ema=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 - report any unreadable file the same way
        raise WeightsUnavailableError(f"--teacher-weights {path}: not a safetensors file or plain state dict ({e})") from None
    meta: dict[str, str] = {}
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    return state, meta


def create_model_from_weights(name: str | None, weights: str | Path, num_classes: int | None = None):
    """A timm model whose architecture comes from ``name`` or, if None, from the file's
    logitcache metadata; returns (model, ModelInput | None from the metadata)."""
    state, meta = read_state_dict(weights)
    name = name or meta.get(META_MODEL)
    if not name:
        raise WeightsUnavailableError(f"{weights}: no model name given and none recorded in the file")
    if num_classes is None and meta.get("num_classes"):
        num_classes = int(meta["num_classes"])
    kwargs = {**_recorded_kwargs(meta, weights), **({} if num_classes is None else {"num_classes": num_classes})}
    try:
        model = timm.create_model(resolve_name(name), pretrained=False, **kwargs)
    except RuntimeError as e:
        raise WeightsUnavailableError(f"unknown teacher {name!r} (not a timm model name or alias): {e}") from None
    _check_head(model, state, weights)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise WeightsUnavailableError(
            f"--teacher-weights {weights} does not fit {name}: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    io = ModelInput.from_json(meta[META_INPUT]) if META_INPUT in meta else None
    return model, io


def _recorded_kwargs(meta: dict[str, str], weights) -> dict:
    """The ``timm.create_model`` arguments recorded in a weights file (:data:`META_KWARGS`)."""
    if META_KWARGS not in meta:
        return {}
    try:
        kwargs = json.loads(meta[META_KWARGS])
    except ValueError:
        kwargs = None
    if not isinstance(kwargs, dict) or "num_classes" in kwargs:
        raise WeightsUnavailableError(f"--teacher-weights {weights}: metadata {META_KWARGS} is not a JSON object of "
                                      f"model arguments: {meta[META_KWARGS][:80]!r}")
    return kwargs


def _check_head(model: torch.nn.Module, state: dict[str, torch.Tensor], weights) -> None:
    """One clear line when the weights' classifier predicts another class count than the
    model is built for (the dataset's), instead of torch's size-mismatch traceback."""
    head = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    heads = [head] if isinstance(head, str) else list(head or [])
    for h in heads:
        w = state.get(f"{h}.weight")
        if w is not None and w.shape[0] != model.num_classes:
            raise WeightsUnavailableError(
                f"--teacher-weights {weights}: its classifier ({h}) predicts {w.shape[0]} classes but the dataset "
                f"has {model.num_classes}")


class Teacher:
    """A frozen classifier that turns views into float32 logits (B, C)."""

    def __init__(self, name: str, *, weights: str | None = None, num_classes: int | None = None,
                 device: str | torch.device = "cpu", compile: bool = False, input_size: int | None = None):
        """``input_size`` (pixels, square) overrides the input size recorded in the weights file
        or timm's default (``build --teacher-input-size``); the cache records it."""
        if input_size is not None and input_size < 8:
            raise LogitcacheError(f"teacher input size must be at least 8 px, not {input_size}")
        self.name = resolve_name(name)
        self.device = torch.device(device)
        if weights is not None:
            model, io = create_model_from_weights(self.name, weights, num_classes)
            self.weights_label = os.path.basename(str(weights))
            self.weights_sha256 = file_sha256(weights)
        else:
            model, io = self._pretrained(num_classes), None
            self.weights_label = f"timm:{self.name}"
            self.weights_sha256 = None
        self.io = io or ModelInput.from_timm(model)
        self.io_origin = "recorded in its weights file" if io is not None else "its timm default"
        self.input_size_override = input_size
        if input_size is not None:
            self.io = dataclasses.replace(self.io, input_size=int(input_size))
            self.io_origin = "set by --teacher-input-size"
        self.num_classes = model.num_classes
        model.eval().requires_grad_(False).to(self.device)
        if self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        self.compiled = compile
        self.model = torch.compile(model) if compile else model

    def _pretrained(self, num_classes: int | None):
        """timm's pretrained weights; fails fast, naming --teacher-weights, when unreachable."""
        if not timm.is_model(self.name.split(".")[0]):
            raise WeightsUnavailableError(f"unknown teacher {self.name!r} (not a timm model name or alias)")
        if not _hub_reachable():
            from huggingface_hub import constants

            constants.HF_HUB_OFFLINE = True  # only the local cache: no minute of retries
            if not _in_local_cache(self.name):  # fail before building a 300M-parameter model
                raise WeightsUnavailableError(
                    f"cannot load pretrained weights for teacher {self.name}: no network and not in the local "
                    f"cache; pass a weights file with --teacher-weights FILE"
                )
        try:
            model = timm.create_model(self.name, pretrained=True)
        except RuntimeError as e:
            if "Unknown model" in str(e):
                raise WeightsUnavailableError(f"unknown teacher {self.name!r} (not a timm model name or alias)") from None
            raise
        except Exception as e:  # noqa: BLE001 - hub errors come in many types
            raise WeightsUnavailableError(
                f"cannot load pretrained weights for teacher {self.name} ({type(e).__name__}: no network or not "
                f"in the local cache); pass a weights file with --teacher-weights FILE"
            ) from None
        if num_classes is not None and model.num_classes != num_classes:
            raise WeightsUnavailableError(
                f"teacher {self.name} predicts {model.num_classes} classes but the dataset has {num_classes}"
            )
        return model

    def runtime(self) -> dict:
        """Where and how the logits are computed (recorded in the manifest; informative):
        device name, arithmetic (bf16 autocast on CUDA, float32 on CPU), torch.compile,
        CPU threads. Caches built under other settings differ in the last bits of the logits."""
        from logitcache.storage.manifest import device_name

        dev = self.device
        return {"device": f"{dev.type}: {device_name(dev)}",
                "precision": "bf16 autocast" if dev.type == "cuda" else "float32",
                "compile": self.compiled, "torch_threads": torch.get_num_threads()}

    def resize_note(self, view_size: int) -> str | None:
        """One line saying that views of ``view_size`` px are resized for this teacher (and what
        that costs), or None when the teacher takes them as they are."""
        size = self.io.input_size
        if size == view_size:
            return None
        return (f"teacher {self.name} takes {size} px input ({self.io_origin}): the {view_size} px views are "
                f"resized to it on the device, {(size / view_size) ** 2:.1f}x the pixels per view")

    @property
    def feature_dim(self) -> int:
        """D: the width of the pooled pre-logit features (:meth:`__call__` with ``features``)."""
        return pre_logits_dim(_unwrapped(self.model))

    @torch.inference_mode()
    def __call__(self, views: torch.Tensor, src_mean, src_std, *, features: bool = False):
        """Logits (B, C) float32 for views (B, 3, H, W) normalised with (src_mean, src_std);
        with ``features``, (logits, pooled pre-logit features (B, D) float32)."""
        x = adapt_views(views.to(self.device, non_blocking=True), src_mean, src_std, self.io)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            if not features:
                return self.model(x).float()
            logits, feats = logits_and_features(_unwrapped(self.model), x)
            return logits.float(), feats.float()


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The timm model under torch.compile's wrapper (its forward_features/forward_head)."""
    return getattr(model, "_orig_mod", model)


def pre_logits_dim(model: torch.nn.Module) -> int:
    """Width of a timm model's pooled pre-logit features (``forward_head(..., pre_logits=True)``)."""
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def logits_and_features(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A timm model's (logits (B, C), pooled pre-logit features (B, D)) from one trunk pass:
    ``forward_features``, then ``forward_head(pre_logits=True)``, then the classifier on those
    features (what ``forward_head`` does after its pre-logits: dropout is inside them)."""
    trunk = model.forward_features(x)
    feats = model.forward_head(trunk, pre_logits=True)
    head = model.get_classifier()
    if not isinstance(head, torch.nn.Module):
        raise ValueError(f"{type(model).__name__}: its classifier is not one module; features are not supported")
    return head(feats), feats


def check_logits(logits: torch.Tensor, num_classes: int, keys: list[str], where: str) -> None:
    """Raise :class:`BadLogitsError` for NaN/inf logits or a wrong class count, naming the keys."""
    if logits.ndim != 2 or logits.shape[1] != num_classes:
        raise BadLogitsError(f"teacher returned logits of shape {tuple(logits.shape)}, expected (B, {num_classes}) ({where})")
    bad = ~torch.isfinite(logits).all(dim=1)
    if bad.any():
        names = [keys[i] for i in bad.nonzero().flatten().tolist()]
        raise BadLogitsError(f"teacher returned NaN/inf logits for {len(names)} views ({where}; keys {names[:5]})")
