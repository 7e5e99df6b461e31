"""``logitcache build``: each teacher over every view of the asked epochs, into a cache per
teacher (one process, several with ``--procs``, or one rank under torchrun)."""

from __future__ import annotations

import json
import os
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    """Add the ``build`` command to ``app``."""
    app.command()(build)


def parse_epochs(text: str) -> list[int]:
    """'N' -> 0..N-1; 'A:B' -> A..B-1."""
    try:
        if ":" in text:
            a, b = (int(p) for p in text.split(":", 1))
        else:
            a, b = 0, int(text)
    except ValueError:
        raise typer.BadParameter(f"--epochs takes N or A:B, not {text!r}") from None
    if not 0 <= a < b:
        raise typer.BadParameter(f"--epochs {text}: need 0 <= A < B")
    return list(range(a, b))


def _check_epochs(text: str) -> str:
    """typer callback: reject a bad --epochs before anything is opened."""
    parse_epochs(text)
    return text


def _values(value_dtype: str | None, value_bits: int | None) -> str:
    """The codec's values: float16/float32, or gap<bits> (default gap8)."""
    if value_dtype is not None and value_bits is not None:
        raise typer.BadParameter("give --value-bits (quantised gaps) or --value-dtype (floats), not both")
    if value_dtype is not None and value_dtype not in ("float16", "float32"):
        raise typer.BadParameter(f"--value-dtype must be float16 or float32, not {value_dtype!r}")
    return value_dtype or f"gap{value_bits or 8}"


def _build_rank(*, data, teacher, teacher_weights, teacher_input_size, split, recipe, aug_repeats, cache_seed, out,
                cache_root, views_of, epochs, codec, topk, value_dtype, value_bits, batch_size, workers, device, compile,
                progress, recheck, allow_view_drift, features, feature_dims, feature_dtype, feature_fit_views) -> None:
    """The body of ``build`` for one process: the whole build, or one rank of it when the
    environment says so (WORLD_SIZE > 1: torchrun, or a child started by ``--procs``)."""
    from logitcache import distributed
    from logitcache.build.loop import build_many
    from logitcache.codecs.logits import create_codec
    from logitcache.data.source import open_source
    from logitcache.distributed import resolve_device

    source = open_source(data, split)
    if views_of is not None:
        rec, epoch_list = _views_of(views_of, source, recipe, aug_repeats, cache_seed, epochs, allow_view_drift)
    else:
        rec = _recipe(recipe, aug_repeats, cache_seed)
        epoch_list = parse_epochs(epochs or "1")
    dev = distributed.rank_device(resolve_device(device))
    spec = create_codec(codec, source.num_classes, topk, _values(value_dtype, value_bits))
    name = _dataset_name(data)
    targets = _targets(teacher, teacher_weights, teacher_input_size, out, cache_root, source, name, split, rec, spec,
                       dev, compile, (features, feature_dims, feature_dtype, feature_fit_views))
    ctx = distributed.init_from_env(dev)
    for t in targets:
        note = t.teacher.resize_note(rec.input_size)
        if note and ctx.rank == 0:
            print(note, flush=True)
    try:
        reports = build_many(source, dataset_name=name, targets=targets, recipe=rec, epochs=epoch_list,
                             batch_size=batch_size, num_workers=workers, rank=ctx.rank, world_size=ctx.world_size,
                             barrier=ctx.barrier, progress=progress and ctx.rank == 0, recheck=recheck,
                             allow_view_drift=allow_view_drift)
    finally:
        ctx.close()
    for report in reports:
        _print_report(report, f"rank {ctx.rank}/{ctx.world_size}: " if ctx.world_size > 1 else "")


def _recipe(name: str | None, aug_repeats: int | None, cache_seed: int | None):
    from logitcache.views.augment import create_recipe

    return create_recipe(name or "vanillakd_a2", cache_seed=cache_seed or 0,
                         **({"aug_repeats": aug_repeats} if aug_repeats else {}))


