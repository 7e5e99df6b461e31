"""The student trainer, run for real on the tiny synthetic data (tests/conftest.py).

* cached vs online teacher: a ``full`` float32 cache gives the same loss and gradients as
  running the teacher on the same views (function level, and whole runs), and the same kd
  term as timm's ``LogitDistillationTask``;
* DDP (2 processes, gloo) reproduces the 1-process loss sequence;
* a run stopped by SIGTERM or killed by SIGKILL and resumed ends bit-identical to an
  uninterrupted one (deterministic mode), with and without DataLoader workers;
* cached mode holds no teacher in memory;
* config files (YAML, TOML) with flag overrides; more student than cached epochs;
  MKD (temperatures logged every step, moving, positive, resumable); DKD and DIST.

Every run uses one torch thread (the machine has 2 shared cores).
"""

from __future__ import annotations

import gc
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from logitcache.trainer.checkpoint import TrainingStopped
from logitcache.trainer.config import TrainConfig
from logitcache.trainer.losses import LossConfig, distill_loss
from logitcache.trainer.step import smoothed_targets
from logitcache.trainer.train import train
from safetensors.torch import load_file

from logitcache.build.teacher import Teacher
from logitcache.codecs.logits import create_codec, decode
from logitcache.data.source import open_source
from logitcache.errors import LogitcacheError
from logitcache.replay.batches import create_train_loader, epoch_groups
from logitcache.replay.rows import CachedRows
from logitcache.storage.reader import CacheReader

torch.set_num_threads(1)  # in-process runs: the same arithmetic as the 1-thread subprocesses

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 16
SUBPROCESS_ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (relative to the scale of the reference)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_config(synth_data: str, cache: str, out: Path, **kw) -> TrainConfig:
    """A small, quiet, CPU run: one epoch of at most 2 batches of 16 views."""
    settings = dict(data=synth_data, cache=cache, out=str(out), student="test_resnet", epochs=1, batch_size=16,
                    limit_batches=2, num_workers=0, tensorboard=False, progress=False, device="cpu", seed=0)
    settings.update(kw)
    return TrainConfig(**settings)


def cli_train(*args: str):
    """``logitcache train ...`` in this process (typer's runner); returns the result, checked."""
    from logitcache.cli.main import app
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["train", *args])
    if result.exit_code != 0:
        raise AssertionError(f"exit {result.exit_code}: {result.output}") from result.exception
    return result


# --- a full float32 cache of mixed views ------------------------------------------------

@pytest.fixture(scope="module")
def full_cache(tmp_path_factory, synth_data, tiny_teacher) -> str:
    """1 epoch of demo32_mix views (mixup/cutmix pairs), every logit stored as float32."""
    from logitcache.build.loop import build
    from logitcache.views.augment import create_recipe

    source = open_source(synth_data, "train")
    url = str(tmp_path_factory.mktemp("full") / "full.zarr")
    build(source, dataset_name="synth", recipe=create_recipe("demo32_mix"), url=url, epochs=[0],
          teacher=Teacher("test_resnet", weights=tiny_teacher, num_classes=NUM_CLASSES),
          codec=create_codec("full", NUM_CLASSES, values="float32"), batch_size=16, num_workers=0,
          progress=False)
    return url


