"""Use a logitcache cache from your own training loop (timm's train.py, Lightning, plain PyTorch).

The pieces, in the order a step uses them:

* :func:`open_cache` - a :class:`~logitcache.storage.reader.CacheReader` on any fsspec URL.
* :class:`CachedTrainData` - the training split and the cache built on it, checked to match;
  ``.loader(epoch, ...)`` is a ``torch.utils.data.DataLoader`` of one epoch's regenerated
  views with their label targets and cached teacher rows, for one rank of a world size.
* :func:`teacher_logits` / :func:`teacher_probs` - the teacher's (B, C) logits or
  probabilities at temperature T, rebuilt on the device from a batch's cached rows
  (several caches: ``teacher=i``); :func:`ensemble_probs` - the teachers' weighted mean.
* :func:`teacher_features` - the teacher's pooled features (B, D), decoded on the device
  from a batch of ``loader(..., features=True)`` (a cache built with ``build --features``).
* ``logitcache.smoothed_targets`` - the mixed, smoothed label targets (B, C) of a batch; the
  losses are ``logitcache.kd_loss``, ``dkd_loss``, ``dist_loss``, MKD's learner, and for
  projector distillation ``logitcache.FeatureStudent`` with ``projector_distance``.

Each batch is a dict: ``images`` (B, 3, H, W) float32 normalised with the cache's recipe;
``label``, ``partner_label`` (B,) int64 (the partner is the other image of a mixup/cutmix
pair, the view itself when not mixed); ``lam`` (B,) float32, the weight of the view's own
label; ``ids``, ``values`` (B, k) and ``tail`` (B,): the cached teacher rows in their stored
dtypes (class ids; gap codes, counts or float logits; see logitcache/codecs/logits.py), decoded on
the device by :func:`teacher_logits`; plus ``index``, ``partner``, ``seed`` (B,) int64. With
``features=True`` also ``feat`` (B, w) (int8 coefficients, or float16/float32) and, for int8,
``feat_scale`` (B,) float32, decoded by :func:`teacher_features`. From several caches
(``CachedTrainData(data, [a, b])``), teacher i > 0's rows are ``ids_i``, ``values_i``, ``tail_i``.
"""

from __future__ import annotations

import torch

from logitcache.codecs.features import decode_features
from logitcache.codecs.logits import CodecSpec, decode, rebuilt_probs
from logitcache.data.source import open_source
from logitcache.errors import LogitcacheError
from logitcache.replay.batches import check_batch_size, create_train_loader, epoch_groups
from logitcache.replay.rows import CachedRows
from logitcache.replay.teachers import mix_weights, row_keys, teacher_count
from logitcache.storage.canary import check_views_of
from logitcache.storage.manifest import check_serves
from logitcache.storage.reader import CacheReader
from logitcache.storage.views_compat import check_same_views, common_epochs, load_same_views
from logitcache.views.loader import BatchLoader

__all__ = ["CachedTrainData", "ensemble_probs", "open_cache", "teacher_features", "teacher_logits", "teacher_probs"]


def open_cache(url: str, storage_options: dict | None = None) -> CacheReader:
    """Open the cache at ``url`` (a local path or any fsspec URL) for reading.

    Raises :class:`~logitcache.errors.CacheNotFoundError` when there is no cache there."""
    return CacheReader(url, storage_options)