def _views_of(url: str, source, recipe, aug_repeats, cache_seed, epochs: str | None, allow_view_drift: bool):
    """`--views-of CACHE`: that cache's recipe (cache seed included) and, unless --epochs says
    otherwise, its complete epochs; the data must be its data, and the views rendered here its views."""
    from logitcache.storage.canary import check_views_of
    from logitcache.storage.manifest import check_serves
    from logitcache.storage.reader import CacheReader

    given = [f for f, v in (("--recipe", recipe), ("--aug-repeats", aug_repeats), ("--cache-seed", cache_seed))
             if v is not None]
    if given:
        raise typer.BadParameter(f"--views-of takes the recipe and cache seed from {url}: drop {', '.join(given)}")
    reader = CacheReader(url)
    check_serves(reader.manifest, fingerprint=source.fingerprint(), num_classes=source.num_classes, where=url)
    if epochs is None:
        epoch_list = reader.epochs()
        if not epoch_list:
            raise typer.BadParameter(f"--views-of {url}: that cache has no complete epoch; give --epochs")
    else:
        epoch_list = parse_epochs(epochs)
    check_views_of(reader, source, allow_drift=allow_view_drift)
    return reader.manifest.recipe, epoch_list


def _paired(flag: str, values: list | None, teachers: list[str]) -> list:
    """A per-teacher option: absent (None for each teacher) or given once per --teacher, in order."""
    if not values:
        return [None] * len(teachers)
    if len(values) != len(teachers):
        raise typer.BadParameter(f"{flag} is given {len(values)} times for {len(teachers)} --teacher: give it once "
                                 f"per teacher, in their order, or not at all")
    return list(values)


def _targets(teachers, weights, input_sizes, outs, cache_root, source, dataset_name, split, rec, spec, dev, compile,
             feature_flags) -> list:
    """One BuildTarget per --teacher: its Teacher, codec, cache URL (--out, else a name under
    the cache root) and feature request."""
    from logitcache.build.loop import BuildTarget, default_cache_name
    from logitcache.build.teacher import Teacher
    from logitcache.storage.catalog import cache_root as root_of

    targets = []
    for teacher, w, size, out in zip(teachers, _paired("--teacher-weights", weights, teachers),
                                     _paired("--teacher-input-size", input_sizes, teachers),
                                     _paired("--out", outs, teachers)):
        t = Teacher(teacher, weights=None if w in (None, "-") else w, num_classes=source.num_classes, device=dev,
                    compile=compile, input_size=size)
        feats = _feature_request(*feature_flags, t.feature_dim)
        named = default_cache_name(dataset_name, split, t.name, rec, spec, feats)
        url = out or f"{root_of(cache_root).rstrip('/')}/{named}"
        targets.append(BuildTarget(t, spec, url, feats))
    return targets


def _print_report(report, who: str) -> None:
    """The build's summary: what it wrote, and the rate of each stage with the one that bounds it."""
    print(f"{who}cache {report.url}: {report.units_written} units written, {report.units_skipped} already committed, "
          f"{report.views} views in {report.seconds:.1f} s ({report.views_per_s:.1f} views/s)", flush=True)
    if report.views:
        workers = f"{report.workers} worker{'' if report.workers == 1 else 's'}"
        print(f"{who}stages: rendering {report.render_views_per_s:,.1f} views/s ({workers}), teacher "
              f"{report.teacher_views_per_s:,.1f} views/s: {report.bound_by} bounds this build", flush=True)


def _feature_request(features: bool, dims: Optional[str], dtype: Optional[str], fit_views: Optional[int],
                     feature_dim: int):
    """The FeatureRequest of `build --features ...` (None without --features); flags checked here."""
    from logitcache.build.features import DEFAULT_FIT_VIEWS, FeatureRequest
    from logitcache.codecs.features import DEFAULT_RANK, create_feature_spec

    if not features:
        given = [f for f, v in (("--feature-dims", dims), ("--feature-dtype", dtype), ("--feature-fit-views", fit_views))
                 if v is not None]
        if given:
            raise typer.BadParameter(f"{', '.join(given)} without --features")
        return None
    try:
        spec = create_feature_spec(feature_dim, dims if dims is not None else DEFAULT_RANK, dtype)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    return FeatureRequest(dims=spec.rank if spec.rank is not None else "full", dtype=spec.dtype,
                          fit_views=fit_views or DEFAULT_FIT_VIEWS)


