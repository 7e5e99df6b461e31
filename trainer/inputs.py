"""What a run trains on: the data splits, the caches (given, or the one found for the data;
checked against it; several teachers' caches checked to hold the same views), the recipe,
which cached epoch each student epoch reads, MKD's held-out meta split, the batches per
epoch, and each epoch's train loader."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from logitcache.codecs.logits import CodecSpec, check_serves_loss
from logitcache.data.source import SampleSource, open_source
from logitcache.errors import CacheMismatchError, CacheNotFoundError, LogitcacheError
from logitcache.replay.batches import check_batch_size, create_train_loader, epoch_groups
from logitcache.replay.rows import CachedRows
from logitcache.storage.canary import check_views_of
from logitcache.storage.catalog import cache_root, list_caches
from logitcache.storage.manifest import check_serves
from logitcache.storage.reader import CacheReader
from logitcache.storage.stats import recipe_name
from logitcache.storage.views_compat import check_same_views, common_epochs, load_same_views
from logitcache.views.augment import RENAMED_RECIPES, Recipe, create_recipe
from logitcache.views.loader import BatchLoader
from logitcache.views.plan import Groups, block_views

from .config import TrainConfig
from .data import create_meta_loader, meta_split


def find_cache(root: str, fingerprint: str, teacher: str | None = None) -> str:
    """The one cache under ``root`` built on the data with ``fingerprint``; errors on none or several."""
    matches = [c for c in list_caches(root) if c.manifest.dataset.fingerprint == fingerprint
               and (teacher is None or teacher in c.manifest.teacher)]
    if not matches:
        raise CacheNotFoundError(
            f"no cache for this dataset under {root} (fingerprint {fingerprint[:12]}); build one with "
            f"`logitcache build`, or pass --cache URL"
        )
    if len(matches) > 1:
        names = ", ".join(c.url for c in matches)
        raise CacheNotFoundError(f"several caches for this dataset under {root}: {names}; choose one with --cache")
    return matches[0].url


@dataclass
class RunInputs:
    """The data side of one run (see :func:`open_inputs`)."""

    train_src: SampleSource
    val_src: SampleSource
    readers: list[CacheReader]  # one per teacher, on the same views; none: no teacher term, or online without --cache
    recipe: Recipe
    view_epochs: list[int]  # the cached (or regenerated) epochs, cycled by student epoch
    held_out: np.ndarray | None  # (N,) bool over train samples: MKD's meta split, never trained on
    steps_per_epoch: int  # batches per epoch (scheduler, DKD warm-up)
    labels: np.ndarray  # (N,) int64 train labels
    epochs_needed: int = 0  # student epochs of the run
    damaged_epochs: list[int] = field(default_factory=list)  # left out by --skip-damaged-epochs
    # The train loader, kept between epochs: its workers render epoch after epoch.
    _loader: BatchLoader | None = field(default=None, repr=False)

    @property
    def num_classes(self) -> int:
        return self.train_src.num_classes

    @property
    def reader(self) -> CacheReader | None:
        """The first cache (the only one, unless several teachers teach), or None."""
        return self.readers[0] if self.readers else None

    def epochs_note(self) -> str:
        """Which cached epochs the run trains on, and which present epochs it leaves out (incomplete)."""
        if self.reader is None:
            return "no cache: views regenerated from the recipe"
        used = self.view_epochs
        skipped = sorted({e for r in self.readers for e in r.epochs_present()} - set(used) - set(self.damaged_epochs))
        caches = " + ".join(r.url for r in self.readers)
        common = " common to every cache" if len(self.readers) > 1 else ""
        note = (f"cache{'s' if len(self.readers) > 1 else ''} {caches}: training on cached epochs {_ranges(used)} "
                f"({len(used)} complete{common}, used in this order"
                f"{', cycled' if len(used) < self.epochs_needed else ''})")
        pins = [f"{r.url} is published index sha256 {r.store.index_sha256[:16]}" for r in self.readers
                if r.store.index_sha256]
        if pins:
            note += f" ({'; '.join(pins)})"
        name = recipe_name(self.reader.manifest)
        if name in RENAMED_RECIPES:
            note += f"; its recipe is {name}, {RENAMED_RECIPES[name]}"
        if skipped:
            note += (f"; epochs {_ranges(skipped)} are unfinished{' in some cache' if common else ''} and are not "
                     f"used (a build has not finished them: finish them with the same build command)")
        if self.damaged_epochs:
            note += f"; damaged epochs {_ranges(self.damaged_epochs)} are left out (--skip-damaged-epochs)"
        return note

    def view_epoch(self, epoch: int) -> int:
        """The cached epoch student epoch ``epoch`` trains on."""
        return self.view_epochs[epoch % len(self.view_epochs)]

    def train_groups(self, view_epoch: int) -> Groups:
        """The groups the student trains on: the epoch's, without any sample of MKD's meta split."""
        return _without(epoch_groups(self.train_src, self.recipe, view_epoch), self.held_out)

    def train_loader(self, cfg: TrainConfig, epoch: int, *, first_batch: int, rank: int, world_size: int,
                     device: torch.device) -> BatchLoader:
        """Student epoch ``epoch`` from batch ``first_batch`` on: this rank's slice of every global
        batch, each with its cached rows (none with an online teacher), views finished on
        ``device``. The same loader (and workers) every epoch."""
        view_epoch = self.view_epoch(epoch)
        arrays = None
        if self.readers and not cfg.online_teacher:
            arrays = load_same_views(self.readers, view_epoch, features=cfg.needs_teacher_features)
        rows = CachedRows(arrays, self.labels, self.train_src)
        self._loader = create_train_loader(
            self.train_src, self.recipe, view_epoch, self.train_groups(view_epoch), rows,
            batch_size=cfg.batch_size, seed=cfg.seed, epoch=epoch, num_workers=cfg.num_workers, rank=rank,
            world_size=world_size, pin_memory=device.type == "cuda", limit=cfg.limit_batches, skip=first_batch,
            device=device, reuse=self._loader,
        )
        return self._loader

    def meta_batches(self, cfg: TrainConfig, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """An endless stream of (images, labels) from the meta split, through the eval transform,
        from meta batch number ``start`` on (a resumed run continues the stream)."""
        loader = create_meta_loader(self.train_src, self.recipe, np.flatnonzero(self.held_out),
                                    batch_size=min(cfg.batch_size, 64), seed=cfg.seed, start=start)
        return iter(loader)


def open_inputs(cfg: TrainConfig, world_size: int) -> RunInputs:
    """Open the splits and the caches, and check that ``cfg``'s batch fits the data and the ranks."""
    train_src = open_source(cfg.data, "train")
    val_src = open_source(cfg.data, "val")
    readers = []
    if cfg.loss.kind != "none" and not cfg.online_teacher or cfg.cache:
        urls = cfg.cache_urls or [find_cache(cache_root(cfg.cache_root), train_src.fingerprint())]
        readers = [_open_cache(cfg, url, train_src, t) for t, url in enumerate(urls)]
        check_same_views([r.manifest for r in readers], urls)
        recipe = readers[0].manifest.recipe
        view_epochs, damaged = _cached_epochs(cfg, readers)
        for r in readers:
            check_views_of(r, train_src, view_epochs[:1], allow_drift=cfg.allow_view_drift)
    else:
        recipe = create_recipe(cfg.recipe or "demo32")
        view_epochs, damaged = list(range(cfg.epochs)), []
    gs = recipe.group_size
    try:
        check_batch_size(recipe, cfg.batch_size, world_size)
    except ValueError as e:
        raise LogitcacheError(f"--batch-size: {e}") from None
    if cfg.batch_size % block_views(recipe):
        warnings.warn(f"--batch-size {cfg.batch_size} is not a multiple of a repeat block ({block_views(recipe)} "
                      f"views): at each batch boundary one block's repeats straddle two batches (as in timm's "
                      f"RepeatAugSampler)", UserWarning, stacklevel=3)
    held_out = meta_split(train_src, cfg.meta_fraction, cfg.seed) if cfg.mkd is not None else None
    # Every epoch has as many groups as the first unless MKD's meta split removes a slightly
    # different number of pairs.
    n_groups = len(_without(epoch_groups(train_src, recipe, view_epochs[0]), held_out))
    return RunInputs(train_src, val_src, readers, recipe, view_epochs, held_out,
                     steps_per_epoch=_steps_per_epoch(cfg, n_groups, gs), labels=train_src.labels(),
                     epochs_needed=cfg.epochs, damaged_epochs=damaged)