class CachedTrainData:
    """The training split at ``data`` and the cache built on it (or several caches, one per
    teacher, on the same views): checked to serve that data (same samples, classes), to hold
    the same views as each other, and to regenerate the views their teachers saw.

    Attributes:
        readers: the open caches, in the order given; ``reader``: the first.
        source: the training split (random access by global sample index).
        recipe: the augmentation recipe the cache was built with (``recipe.input_size`` pixels).
        num_classes: C, the columns of the teacher logits and targets.
        codecs: how each cache's teacher rows decode (give one to :func:`teacher_logits`);
            ``codec``: the first.
        epochs: the epochs complete in every cache; student epoch e reads ``epochs[e % len(epochs)]``.
            A damaged epoch (sealed by its build, then lost a unit: logitcache/storage/seals.py) is
            an error, unless ``skip_damaged_epochs``: then it is left out (``damaged_epochs``).
        feature_dim: D, the width of the (first) cache's teacher features; None for a logit-only cache.
    """

    def __init__(self, data: str, cache: str | CacheReader | list[str | CacheReader], *, split: str = "train",
                 allow_view_drift: bool = False, skip_damaged_epochs: bool = False):
        caches = cache if isinstance(cache, list) else [cache]
        if not caches:
            raise LogitcacheError("CachedTrainData needs at least one cache")
        self.readers = [open_cache(c) if isinstance(c, str) else c for c in caches]
        self.reader = self.readers[0]
        self.source = open_source(data, split)
        for r in self.readers:
            check_serves(r.manifest, fingerprint=self.source.fingerprint(), num_classes=self.source.num_classes,
                         where=r.url)
        check_same_views([r.manifest for r in self.readers], [r.url for r in self.readers])
        self.epochs, self.damaged_epochs = common_epochs(self.readers, skip_damaged_epochs)
        if not self.epochs:
            raise LogitcacheError(f"cache {' + '.join(r.url for r in self.readers)} has no epoch complete in "
                                  f"every cache yet")
        for r in self.readers:
            check_views_of(r, self.source, self.epochs[:1], allow_drift=allow_view_drift)
        self.recipe = self.reader.manifest.recipe
        self.num_classes = self.source.num_classes
        self.codecs = [r.manifest.codec for r in self.readers]
        self.codec = self.codecs[0]
        spec = self.reader.manifest.feature_spec
        self.feature_dim = spec.dim if spec is not None else None
        self._labels = self.source.labels()
        self._basis: dict[str, tuple] = {}  # device -> the feature basis there (read and checked once)
        self._loaders: dict[tuple, BatchLoader] = {}  # (workers, pin, device) -> a loader kept between epochs

    def view_epoch(self, epoch: int) -> int:
        """The cached epoch that student epoch ``epoch`` trains on (cached epochs cycle)."""
        return self.epochs[epoch % len(self.epochs)]

    def eval_config(self) -> dict:
        """What timm's ``create_loader(..., is_training=False, **eval_config())`` needs to
        evaluate a student on the views it trains on: the cache's input size, normalisation,
        crop and interpolation (as ``logitcache train`` evaluates), not the student's own
        ``pretrained_cfg`` (which ``timm.data.resolve_data_config`` would give)."""
        from logitcache.views.augment import eval_interpolation

        r = self.recipe
        return {"input_size": (3, r.input_size, r.input_size), "interpolation": eval_interpolation(r),
                "mean": tuple(r.mean), "std": tuple(r.std), "crop_pct": r.crop_pct}

    def loader(self, epoch: int, *, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
               num_workers: int = 0, pin_memory: bool = False, limit: int | None = None,
               features: bool = False, device: torch.device | str | None = None) -> BatchLoader:
        """Student epoch ``epoch``: this rank's slice of every shuffled global batch.

        ``batch_size`` is the global batch in views (a multiple of the recipe's group size,
        2 with mixup/cutmix, times ``world_size``); each rank's batches hold
        ``batch_size // world_size`` views (a group of one leftover view may make one
        smaller). The batches are a function of ``(seed, epoch)``; ``limit`` keeps the first
        ones. Items are the dicts described in this module's docstring, the views made on
        ``device`` (default: the CPU); ``features`` adds the cached teacher features (a cache
        built without ``--features`` raises, saying so). Loaders with the same workers, pinning
        and device are one loader, given each epoch's batches: its workers stay up between epochs."""
        view_epoch = self.view_epoch(epoch)
        try:
            check_batch_size(self.recipe, batch_size, world_size)
        except ValueError as e:
            raise LogitcacheError(str(e)) from None
        rows = CachedRows(load_same_views(self.readers, view_epoch, features), self._labels, self.source)
        dev = torch.device(device) if device is not None else None
        key = (num_workers, pin_memory, str(dev))
        loader = create_train_loader(self.source, self.recipe, view_epoch,
                                     epoch_groups(self.source, self.recipe, view_epoch), rows,
                                     batch_size=batch_size, seed=seed, epoch=epoch, num_workers=num_workers,
                                     rank=rank, world_size=world_size, pin_memory=pin_memory, limit=limit,
                                     device=dev, reuse=self._loaders.get(key))
        self._loaders[key] = loader
        return loader  # a BatchLoader: an unreadable sample raises, naming shard and key


def teacher_logits(batch: dict, codec: CodecSpec, device: torch.device | str | None = None, *,
                   teacher: int = 0) -> torch.Tensor:
    """Teacher ``teacher``'s logits (B, C) float32 on ``device`` (default: where the rows are),
    rebuilt from the batch's cached rows; ``codec`` is its cache's (``data.codecs[teacher]``)."""
    return decode(codec, *_rows(batch, device, teacher))


def teacher_probs(batch: dict, codec: CodecSpec, temperature: float = 1.0,
                  device: torch.device | str | None = None, *, teacher: int = 0) -> torch.Tensor:
    """Teacher ``teacher``'s probabilities (B, C) float32 at temperature T: softmax(logits / T),
    rows summing to 1, rebuilt on ``device`` from the batch's cached rows (a sampled cache: T = 1 only)."""
    return rebuilt_probs(codec, *_rows(batch, device, teacher), temperature)


def ensemble_probs(batch: dict, codecs: list[CodecSpec], temperature: float = 1.0,
                   device: torch.device | str | None = None, *, weights: list[float] | None = None) -> torch.Tensor:
    """The teachers' combined target (B, C): ``sum_i w_i teacher_probs(teacher=i)`` at
    temperature T, ``weights`` normalised to sum 1 (None: equal), one teacher per codec of
    ``data.codecs`` (what ``train --teachers-mode mean-probs`` distils)."""
    w = mix_weights(weights, len(codecs))
    return sum(wi * teacher_probs(batch, c, temperature, device, teacher=i) for i, (c, wi) in enumerate(zip(codecs, w)))


def teacher_features(batch: dict, data: CachedTrainData, device: torch.device | str | None = None) -> torch.Tensor:
    """The teacher's pooled pre-logit features (B, D) float32 on ``device`` (default: where the
    rows are), decoded from a batch of ``data.loader(..., features=True)`` with the cache's
    basis (within the codec's rounding of the feature's projection onto it)."""
    if "feat" not in batch:
        raise LogitcacheError("this batch has no cached features: use data.loader(..., features=True)")
    feat = batch["feat"].to(device, non_blocking=True) if device is not None else batch["feat"]
    scale = batch.get("feat_scale")
    scale = scale.to(feat.device, non_blocking=True) if scale is not None else None
    key = str(feat.device)
    if key not in data._basis:
        basis = data.reader.feature_basis()
        data._basis[key] = basis.to_torch(feat.device) if basis is not None else None
    return decode_features(data.reader.manifest.feature_spec, data._basis[key], feat, scale)


def _rows(batch: dict, device, teacher: int) -> tuple[torch.Tensor, ...]:
    keys = row_keys(teacher)
    if keys[0] not in batch:
        raise LogitcacheError(f"this batch holds no rows of teacher {teacher} ({teacher_count(batch)} teachers' "
                              f"rows: one per cache given to CachedTrainData)")
    return tuple(batch[k].to(device, non_blocking=True) if device is not None else batch[k] for k in keys)