def _loss_and_grads(model: nn.Module, x, teacher_logits, target, cfg: LossConfig):
    model.zero_grad(set_to_none=True)
    loss, parts = distill_loss(cfg, model(x).float(), teacher_logits, target, epoch=1.0)
    loss.backward()
    return loss.detach(), {k: v.detach() for k, v in parts.items()}, \
        {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def test_cached_full_logits_give_the_online_teachers_loss_and_gradients(synth_data, tiny_teacher, full_cache):
    from timm.loss import SoftTargetCrossEntropy
    from timm.task import LogitDistillationTask

    reader = CacheReader(full_cache)
    recipe = reader.manifest.recipe
    source = open_source(synth_data, "train")
    arrays = reader.load_epoch(0)
    groups = epoch_groups(source, recipe, 0)
    loader = create_train_loader(source, recipe, 0, groups, CachedRows(arrays, source.labels()), batch_size=32,
                                 seed=0, epoch=0, num_workers=0, limit=1)
    batch = next(iter(loader))
    x = batch["images"]
    assert (batch["lam"] < 1).any(), "the batch should hold mixed views"
    target = smoothed_targets(batch["label"], batch["partner_label"], batch["lam"], NUM_CLASSES, 0.1)

    cached = decode(reader.manifest.codec, batch["ids"], batch["values"], batch["tail"])
    teacher = Teacher("test_resnet", weights=tiny_teacher, num_classes=NUM_CLASSES)
    online = teacher(x, recipe.mean, recipe.std).clone()
    logit_diff = rel_diff(cached, online)
    assert logit_diff <= 1e-5, logit_diff

    torch.manual_seed(0)
    student = timm.create_model("test_resnet", num_classes=NUM_CLASSES).train()
    worst = {}
    for cfg in (LossConfig(kind="kd", temperature=1.0), LossConfig(kind="kd", temperature=4.0),
                LossConfig(kind="dkd", temperature=2.0, dkd_beta=2.0), LossConfig(kind="dist", kd_weight=2.0)):
        loss_c, parts_c, grads_c = _loss_and_grads(student, x, cached, target, cfg)
        loss_o, parts_o, grads_o = _loss_and_grads(student, x, online, target, cfg)
        assert parts_c["kd"] > 1e-4  # a real distillation signal, not 0 == 0
        d_loss = max(rel_diff(loss_c, loss_o), rel_diff(parts_c["kd"], parts_o["kd"]))
        d_grad = max(rel_diff(grads_c[n], grads_o[n]) for n in grads_o)
        worst[f"{cfg.kind} T={cfg.temperature}"] = (d_loss, d_grad)
        assert d_loss <= 1e-5, (cfg, d_loss)
        assert d_grad <= 1e-5, (cfg, d_grad)

    # timm's LogitDistillationTask runs the same teacher online on the same mixed views;
    # its kd term (and total, with soft-target CE on the same mixed targets) equals ours
    # computed from the cached logits.
    for temp in (1.0, 4.0):
        mean_std = {"mean": tuple(recipe.mean), "std": tuple(recipe.std)}
        student.pretrained_cfg = {**student.pretrained_cfg, **mean_std}
        teacher.model.pretrained_cfg = {**teacher.model.pretrained_cfg, **mean_std}
        task = LogitDistillationTask(student, teacher.model, criterion=SoftTargetCrossEntropy(), temperature=temp,
                                     verbose=False)
        student.zero_grad(set_to_none=True)
        out = task(x, target)
        out["loss"].backward()
        timm_grads = {n: p.grad.detach().clone() for n, p in student.named_parameters()}
        loss_c, parts_c, grads_c = _loss_and_grads(student, x, cached, target, LossConfig(kind="kd", temperature=temp))
        d_kd = rel_diff(parts_c["kd"], out["kd_loss"])
        d_total = rel_diff(loss_c, out["loss"])
        d_grad = max(rel_diff(grads_c[n], timm_grads[n]) for n in timm_grads)
        worst[f"timm T={temp}"] = (max(d_kd, d_total), d_grad)
        assert d_kd <= 1e-5 and d_total <= 1e-5, (temp, d_kd, d_total)
        assert d_grad <= 1e-5, (temp, d_grad)
    print(f"\nmax rel diff cached vs online: logits {logit_diff:.2e}; (loss, grad): "
          + ", ".join(f"{k}: ({a:.1e}, {b:.1e})" for k, (a, b) in worst.items()))


# --- whole runs: cached vs online teacher, and what is in memory -----------------------

def _memory_probe(records: list, teacher_cls=Teacher):
    """An ``on_step`` callback: after a full GC, what exists besides the student (and its
    EMA copy) that was created since the probe was made."""
    gc.collect()
    with warnings.catch_warnings():  # isinstance on torch's deprecated module aliases warns
        warnings.simplefilter("ignore")
        before_modules = {id(o) for o in gc.get_objects() if isinstance(o, nn.Module)}
        before_tensors = {id(o) for o in gc.get_objects() if isinstance(o, torch.Tensor)}

    def probe(info):
        if info["batch"] != 0:
            return
        with warnings.catch_warnings():  # isinstance on torch's deprecated module aliases warns
            warnings.simplefilter("ignore")
            _probe(info)

    def _probe(info):
        gc.collect()
        objs = gc.get_objects()
        own = list(info["model"].modules()) + (list(info["ema"].modules()) if info["ema"] is not None else [])
        own_ids = {id(m) for m in own}
        own_params = {id(p) for m in own for p in m.parameters()}
        foreign = [o for o in objs if isinstance(o, nn.Module) and id(o) not in own_ids and id(o) not in before_modules]
        foreign_params = {id(p): p.numel() for m in foreign for p in m.parameters() if id(p) not in own_params}
        loose_params = [o for o in objs if isinstance(o, nn.Parameter) and id(o) not in own_params
                        and id(o) not in before_tensors]
        records.append({
            "teachers": sum(isinstance(o, teacher_cls) for o in objs),
            "foreign_modules": [type(m).__name__ for m in foreign],
            "foreign_params": sum(foreign_params.values()),
            "loose_params": sum(p.numel() for p in loose_params),
            "student_params": sum(p.numel() for p in info["model"].parameters()),
        })

    return probe


@pytest.fixture(scope="module")
def parity_runs(tmp_path_factory, synth_data, tiny_teacher, full_cache):
    """The same 3-step run twice: teacher logits from the full cache, and from the teacher
    run online on the same views; each with the memory probe."""
    out = tmp_path_factory.mktemp("parity")
    common = dict(limit_batches=3, deterministic=True, loss=LossConfig(kind="kd", temperature=2.0),
                  label_smoothing=0.1, model_ema=True, model_ema_decay=0.5)
    runs = {}
    for name, extra in (("cached", {}), ("online", {"online_teacher": True, "teacher_weights": tiny_teacher})):
        records: list = []
        t0 = time.perf_counter()
        summary = train(base_config(synth_data, full_cache, out / name, **common, **extra),
                        on_step=_memory_probe(records))
        runs[name] = {"summary": summary, "steps": read_rows(out / name / "steps.jsonl"), "memory": records,
                      "weights": load_file(str(out / name / "model.safetensors")),
                      "seconds": time.perf_counter() - t0}
    return runs


def test_cached_run_matches_online_teacher_run(parity_runs):
    cached, online = parity_runs["cached"], parity_runs["online"]
    assert len(cached["steps"]) == len(online["steps"]) == 3
    worst = 0.0
    for c, o in zip(cached["steps"], online["steps"]):
        for k in ("loss", "hard", "kd"):
            d = abs(c[k] - o[k]) / abs(o[k])
            worst = max(worst, d)
            assert d <= 1e-5, (k, c, o)
    w = max(rel_diff(cached["weights"][k], online["weights"][k]) for k in online["weights"]
            if online["weights"][k].is_floating_point())
    assert w <= 1e-4, w
    print(f"\nrun-level max rel diff: step losses {worst:.2e}, final weights {w:.2e}")


def test_cached_mode_holds_no_teacher_in_memory(parity_runs):
    cached, online = parity_runs["cached"]["memory"], parity_runs["online"]["memory"]
    assert cached, "the probe did not run"
    for rec in cached:
        assert rec["teachers"] == 0, rec
        assert rec["foreign_params"] == 0 and rec["loose_params"] == 0, rec
    # The probe does see a teacher when there is one: the online run's, parameter for parameter.
    teacher_params = sum(p.numel() for p in timm.create_model("test_resnet", num_classes=NUM_CLASSES).parameters())
    for rec in online:
        assert rec["teachers"] == 1, rec
        assert rec["foreign_params"] == teacher_params, rec


# --- DDP ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path, synth_data, built_cache):
    # test_vit has no BatchNorm: with BN each rank normalises with its own half-batch
    # statistics, which legitimately differ from one process's full-batch statistics.
    args = ["--data", synth_data, "--cache", built_cache, "--student", "test_vit", "--epochs", "1",
            "--batch-size", "16", "--limit-batches", "4", "--workers", "0", "--deterministic", "--no-tensorboard",
            "--no-progress", "--device", "cpu"]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
         "--master-port", str(free_port()), "-m", "logitcache.cli.main", "train", *args, "--out", str(tmp_path / "ddp")],
        capture_output=True, text=True, timeout=300, env=SUBPROCESS_ENV, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    single = train(base_config(synth_data, built_cache, tmp_path / "one", student="test_vit", limit_batches=4,
                               deterministic=True))
    ddp_summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert ddp_summary["world_size"] == 2 and single["world_size"] == 1
    ddp, one = read_rows(tmp_path / "ddp" / "steps.jsonl"), read_rows(tmp_path / "one" / "steps.jsonl")
    assert [r["step"] for r in ddp] == [r["step"] for r in one] == [1, 2, 3, 4]
    worst = max(abs(d[k] - o[k]) / abs(o[k]) for d, o in zip(ddp, one) for k in ("loss", "hard", "kd"))
    assert worst <= 1e-5, (worst, ddp, one)
    print(f"\nDDP vs 1 process: max rel diff of step losses {worst:.2e}")