def _open_cache(cfg: TrainConfig, url: str, train_src: SampleSource, teacher: int) -> CacheReader:
    """Cache number ``teacher`` of the run, checked to serve its data, recipe and loss."""
    reader = CacheReader(url)
    check_serves(reader.manifest, fingerprint=train_src.fingerprint(), num_classes=train_src.num_classes, where=url)
    if not cfg.online_teacher:
        _check_codec_serves(cfg, reader.manifest.codec, url, cfg.teachers.temperature_of(teacher, cfg.loss))
        if cfg.needs_teacher_features and not reader.has_features:
            raise LogitcacheError(f"--kd projector needs the teacher's features, and cache {url} holds logits "
                                  f"only: build a cache with `logitcache build --features`, or add "
                                  f"--online-teacher")
    _check_recipe(cfg.recipe, reader.manifest.recipe, url)
    return reader


def _check_recipe(name: str | None, recipe: Recipe, url: str) -> None:
    """Refuse a cache whose views are not those of recipe ``name`` (None: any; cache seeds aside)."""
    if name is None:
        return
    want = dataclasses.replace(create_recipe(name), cache_seed=recipe.cache_seed)
    if want != recipe:
        diff = [f"{f.name} {getattr(recipe, f.name)!r} (recipe {getattr(want, f.name)!r})"
                for f in dataclasses.fields(Recipe) if getattr(recipe, f.name) != getattr(want, f.name)]
        raise CacheMismatchError(f"cache {url} holds other views than recipe {name}: its {', '.join(diff)}; "
                                 f"build a cache with --recipe {name}, or leave the recipe out to train on the "
                                 f"cache's own")


