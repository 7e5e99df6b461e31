"""The accuracy study's results as a markdown table and as plots."""

from __future__ import annotations

from pathlib import Path

from ..common import save_figure
from .intervals import FIDELITY_LOSS_PP, FIDELITY_MEAN_PP, fmt
from .plan import MAIN_K, STUDENT, TEACHER, VARIANT_LABELS


def markdown(data: dict) -> str:
    """The results as a markdown table (mean ± sample std of final val top-1 over seeds)."""
    names = [n for n, d in data["datasets"].items() if "variants" in d]
    lines = ["| variant | " + " | ".join(f"{n} top-1 % (n)" for n in names) + " |",
             "|---|" + "---:|" * len(names)]
    variants = []
    for n in names:
        variants += [v for v in data["datasets"][n]["variants"] if v not in variants]
    for v in variants:
        cells = []
        for n in names:
            d = data["datasets"][n]["variants"].get(v)
            cells.append("–" if not d or d["mean"] is None else f"{d['mean']:.2f} ± {d['std']:.2f} ({len(d['top1'])})")
        lines.append(f"| {VARIANT_LABELS[v]} | " + " | ".join(cells) + " |")
    teachers = ", ".join(f"{n}: {data['datasets'][n]['teacher']['val_top1']:.2f}%" for n in names)
    lines.append("")
    for n in names:
        sweep = data["datasets"][n].get("k_sweep") or {}
        if sweep:
            cells = [f"k={k}: {v['mean']:.2f} ± {v['std']:.2f}" + (" (= top-10 run)" if v["variant"] == "kd_cache" else "")
                     for k, v in sweep.items() if v["mean"] is not None]
            lines.append(f"{n} top-k sweep (vanilla KD from cache): " + "; ".join(cells) + ".")
        codecs = data["datasets"][n].get("codecs")
        if codecs:
            cells = [f"{v}: {r['minus_float16_mean_pp']:+.2f} ± {r['minus_float16_std_pp']:.2f} pp"
                     for v, r in codecs["variants"].items() if r.get("minus_float16_mean_pp") is not None]
            lines.append(f"{n} paired difference to {codecs['reference']} (top-10 float16), same seeds: "
                         + "; ".join(cells) + ".")
    lines.append(f"Teacher ({TEACHER}) val top-1: {teachers}.")
    for n in names:
        lines += intervals_markdown(n, data["datasets"][n])
    return "\n".join(lines)


def intervals_markdown(name: str, d: dict) -> list[str]:
    """The fidelity rows (paired differences, 95% intervals, verdicts) and every variant's
    mean and difference to CE with their 95% intervals."""
    lines = []
    if d.get("fidelity"):
        lines += ["", f"{name}: fidelity, paired by seed (mean [95% interval], pp; target |mean| <= "
                      f"{FIDELITY_MEAN_PP} and lower end >= -{FIDELITY_LOSS_PP}):", "",
                  "| pair | difference, pp | meets target |", "|---|---:|:---:|"]
        lines += [f"| {VARIANT_LABELS[r['a']]} - {VARIANT_LABELS[r['b']]} | {fmt(r, '+')} | "
                  f"{'yes' if r['meets_target'] else 'no'} |" for r in d["fidelity"].values()]
    if d.get("intervals"):
        lines += ["", f"{name}: every variant, mean [95% interval] over seeds:", "",
                  "| variant | val top-1 % | minus CE, pp (paired) |", "|---|---:|---:|"]
        lines += [f"| {VARIANT_LABELS[v]} | {fmt(r['top1'])} | {fmt(r['minus_ce'], '+') if 'minus_ce' in r else ''} |"
                  for v, r in d["intervals"].items()]
    return lines


def _plot_k_sweep(ax, name: str, d: dict) -> None:
    """Final val top-1 against the cache's k, with the CE and online-KD means as bands."""
    ks = [k for k in ("1", "5", "10", "full") if k in d["k_sweep"] and d["k_sweep"][k]["mean"] is not None]
    xs = list(range(len(ks)))
    labels = [f"full ({d['dataset']['num_classes']})" if k == "full" else k for k in ks]
    if name != "synth" and d["dataset"]["num_classes"] <= MAIN_K:
        labels = [lab if k != "10" else "10 (= full)" for k, lab in zip(ks, labels)]
    ax.errorbar(xs, [d["k_sweep"][k]["mean"] for k in ks], yerr=[d["k_sweep"][k]["std"] for k in ks],
                marker="o", capsize=4, label="vanilla KD from cache")
    for v, style in (("ce", "--"), ("kd_online", ":")):
        if v not in d["variants"]:  # --variants without it
            continue
        m, s = d["variants"][v]["mean"], d["variants"][v]["std"]
        if m is not None:
            line = ax.axhline(m, ls=style, color="grey" if v == "ce" else "tab:red",
                              label=f"{VARIANT_LABELS[v]} (±std band)")
            ax.axhspan(m - s, m + s, color=line.get_color(), alpha=0.12)
    ax.set_xticks(xs, labels)
    ax.set_xlabel("cached top-k logits per view")
    ax.set_ylabel("final val top-1 (%)")
    ax.set_title(f"{name}: {d['settings']['student']}, {d['settings']['student_epochs']} epochs, "
                 f"{len(d['settings']['seeds'])} seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot(data: dict, outdir: str | Path, prefix: str = "accuracy") -> list[str]:
    """``<prefix>_vs_k.png`` (when a k sweep ran) and ``<prefix>_curves.png``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    written = []
    swept = {n: d for n, d in data["datasets"].items() if d.get("k_sweep")}
    if swept:
        fig, axes = plt.subplots(1, len(swept), figsize=(5 * len(swept), 3.8), squeeze=False)
        for ax, (n, d) in zip(axes[0], swept.items()):
            _plot_k_sweep(ax, n, d)
        written.append(str(save_figure(fig, outdir / f"{prefix}_vs_k.png", dpi=120)))
    with_curves = [n for n, d in data["datasets"].items() if d.get("curves_seed0")]
    curve_ds = "synth" if "synth" in with_curves else next(iter(with_curves), None)
    if curve_ds:
        fig, ax = plt.subplots(figsize=(6, 4))
        for v, ys in data["datasets"][curve_ds]["curves_seed0"].items():
            ax.plot(range(1, len(ys) + 1), ys, marker="o", ms=3, label=VARIANT_LABELS[v])
        ax.set_xlabel("epoch")
        ax.set_ylabel("val top-1 (%)")
        ax.set_title(f"{curve_ds}, seed 0: student {STUDENT}")
        ax.grid(alpha=0.3)
        ax.legend()
        written.append(str(save_figure(fig, outdir / f"{prefix}_curves.png", dpi=120)))
    return written
