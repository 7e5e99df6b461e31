"""The codec frontier: bytes per view on disk against the fidelity of the rebuilt distribution.

Every codec setting (topk k x values, full float16, sampled N draws) writes the same views
with the real path (``logitcache.codecs.logits.encode``, ``CacheWriter.write_unit`` into a local
format-3 cache, units of ``unit_views`` views, each with its plan digest and a canary in
its commit record as a build writes them), reads them back with ``CacheReader.load_epoch``
and rebuilds the distribution from what was read (``logitcache.codecs.logits.decode``). Bytes per
view = everything in the cache's folder (array chunks, every ``zarr.json``, commit records,
manifest; ``logitcache.storage.stats.storage_bytes``) / views.

Fidelity, mean over views, against the teacher's own softmax: KL(teacher || rebuilt) at
T = 1 and T = 4 (nats), total-variation distance at T = 1, top-1 agreement (the teacher's
top class is a mode of the rebuilt distribution), top-5 overlap (|top5(rebuilt) ∩
top5(teacher)| / 5; a rebuilt class of probability 0 never counts). Both count a class tied
at the boundary as in: quantised gaps give near-equal logits equal values, and no loss can
order classes of equal probability; ``top1_tied`` is the share of views whose rebuilt mode
is not unique. A
sampled row gives probability 0 to every class it did not draw, so its KL is infinite
(recorded as None) and it has no T = 4 distribution; its TV is finite.

TinyViT's format, side by side on the same logits: per view an int32 seed and the top k
classes as int16 ids + fp16 T = 1 *probabilities*, 4 + 4k bytes (44 B at k = 10; by that
formula, not written); rebuilt as TinyViT does: every class gets ``minor = (1 - sum of the
kept fp16 probabilities) / (C - k)``, then the kept probabilities are scattered in (no
renormalisation). At T = 4 its vector is tempered (q^(1/4), renormalised).

Two logit sets: (a) ImageNet-shaped random logits, 1000 classes
(``bench.common.teacher_like_logits``); (b) the demo teacher's, 128 classes
(bench/demo_logits.py).
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import torch

from logitcache.storage.stats import storage_bytes

from .common import Ctx, synthetic_manifest, synthetic_unit, teacher_like_logits
from .frontier_report import markdown, plot  # noqa: F401 - bench.report calls them from here

IMAGENET_CLASSES = 1000
IMAGENET_VIEWS = 1_281_167
EPOCHS = 300
BUDGET_BYTES = 44  # TinyViT's bytes per view at k = 10
CHUNK = 2048  # views per fidelity batch (bounds the float64 (chunk, C) tensors)


def settings(ctx: Ctx) -> dict:
    tiny = ctx.tiny
    return {
        "topk_ks": [5, 10] if tiny else [5, 10, 20, 30, 50],
        "topk_values": ["gap8", "float16"] if tiny else ["gap4", "gap6", "gap8", "gap10", "float16"],
        "sampled_ns": [32] if tiny else [8, 16, 32, 64, 128],
        "tinyvit_ks": [10] if tiny else [10, 20, 30],
        "full_values": "float16",
        "temperatures": [1, 4],
        # ImageNet-1k's 1,281,167 training images in 1,024 shards: 1,251 per unit
        "unit_views": 100 if tiny else 1251,
        "imagenet_views": ctx.pick(quick_cpu=1251 * 8, full_cpu=1251 * 24, tiny=200),
        "demo_views": ctx.pick(quick_cpu=1251 * 2, full_cpu=1251 * 4, tiny=200),
        "fallback_train_per_class": ctx.pick(quick_cpu=16, full_cpu=40, tiny=2),
        "fallback_epochs": ctx.pick(quick_cpu=6, full_cpu=15, tiny=1),
    }


def codec_settings(s: dict, num_classes: int) -> list:
    """The CodecSpecs measured: topk k x values, full, sampled N."""
    from logitcache.codecs.logits import create_codec

    specs = [create_codec("topk", num_classes, k, v) for k in s["topk_ks"] for v in s["topk_values"]]
    specs.append(create_codec("full", num_classes, values=s["full_values"]))
    return specs + [create_codec("sampled", num_classes, n) for n in s["sampled_ns"]]


def setting_name(spec) -> str:
    if spec.name == "sampled":
        return f"sampled N={spec.k}"
    if spec.name == "full":
        return f"full {spec.values}"
    return f"topk k={spec.k} {spec.values}"


# --- bytes: real writes ------------------------------------------------------------------


def _where_bytes(url: str) -> dict[str, float]:
    """Bytes of unit 0 of epoch 0 by part: each array (its chunks and zarr.json), the unit
    group's zarr.json and its commit record."""
    from logitcache.storage.layout import commit_path, unit_path

    unit = os.path.join(url, unit_path(0, 0))
    out = {name: storage_bytes(os.path.join(unit, name)) for name in sorted(os.listdir(unit))
           if os.path.isdir(os.path.join(unit, name))}
    out["unit zarr.json"] = os.path.getsize(os.path.join(unit, "zarr.json"))
    out["commit record"] = storage_bytes(os.path.join(url, commit_path(0, 0)))
    return out