_TEACHER = typer.Option(..., metavar="NAME", help="timm model name or alias (beitv2_l, beitv2_b, resnet152); repeat "
                                                   "--teacher to run several teachers on each view, one cache each.")
_TEACHER_WEIGHTS = typer.Option(None, metavar="PATH", show_default="timm's pretrained weights",
                                help="Weights file (safetensors or a plain state dict); with several teachers once "
                                     "per --teacher, in order ('-': timm's).")
_TEACHER_INPUT_SIZE = typer.Option(None, metavar="PIXELS", min=8,
                                   show_default="recorded in the weights file, else timm's default",
                                   help="Input size the teacher runs at (views are resized to it); with several "
                                        "teachers once per --teacher.")
_OUT = typer.Option(None, metavar="URL", show_default="a named folder under the cache root",
                    help="Cache URL; with several teachers once per --teacher.")
_CACHE_ROOT = typer.Option(None, metavar="URL", show_default="$LOGITCACHE_ROOT or ~/.cache/logitcache",
                           help="Where named caches live.")
_FEATURE_DIMS = typer.Option(None, metavar="INTEGER|full", show_default="256",
                             help="Features: PCA components kept (a basis fitted on the first epoch), or full (every dim).")
_SPLIT = typer.Option("train", metavar="TEXT", help="Dataset split to cache.")
_CACHE_SEED = typer.Option(None, metavar="INTEGER", show_default="0", help="Root seed of every view seed.")
_VIEWS_OF = typer.Option(None, metavar="URL", help="Build on exactly the views of this cache: its recipe, cache seed "
                                                   "and (unless --epochs) complete epochs, for a student taught by both.")
_EPOCHS = typer.Option(None, metavar="N|A:B", callback=lambda t: t if t is None else _check_epochs(t),
                       show_default="1; with --views-of, that cache's complete epochs",
                       help="N: epochs 0..N-1; A:B: extend with epochs A..B-1.")
_RECIPE = typer.Option(None, metavar="NAME", show_default="vanillakd_a2",
                       help="Augmentation recipe: vanillakd_a2, vanillakd_a1, deit, imagenet_basic, demo32, demo32_mix "
                            "(vanillakd_a2_norepeat: vanillakd_a2 before repeated augmentation).")
_AUG_REPEATS = typer.Option(None, metavar="INTEGER", min=1, show_default="the recipe's",
                            help="Repeated augmentation (timm's --aug-repeats): about 1/N of the samples per epoch, "
                                 "each N times as its own view.")

_RECHECK = typer.Option(False, help="Read every committed unit back, check it against its commit record, and "
                                    "rebuild the damaged ones.")


