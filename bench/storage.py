"""Bytes per view on disk, per codec and k, for 1000 classes, extrapolated to ImageNet-1k.

Each configuration writes the same views with the real path (``logitcache.codec.encode``
on float32 logits, ``CacheWriter.write_unit`` into a local Zarr cache, zstd level 3) in
units of ``unit_views`` views, and divides everything on disk (array chunks, every
``zarr.json``, the manifest) by the number of views. The per-view fields a build writes
besides the logits (sample index, 64-bit view seed, label, mix partner, mix lambda) are
included, shaped like a vanillakd_a2 build's (mixing pairs); a row without mixing is
also given at k = 10.

Logits: ``bench.common.teacher_like_logits`` (random but shaped like a trained teacher's:
a large margin on one class, a few confusable classes near it, Gaussian tail, a per-view
offset). The statistics of those logits are recorded; compressibility of real logits
may differ a little (the ids and fp16 values carry most of the bytes and compress poorly
either way).

Extrapolation: bytes/view x 1,281,167 views x 300 epochs, next to TinyViT's 44 B/view at
k = 10 (int32 seed + 10 x (int16 id + fp16 value)).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from logitcache.cache_stats import storage_bytes

from .common import Ctx, codec_for_k, mixed_view_metadata, save_figure, synthetic_manifest, teacher_like_logits

NUM_CLASSES = 1000
IMAGENET_VIEWS = 1_281_167
EPOCHS = 300
TINYVIT_BYTES = 44


def settings(ctx: Ctx) -> dict:
    return {
        "num_classes": NUM_CLASSES,
        "ks": [1, 5, 10, 20, 50, "full"],
        "value_dtype": "float16",
        "unit_views": 1000,
        "units": ctx.pick(quick_cpu=4, full_cpu=20, tiny=2),
        "extra": ["k=10 float32 values", "k=10 without mixing"],
    }


def _array_bytes(unit_dir: str) -> dict[str, int]:
    return {name: storage_bytes(os.path.join(unit_dir, name)) for name in sorted(os.listdir(unit_dir))
            if os.path.isdir(os.path.join(unit_dir, name))}


def write_config(url: str, codec, logits: np.ndarray, unit_views: int, mixing: bool) -> dict:
    from logitcache.codec import encode
    from logitcache.store import unit_path
    from logitcache.writer import CacheWriter

    n = len(logits)
    units = n // unit_views
    writer = CacheWriter(url, synthetic_manifest(n, [unit_views] * units, codec))
    writer.prepare_epochs([0])
    raw = 0
    for u in range(units):
        sl = slice(u * unit_views, (u + 1) * unit_views)
        arrays = encode(codec, torch.from_numpy(logits[sl]))
        meta = mixed_view_metadata(unit_views, u * unit_views, seed=u, mixing=mixing)
        # rows in plan order, like a build: the logits of view i belong to sample_index[i]
        arrays = {k: v[meta["sample_index"] - u * unit_views] for k, v in arrays.items()}
        arrays.update(meta)
        raw += sum(a.nbytes for a in arrays.values())
        writer.write_unit(0, u, arrays)
    total = storage_bytes(url)
    per_array = _array_bytes(os.path.join(url, unit_path(0, 0)))
    return {
        "bytes_per_view": total / n,
        "raw_bytes_per_view": raw / n,
        "codec_payload_bytes_per_view": codec.bytes_per_view,
        "array_bytes_per_view_unit0": {k: v / unit_views for k, v in per_array.items()},
        "imagenet_300ep_gb": total / n * IMAGENET_VIEWS * EPOCHS / 1e9,
    }


def run(ctx: Ctx) -> dict:
    s = settings(ctx)
    n = s["unit_views"] * s["units"]
    logits, _ = teacher_like_logits(n, NUM_CLASSES, seed=0)
    p = torch.softmax(torch.from_numpy(logits), 1)
    logit_stats = {
        "mean_top1_prob": float(p.max(1).values.mean()),
        "mean_top10_mass": float(p.topk(10, 1).values.sum(1).mean()),
        "mean_entropy_nats": float(-(p * p.clamp_min(1e-30).log()).sum(1).mean()),
    }
    rows = []
    configs = [(k, s["value_dtype"], True) for k in s["ks"]] + [(10, "float32", True), (10, s["value_dtype"], False)]
    for k, dtype, mixing in configs:
        codec = codec_for_k(k, NUM_CLASSES, dtype)
        url = str(ctx.workdir / f"storage_{k}_{dtype}_{int(mixing)}.zarr")
        r = write_config(url, codec, logits, s["unit_views"], mixing)
        rows.append({"codec": codec.name, "k": codec.k, "value_dtype": dtype, "mixing": mixing, **r})
    summary = {}
    for r in rows:
        tag = f"k{r['k']}" if r["codec"] == "topk" else "full"
        if r["value_dtype"] != s["value_dtype"]:
            tag += f"_{r['value_dtype']}"
        if not r["mixing"]:
            tag += "_nomix"
        summary[f"bytes_per_view_{tag}"] = r["bytes_per_view"]
        summary[f"imagenet_300ep_gb_{tag}"] = r["imagenet_300ep_gb"]
    summary["tinyvit_bytes_per_view_k10"] = TINYVIT_BYTES
    summary["tinyvit_imagenet_300ep_gb_k10"] = TINYVIT_BYTES * IMAGENET_VIEWS * EPOCHS / 1e9
    return {"settings": {**s, "views": n}, "results": {"rows": rows, "logit_stats": logit_stats}, "summary": summary}


def markdown(data: dict) -> str:
    s, r = data["settings"], data["results"]
    st = r["logit_stats"]
    lines = [
        f"{s['views']:,} views, {s['num_classes']} classes, units of {s['unit_views']} views; logits with mean top-1 "
        f"probability {st['mean_top1_prob']:.2f}, top-10 mass {st['mean_top10_mass']:.2f}, entropy "
        f"{st['mean_entropy_nats']:.2f} nats.",
        "",
        "| codec | k | values | mixing | **B/view on disk** | raw B/view (all fields) | ids+values+tail B/view | "
        "ImageNet-1k x 300 epochs |",
        "|---|---:|---|---|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        lines.append(f"| {row['codec']} | {row['k']} | {row['value_dtype']} | {'yes' if row['mixing'] else 'no'} | "
                     f"**{row['bytes_per_view']:.1f}** | {row['raw_bytes_per_view']:.1f} | "
                     f"{row['codec_payload_bytes_per_view']} | {row['imagenet_300ep_gb']:.1f} GB |")
    tv = TINYVIT_BYTES * IMAGENET_VIEWS * EPOCHS / 1e9
    lines.append(f"| TinyViT (reference) | 10 | float16 | no | {TINYVIT_BYTES} | {TINYVIT_BYTES} | 44 | {tv:.1f} GB |")
    k10 = next(x for x in r["rows"] if x["k"] == 10 and x["mixing"] and x["value_dtype"] == "float16")
    parts = ", ".join(f"{k} {v:.1f}" for k, v in k10["array_bytes_per_view_unit0"].items())
    lines += ["", f"Where the bytes go at k = 10 (B/view, one unit, incl. its zarr.json): {parts}."]
    return "\n".join(lines)


def plot(data: dict, outdir) -> list[str]:
    import matplotlib.pyplot as plt

    rows = [x for x in data["results"]["rows"] if x["mixing"] and x["value_dtype"] == data["settings"]["value_dtype"]]
    ks = [x["k"] for x in rows]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot(ks, [x["bytes_per_view"] for x in rows], "o-", label="logitcache, on disk")
    ax.plot(ks, [x["codec_payload_bytes_per_view"] for x in rows], "s--", alpha=0.6, label="ids+values+tail, raw")
    ax.axhline(TINYVIT_BYTES, color="grey", ls=":", label="TinyViT k=10 (44 B)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("k (full = 1000)")
    ax.set_ylabel("bytes per view")
    ax.set_title("storage per view, 1000 classes")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return [save_figure(fig, outdir / "storage.png").name]
