"""Student step time: CE only vs KD from cached rows vs KD with an online teacher.

All variants run in one process on the same student object, optimiser, batch and input
size, random weights, interleaved (A B C, C B A, ...), warm-up steps dropped, median of
the rest:

* ``ce``: student forward, soft-target CE on mixed targets, backward, AdamW step;
* ``cached``: the same plus the cached teacher rows of the default codec (topk, k = 10,
  gap8: ``ids``, ``values``, ``tail`` as pre-made tensors in their stored dtypes, as the
  DataLoader workers deliver them) moved to the device, ``logitcache.codecs.logits.decode`` there, and
  ``logitcache.trainer.losses.distill_loss`` kind ``kd`` (CE + KL at T = 1); ``cached_2t``: two
  teachers' rows, each decoded, their mean probabilities distilled (``--teachers-mode mean-probs``);
* ``online_<teacher>``: timm's ``timm.task.LogitDistillationTask`` (teacher forward under
  ``no_grad`` on the same batch, its own KL), backward, AdamW step.

Every step moves the images from (pinned) host memory to the device and builds the mixed
targets there, as the trainer does. On CUDA the student runs under bf16 autocast and
channels_last (the trainer's defaults); the online task runs under the same autocast.

Figures, each the median over rounds of the ratio within a round (paired; see
:func:`figures`): ``cached_over_ce_step`` = cached / CE (target <= 1.05),
``speedup_over_online_<t>`` = online / cached, ``ideal_speedup_over_online_<t>`` = online /
CE, and their ratio ``speedup_over_ideal_<t>`` (target >= 0.9). Peak memory: one
subprocess per variant (``python -m bench.train_step --memory ...``): the growth of
``ru_maxrss`` from before the models are built to after two steps, and on CUDA
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import torch

from logitcache.replay.teachers import ROW_ARRAYS, row_keys

from .common import Ctx, PeakRSS, interleaved, save_figure, stats, sync

NUM_CLASSES = 1000
K = 10
SHORT = {"beitv2_large_patch16_224": "beitv2_l", "vit_tiny_patch16_224": "vit_t", "resnet152": "resnet152",
         "resnet50": "resnet50", "deit_tiny_distilled_patch16_224": "deit_t_distilled"}


def short(name: str) -> str:
    return SHORT.get(name, name)


def settings(ctx: Ctx) -> dict:
    quick = ctx.quick
    return {
        "students": ctx.pick(quick_cpu=["resnet50"], full_cpu=["resnet50", "vit_tiny_patch16_224"], tiny=["test_resnet"]),
        # students with a distillation head: CE (class head) vs --kd deit-hard from the cache
        "token_students": ctx.pick(quick_cpu=["deit_tiny_distilled_patch16_224"],
                                   full_cpu=["deit_tiny_distilled_patch16_224"], tiny=[]),
        "teachers": ctx.pick(quick_cpu=["resnet152"], full_cpu=["beitv2_large_patch16_224", "resnet152"],
                             tiny=["resnet18"]),
        "batch_size": ctx.pick(quick_cpu=8, full_cpu=8, quick_cuda=128, full_cuda=128, tiny=2),
        "input_size": ctx.pick(quick_cpu=224, full_cpu=224, tiny=64),
        "warmup_steps": ctx.pick(quick_cpu=2, full_cpu=2, quick_cuda=5, full_cuda=10, tiny=1),
        "timed_steps": ctx.pick(quick_cpu=10, full_cpu=12, quick_cuda=20, full_cuda=50, tiny=2),
        "k": K,
        "num_classes": NUM_CLASSES,
        "optimizer": "adamw lr 1e-4",
        "amp_bf16": ctx.cuda,
        "channels_last": ctx.cuda,
        "memory_subprocess": True,
        "quick_note": "quick: ResNet-152 teacher only" if quick else "",
    }


# --- one process, all variants -------------------------------------------------------------

class Bench:
    """Inputs, student, optimiser and the step functions of one student."""

    def __init__(self, student_name: str, device: torch.device, batch: int, size: int, seed: int = 0):
        import timm

        from logitcache.codecs.logits import create_codec, encode

        from .common import teacher_like_logits

        self.device = device
        cuda = device.type == "cuda"
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, 3, size, size, generator=g)
        label = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
        partner = label.flip(0)
        lam = torch.rand(batch, generator=g)
        self.codec = create_codec("topk", NUM_CLASSES, K)  # the default: gap8 values
        host = {"images": x, "label": label, "partner_label": partner, "lam": lam}
        for t in range(2):  # what collate + CachedRows hand over: two teachers' rows in their stored dtypes
            # (uint16 ids, uint8 gap codes, uint16 tail code; teacher 1's for the cached_2t variant)
            rows = encode(self.codec, torch.from_numpy(teacher_like_logits(batch, NUM_CLASSES, seed=seed + t)[0]))
            host.update({key: torch.from_numpy(rows[k]) for k, key in zip(ROW_ARRAYS, row_keys(t))})
        self.host = {k: v.pin_memory() for k, v in host.items()} if cuda else host
        torch.manual_seed(seed)
        self.student = timm.create_model(student_name, pretrained=False, num_classes=NUM_CLASSES).to(device)
        if cuda:
            self.student = self.student.to(memory_format=torch.channels_last)
        self.token = hasattr(self.student, "set_distilled_training")  # DeiT's distillation head
        if self.token:
            self.student.set_distilled_training(True)
        self.student.train()
        self.opt = torch.optim.AdamW(self.student.parameters(), lr=1e-4, weight_decay=0.05)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)
        self.tasks: dict[str, object] = {}

    def _inputs(self):
        from logitcache.trainer.step import smoothed_targets

        h, dev = self.host, self.device
        x = h["images"].to(dev, non_blocking=True)
        if dev.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        target = smoothed_targets(h["label"].to(dev, non_blocking=True), h["partner_label"].to(dev, non_blocking=True),
                                  h["lam"].to(dev, non_blocking=True), NUM_CLASSES, 0.0)
        return x, target

    def _update(self, loss):
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def step_ce(self):
        from logitcache.trainer.losses import LossConfig, distill_loss

        x, target = self._inputs()
        with self.autocast:
            logits = self.student(x)
        if self.token:  # the same two-head forward; CE on the class head
            logits = logits[0]
        loss, _ = distill_loss(LossConfig(kind="none"), logits.float(), None, target)
        self._update(loss)

    def step_cached(self):
        from logitcache.trainer.losses import LossConfig, distill_loss

        from logitcache.codecs.logits import decode

        x, target = self._inputs()
        h, dev = self.host, self.device
        teacher_logits = None  # deit-hard reads only the top-1 ids (trainer/step.py: needs_teacher_logits)
        if not self.token:
            teacher_logits = decode(self.codec, h["ids"].to(dev, non_blocking=True),
                                    h["values"].to(dev, non_blocking=True), h["tail"].to(dev, non_blocking=True))
        with self.autocast:
            logits = self.student(x)
        if self.token:  # --kd deit-hard: the trainer's step (trainer/step.py:_token_loss)
            from logitcache.trainer.token import token_distill_loss

            from logitcache.codecs.logits import teacher_top1

            top1 = teacher_top1(self.codec, h["ids"].to(dev), h["values"].to(dev), h["tail"].to(dev))
            loss, _ = token_distill_loss(LossConfig(kind="deit-hard", hard_weight=0.5, kd_weight=0.5),
                                         logits[0].float(), logits[1].float(), teacher_logits, target,
                                         teacher_top1=top1)
        else:
            loss, _ = distill_loss(LossConfig(kind="kd"), logits.float(), teacher_logits, target)
        self._update(loss)

    def step_cached_2t(self):
        """Vanilla KD from two caches' rows, --teachers-mode mean-probs (trainer/step.py, trainer/ensemble.py)."""
        from logitcache.trainer.ensemble import TeachersConfig, multi_teacher_loss
        from logitcache.trainer.losses import LossConfig

        from logitcache.codecs.logits import decode

        (x, target), h, dev = self._inputs(), self.host, self.device
        teachers = [decode(self.codec, *(h[k].to(dev, non_blocking=True) for k in row_keys(t))) for t in range(2)]
        with self.autocast:
            logits = self.student(x)
        self._update(multi_teacher_loss(LossConfig(kind="kd"), TeachersConfig("mean-probs"), logits.float(), teachers,
                                        target)[0])

    def add_online(self, teacher_name: str) -> None:
        import timm
        from timm.loss import SoftTargetCrossEntropy
        from timm.task import LogitDistillationTask
        from timm.task.distillation import DistillationTeacher

        torch.manual_seed(1)
        model = timm.create_model(teacher_name, pretrained=False, num_classes=NUM_CLASSES)
        model.eval().requires_grad_(False).to(self.device)
        if self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        teacher = DistillationTeacher(model, device=self.device)
        task = LogitDistillationTask(self.student, teacher, criterion=SoftTargetCrossEntropy(), temperature=1.0,
                                     device=self.device, verbose=False)
        task.train()
        self.tasks[teacher_name] = task

    def step_online(self, teacher_name: str):
        x, target = self._inputs()
        with self.autocast:
            out = self.tasks[teacher_name](x, target)
        self._update(out["loss"].float())

    def step_fns(self) -> dict:
        fns = {"ce": self.step_ce, "cached": self.step_cached}
        fns |= {} if self.token else {"cached_2t": self.step_cached_2t}
        for t in self.tasks:
            fns[f"online_{short(t)}"] = (lambda t=t: self.step_online(t))
        return fns