# --- stop / kill and resume ----------------------------------------------------------------

#: 2 epochs of 12 batches of 8 views; EMA on, so its checkpointing is covered too.
RESUME_FLAGS = dict(student="test_resnet", epochs=2, batch_size=8, deterministic=True, model_ema=True,
                    model_ema_decay=0.9, lr=3e-3)
STEPS_PER_EPOCH = 12


def _resume_cli_args(synth_data: str, cache: str, out: Path, workers: int) -> list[str]:
    return ["--data", synth_data, "--cache", cache, "--out", str(out), "--student", "test_resnet", "--epochs", "2",
            "--batch-size", "8", "--deterministic", "--model-ema", "--model-ema-decay", "0.9", "--lr", "3e-3",
            "--workers", str(workers), "--no-tensorboard", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, synth_data, built_cache) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    train(base_config(synth_data, built_cache, out, limit_batches=None, **RESUME_FLAGS))
    assert len(read_rows(out / "steps.jsonl")) == 2 * STEPS_PER_EPOCH
    return out


def _start_and_signal(args: list[str], out: Path, lines: int, sig: int) -> subprocess.CompletedProcess:
    """Start ``logitcache train``; once steps.jsonl has ``lines`` rows, send ``sig``."""
    proc = subprocess.Popen([sys.executable, "-m", "logitcache.cli.main", "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=SUBPROCESS_ENV, cwd=ROOT)
    try:
        deadline = time.monotonic() + 240
        while count_lines(out / "steps.jsonl") < lines:
            if proc.poll() is not None:
                raise AssertionError(f"run ended before the signal (exit {proc.returncode}): {proc.stderr.read()}")
            assert time.monotonic() < deadline, "run too slow"
            time.sleep(0.005)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _assert_same_as_uninterrupted(out: Path, reference: Path) -> None:
    for name in ("model.safetensors", "model_ema.safetensors"):
        ours, ref = load_file(str(out / name)), load_file(str(reference / name))
        assert ours.keys() == ref.keys()
        different = [k for k in ref if not torch.equal(ours[k], ref[k])]
        assert not different, f"{name}: {len(different)} tensors differ, e.g. {different[:3]}"
    # The logs read like one run: every step once, with the same losses.
    steps, ref_steps = read_rows(out / "steps.jsonl"), read_rows(reference / "steps.jsonl")
    assert [r["step"] for r in steps] == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    assert [r["loss"] for r in steps] == [r["loss"] for r in ref_steps]
    assert [r["epoch"] for r in read_rows(out / "metrics.jsonl")] == [0, 1]


@pytest.mark.slow
def test_sigterm_mid_epoch_then_resume_equals_uninterrupted(tmp_path, synth_data, built_cache, uninterrupted):
    out = tmp_path / "run"
    proc = _start_and_signal(_resume_cli_args(synth_data, built_cache, out, workers=2), out, lines=3,
                             sig=signal.SIGTERM)
    assert proc.returncode == 143, proc.stderr
    assert "stopped by SIGTERM" in proc.stderr and "--resume" in proc.stderr
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=True)
    assert state["epoch"] == 0 and 0 < state["batch"] < STEPS_PER_EPOCH, "the stop should land mid-epoch"
    assert state["step"] == state["batch"] == count_lines(out / "steps.jsonl")
    train(base_config(synth_data, built_cache, out, limit_batches=None, num_workers=2, resume=True, **RESUME_FLAGS))
    _assert_same_as_uninterrupted(out, uninterrupted)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_from_epoch_checkpoint_equals_uninterrupted(tmp_path, synth_data, built_cache,
                                                                                  uninterrupted):
    out = tmp_path / "run"
    proc = _start_and_signal(_resume_cli_args(synth_data, built_cache, out, workers=0), out,
                             lines=STEPS_PER_EPOCH + 2, sig=signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=True)
    assert (state["epoch"], state["batch"]) == (1, 0), "the kill should land in the second epoch"
    assert count_lines(out / "steps.jsonl") > STEPS_PER_EPOCH  # rows past the checkpoint, dropped on resume
    cli_train(*_resume_cli_args(synth_data, built_cache, out, workers=0), "--resume")
    _assert_same_as_uninterrupted(out, uninterrupted)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, synth_data, built_cache):
    with pytest.raises(LogitcacheError, match="no checkpoint"):
        train(base_config(synth_data, built_cache, tmp_path, resume=True))


