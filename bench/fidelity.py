"""Fidelity of the top-k codec: how far the rebuilt distribution is from the teacher's.

Logits of a trained teacher on augmented views of the embedded synthetic dataset (128
classes, 32 px, recipe ``demo32``, epoch-0 view seeds): the demo's teacher
(``demo_out/teacher/model.safetensors`` with ``demo_out/data``) when ``make demo`` has
been run, otherwise a tiny teacher trained here in a few seconds (timm ``test_resnet``,
AdamW, on eval-transformed training images with flips; its val top-1 is recorded).

For every k and T: mean over views of KL(softmax(z / T) || softmax(rebuilt / T)), where
``rebuilt = decode(encode(z))`` (float16 values: ``full`` shows the rounding floor), the
top-1 agreement of the rebuilt logits with the teacher's (exact by construction for
k >= 1 up to float16 ties), the top-5 overlap, and the teacher's probability mass
outside the top k at that T (what the flat tail has to stand in for).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .common import Ctx, codec_for_k, save_figure, teacher_like_logits

REPO = Path(__file__).resolve().parent.parent
DEMO_TEACHER = REPO / "demo_out" / "teacher" / "model.safetensors"
DEMO_DATA = REPO / "demo_out" / "data"


def settings(ctx: Ctx) -> dict:
    return {
        "recipe": "demo32",
        "ks": [1, 5, 10, 20, 50, "full"],
        "temperatures": [1, 2, 4],
        "value_dtype": "float16",
        "views": ctx.pick(quick_cpu=1024, full_cpu=5120, tiny=128),
        "synthetic_views": ctx.pick(quick_cpu=2000, full_cpu=10000, tiny=200),
        "fallback_model": "test_resnet",
        "fallback_train_per_class": ctx.pick(quick_cpu=16, full_cpu=40, tiny=2),
        "fallback_epochs": ctx.pick(quick_cpu=6, full_cpu=15, tiny=1),
        "demo_teacher_present": DEMO_TEACHER.is_file() and (DEMO_DATA / "dataset.json").is_file(),
    }


def _eval_tensors(source, recipe) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of ``source`` through the eval transform, and the labels (int64), as one batch."""
    from logitcache.trainer.data import create_eval_loader

    return next(iter(create_eval_loader(source, recipe, batch_size=len(source), num_workers=0)))


