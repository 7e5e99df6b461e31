"""One train loader for a whole run (persistent workers, given each epoch's batches) yields
exactly what a new loader per epoch yields, also after an epoch broken off half-way."""

from __future__ import annotations

import numpy as np
import torch

from logitcache.data.source import open_source
from logitcache.replay.batches import create_train_loader, epoch_groups
from logitcache.replay.rows import CachedRows
from logitcache.views.augment import create_recipe


def _epoch(loader) -> list[dict]:
    return [{k: batch[k].clone() for k in ("images", "index", "label", "lam")} for batch in loader]


def test_a_reused_loader_yields_what_a_new_one_does(synth_data):
    source = open_source(synth_data, "train")
    recipe = create_recipe("demo32_mix")
    rows = CachedRows(None, np.asarray(source.labels()), source)
    kw = dict(batch_size=8, seed=3, num_workers=2, limit=4)

    def loader(view_epoch, epoch, reuse=None):
        return create_train_loader(source, recipe, view_epoch, epoch_groups(source, recipe, view_epoch), rows,
                                   epoch=epoch, reuse=reuse, **kw)

    kept = loader(0, 0)
    for batch in kept:  # an epoch broken off after its first batch: its workers had more in flight
        break
    for view_epoch, epoch in ((1, 1), (0, 2)):
        again = _epoch(loader(view_epoch, epoch, reuse=kept))
        fresh = _epoch(loader(view_epoch, epoch))
        assert len(again) == len(fresh) == 4
        for a, b in zip(again, fresh):
            for k in a:
                assert torch.equal(a[k], b[k]), k
    assert loader(1, 1, reuse=kept) is kept and kept.persistent_workers
    assert not torch.equal(_epoch(loader(1, 1))[0]["index"], _epoch(loader(0, 2))[0]["index"])