# --- config files --------------------------------------------------------------------------

def test_yaml_config_with_flag_overrides(tmp_path, synth_data, built_cache):
    out = tmp_path / "run"
    path = tmp_path / "run.yaml"
    path.write_text(
        f"data: {synth_data}\ncache: {built_cache}\nout: {out}\nstudent: test_resnet\n"
        "epochs: 5  # more than the cache holds: only the --epochs flag makes this run possible\n"
        "batch_size: 16\nlimit_batches: 1\nnum_workers: 0\ntensorboard: false\nprogress: false\ndevice: cpu\n"
        "lr: 0.004\nloss:\n  kind: kd\n  temperature: 5.0\n  hard_weight: 0.5\n")
    cli_train("--config", str(path), "--epochs", "1", "--temperature", "2.0")
    cfg = json.loads((out / "summary.json").read_text())["config"]
    assert cfg["epochs"] == 1 and cfg["loss"]["temperature"] == 2.0  # flags win
    assert cfg["lr"] == 0.004 and cfg["loss"]["hard_weight"] == 0.5 and cfg["student"] == "test_resnet"  # file
    assert len(read_rows(out / "steps.jsonl")) == 1


def test_toml_config_with_flag_overrides(tmp_path, synth_data, built_cache):
    out = tmp_path / "run"
    path = tmp_path / "run.toml"
    path.write_text(
        f'data = "{synth_data}"\ncache = "{built_cache}"\nout = "{out}"\nstudent = "test_resnet"\n'
        "epochs = 1\nbatch_size = 16\nlimit_batches = 1\nnum_workers = 0\ntensorboard = false\nprogress = false\n"
        'device = "cpu"\nlr = 0.004\n\n[loss]\nkind = "dkd"\ndkd_beta = 2.0\n')
    cli_train("--config", str(path), "--kd", "dist", "--lr", "0.001", "--dist-gamma", "0.5")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kd"] == "dist"
    cfg = summary["config"]
    assert cfg["lr"] == 0.001 and cfg["loss"]["dist_gamma"] == 0.5  # flags win
    assert cfg["loss"]["dkd_beta"] == 2.0 and cfg["batch_size"] == 16  # from the file


