"""The accuracy study's units of work: the dataset, a teacher, a cache and a student run.

Each runs in a pool process, writes its result next to its files and, called again, finds
that result on disk instead of redoing the work (a student run only with ``resume``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from ..common import Clock
from .plan import RECIPE, STUDENT, TEACHER, cache_codec, cache_features

#: TrainConfig settings added after earlier studies stored their runs, with the values at which a
#: run is what it was before them: (table or "", key, value). Left out of a run's spec, so
#: ``--resume`` still finds those runs.
LATER_DEFAULTS = (("", "prokt", None), ("loss", "feature_weight", 1.0))


def log(msg: str) -> None:
    print(f"[accuracy {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def prepare_dataset(name: str, work: Path) -> Path:
    """The dataset's folder under ``work``, generated on first use (synth: again when an earlier
    study generated it with other arguments or another rendering)."""
    root = work / name / "data"
    if name == "synth":
        from logitcache.cli.demo_teacher import DEMO_DATA

        from logitcache.data.synth import generate_synth_once

        generate_synth_once(root, **DEMO_DATA)  # make demo's: 64 classes, 40 train + 10 val per class, 32 px
        return root
    if name != "digits":
        raise ValueError(f"unknown dataset {name!r}; use synth or digits")
    if (root / "dataset.json").exists():
        return root
    from logitcache.data.digits import generate_digits

    tmp = work / name / "data.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    generate_digits(tmp)  # the defaults: 80/20 split, 32 px
    tmp.rename(root)
    return root


def shipped_teacher(data: Path, work: Path) -> dict:
    """synth's teacher: the demo's, trained once by ``make teacher`` on its own images and shipped
    in cli/assets (logitcache/cli/demo_teacher.py); its top-1 measured on this val split."""
    from logitcache.cli.demo_teacher import RECORD, WEIGHTS, teacher_val_top1

    from logitcache.build.teacher import file_sha256

    record = json.loads(RECORD.read_text())
    sha = file_sha256(WEIGHTS)
    tdir = work / "synth" / f"teacher-shipped-{sha[:12]}"  # names the caches built from it
    tdir.mkdir(parents=True, exist_ok=True)
    done = tdir / "done.json"
    if not done.exists():
        done.write_text(json.dumps({"val_top1": teacher_val_top1(WEIGHTS, data)}))
    return {"model": TEACHER, "epochs": record["epochs"], "recipe": record["recipe"], "dir": str(tdir),
            "weights": str(WEIGHTS), "sha256": sha, "source": "cli/assets (make teacher)",
            "val_top1": json.loads(done.read_text())["val_top1"], "trained": record, "wall_s": 0.0, "reused": True}


def _find_or_train_teacher(name: str, data: Path, work: Path, epochs: int, workers: int,
                           only_existing: bool = False) -> dict | None:
    """Train (once) the dataset's teacher; later calls find it on disk. ``only_existing``:
    None instead of training."""
    from logitcache.trainer.config import TrainConfig
    from logitcache.trainer.losses import LossConfig
    from logitcache.trainer.train import train

    from logitcache.data.source import open_source

    fingerprint = open_source(str(data), "train").fingerprint()
    spec = {"model": TEACHER, "recipe": RECIPE, "epochs": epochs, "loss": "none", "batch_size": 128, "seed": 0,
            "data": fingerprint}
    tdir = work / name / f"teacher-{_digest(spec)}"
    weights = tdir / "model.safetensors"
    info = {"model": TEACHER, "epochs": epochs, "recipe": RECIPE, "dir": str(tdir), "weights": str(weights)}
    if (tdir / "done.json").exists():
        return {**json.loads((tdir / "done.json").read_text()), "reused": True}
    if only_existing:
        return None
    log(f"{name}: training teacher {TEACHER} for {epochs} epochs -> {tdir}")
    clock = Clock()
    summary = train(TrainConfig(data=str(data), student=TEACHER, out=str(tdir), recipe=RECIPE, epochs=epochs,
                                batch_size=128, loss=LossConfig(kind="none"), num_workers=workers, seed=0,
                                tensorboard=False))
    done = {**info, "val_top1": summary["final_top1"], "val_top5": summary["final_top5"], **clock.read()}
    (tdir / "done.json").write_text(json.dumps(done, indent=2))
    return {**done, "reused": False}


def obtain_teacher(name: str, data: Path, work: Path, epochs: int, workers: int, prefer_epochs: int | None) -> dict:
    """The dataset's teacher: synth's is the shipped one; digits' one of ``prefer_epochs`` when one
    is on disk, else one of ``epochs``, trained here."""
    if name == "synth":
        return shipped_teacher(data, work)
    if prefer_epochs:
        found = _find_or_train_teacher(name, data, work, prefer_epochs, workers, only_existing=True)
        if found is not None:
            return found
    return _find_or_train_teacher(name, data, work, epochs, workers)


def cache_tag(codec, features=None) -> str:
    """A cache's name in its path: "top10" / "full" for float16 values (where the study's caches
    have always been), else with the values: "top10-gap8", "full-gap8", "sampled32"; with
    features "-feat<r>" ("top10-feat256")."""
    if codec.name == "sampled":
        return f"sampled{codec.k}"
    tag = "full" if codec.name == "full" else f"top{codec.k}"
    tag = tag if codec.values == "float16" else f"{tag}-{codec.values}"
    return tag if features is None else f"{tag}-feat{features.dims}"


def views_digest(url: str, epochs: int) -> str:
    """sha256 (12 hex) of the plan digests of every committed unit of ``epochs`` epochs: equal
    for two caches exactly when their views (seeds and pairings) are the same."""
    from logitcache.storage.reader import CacheReader

    reader = CacheReader(url)
    plans = [str((reader.commit(e, s) or {}).get("plan")) for e in range(epochs) for s in range(reader.num_shards)]
    return _digest(plans)


def build_cache(name: str, data: Path, work: Path, teacher: dict, cid, epochs: int, workers: int) -> dict:
    """Build (or extend to ``epochs``, or just find) the cache ``cid`` (plan.cache_id: 1, 5, 10,
    "full" for float16 top-k; "top10-gap8"; "sampled32") of this teacher."""
    from logitcache.build.loop import build
    from logitcache.build.teacher import Teacher
    from logitcache.data.source import open_source
    from logitcache.storage.reader import CacheReader
    from logitcache.views.augment import create_recipe

    source = open_source(str(data), "train")
    codec, features = cache_codec(cid, source.num_classes), cache_features(cid)
    tag = cache_tag(codec, features)
    url = str(work / name / "caches" / f"{Path(teacher['dir']).name}-{tag}.zarr")
    stats = Path(url + ".accuracy.json")  # how the build went, for reruns that reuse the cache
    have = CacheReader(url).epochs() if Path(url, "zarr.json").exists() else []
    about = {"url": url, "codec": tag, "codec_name": codec.name, "k": codec.k, "values": codec.values,
             "features": None if features is None else f"pca{features.dims}"}
    if set(range(epochs)) <= set(have):
        built = json.loads(stats.read_text()) if stats.exists() else {"wall_s": 0.0}
        return {**built, **about, "epochs": len(have), "views_digest": views_digest(url, epochs), "reused": True}
    log(f"{name}: building cache {tag} ({epochs} epochs) -> {url}")
    clock = Clock()
    report = build(source, dataset_name=name, teacher=Teacher(TEACHER, weights=teacher["weights"]),
                   recipe=create_recipe(RECIPE), codec=codec, url=url, epochs=list(range(epochs)), batch_size=128,
                   num_workers=workers, progress=False, features=features)
    result = {**about, "epochs": epochs, "views": report.views, "views_per_s": report.views_per_s, **clock.read()}
    stats.write_text(json.dumps(result, indent=2))
    return {**result, "views_digest": views_digest(url, epochs), "reused": False}


def train_student(name: str, data: Path, work: Path, variant: str, seed: int, epochs: int, extra: dict,
                  workers: int, resume: bool, limit_batches: int | None) -> dict:
    """One student run; with ``resume``, a finished run with the same settings is reused."""
    from logitcache.trainer.config import TrainConfig
    from logitcache.trainer.metrics_log import read_rows
    from logitcache.trainer.train import train

    out = work / name / "students" / f"e{epochs}" / variant / f"seed{seed}"
    cfg = TrainConfig(data=str(data), student=STUDENT, out=str(out), epochs=epochs, batch_size=128, lr=2e-3,
                      num_workers=workers, seed=seed, tensorboard=False, progress=False,
                      limit_batches=limit_batches, **extra)
    spec = json.loads(json.dumps(asdict(cfg), default=str))
    spec.pop("num_workers")  # the views, and so the results, do not depend on it
    for table, key, value in LATER_DEFAULTS:  # settings added since runs were stored: at these values nothing changes
        where = spec[table] if table else spec
        if where.get(key) == value:
            where.pop(key)
    marker = out / "accuracy_run.json"
    if resume and marker.exists():
        saved = json.loads(marker.read_text())
        if saved.get("spec") == spec:
            return {**saved["result"], "reused": True}
    shutil.rmtree(out, ignore_errors=True)
    clock = Clock()
    summary = train(cfg)
    curve = read_rows(out / "metrics.jsonl")
    result = {"top1": summary["final_top1"], "top5": summary["final_top5"], "best_top1": summary["best_top1"],
              "curve_top1": [r["val_top1"] for r in curve], **clock.read(),
              "train_images_per_s": summary["images_per_s"], "dir": str(out)}
    for key in ("t_teacher", "t_student"):
        if key in summary:
            result[key] = summary[key]
    marker.write_text(json.dumps({"spec": spec, "result": result}, indent=2))
    return {**result, "reused": False}
