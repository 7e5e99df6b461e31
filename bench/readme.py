"""README's headline block: the figures it quotes, as one Markdown table, from ``summary.json``
(``python -m bench.report`` writes it between the markers)."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
README_START = "<!-- bench-headline:start (written by python -m bench.report from bench/results/summary.json) -->"
README_END = "<!-- bench-headline:end -->"

#: the accuracy study's fidelity rows README quotes (bench/accuracy/intervals.py's names)
FIDELITY_ROWS = (("cache_minus_online", "KD from the cache minus the same KD online"),
                 ("gap8_minus_float16", "KD from the default gap8 cache minus a float16 one"),
                 ("projector_cache_minus_online", "projector KD from cached features minus online"))
#: README's headline rows: (what, formatter of summary -> value or None when absent, target)
_pp = "{:+.2f} pp".format


def _interval(mean: float, lo: float, hi: float, n: float) -> str:
    return f"{mean:+.2f} [{lo:+.2f}, {hi:+.2f}] pp (n={n:.0f})"


def _get(summary: dict, *keys: str):
    vals = [summary.get(k) for k in keys]
    return None if any(not isinstance(v, (int, float)) for v in vals) else vals


def readme_block(summary: dict) -> str:
    """The headline figures README quotes, as one Markdown table, from ``summary.json``."""
    rows = []

    def row(what: str, keys: tuple[str, ...], fmt, target: str) -> None:
        vals = _get(summary, *keys)
        if vals is not None:
            rows.append(f"| {what} | {fmt(*vals)} | {target} |")

    row("cached-KD step / CE-only step, ResNet-50: steps only, on pre-made batches (`cached_over_ce_step`)",
        ("cached_over_ce_step",), "{:.3f}".format, "<= 1.05")
    row("speed-up of cached KD over online KD, teacher ResNet-152: steps only, no loader (`speedup_over_online`; "
        "ideal = online / CE)", ("speedup_over_online", "ideal_speedup_over_online"),
        "{:.2f}x (ideal {:.2f}x)".format, ">= 0.9 x ideal")
    row("the same, teacher BEiTv2-L (full suite)",
        ("train_step.speedup_over_online_beitv2_l", "train_step.ideal_speedup_over_online_beitv2_l"),
        "{:.2f}x (ideal {:.2f}x)".format, ">= 0.9 x ideal")
    row("whole epochs, loader included: `logitcache train` CE / timm's loop; cached KD vs timm's online KD "
        "(`timm.task`, ResNet-18 teacher), share of the ideal speed-up",
        ("epoch.ce_epoch_over_timm", "epoch.kd_speedup_over_online", "epoch.kd_ideal_speedup",
         "epoch.kd_speedup_over_ideal"),
        "{:.3f}; {:.2f}x (ideal {:.2f}x): {:.2f} of ideal".format, "<= 1.05; >= 0.9 of ideal")
    row("replay loader / timm's `create_loader` (prefetcher, FastCollateMixup), views/s, 2 workers: 32 px; 224 px",
        ("replay.ours_over_timm_32px_w2", "replay.ours_over_timm_224px_w2"), "{:.2f}; {:.2f}".format, ">= 1.0")
    row("build / raw teacher inference, ResNet-152 224 px (`build_over_raw_teacher`)", ("build_over_raw_teacher",),
        "{:.3f}".format, ">= 0.9")
    row("build / what its two stages allow, fast teacher (ResNet-18 32 px), shared CPU cores",
        ("build.fast_build_over_allowed",), "{:.3f}".format, ">= 0.9")
    row("reader, views/s per process once an epoch is loaded (`reader_views_per_s`)", ("reader_views_per_s",),
        "{:,.0f}".format, ">= 1,000,000")
    row("bytes per view on disk, default codec (topk k = 10, gap8), 1000 classes (`bytes_per_view_k10`)",
        ("bytes_per_view_k10",), "{:.1f} B".format, "<= 24 B (TinyViT: 44 B)")
    row("KL(teacher || rebuilt) T = 1 at k = 10, gap8 minus float16 values: ImageNet-shaped; demo teacher",
        ("frontier.kl_t1_k10_gap8_minus_float16", "frontier.kl_t1_k10_gap8_minus_float16_demo"),
        "{:+.1e}; {:+.1e}".format, "<= 1e-3")
    row("best KL T = 1 of ours at <= 44 B/view on disk / TinyViT's (k = 10, 44 B): ImageNet-shaped; demo teacher",
        ("frontier.best_over_tinyvit_kl_at_44b", "frontier.best_over_tinyvit_kl_at_44b_demo"), "{:.2f}; {:.2f}".format,
        "<= 0.5")
    row("checksums' share of `load_epoch` (every array checked on every read)",
        ("reader.checksum_fraction_of_load_epoch",), "{:.1%}".format, "<= 10%")
    row("ImageNet-1k x 300 epochs: build start-up to the first batch planned (virtual source); its memory",
        ("scale.startup_to_first_batch_s", "scale.startup_peak_rss_growth_mb"), "{:.2f} s; +{:.0f} MB".format,
        "<= 5 s; < 500 MB")
    row("trainer: one epoch of 1.28 M views planned and batched", ("scale.trainer_epoch_plan_s",), "{:.2f} s".format,
        "<= 2 s")
    row("resume scan of committed units, requests per epoch on loopback S3",
        ("scale.resume_scan_s3_requests_per_epoch",), "{:.1f}".format, "one listing (a page per 1,000 units)")
    row("`logitcache build --epochs 300` over tiny images: first unit committed; build process peak memory",
        ("scale.cli_first_unit_s", "scale.cli_build_peak_rss_mb"), "{:.1f} s; {:.0f} MB".format, "<= 20 s; < 1.5 GB")
    row("accuracy on make demo's workload (teacher 97%, CNN student, 5 seeds): KD from the cache minus CE only "
        "(`acc_kd_minus_ce_pp`; CE std `acc_ce_std_pp`)",
        ("acc_kd_minus_ce_pp", "acc_ce_std_pp"), lambda d, sd: f"{_pp(d)} (CE std {sd:.2f} pp)", "> 1 std")
    for name, what in FIDELITY_ROWS:
        row(f"accuracy, paired by seed, mean [95% interval]: {what} (`fidelity.{name}.*`)",
            tuple(f"fidelity.{name}.{k}" for k in ("mean", "lo", "hi", "n")),
            _interval, "mean within +-0.3, lower end >= -0.5")
    row("accuracy, KD from the cache minus timm's online KD (`create_loader` + `LogitDistillationTask`), paired by "
        "seed, mean [95% interval] (`peer.cache_minus_timm.*`)",
        tuple(f"peer.cache_minus_timm.{k}" for k in ("mean", "lo", "hi", "n")),
        _interval, "no loss")
    if not rows:
        return ""
    return "\n".join([
        f"Measured on {summary.get('device', '?')}, latest result {summary.get('date', '?')}; ratios are side by side "
        "in one process. Every figure is a key of [bench/results/summary.json](bench/results/summary.json).",
        "",
        "| figure | measured | target |",
        "|---|---:|---|",
        *rows,
    ])


def update_readme(summary: dict, readme: Path = README) -> bool:
    """Replace README's headline block (between the markers) with :func:`readme_block`;
    returns whether README has the markers."""
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        return False
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(f"{head}{README_START}\n{readme_block(summary)}\n{README_END}{tail}")
    return True