def _check_codec_serves(cfg: TrainConfig, codec: CodecSpec, url: str, temperature: float) -> None:
    """A sampled cache serves KD at T = 1 only (logitcache.codecs.logits.check_serves_loss)."""
    try:
        check_serves_loss(codec, cfg.loss.kind, temperature, learns_temperature=cfg.mkd is not None)
    except ValueError as e:
        raise LogitcacheError(f"cache {url}: {e}") from None


def _ranges(values: list[int]) -> str:
    """'0-3, 7' for [0, 1, 2, 3, 7]."""
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs) or "-"


def _without(groups: Groups, held_out: np.ndarray | None) -> Groups:
    """The groups without any sample of MKD's meta split."""
    if held_out is None:
        return groups
    paired = groups.second >= 0
    out = held_out[groups.first] | (paired & held_out[np.where(paired, groups.second, 0)])
    return groups.take(~out)


def _cached_epochs(cfg: TrainConfig, readers: list[CacheReader]) -> list[int]:
    """The epochs complete in every cache; enough of them for ``cfg.epochs`` unless reusing is allowed."""
    view_epochs, damaged = common_epochs(readers, cfg.skip_damaged_epochs)
    url = " + ".join(r.url for r in readers)
    if not view_epochs:
        what = "no complete epoch yet" if len(readers) == 1 else (
            "no epoch complete in every cache (" + "; ".join(f"{r.url}: {_ranges(r.epochs())}" for r in readers) + ")")
        raise LogitcacheError(f"cache {url} has {what}")
    if cfg.epochs > len(view_epochs) and not cfg.reuse_epochs:
        raise LogitcacheError(
            f"{cfg.epochs} student epochs but cache {url} holds {len(view_epochs)} complete epochs; build more "
            f"(logitcache build --epochs A:B) or pass --reuse-epochs to cycle them"
        )
    if cfg.epochs > len(view_epochs):
        warnings.warn(
            f"{cfg.epochs} student epochs but cache {url} holds {len(view_epochs)} complete epochs: reusing "
            f"cached epochs (student epoch e trains on cached epoch e mod {len(view_epochs)}; --reuse-epochs)",
            UserWarning, stacklevel=4,  # attributed to train()
        )
    return view_epochs, damaged


def _steps_per_epoch(cfg: TrainConfig, n_groups: int, gs: int) -> int:
    """Batches per epoch of ``n_groups`` groups of ``gs`` views (at most ``limit_batches``)."""
    steps = n_groups // (cfg.batch_size // gs)
    if cfg.limit_batches:
        steps = min(steps, cfg.limit_batches)
    if steps < 1:
        raise LogitcacheError(f"--batch-size {cfg.batch_size} is larger than an epoch of training views "
                              f"({n_groups} groups of {gs}); use a smaller batch")
    return steps