def test_config_with_unknown_setting_is_rejected(tmp_path, synth_data):
    from logitcache.trainer.config import load_config

    path = tmp_path / "bad.yaml"
    path.write_text(f"data: {synth_data}\nepoch: 3\n")
    with pytest.raises(LogitcacheError, match="epoch"):
        load_config(path)


# --- cached epochs -------------------------------------------------------------------------

def test_more_student_epochs_than_cached(tmp_path, synth_data, built_cache):
    cfg = base_config(synth_data, built_cache, tmp_path / "run", epochs=3, limit_batches=1)
    with pytest.raises(LogitcacheError, match=r"3 student epochs but cache .* holds 2 complete epochs.*--reuse-epochs"):
        train(cfg)
    with pytest.warns(UserWarning, match="reusing cached epochs"):
        train(replace(cfg, reuse_epochs=True))
    assert [r["view_epoch"] for r in read_rows(tmp_path / "run" / "metrics.jsonl")] == [0, 1, 0]


# --- MKD, DKD, DIST ------------------------------------------------------------------------

def test_mkd_run_logs_moving_positive_temperatures_every_step(tmp_path, synth_data, built_cache):
    out = tmp_path / "run"
    cli_train("--data", synth_data, "--cache", built_cache, "--out", str(out), "--student", "test_resnet",
              "--kd", "mkd", "--mkd-meta-every", "1", "--mkd-meta-lr", "0.2", "--epochs", "1", "--batch-size", "16",
              "--limit-batches", "4", "--workers", "0", "--no-tensorboard", "--no-progress", "--device", "cpu")
    steps = read_rows(out / "steps.jsonl")
    assert len(steps) == 4
    for key in ("t_teacher", "t_student"):
        values = [r[key] for r in steps]
        assert all(math.isfinite(v) and v > 0 for v in values), values
        assert max(values) - min(values) > 1e-2, f"{key} did not move: {values}"
    assert all(math.isfinite(r["meta_loss"]) for r in steps)  # a meta step every step
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kd"] == "mkd" and summary["t_teacher"] > 0 and summary["t_student"] > 0
    epoch = read_rows(out / "metrics.jsonl")[0]
    assert epoch["t_teacher"] == summary["t_teacher"]


