"""Teacher features in the cache (`build --features`): bytes per view and reconstruction
quality by setting, and the cost of a cached projector step against a cached KD step.

(a) Features of a trained teacher on augmented views of the embedded synthetic dataset: the
demo teacher (timm resnet18, D = 512) when ``make demo`` has run, else a timm resnet10t
(D = 512) trained here for a few epochs. The basis is fitted on epoch-0 views (as a build
fits it); the figures are measured on other views (epoch 1), written as real units with
``CacheWriter`` (zarr, zstd), read back with ``load_epoch(features=True)`` and decoded as the
trainer decodes them: bytes of the feature arrays per view on disk, mean cosine and mean
relative L2 error to the teacher's own float32 features.

(b) One process, one student, the same batch: ``kd`` = the cached KD step (decode the
default codec's rows, CE + KD); ``projector`` = the same plus decoding int8 PCA-256 features
of a D = 1024 teacher (BEiTv2-L's width) and the projector term (linear projector, batch
normalisation, soft maximum; trainer/projector.py). Interleaved, warm-up dropped; the figure
is the median over rounds of the within-round ratio (target <= 1.05).
"""

from __future__ import annotations

import shutil
import statistics

import torch

from logitcache.storage.stats import storage_bytes

from .common import Ctx, interleaved, stats, synthetic_manifest, synthetic_unit
from .demo_logits import (
    DEMO_DATA,
    DEMO_TEACHER,
    RECIPE,
    demo_teacher_present,
    teacher_on_views,
    train_tiny_teacher,
)

SETTINGS = (("pca64", 64, "int8"), ("pca256", 256, "int8"), ("full", "full", "float16"), ("full", "full", "float32"))
FALLBACK_MODEL = "resnet10t"
STEP_TEACHER_DIM = 1024


def settings(ctx: Ctx) -> dict:
    return {
        "views": ctx.pick(quick_cpu=2048, full_cpu=8192, tiny=300),
        "unit_views": ctx.pick(quick_cpu=1024, full_cpu=1251, tiny=100),
        "train_per_class": ctx.pick(quick_cpu=24, full_cpu=40, tiny=3),
        "teacher_epochs": ctx.pick(quick_cpu=4, full_cpu=8, tiny=1),
        "student": ctx.pick(quick_cpu="resnet50", full_cpu="resnet50", tiny="test_resnet"),
        "batch_size": ctx.pick(quick_cpu=8, full_cpu=16, quick_cuda=128, full_cuda=128, tiny=4),
        "input_size": ctx.pick(quick_cpu=224, full_cpu=224, tiny=64),
        "warmup_steps": ctx.pick(quick_cpu=2, full_cpu=3, tiny=1),
        "timed_steps": ctx.pick(quick_cpu=8, full_cpu=16, quick_cuda=30, full_cuda=50, tiny=2),
    }


# --- (a) bytes and quality -------------------------------------------------------------------