def build(
    data: str = typer.Option(..., metavar="URL", help="Dataset root (with dataset.json) or image folder; any fsspec URL."),
    teacher: list[str] = _TEACHER,
    teacher_weights: Optional[list[str]] = _TEACHER_WEIGHTS,
    teacher_input_size: Optional[list[int]] = _TEACHER_INPUT_SIZE,
    split: str = _SPLIT,
    recipe: Optional[str] = _RECIPE,
    aug_repeats: Optional[int] = _AUG_REPEATS,
    cache_seed: Optional[int] = _CACHE_SEED,
    out: Optional[list[str]] = _OUT,
    cache_root: Optional[str] = _CACHE_ROOT,
    views_of: Optional[str] = _VIEWS_OF,
    epochs: Optional[str] = _EPOCHS,
    codec: str = typer.Option("topk", metavar="topk|full|sampled",
                              help="Keep the top-k logits per view, all of them, or N draws from the teacher."),
    topk: Optional[int] = typer.Option(None, metavar="INTEGER", min=1, show_default="10; sampled: 32",
                                       help="Logits kept per view (k >= classes means full); sampled: draws per view."),
    value_bits: Optional[int] = typer.Option(None, metavar="INTEGER", min=2, max=16, show_default="8",
                                             help="Bits per stored logit: its gap below the view's top logit, "
                                                  "quantised (docs/FORMAT.md gives the error bound)."),
    value_dtype: Optional[str] = typer.Option(None, metavar="float16|float32", show_default="quantised gaps",
                                              help="Store the logits as floats instead of quantised gaps."),
    batch_size: int = typer.Option(64, metavar="INTEGER", min=1, help="Views per teacher batch."),
    workers: Optional[int] = typer.Option(None, metavar="INTEGER", min=0, show_default="CPU: 1, CUDA: up to 8",
                                          help="DataLoader worker processes per build process."),
    device: str = typer.Option("auto", metavar="TEXT", help="auto, cpu, cuda or cuda:N."),
    compile: bool = typer.Option(False, help="torch.compile the teacher."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    procs: int = typer.Option(1, metavar="INTEGER", min=1, help="Build processes on this machine (ranks; each writes its own units)."),
    recheck: bool = _RECHECK,
    allow_view_drift: bool = typer.Option(False, help="Add to a cache even when views rendered here differ from "
                                                      "those its teacher saw (library versions)."),
    features: bool = typer.Option(False, help="Also store each view's pooled pre-logit teacher features (for --kd projector)."),
    feature_dims: Optional[str] = _FEATURE_DIMS,
    feature_dtype: Optional[str] = typer.Option(None, metavar="int8|float16|float32", show_default="int8 with PCA, float16 for full",
                                                help="Features: stored values (int8 with a per-view scale)."),
    feature_fit_views: Optional[int] = typer.Option(None, metavar="INTEGER", min=1, show_default="8192",
                                                    help="Features: views of the first epoch the basis is fitted on."),
):
    """Run the teacher once over every augmented view and store compressed logits.

    The cache is written in whole units (epoch x data shard), each committed last: a build
    that was killed or interrupted finishes when run again with the same arguments, and
    `--epochs A:B` extends a cache while students read its complete epochs.

    Several teachers: `--teacher A --teacher B` renders each view once and runs both,
    writing one cache per teacher (each usable alone, byte-identical to a build of that
    teacher alone); `--views-of CACHE` builds a later teacher's cache on an earlier one's
    views. `logitcache train --cache A --cache B` learns from both.

    Several processes: `--procs N` runs N ranks on this machine; or launch with
    `torchrun --nproc-per-node N logitcache build ...` (one or more machines; ranks from
    RANK/WORLD_SIZE/LOCAL_RANK; on CUDA rank r uses cuda:LOCAL_RANK). Units are dealt out
    round-robin; `--workers` is per process. The cache is byte-identical to a one-process
    build when every process uses the same number of CPU threads (OMP_NUM_THREADS; torchrun
    sets 1): CPU kernels round differently with other thread counts.

    Object storage: --data and --out take any fsspec URL (s3://, gs://, ...). For an
    S3-compatible server set AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) and the usual
    AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_DEFAULT_REGION; any other s3fs option
    can be given as `FSSPEC_S3_<OPTION>` (fsspec's environment configuration). Data on
    object storage: `logitcache data index URL...` once, so each process opens the shards
    from their small index files; LOGITCACHE_SHARD_CACHE=DIR keeps local copies of shards.
    """
    opts = {k: v for k, v in locals().items() if k != "procs"}
    if procs < 1:
        raise typer.BadParameter(f"--procs must be >= 1, not {procs}")
    if procs == 1:
        _build_rank(**opts)
        return
    import functools

    from logitcache import distributed

    if distributed.env_world_size() > 1:
        raise typer.BadParameter("--procs starts its own ranks; do not combine it with torchrun")
    code = distributed.run_procs(functools.partial(_build_rank, **opts), procs)
    if code:
        raise typer.Exit(code)


def _dataset_name(data: str) -> str:
    """The dataset's name from its dataset.json, else the folder name."""
    import fsspec

    try:
        with fsspec.open(data.rstrip("/") + "/dataset.json", "r") as f:
            return json.load(f)["name"]
    except (FileNotFoundError, KeyError, ValueError):
        return os.path.basename(data.rstrip("/")) or "data"