def test_mkd_with_online_teacher(tmp_path, synth_data, built_cache, tiny_teacher):
    # The teacher answers under inference_mode; MKD's meta step differentiates through it.
    from logitcache.trainer.config import MKDConfig

    train(base_config(synth_data, built_cache, tmp_path, limit_batches=1, online_teacher=True,
                      teacher_weights=tiny_teacher, mkd=MKDConfig(meta_every=1)))
    (row,) = read_rows(tmp_path / "steps.jsonl")
    assert math.isfinite(row["meta_loss"]) and row["t_teacher"] > 0


def test_mkd_stopped_and_resumed_equals_uninterrupted(tmp_path, synth_data, built_cache):
    """The meta batches continue where they stopped (not from the start of the meta split)."""
    from logitcache.trainer.config import MKDConfig

    cfg = base_config(synth_data, built_cache, tmp_path / "ref", student="test_vit", batch_size=8, limit_batches=6,
                      deterministic=True, meta_fraction=0.3, mkd=MKDConfig(meta_every=2, meta_lr=0.1))
    train(cfg)

    def sigterm_at_step_3(info):
        if info["step"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    stopped = replace(cfg, out=str(tmp_path / "run"))
    with pytest.raises(TrainingStopped):
        train(stopped, on_step=sigterm_at_step_3)
    assert torch.load(tmp_path / "run" / "checkpoint" / "state.pt", weights_only=True)["batch"] == 4
    train(replace(stopped, resume=True))
    ref = load_file(str(tmp_path / "ref" / "model.safetensors"))
    run = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert all(torch.equal(ref[k], run[k]) for k in ref)
    ref_steps, run_steps = read_rows(tmp_path / "ref" / "steps.jsonl"), read_rows(tmp_path / "run" / "steps.jsonl")
    assert [(r["t_teacher"], r["t_student"], r.get("meta_loss")) for r in run_steps] == \
        [(r["t_teacher"], r["t_student"], r.get("meta_loss")) for r in ref_steps]


def test_sigterm_on_an_epochs_last_batch_then_resume_equals_uninterrupted(tmp_path, synth_data, built_cache):
    """The checkpoint says (epoch 0, batch = the epoch's last + 1): resuming runs no batch of
    epoch 0, evaluates it, and goes on with epoch 1 as an uninterrupted run does."""
    cfg = base_config(synth_data, built_cache, tmp_path / "ref", epochs=2, limit_batches=3, deterministic=True)
    train(cfg)

    def sigterm_at_step_2(info):  # the flag is read with step 3's losses: the stop comes after step 3
        if info["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    stopped = replace(cfg, out=str(tmp_path / "run"))
    with pytest.raises(TrainingStopped):
        train(stopped, on_step=sigterm_at_step_2)
    state = torch.load(tmp_path / "run" / "checkpoint" / "state.pt", weights_only=True)
    assert (state["epoch"], state["batch"], state["step"]) == (0, 3, 3)
    train(replace(stopped, resume=True))
    ref = load_file(str(tmp_path / "ref" / "model.safetensors"))
    run = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert all(torch.equal(ref[k], run[k]) for k in ref)
    assert [r["loss"] for r in read_rows(tmp_path / "run" / "steps.jsonl")] == \
        [r["loss"] for r in read_rows(tmp_path / "ref" / "steps.jsonl")]
    ref_epochs, run_epochs = (read_rows(tmp_path / d / "metrics.jsonl") for d in ("ref", "run"))
    assert [r["epoch"] for r in run_epochs] == [0, 1]
    assert [(r["val_top1"], r["loss"]) for r in run_epochs] == [(r["val_top1"], r["loss"])
                                                                      for r in ref_epochs]


def test_mkd_needs_vanilla_kd(tmp_path, synth_data, built_cache):
    from logitcache.trainer.config import MKDConfig

    with pytest.raises(LogitcacheError, match="MKD"):
        train(base_config(synth_data, built_cache, tmp_path, mkd=MKDConfig(), loss=LossConfig(kind="dkd")))


@pytest.mark.parametrize("loss", [LossConfig(kind="dkd", dkd_beta=2.0, dkd_warmup_epochs=1.0),
                                  LossConfig(kind="dist", kd_weight=2.0)], ids=["dkd", "dist"])
def test_dkd_and_dist_runs(tmp_path, synth_data, built_cache_mix, loss):
    summary = train(base_config(synth_data, built_cache_mix, tmp_path, loss=loss, num_workers=2))
    assert summary["kd"] == loss.kind
    steps = read_rows(tmp_path / "steps.jsonl")
    assert len(steps) == 2
    for r in steps:
        assert all(math.isfinite(r[k]) for k in ("loss", "hard", "kd")), r
        assert r["kd"] > 0
    assert np.isfinite(summary["final_top1"])


# --- data: the global batch does not depend on the world size -----------------------------

def test_ranks_split_the_same_global_batches(synth_data, built_cache_mix):
    """Rank slices of every global batch add up to the 1-process batch, view for view, also
    when a group holds one view (a mixing recipe's odd leftover), whose size the trainer
    needs to weight each rank's loss (``global_batch_views``)."""
    from logitcache.views.plan import Groups

    reader = CacheReader(built_cache_mix)
    recipe = reader.manifest.recipe
    source = open_source(synth_data, "train")
    arrays = reader.load_epoch(0)
    groups = epoch_groups(source, recipe, 0)
    single = np.arange(len(groups)) % 5 == 0
    groups = Groups(groups.first, np.where(single, -1, groups.second))  # every 5th group: its first view only
    rows = CachedRows(arrays, source.labels())

    def batches(rank, world):
        loader = create_train_loader(source, recipe, 0, groups, rows, batch_size=8, seed=3, epoch=1,
                                     num_workers=0, rank=rank, world_size=world, limit=4, skip=1)
        return loader.global_batch_views, list(loader)

    sizes, one = batches(0, 1)
    (sizes0, r0), (sizes1, r1) = batches(0, 2), batches(1, 2)
    assert sizes == sizes0 == sizes1 == [len(b["index"]) for b in one]
    assert len(one) == 3 and any(s < 8 for s in sizes)  # limit 4, skip 1; some batches hold a single view
    for full, a, b in zip(one, r0, r1):
        for key in ("index", "images", "values", "lam"):
            assert torch.equal(torch.cat([a[key], b[key]]), full[key])