def teacher_features(ctx: Ctx, s: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(epoch-0 features (n, D), epoch-1 features (n, D), info) of the trained teacher."""
    from logitcache.data.synth import generate_synth
    from logitcache.views.augment import create_recipe

    recipe = create_recipe(RECIPE)
    if demo_teacher_present():
        data, weights, info = str(DEMO_DATA), str(DEMO_TEACHER), {"source": "demo_out/teacher (make demo)"}
    else:
        tpc = s["train_per_class"]
        data = str(generate_synth(ctx.workdir / "synth_features", train_per_class=tpc, val_per_class=max(2, tpc // 4)))
        weights, trained = train_tiny_teacher(ctx, data, recipe, FALLBACK_MODEL, s["teacher_epochs"])
        info = {"source": "trained here (no demo_out)", **trained}
    (fit, held), teacher = teacher_on_views(ctx, data, weights, recipe, s["views"], epochs=(0, 1), features=True)
    return fit, held, {**info, "model": teacher.name, "dim": teacher.feature_dim, "views": len(fit)}


def measure_setting(ctx: Ctx, fit: torch.Tensor, held: torch.Tensor, dims, dtype: str, unit_views: int) -> dict:
    """Fit (on ``fit``), write ``held`` as feature units, read back, decode; bytes and quality."""
    from logitcache.build.features import feature_entry
    from logitcache.codecs.features import (
        create_feature_spec,
        decode_features,
        encode_features,
        fit_basis,
        reconstruction_quality,
    )
    from logitcache.codecs.logits import create_codec, encode
    from logitcache.storage.reader import CacheReader
    from logitcache.storage.writer import CacheWriter

    spec = create_feature_spec(held.shape[1], dims, dtype)
    basis = fit_basis(fit, spec.rank) if spec.rank is not None else None
    n = len(held) // unit_views * unit_views
    codec = create_codec("topk", 128, 10)
    manifest = synthetic_manifest(n, [unit_views] * (n // unit_views), codec)
    manifest.add_features(feature_entry(spec, basis, len(fit)))
    url = str(ctx.workdir / f"features_{spec.label.replace('/', '_')}.zarr")
    writer = CacheWriter(url, manifest, basis=basis)
    writer.prepare_epochs([0])
    logits = torch.zeros(unit_views, 128)
    for u in range(n // unit_views):
        unit = synthetic_unit(unit_views, u * unit_views, seed=u)
        rows = {**encode(codec, logits, unit["view_seeds"]),
                **encode_features(spec, basis, held[u * unit_views:(u + 1) * unit_views])}
        writer.write_unit(0, u, rows, unit["plan"], canary=unit["canary"])
    feat_bytes = sum(storage_bytes(f"{url}/epochs/0000/units/{u:05d}/{a}") for u in range(n // unit_views)
                     for a in spec.stored_arrays())
    basis_bytes = storage_bytes(f"{url}/features") if basis is not None else 0
    reader = CacheReader(url)
    epoch = reader.load_epoch(0, features=True)
    basis_t = reader.feature_basis().to_torch("cpu") if basis is not None else None
    scale = torch.from_numpy(epoch.feat_scale) if epoch.feat_scale is not None else None
    decoded = decode_features(spec, basis_t, torch.from_numpy(epoch.feat), scale)
    quality = reconstruction_quality(held[:n], decoded)
    shutil.rmtree(url)
    return {"label": spec.label, "dim": spec.dim, "width": spec.width, "views": n,
            "feature_bytes_per_view": feat_bytes / n, "raw_bytes_per_view": spec.raw_bytes_per_view,
            "basis_bytes": basis_bytes, "explained_on_fit": basis.explained if basis is not None else 1.0,
            "cosine": quality["cosine"], "rel_l2": quality["rel_l2"]}


# --- (b) projector step vs KD step -------------------------------------------------------------

class StepBench:
    """One student, one batch: the cached KD step and the cached projector step."""

    def __init__(self, s: dict, device: torch.device, seed: int = 0):
        import timm
        from logitcache.trainer.projector import FeatureStudent

        from logitcache.codecs.features import (
            create_feature_spec,
            encode_features,
            fit_basis,
        )
        from logitcache.codecs.logits import create_codec, encode

        from .common import teacher_like_logits

        b, size, c = s["batch_size"], s["input_size"], 1000
        g = torch.Generator().manual_seed(seed)
        self.device = device
        self.x = torch.randn(b, 3, size, size, generator=g)
        self.target = torch.softmax(torch.randn(b, c, generator=g), dim=1)
        self.codec = create_codec("topk", c, 10)
        self.rows = {k: torch.from_numpy(v) for k, v in
                     encode(self.codec, torch.from_numpy(teacher_like_logits(b, c, seed=seed)[0])).items()}
        fit = torch.randn(512, STEP_TEACHER_DIM, generator=g)
        self.fspec = create_feature_spec(STEP_TEACHER_DIM, 256, "int8")
        basis = fit_basis(fit, 256)
        self.basis_t = basis.to_torch(device)
        self.feat = {k: torch.from_numpy(v) for k, v in encode_features(self.fspec, basis, fit[:b]).items()}
        torch.manual_seed(seed)
        self.kd_student = timm.create_model(s["student"], num_classes=c).to(device).train()
        torch.manual_seed(seed)
        self.pj_student = FeatureStudent(timm.create_model(s["student"], num_classes=c), STEP_TEACHER_DIM).to(device)
        self.kd_opt = torch.optim.AdamW(self.kd_student.parameters(), lr=1e-4)
        self.pj_opt = torch.optim.AdamW(self.pj_student.parameters(), lr=1e-4)

    def _teacher_logits(self):
        from logitcache.codecs.logits import decode

        return decode(self.codec, *(self.rows[k].to(self.device) for k in ("ids", "values", "tail")))

    def step_kd(self):
        from logitcache.trainer.losses import LossConfig, distill_loss

        loss, _ = distill_loss(LossConfig(kind="kd"), self.kd_student(self.x.to(self.device)),
                               self._teacher_logits(), self.target.to(self.device))
        self.kd_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.kd_opt.step()

    def step_projector(self):
        from logitcache.trainer.losses import LossConfig, distill_loss
        from logitcache.trainer.projector import projector_distance

        from logitcache.codecs.features import decode_features

        teacher_feat = decode_features(self.fspec, self.basis_t, self.feat["feat"].to(self.device),
                                       self.feat["feat_scale"].to(self.device))
        logits, projected = self.pj_student(self.x.to(self.device))
        loss, _ = distill_loss(LossConfig(kind="projector"), logits, self._teacher_logits(),
                               self.target.to(self.device))
        loss = loss + projector_distance(projected, teacher_feat)
        self.pj_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.pj_opt.step()


def run(ctx: Ctx) -> dict:
    s = settings(ctx)
    fit, held, info = teacher_features(ctx, s)
    rows = [measure_setting(ctx, fit, held, dims, dtype, s["unit_views"]) for _, dims, dtype in SETTINGS]
    bench = StepBench(s, ctx.device)
    times = interleaved({"kd": bench.step_kd, "projector": bench.step_projector}, warmup=s["warmup_steps"],
                        reps=s["timed_steps"], device=ctx.device)
    ratio = statistics.median(p / k for p, k in zip(times["projector"], times["kd"]))
    by = {r["label"]: r for r in rows}
    summary = {"projector_over_kd_step": ratio,
               **{f"feature_bytes_per_view_{lab.replace('/', '_')}": r["feature_bytes_per_view"] for lab, r in by.items()},
               **{f"feature_cosine_{lab.replace('/', '_')}": r["cosine"] for lab, r in by.items()}}
    return {"settings": s, "teacher": info, "results": rows,
            "steps": {name: stats(v) for name, v in times.items()}, "summary": summary}


def plot(data: dict, outdir) -> list[str]:
    return []


def markdown(data: dict) -> str:
    s, t = data["settings"], data["teacher"]
    lines = [f"Teacher `{t['model']}` ({t['source']}), D = {t['dim']}: basis fitted on {t['views']:,} epoch-0 views, "
             f"figures on {t['views']:,} epoch-1 views written as units of {s['unit_views']:,}.", "",
             "| features | stored per view | bytes/view on disk | before zstd | cosine | rel. L2 error | "
             "variance kept (fit) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in data["results"]:
        lines.append(f"| {r['label']} | {r['width']} values | {r['feature_bytes_per_view']:.1f} | "
                     f"{r['raw_bytes_per_view']:.0f} | {r['cosine']:.4f} | {r['rel_l2']:.4f} | "
                     f"{100 * r['explained_on_fit']:.1f}% |")
    st = data["steps"]
    lines += ["", f"The basis itself is stored once per cache ({max(r['basis_bytes'] for r in data['results']) / 2**20:.2f} "
              f"MB at the widest), nothing per view.", "",
              f"Step cost, student `{s['student']}`, batch {s['batch_size']} at {s['input_size']} px: cached KD "
              f"{st['kd']['median']:.3f} s, cached projector (pca256/int8 features of a D = {STEP_TEACHER_DIM} "
              f"teacher) {st['projector']['median']:.3f} s; `projector_over_kd_step` = "
              f"**{data['summary']['projector_over_kd_step']:.3f}** (target <= 1.05; median of within-round ratios)."]
    return "\n".join(lines)