def write_read(url: str, spec, z: torch.Tensor, unit_views: int) -> tuple[dict, dict[str, np.ndarray]]:
    """Write logits ``z`` (n, C) float32 (n a multiple of ``unit_views``) as a cache of one
    epoch with codec ``spec``, read it back whole; returns (bytes figures, teacher rows as
    read: ``ids``, ``values`` (n, k'), ``tail`` (n,)). The folder is deleted afterwards."""
    from logitcache.codecs.logits import encode
    from logitcache.storage.reader import CacheReader
    from logitcache.storage.writer import CacheWriter

    n = len(z)
    units = n // unit_views
    writer = CacheWriter(url, synthetic_manifest(n, [unit_views] * units, spec))
    writer.prepare_epochs([0])
    for u in range(units):
        unit = synthetic_unit(unit_views, u * unit_views, seed=u)
        rows = encode(spec, z[u * unit_views:(u + 1) * unit_views], seeds=unit["view_seeds"])
        writer.write_unit(0, u, rows, unit["plan"], canary=unit["canary"])
    total = storage_bytes(url)
    where = {k: v / unit_views for k, v in _where_bytes(url).items()}
    epoch = CacheReader(url).load_epoch(0)
    shutil.rmtree(url)
    payload = spec.payload_bits_per_view
    info = {"bytes_per_view": total / n, "payload_bytes_per_view": None if payload is None else payload / 8,
            "where_bytes_per_view_unit0": where}
    return info, {"ids": epoch.ids, "values": epoch.values, "tail": epoch.tail}


# --- fidelity ----------------------------------------------------------------------------


def reference(z: torch.Tensor, temperatures) -> list[dict]:
    """The teacher's side of the fidelity figures, once per logit set, in chunks of ``CHUNK``
    views: ``p1`` (b, C) float64 softmax at T = 1, ``logp`` {T: (b, C) float64 log-softmax},
    ``top1`` (b, 1) and ``top5`` (b, 5) int64 class ids."""
    out = []
    for a in range(0, len(z), CHUNK):
        zc = z[a:a + CHUNK].double()
        logp = {t: torch.log_softmax(zc / t, 1) for t in temperatures}
        out.append({"p1": logp[1].exp(), "logp": logp, "top1": zc.argmax(1, keepdim=True),
                    "top5": zc.topk(5, 1).indices})
    return out


class Fidelity:
    """Sums of the fidelity figures over chunks of views; :meth:`means` per view."""

    def __init__(self, temperatures):
        self.temperatures = list(temperatures)
        self.n = 0
        self.sums = {"tv": 0.0, "top1_agree": 0.0, "top1_tied": 0.0, "top5_overlap": 0.0,
                     **{f"kl_t{t}": 0.0 for t in temperatures}}
        self.finite = True

    def add(self, ref: dict, logq: dict[int, torch.Tensor] | None, q1: torch.Tensor) -> None:
        """One chunk: the teacher's side ``ref`` (:func:`reference`); rebuilt log-probabilities
        per T (b, C) float64, or None (sampled: no finite KL); rebuilt T = 1 probabilities
        ``q1`` (b, C) float64."""
        self.n += len(q1)
        self.sums["tv"] += float(0.5 * (ref["p1"] - q1).abs().sum())
        # Tie-aware: a rebuilt distribution cannot order classes it gives equal probability (gap codes
        # equal within half a step), so a teacher class tied at the boundary counts as kept.
        mode = q1.max(1, keepdim=True).values
        self.sums["top1_agree"] += float((q1.gather(1, ref["top1"]) >= mode).double().sum())
        self.sums["top1_tied"] += float(((q1 >= mode).sum(1) > 1).double().sum())
        fifth = q1.topk(5, 1).values[:, 4:]
        q5 = q1.gather(1, ref["top5"])
        self.sums["top5_overlap"] += float(((q5 >= fifth) & (q5 > 0)).double().sum() / 5)
        if logq is None:
            self.finite = False
            return
        for t in self.temperatures:
            logp = ref["logp"][t]
            self.sums[f"kl_t{t}"] += float((logp.exp() * (logp - logq[t])).sum())

    def means(self) -> dict:
        out = {k: v / self.n for k, v in self.sums.items()}
        if not self.finite:
            out.update({f"kl_t{t}": None for t in self.temperatures})
        return out


