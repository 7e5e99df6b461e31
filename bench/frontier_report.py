"""RESULTS.md section and plot of bench/frontier.py (bytes per view vs fidelity)."""

from __future__ import annotations

from .common import save_figure

SETS = (("imagenet", "", "ImageNet-shaped random logits"), ("demo", "_demo", "demo teacher"))


def _kl(v) -> str:
    return "inf" if v is None else f"{max(v, 0.0):.2e}"


def _table(rows: list[dict]) -> list[str]:
    lines = ["| setting | B/view | KL T=1 (nats) | KL T=4 (nats) | TV T=1 | top-1 agree | top-5 overlap |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        name = f"**{r['name']}** (reference)" if r["codec"] == "tinyvit" else r["name"]
        size = f"{r['bytes_per_view']:.1f}"
        if r["bytes_source"] == "formula":
            size = f"{r['bytes_per_view']:.0f} (formula)"
        lines.append(f"| {name} | {size} | {_kl(r['kl_t1'])} | {_kl(r['kl_t4'])} | {r['tv']:.4f} | "
                     f"{r['top1_agree']:.4f} | {r['top5_overlap']:.4f} |")
    return lines


def _teacher_line(t: dict, st: dict) -> str:
    desc = t["source"]
    if "val_top1" in t:
        desc += (f": `{t['model']}`, {t['epochs']} epochs on {t['train_images']} images, val top-1 "
                 f"{t['val_top1']:.1f}%")
    return desc + (f"; {st['views']:,} augmented views (`{t['recipe']}`), {st['num_classes']} classes, mean top-1 "
                   f"probability {st['mean_top1_prob']:.2f}, top-10 mass {st['mean_top10_mass']:.2f}, entropy "
                   f"{st['mean_entropy_nats']:.2f} nats")


def _headline(s: dict, suffix: str) -> str:
    best = s.get(f"best_at_44b_setting{suffix}")
    line = (f"Default codec (topk k=10 gap8): **{s[f'bytes_per_view_k10{suffix}']:.1f} B/view**, KL T=1 "
            f"{s[f'kl_t1_k10_gap8{suffix}']:.3e} vs {s[f'kl_t1_k10_float16{suffix}']:.3e} with float16 values "
            f"(gap8 - float16 = {s[f'kl_t1_k10_gap8_minus_float16{suffix}']:+.1e}); TinyViT k=10 (44 B): KL T=1 "
            f"{s[f'tinyvit_kl_t1_k10{suffix}']:.3e}. The default codec's rebuilt mode is tied (gaps within half a "
            f"step) in {100 * s[f'top1_tied_k10_gap8{suffix}']:.1f}% of views.")
    if best is not None:
        ratio = s[f"best_over_tinyvit_kl_at_44b{suffix}"]
        line += (f" Best of ours at <= 44 B on disk: **{best}** ({s[f'best_at_44b_bytes_per_view{suffix}']:.1f} B), "
                 f"KL T=1 {s[f'best_kl_t1_at_44b{suffix}']:.3e} = **{ratio:.3f} x** TinyViT's.")
    return line


def markdown(data: dict) -> str:
    st, r, s = data["settings"], data["results"], data["summary"]
    im = r["imagenet"]["logit_stats"]
    lines = [
        f"Every setting writes the views for real (format 3, local folder, units of {st['unit_views']:,} views, plan "
        f"digest and canary in every commit record), reads them back with `load_epoch` and rebuilds from what was "
        f"read. **B/view** = the whole folder (chunks, every zarr.json, commit records, manifest) / views; TinyViT's "
        f"by its formula, 4 + 4k (int32 seed, k x (int16 id + fp16 probability)), with no container at all. "
        f"KL(teacher || rebuilt) and TV are means over views; top-1 agree = the teacher's top class is a mode of the "
        f"rebuilt distribution, top-5 overlap = |top5(rebuilt) ∩ top5(teacher)| / 5, both counting classes tied at "
        f"the boundary as in (near-equal logits share a gap code; no loss can order them; `top1_tied` in the JSON "
        f"is the share of views whose rebuilt mode is tied).",
        "",
        f"**ImageNet-shaped logits** (`bench.common.teacher_like_logits`, not a trained model): {im['views']:,} views, "
        f"{im['num_classes']} classes, mean top-1 probability {im['mean_top1_prob']:.2f}, top-10 mass "
        f"{im['mean_top10_mass']:.2f}, entropy {im['mean_entropy_nats']:.2f} nats.",
        "",
        _headline(s, ""),
        "",
        *_table(r["imagenet"]["rows"]),
        "",
        f"**Demo teacher**: {_teacher_line(r['teacher'], r['demo']['logit_stats'])}.",
        "",
        _headline(s, "_demo"),
        "",
        *_table(r["demo"]["rows"]),
        "",
        "Sampled rows keep only the classes drawn, so the rebuilt distribution is 0 on every other class and "
        "KL(teacher || rebuilt) is infinite (`inf`; None in the JSON); it estimates the teacher at T = 1 only, so it "
        "has no T = 4 figure. Its KD loss at T = 1 is unbiased in expectation (codec docstring); TV shows how far a "
        "single view's estimate is. The plot's third panel gives TV for it, next to topk gap8.",
        "",
        f"TinyViT's vector is used as TinyViT trains on it (not renormalised). Its entries <= 0 (`minor` <= 0 "
        f"where fp16 rounding lifts the kept mass of a near-certain view to >= 1, or a kept probability below "
        f"fp16's 6e-8 stored as 0), which would make the KL infinite, are clamped to 1e-12; views concerned: "
        f"{', '.join(_clamped(r))}. Its T = 4 figure tempers that vector (q^(1/4), renormalised). Elsewhere TinyViT's vector is "
        f"ours with float values up to a constant in log space (kept log-probabilities = logits - lse, tail "
        f"log(minor) = our fill - lse), so at equal k the two rebuild the same distribution at every T (up to "
        f"fp16 rounding of probabilities vs logits): what differs is the bytes each k costs.",
        "",
        f"ImageNet-1k x 300 epochs: {s['imagenet_300ep_gb_k10']:.1f} GB with the default codec vs "
        f"{s['tinyvit_imagenet_300ep_gb_k10']:.1f} GB for TinyViT's k = 10 format.",
    ]
    k10 = next(x for x in r["imagenet"]["rows"] if x["name"] == "topk k=10 gap8")
    parts = ", ".join(f"{k} {v:.2f}" for k, v in k10["where_bytes_per_view_unit0"].items())
    lines += ["", f"Where the bytes go, default codec, ImageNet-shaped (B/view, unit 0): {parts}; the rest is the "
                  f"manifest and the epoch groups' zarr.json."]
    return "\n".join(lines)


def _clamped(r: dict) -> list[str]:
    return [f"{x['name']} {tag}: {x['views_clamped']}" for tag, _, _ in SETS for x in r[tag]["rows"]
            if x["codec"] == "tinyvit"]


def _kl_panel(ax, rows: list[dict], budget: float, title: str) -> None:
    def line(sel, style, label):
        pts = sorted((x["bytes_per_view"], x["kl_t1"]) for x in rows if sel(x) and x["kl_t1"] is not None)
        if pts:
            ax.plot([p[0] for p in pts], [max(p[1], 1e-9) for p in pts], style, label=label, ms=4)

    line(lambda x: x["family"] == "topk gap8", "o-", "topk gap8, k=5..50")
    line(lambda x: x["family"] == "topk float16", "s--", "topk float16, k=5..50")
    line(lambda x: x["codec"] == "topk" and x["k"] == 10, "^:", "k=10, gap4..gap10, float16")
    line(lambda x: x["codec"] == "tinyvit", "*-", "TinyViT, k=10/20/30 (4 + 4k B)")
    ax.set_yscale("log")
    _bytes_axis(ax, budget)
    ax.set_title(title + " (full float16: table)", fontsize=9)


def _bytes_axis(ax, budget: float) -> None:
    """Log x axis of bytes per view, plain tick labels, the 44 B line."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.axvline(budget, color="grey", ls=":", lw=1)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks([t for t in (5, 10, 20, 44, 100, 200) if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]])
    ax.set_xlabel("bytes per view on disk (dotted: 44 B)")
    ax.grid(alpha=0.3, which="both")


def plot(data: dict, outdir) -> list[str]:
    import matplotlib.pyplot as plt

    r, budget = data["results"], data["settings"]["budget_bytes"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), gridspec_kw={"width_ratios": [1, 1, 0.75]})
    for ax, (tag, _, title) in zip(axes, SETS):
        st = r[tag]["logit_stats"]
        _kl_panel(ax, r[tag]["rows"], budget, f"{title}, {st['num_classes']} classes")
    axes[0].set_ylabel("KL(teacher || rebuilt), T=1, nats")
    axes[0].legend(fontsize=7)
    ax = axes[2]
    for (tag, _, title), color in zip(SETS, ("C0", "C1")):
        for fam, style, what in (("sampled", "o-", "sampled N=8..128"), ("topk gap8", "s--", "topk gap8")):
            pts = sorted((x["bytes_per_view"], x["tv"]) for x in r[tag]["rows"] if x["family"] == fam)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=color, ms=4, label=f"{what}, {title}")
    ax.set_yscale("log")
    _bytes_axis(ax, budget)
    ax.set_ylabel("total variation, T=1")
    ax.set_title("sampled (no finite KL): TV", fontsize=9)
    ax.legend(fontsize=6)
    return [save_figure(fig, outdir / "frontier.png").name]