def train_tiny_teacher(ctx: Ctx, data: str, recipe, name: str, epochs: int) -> tuple[str, dict]:
    """A quickly trained teacher saved like logitcache saves one; returns (weights path, info)."""
    import timm

    from logitcache.data.source import open_source
    from logitcache.trainer.checkpoint import save_student

    train_src, val_src = open_source(data, "train"), open_source(data, "val")
    x, y = _eval_tensors(train_src, recipe)
    xv, yv = _eval_tensors(val_src, recipe)
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=train_src.num_classes).to(ctx.device)
    bs = 128
    steps = epochs * math.ceil(len(x) / bs)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.15)
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for b in range(0, len(x), bs):
            idx = order[b:b + bs]
            xb = x[idx]
            flip = torch.rand(len(idx), generator=g) < 0.5
            xb[flip] = xb[flip].flip(-1)
            loss = F.cross_entropy(model(xb.to(ctx.device)), y[idx].to(ctx.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.inference_mode():
        acc = float((model(xv.to(ctx.device)).argmax(1).cpu() == yv).float().mean())
    path = ctx.workdir / "fidelity_teacher.safetensors"
    save_student(model, path, name, train_src.num_classes, recipe)
    return str(path), {"model": name, "epochs": epochs, "train_images": len(x), "val_top1": 100 * acc,
                       "train_seconds": time.perf_counter() - t0}


def teacher_logits(ctx: Ctx, data: str, weights: str, recipe, n_views: int) -> torch.Tensor:
    """Logits (n, C) of the teacher on epoch-0 training views (the build's seeds), float32."""
    from safetensors import safe_open

    from logitcache.data.source import open_source
    from logitcache.teacher import META_MODEL, Teacher
    from logitcache.views import create_train_transform, render_view, view_seed

    with safe_open(weights, framework="pt") as f:
        name = (f.metadata() or {})[META_MODEL]
    source = open_source(data, "train")
    teacher = Teacher(name, weights=weights, num_classes=source.num_classes, device=ctx.device)
    tf = create_train_transform(recipe)
    n = min(n_views, len(source))
    out = []
    for b in range(0, n, 256):
        views = torch.stack([render_view(tf, source.load_image(i), view_seed(recipe.cache_seed, 0, source.key(i)))
                             for i in range(b, min(n, b + 256))])
        out.append(teacher(views, recipe.mean, recipe.std).cpu())
    return torch.cat(out)


def fidelity_table(z: torch.Tensor, ks, temperatures, value_dtype: str) -> list[dict]:
    from logitcache.codec import decode, encode

    c = z.shape[1]
    top1 = z.argmax(1)
    top5 = z.topk(min(5, c), 1).indices
    rows = []
    for k in ks:
        codec = codec_for_k(k, c, value_dtype)
        enc = encode(codec, z)
        rebuilt = decode(torch.from_numpy(enc["topk_ids"]), torch.from_numpy(enc["topk_logits"]),
                         torch.from_numpy(enc["tail_lse"]), c)
        r5 = rebuilt.topk(min(5, c), 1).indices
        overlap = (r5[:, :, None] == top5[:, None, :]).any(2).float().mean().item()
        agree = (rebuilt.argmax(1) == top1).float().mean().item()
        kept = torch.zeros_like(z, dtype=torch.bool).scatter_(1, z.topk(codec.k, 1).indices, True)
        for t in temperatures:
            logp, logq = F.log_softmax(z / t, 1), F.log_softmax(rebuilt / t, 1)
            kl = F.kl_div(logq, logp, reduction="none", log_target=True).sum(1)
            tail = (logp.exp() * ~kept).sum(1)
            rows.append({"k": codec.k, "codec": codec.name, "T": t, "kl_mean": kl.mean().item(),
                         "kl_p99": kl.quantile(0.99).item(), "top1_agreement": agree, "top5_overlap": overlap,
                         "tail_mass_mean": tail.mean().item()})
    return rows


def run(ctx: Ctx) -> dict:
    from logitcache.data.synth import generate_synth
    from logitcache.views import create_recipe

    s = settings(ctx)
    recipe = create_recipe(s["recipe"])
    if s["demo_teacher_present"]:
        data, weights = str(DEMO_DATA), str(DEMO_TEACHER)
        teacher_info = {"source": "demo_out/teacher/model.safetensors (make demo)"}
    else:
        data = str(generate_synth(ctx.workdir / "synth", train_per_class=s["fallback_train_per_class"],
                                  val_per_class=max(2, s["fallback_train_per_class"] // 4)))
        weights, info = train_tiny_teacher(ctx, data, recipe, s["fallback_model"], s["fallback_epochs"])
        teacher_info = {"source": "trained here (no demo_out)", **info}
    z = teacher_logits(ctx, data, weights, recipe, s["views"])
    p = torch.softmax(z, 1)
    teacher_info.update(views=len(z), num_classes=z.shape[1], mean_top1_prob=float(p.max(1).values.mean()),
                        mean_entropy_nats=float(-(p * p.clamp_min(1e-30).log()).sum(1).mean()))
    rows = fidelity_table(z, s["ks"], s["temperatures"], s["value_dtype"])
    zs, _ = teacher_like_logits(s["synthetic_views"], 1000, seed=1)
    synth_rows = fidelity_table(torch.from_numpy(zs), s["ks"], s["temperatures"], s["value_dtype"])
    summary = {}
    for prefix, table in (("", rows), ("imagenet_like.", synth_rows)):
        for r in table:
            tag = "full" if r["codec"] == "full" else f"k{r['k']}"
            summary[f"{prefix}kl_{tag}_T{r['T']}"] = r["kl_mean"]
            if r["T"] == 1:
                summary[f"{prefix}top1_agreement_{tag}"] = r["top1_agreement"]
                summary[f"{prefix}top5_overlap_{tag}"] = r["top5_overlap"]
    if "val_top1" in teacher_info:
        summary["teacher_val_top1"] = teacher_info["val_top1"]
    summary["teacher_mean_top1_prob"] = teacher_info["mean_top1_prob"]
    return {"settings": s, "results": {"teacher": teacher_info, "rows": rows, "imagenet_like_rows": synth_rows},
            "summary": summary}


def markdown(data: dict) -> str:
    s, r = data["settings"], data["results"]
    t = r["teacher"]
    desc = t["source"]
    if "val_top1" in t:
        desc += (f": `{t['model']}`, {t['epochs']} epochs on {t['train_images']} images, val top-1 "
                 f"{t['val_top1']:.1f}%")
    lines = [
        f"Teacher: {desc}. {t['views']} augmented views (`{s['recipe']}`), {t['num_classes']} classes; mean top-1 "
        f"probability {t['mean_top1_prob']:.2f}, entropy {t['mean_entropy_nats']:.2f} nats. Values stored as "
        f"{s['value_dtype']}.",
        "",
        *_table(r["rows"], s["temperatures"]),
        "",
        f"Reference: {s['synthetic_views']:,} ImageNet-shaped random logits over 1000 classes "
        f"(`bench.common.teacher_like_logits`, as in the storage benchmark; not a trained model):",
        "",
        *_table(r["imagenet_like_rows"], s["temperatures"]),
    ]
    lines += ["", "At T = 1 the rebuilt softmax keeps the top-k probabilities and the tail mass exactly; the KL "
                  "left is the flat-tail approximation (plus float16 rounding, the floor shown by `full`). At T != 1 "
                  "the flat tail is re-tempered too, so its mass is no longer exact (codec docstring)."]
    return "\n".join(lines)


def _table(rows: list[dict], temperatures) -> list[str]:
    lines = [
        "| k | " + " | ".join(f"KL T={x} (nats)" for x in temperatures) + " | "
        + " | ".join(f"tail mass T={x}" for x in temperatures) + " | top-1 agree | top-5 overlap |",
        "|---:|" + "---:|" * (2 * len(temperatures) + 2),
    ]
    by_k: dict[int, dict] = {}
    for row in rows:
        by_k.setdefault(row["k"], {})[row["T"]] = row
    for k, d in by_k.items():
        first = next(iter(d.values()))
        label = f"{k} (full)" if first["codec"] == "full" else str(k)
        lines.append(f"| {label} | " + " | ".join(f"{max(d[x]['kl_mean'], 0.0):.2e}" for x in temperatures) + " | "
                     + " | ".join(f"{d[x]['tail_mass_mean']:.3f}" for x in temperatures)
                     + f" | {first['top1_agreement']:.4f} | {first['top5_overlap']:.3f} |")
    return lines


def plot(data: dict, outdir) -> list[str]:
    import matplotlib.pyplot as plt

    r, s = data["results"], data["settings"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    panels = ((axes[0], r["rows"], f"trained teacher, {r['teacher']['num_classes']} classes"),
              (axes[1], r["imagenet_like_rows"], "ImageNet-shaped random logits, 1000 classes"))
    for ax, table, title in panels:
        for t in s["temperatures"]:
            rows = [x for x in table if x["T"] == t]
            ax.plot([x["k"] for x in rows], [max(x["kl_mean"], 1e-9) for x in rows], "o-", label=f"T={t}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("k (last point: full)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("KL(full || rebuilt), nats")
    axes[0].legend(fontsize=8)
    return [save_figure(fig, outdir / "fidelity.png").name]