def codec_fidelity(spec, ref: list[dict], rows: dict[str, np.ndarray], temperatures) -> dict:
    """Fidelity of teacher rows ``rows`` (as read from disk) against the teacher's ``ref``."""
    from logitcache.codecs.logits import decode, rebuilt_probs

    acc = Fidelity(temperatures)
    for i, chunk in enumerate(ref):
        t = {k: torch.from_numpy(np.ascontiguousarray(v[i * CHUNK:(i + 1) * CHUNK])) for k, v in rows.items()}
        if spec.name == "sampled":
            acc.add(chunk, None, rebuilt_probs(spec, t["ids"].long(), t["values"], t["tail"]).double())
            continue
        rebuilt = decode(spec, t["ids"].long(), t["values"], t["tail"]).double()
        logq = {x: torch.log_softmax(rebuilt / x, 1) for x in temperatures}
        acc.add(chunk, logq, logq[1].exp())
    return acc.means()


def tinyvit_probs(z: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    """TinyViT's rebuilt T = 1 distribution (b, C) float64 from logits ``z`` (b, C), and the
    number of views with an entry <= 0 there (``minor`` <= 0 when fp16 rounding lifts the
    kept mass of a near-certain view to >= 1, or a kept probability below fp16's 6e-8
    stored as 0): such entries are clamped to 1e-12, so that the KL stays finite."""
    c = z.shape[1]
    vals, ids = torch.softmax(z.float(), 1).topk(k, 1)
    kept = vals.half().double()  # what TinyViT stores
    minor = (1.0 - kept.sum(1, keepdim=True)) / (c - k)
    q = minor.expand(-1, c).clone().scatter_(1, ids, kept)
    bad = int((q <= 0).any(1).sum())
    return q.clamp_min_(1e-12), bad


def tinyvit_fidelity(z: torch.Tensor, ref: list[dict], k: int, temperatures) -> dict:
    """TinyViT's format at ``k`` on logits ``z`` (n, C) float32 against the teacher's ``ref``."""
    acc = Fidelity(temperatures)
    bad = 0
    for i, chunk in enumerate(ref):
        q, b = tinyvit_probs(z[i * CHUNK:(i + 1) * CHUNK], k)
        bad += b
        logq1 = q.log()
        logq = {t: torch.log_softmax(logq1 / t, 1) for t in temperatures}
        logq[1] = logq1  # T = 1: the vector TinyViT trains on, as it is (not renormalised)
        acc.add(chunk, logq, q)
    return {**acc.means(), "views_clamped": bad}


# --- the two logit sets ----------------------------------------------------------------------


def logit_stats(z: torch.Tensor) -> dict:
    p = torch.softmax(z.double(), 1)
    return {"views": len(z), "num_classes": z.shape[1], "mean_top1_prob": float(p.max(1).values.mean()),
            "mean_top10_mass": float(p.topk(min(10, p.shape[1]), 1).values.sum(1).mean()),
            "mean_entropy_nats": float(-(p * p.clamp_min(1e-300).log()).sum(1).mean())}


def measure_set(ctx: Ctx, s: dict, z: torch.Tensor, tag: str) -> list[dict]:
    """Every setting's row (bytes and fidelity) on logits ``z`` (n, C) float32."""
    rows = []
    ref = reference(z, s["temperatures"])
    for spec in codec_settings(s, z.shape[1]):
        url = str(ctx.workdir / f"frontier_{tag}_{setting_name(spec).replace(' ', '_')}.zarr")
        info, read = write_read(url, spec, z, min(s["unit_views"], len(z)))
        fam = spec.name if spec.name != "topk" else f"topk {spec.values}"
        rows.append({"name": setting_name(spec), "family": fam, "codec": spec.name, "k": spec.k,
                     "values": spec.values, "bytes_source": "disk", **info,
                     **codec_fidelity(spec, ref, read, s["temperatures"])})
    for k in s["tinyvit_ks"]:
        rows.append({"name": f"TinyViT k={k}", "family": "tinyvit", "codec": "tinyvit", "k": k, "values": "fp16 probs",
                     "bytes_source": "formula", "bytes_per_view": 4 + 4 * k, "payload_bytes_per_view": 4 + 4 * k,
                     **tinyvit_fidelity(z, ref, k, s["temperatures"])})
    return rows


def summarise(rows: list[dict], suffix: str) -> dict:
    """The flat summary keys of one logit set (``suffix`` "" or "_demo")."""
    by = {r["name"]: r for r in rows}
    k10, f16, tv = by["topk k=10 gap8"], by["topk k=10 float16"], by["TinyViT k=10"]
    out = {f"bytes_per_view_k10{suffix}": k10["bytes_per_view"], f"kl_t1_k10_gap8{suffix}": k10["kl_t1"],
           f"kl_t1_k10_float16{suffix}": f16["kl_t1"],
           f"kl_t1_k10_gap8_minus_float16{suffix}": k10["kl_t1"] - f16["kl_t1"],
           f"kl_t4_k10_gap8{suffix}": k10["kl_t4"], f"top1_tied_k10_gap8{suffix}": k10["top1_tied"],
           f"tinyvit_kl_t1_k10{suffix}": tv["kl_t1"], f"tinyvit_kl_t4_k10{suffix}": tv["kl_t4"]}
    ours = [r for r in rows if r["codec"] in ("topk", "full") and r["bytes_per_view"] <= BUDGET_BYTES]
    if ours:
        best = min(ours, key=lambda r: r["kl_t1"])
        out[f"best_kl_t1_at_44b{suffix}"] = best["kl_t1"]
        out[f"best_at_44b_setting{suffix}"] = best["name"]
        out[f"best_at_44b_bytes_per_view{suffix}"] = best["bytes_per_view"]
        out[f"best_over_tinyvit_kl_at_44b{suffix}"] = best["kl_t1"] / tv["kl_t1"]
    for r in rows:
        if r["codec"] == "sampled":
            out[f"bytes_per_view_sampled_n{r['k']}{suffix}"] = r["bytes_per_view"]
            out[f"tv_sampled_n{r['k']}{suffix}"] = r["tv"]
    return out


def run(ctx: Ctx) -> dict:
    from .demo_logits import demo_logits

    s = settings(ctx)
    zi, _ = teacher_like_logits(s["imagenet_views"], IMAGENET_CLASSES, seed=1)
    zi = torch.from_numpy(zi)
    zd, teacher = demo_logits(ctx, s["demo_views"], s["fallback_train_per_class"], s["fallback_epochs"])
    unit = min(s["unit_views"], len(zd))
    zd = zd[:len(zd) // unit * unit]  # whole units of views
    sets = {}
    summary = {}
    for tag, z, suffix in (("imagenet", zi, ""), ("demo", zd, "_demo")):
        rows = measure_set(ctx, s, z, tag)
        sets[tag] = {"logit_stats": logit_stats(z), "rows": rows}
        summary.update(summarise(rows, suffix))
    summary["tinyvit_bytes_per_view_k10"] = BUDGET_BYTES
    per_view_gb = IMAGENET_VIEWS * EPOCHS / 1e9
    summary["imagenet_300ep_gb_k10"] = summary["bytes_per_view_k10"] * per_view_gb
    summary["tinyvit_imagenet_300ep_gb_k10"] = BUDGET_BYTES * per_view_gb
    if "val_top1" in teacher:
        summary["demo_teacher_val_top1"] = teacher["val_top1"]
    return {"settings": {**s, "budget_bytes": BUDGET_BYTES},
            "results": {"teacher": teacher, "imagenet": sets["imagenet"], "demo": sets["demo"]},
            "summary": summary}