# --- peak memory, one subprocess per variant -------------------------------------------------

def memory_child(student: str, variant: str, teacher: str | None, device: str, batch: int, size: int) -> dict:
    """Runs in a fresh process: build only what ``variant`` (ce, cached, online) needs, two
    steps, report peaks."""
    dev = torch.device(device)
    import logitcache.trainer.losses  # noqa: F401
    import logitcache.trainer.train  # noqa: F401
    import timm  # noqa: F401 - imported before the baseline

    mark = PeakRSS()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    b = Bench(student, dev, batch, size)
    if variant == "online":
        b.add_online(teacher)
        fn = lambda: b.step_online(teacher)  # noqa: E731
    else:
        fn = b.step_ce if variant == "ce" else b.step_cached
    for _ in range(2):
        fn()
    sync(dev)
    out = mark.read()
    if dev.type == "cuda":
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    return out


def measure_memory(student: str, variant: str, teacher: str | None, ctx: Ctx, batch: int, size: int) -> dict:
    cmd = [sys.executable, "-m", "bench.train_step", "--memory", "--student", student, "--variant", variant,
           "--device", str(ctx.device), "--batch", str(batch), "--size", str(size), "--teacher", teacher or ""]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
    if p.returncode != 0:
        return {"error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


# --- the benchmark -----------------------------------------------------------------------------

def figures(times: dict[str, list[float]], teachers: list[str]) -> dict[str, float]:
    """Key figures from interleaved step times (name -> seconds per round, round r of every
    variant taken back to back).

    Ratios are paired: the median over rounds of the ratio within a round, which cancels
    the slow drift of a shared machine (a plain ratio of medians can put the cached step
    below the CE step it contains; it is kept as ``*_of_medians``)."""
    def paired(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    med = {name: statistics.median(v) for name, v in times.items()}
    figs = {
        "ce_step_s": med["ce"],
        "cached_step_s": med["cached"],
        "cached_over_ce_step": paired("cached", "ce"),
        "cached_over_ce_step_of_medians": med["cached"] / med["ce"],
        **({"cached_2t_over_ce_step": paired("cached_2t", "ce")} if "cached_2t" in times else {}),
    }
    for t in teachers:
        speedup, ideal = paired(f"online_{t}", "cached"), paired(f"online_{t}", "ce")
        figs[f"online_{t}_step_s"] = med[f"online_{t}"]
        figs[f"speedup_over_online_{t}"] = speedup
        figs[f"ideal_speedup_over_online_{t}"] = ideal
        figs[f"speedup_over_ideal_{t}"] = speedup / ideal
    return figs


def run(ctx: Ctx) -> dict:
    s = settings(ctx)
    results: dict[str, dict] = {}
    summary: dict[str, float] = {}
    for i, student in enumerate(s["students"]):
        b = Bench(student, ctx.device, s["batch_size"], s["input_size"])
        teachers = s["teachers"]
        for t in teachers:
            b.add_online(t)
        fns = b.step_fns()
        times = interleaved(fns, warmup=s["warmup_steps"], reps=s["timed_steps"], device=ctx.device)
        st = {name: stats(v) for name, v in times.items()}
        med = {name: v["median"] for name, v in st.items()}
        figs = figures(times, [short(t) for t in teachers])
        del b, fns
        memory = {}
        if s["memory_subprocess"]:
            variants = {"ce": ("ce", None), "cached": ("cached", None),
                        **{f"online_{short(t)}": ("online", t) for t in teachers}}
            for name, (variant, teacher) in variants.items():
                memory[name] = measure_memory(student, variant, teacher, ctx, s["batch_size"], s["input_size"])
        results[student] = {"step_seconds": st, "figures": figs, "memory": memory,
                            "images_per_s": {n: s["batch_size"] / m for n, m in med.items()}}
        prefix = "" if i == 0 else f"{short(student)}."
        summary.update({prefix + k: v for k, v in figs.items()})
        for name, m in memory.items():
            key = "cuda_max_allocated_mb" if ctx.cuda else "rss_growth_mb"
            if key in m:
                summary[f"{prefix}{name}_{key}"] = m[key]
    for student in s["token_students"]:  # CE vs cached deit-hard only (no online teacher here)
        b = Bench(student, ctx.device, s["batch_size"], s["input_size"])
        times = interleaved(b.step_fns(), warmup=s["warmup_steps"], reps=s["timed_steps"], device=ctx.device)
        st = {name: stats(v) for name, v in times.items()}
        figs = figures(times, [])
        del b
        results[student] = {"step_seconds": st, "figures": figs, "memory": {}, "kd": "deit-hard",
                            "images_per_s": {n: s["batch_size"] / v["median"] for n, v in st.items()}}
        summary.update({f"{short(student)}.{k}": v for k, v in figs.items()})
    return {"settings": s, "results": results, "summary": summary}


# --- report ------------------------------------------------------------------------------

def markdown(data: dict) -> str:
    s, r = data["settings"], data["results"]
    cuda = data["meta"]["device"] == "cuda"
    lines = [
        f"Batch {s['batch_size']} at {s['input_size']} px, random weights, k={s['k']} cached rows, "
        f"{s['warmup_steps']} warm-up + {s['timed_steps']} timed steps per variant, interleaved; medians.",
        "",
    ]
    merged = data["meta"].get("merged", {})  # rows measured in a run of their own
    for student, res in r.items():
        f = res["figures"]
        lines += [
            f"**Student `{student}`**" + (f" (cached = `--kd {res['kd']}` from the cached top-1, CE = the class "
                                          f"head's)" if res.get("kd") else "")
            + (f"; measured in its own run: `{merged[student]['command']}`, {merged[student]['date']}"
               if student in merged else ""),
            "",
            "| variant | median step | IQR | images/s | vs CE | peak memory growth |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, st in res["step_seconds"].items():
            m = res["memory"].get(name, {})
            mem = m.get("cuda_max_allocated_mb" if cuda else "rss_growth_mb")
            mem_s = f"{mem:,.0f} MB" if mem is not None else m.get("error", "-")
            lines.append(f"| {name} | {st['median']:.3f} s | {st['q1']:.3f}-{st['q3']:.3f} | "
                         f"{res['images_per_s'][name]:.2f} | x{st['median'] / f['ce_step_s']:.3f} | {mem_s} |")
        lines += ["", f"- `cached_over_ce_step` = **{f['cached_over_ce_step']:.3f}** (target <= 1.05; median over "
                      f"rounds of the ratio within a round; ratio of the medians: "
                      f"{f['cached_over_ce_step_of_medians']:.3f})"]
        if "cached_2t_over_ce_step" in f:
            lines.append(f"- `cached_2t_over_ce_step` (two teachers' rows, `--teachers-mode mean-probs`) = "
                         f"**{f['cached_2t_over_ce_step']:.3f}** (target <= 1.05)")
        for k, v in f.items():
            if k.startswith("speedup_over_online_"):
                t = k.removeprefix("speedup_over_online_")
                lines.append(f"- teacher `{t}`: `speedup_over_online` (online / cached) = **{v:.2f}**, ideal (online / CE) = "
                             f"{f['ideal_speedup_over_online_' + t]:.2f}, speedup / ideal = "
                             f"**{f['speedup_over_ideal_' + t]:.3f}** (target >= 0.9)")
        lines.append("")
    lines.append("Memory: " + ("`torch.cuda.max_memory_allocated`" if cuda else
                               "peak RSS (VmHWM, reset after imports) minus the RSS before the models are built, "
                               "over model creation and two steps") + ", one subprocess per variant.")
    return "\n".join(lines)


def plot(data: dict, outdir) -> list[str]:
    import matplotlib.pyplot as plt

    r = data["results"]
    fig, axes = plt.subplots(1, len(r), figsize=(4.5 * len(r), 3.2), squeeze=False)
    for ax, (student, res) in zip(axes[0], r.items()):
        names = list(res["step_seconds"])
        med = [res["step_seconds"][n]["median"] for n in names]
        err = [[m - res["step_seconds"][n]["q1"] for n, m in zip(names, med)],
               [res["step_seconds"][n]["q3"] - m for n, m in zip(names, med)]]
        colors = ["#888" if n == "ce" else "#2a7" if n.startswith("cached") else "#c54" for n in names]
        ax.bar(names, med, yerr=err, color=colors, capsize=3)
        ax.set_ylabel("step time (s)")
        ax.set_title(f"{student}, batch {data['settings']['batch_size']} ({data['meta']['device']})", fontsize=9)
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    return [save_figure(fig, outdir / "train_step.png").name]


def _main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--memory", action="store_true")
    p.add_argument("--student", required=True)
    p.add_argument("--variant", choices=["ce", "cached", "online"], required=True)
    p.add_argument("--teacher", default="")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--size", type=int, required=True)
    a = p.parse_args()
    print(json.dumps(memory_child(a.student, a.variant, a.teacher or None, a.device, a.batch, a.size)))


if __name__ == "__main__":
    _main()
