"""ProKT (``--kd prokt``): a teacher trained along with the student, run for real on the tiny
synthetic data (tests/conftest.py).

* the teacher's objective decomposes as (1 - lambda) * hard + lambda * constraint;
* a teacher step moves the teacher (towards the student with lambda = 1);
* a run moves the teacher's weights, logs its terms and LR every step, and writes it;
* a stopped run resumed ends bit-identical (student and teacher) to an uninterrupted one;
* ProKT with a cache (or with MKD, DKD, no online teacher) is one clear error line.

Every run uses one torch thread (the machine has 2 shared cores). The student is seeded
with 1: ``tiny_teacher`` is a seed-0 ``test_resnet``, which a seed-0 student would equal.
"""

from __future__ import annotations

import json
import math
import os
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from logitcache.trainer.checkpoint import TrainingStopped
from logitcache.trainer.config import (
    DEFAULT_TEACHER_LR_FACTOR,
    ProKTConfig,
    TrainConfig,
)
from logitcache.trainer.losses import LossConfig, hard_label_loss, kd_loss
from logitcache.trainer.prokt import ProKTTeacher, prokt_teacher_loss
from logitcache.trainer.train import train
from main_entry import one_error_line, run_main
from safetensors.torch import load_file

from logitcache.build.teacher import Teacher

torch.set_num_threads(1)

NUM_CLASSES = 16


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def prokt_config(synth_data: str, tiny_teacher: str, out: Path, **kw) -> TrainConfig:
    """A small, quiet CPU ProKT run: one epoch of at most 2 batches of 16 views, online teacher."""
    settings = dict(data=synth_data, out=str(out), student="test_resnet", epochs=1, batch_size=16, limit_batches=2,
                    num_workers=0, tensorboard=False, progress=False, device="cpu", seed=1, online_teacher=True,
                    teacher="test_resnet", teacher_weights=tiny_teacher, prokt=ProKTConfig())
    settings.update(kw)
    return TrainConfig(**settings)


# --- the objective ------------------------------------------------------------------------

@pytest.mark.parametrize("hard_kind", ["ce", "bce"])
def test_teacher_loss_decomposes(hard_kind):
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(6, NUM_CLASSES, generator=g) * 3, torch.randn(6, NUM_CLASSES, generator=g) * 3
    target = torch.softmax(torch.randn(6, NUM_CLASSES, generator=g), -1)
    hard, constraint = hard_label_loss(t, target, kind=hard_kind), kd_loss(t, s, 2.0)
    for lam in (0.0, 0.4, 1.0):
        loss, terms = prokt_teacher_loss(t, s, target, lam, 2.0, hard_kind)
        assert torch.equal(terms["teacher_hard"], hard) and torch.equal(terms["teacher_constraint"], constraint)
        assert torch.allclose(loss, (1 - lam) * hard + lam * constraint, rtol=0, atol=1e-6)
    assert torch.equal(prokt_teacher_loss(t, s, target, 0.0, 2.0, hard_kind)[0], hard)  # lambda 0: labels only
    assert torch.equal(prokt_teacher_loss(t, s, target, 1.0, 2.0, hard_kind)[0], constraint)  # 1: student only
    # The constraint is KL(student || teacher) x T^2: zero when they agree, and it is not symmetric.
    assert prokt_teacher_loss(t, t.clone(), target, 1.0, 2.0, hard_kind)[0].abs().item() < 1e-6
    p_s, log_p_t = torch.softmax(s / 2, -1), torch.log_softmax(t / 2, -1)
    kl = (p_s * (torch.log_softmax(s / 2, -1) - log_p_t)).sum(-1).mean() * 4
    assert torch.allclose(constraint, kl, atol=1e-5)


def test_teacher_loss_sends_no_gradient_to_the_student():
    t = torch.randn(4, NUM_CLASSES, requires_grad=True)
    s = torch.randn(4, NUM_CLASSES, requires_grad=True)
    loss, _ = prokt_teacher_loss(t, s, torch.full((4, NUM_CLASSES), 1 / NUM_CLASSES), 0.4, 1.0)
    loss.backward()
    assert t.grad is not None and t.grad.abs().sum() > 0 and s.grad is None


def test_config_checks_lambda_and_teacher_lr():
    assert ProKTConfig().resolved_teacher_lr(2e-3) == pytest.approx(DEFAULT_TEACHER_LR_FACTOR * 2e-3)
    assert ProKTConfig(teacher_lr=1e-4).resolved_teacher_lr(2e-3) == 1e-4
    with pytest.raises(ValueError, match="prokt-lambda"):
        ProKTConfig(lam=1.5)
    with pytest.raises(ValueError, match="prokt-teacher-lr"):
        ProKTConfig(teacher_lr=0.0)


def test_teacher_steps_move_it_towards_the_student(tiny_teacher):
    """lambda = 1: the teacher's steps shrink its KL to the student's (fixed) output, and the
    frozen online teacher it was copied from stays as it was."""
    teacher = Teacher("test_resnet", weights=tiny_teacher, num_classes=NUM_CLASSES)
    run = TrainConfig(data="-", opt="sgd", lr=0.1, weight_decay=0.0, momentum=0.9, sched="constant", warmup_epochs=0,
                      loss=LossConfig(temperature=2.0))
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    prokt = ProKTTeacher(ProKTConfig(lam=1.0, teacher_lr=0.1), teacher, run, mean=mean, std=std, steps_per_epoch=1,
                         autocast=lambda: torch.autocast("cpu", enabled=False))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 32, 32, generator=g)
    student = torch.randn(8, NUM_CLASSES, generator=g) * 2
    target = torch.softmax(torch.randn(8, NUM_CLASSES, generator=g), -1)
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    start = kd_loss(prokt.targets(x), student, 2.0).item()
    for _ in range(15):
        terms = prokt.update(x, student, target)
        assert set(terms) == {"teacher_hard", "teacher_constraint"}
    end = kd_loss(prokt.targets(x), student, 2.0).item()
    assert end < 0.7 * start, (start, end)
    assert all(torch.equal(before[k], v) for k, v in teacher.model.state_dict().items())  # the copy trained
    assert prokt.model.training  # targets() leaves it in train mode


def test_step_distils_from_the_updated_teacher(tiny_teacher):
    """One ``train_step``: the teacher steps first (towards the labels and the student's
    logits of this step), then the student's kd term is computed against the *updated*
    teacher's eval-mode logits; the same sequence done by hand gives the same numbers."""
    import copy

    import timm
    from logitcache.trainer.step import StepSpec, StudentParts, train_step
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    from logitcache.views.augment import create_recipe

    recipe = create_recipe("demo32")
    cfg = TrainConfig(data="-", student="test_resnet", lr=1e-2, warmup_epochs=0, device="cpu",
                      loss=LossConfig(temperature=2.0), online_teacher=True, prokt=ProKTConfig(lam=0.4))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        student = timm.create_model("test_resnet", pretrained=False, num_classes=NUM_CLASSES)
    optimizer = create_optimizer_v2(student, opt="adamw", lr=cfg.lr)
    scheduler, _ = create_scheduler_v2(optimizer, sched="constant", num_epochs=1, updates_per_epoch=1)
    prokt = ProKTTeacher(cfg.prokt, Teacher("test_resnet", weights=tiny_teacher, num_classes=NUM_CLASSES), cfg,
                         mean=recipe.mean, std=recipe.std, steps_per_epoch=1,
                         autocast=lambda: torch.autocast("cpu", enabled=False))
    prokt.optimizer.param_groups[0]["lr"] = 1e-2  # a step that shows
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, NUM_CLASSES, (8,), generator=g)
    batch = {"images": torch.randn(8, 3, 32, 32, generator=g), "label": label, "partner_label": label,
             "lam": torch.ones(8)}
    target = torch.nn.functional.one_hot(label, NUM_CLASSES).float()

    by_hand, student_copy = copy.deepcopy(prokt), copy.deepcopy(student).train()
    stale = prokt.targets(batch["images"])  # the teacher before its step
    logits = student_copy(batch["images"]).float()
    hand_terms = by_hand.update(batch["images"], logits.detach(), target)
    expected_kd = kd_loss(logits, by_hand.targets(batch["images"]), 2.0)

    spec = StepSpec(cfg, torch.device("cpu"), NUM_CLASSES, recipe, steps_per_epoch=1, world_size=1,
                    meta_batches=None)
    parts = StudentParts(student, student, optimizer, scheduler, None, None, None, prokt)
    result = train_step(spec, parts, batch, epoch=0, batch_index=0, step=0, global_views=8)
    assert torch.allclose(result.terms["kd"], expected_kd, rtol=1e-5, atol=0)
    assert not torch.allclose(kd_loss(logits, stale, 2.0), expected_kd, rtol=1e-3, atol=0)
    for k in ("teacher_hard", "teacher_constraint"):
        assert torch.allclose(result.terms[k], hand_terms[k], rtol=1e-5, atol=0)
    assert result.terms["teacher_constraint"] > 0
    for (k, a), b in zip(prokt.model.state_dict().items(), by_hand.model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-7), k


# --- whole runs ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, synth_data, tiny_teacher) -> Path:
    """``logitcache train --kd prokt`` through the command line: 1 epoch of 3 batches of 16."""
    from logitcache.cli.main import app
    from typer.testing import CliRunner

    out = tmp_path_factory.mktemp("prokt_cli")
    args = ["train", "--data", synth_data, "--out", str(out), "--student", "test_resnet", "--kd", "prokt",
            "--teacher", "test_resnet", "--teacher-weights", tiny_teacher, "--prokt-lambda", "0.5",
            "--prokt-teacher-lr", "1e-3", "--lr", "4e-3", "--epochs", "1", "--batch-size", "16",
            "--limit-batches", "3", "--seed", "1", "--workers", "0", "--no-tensorboard", "--no-progress",
            "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return out


def test_cli_run_logs_the_teachers_terms_every_step(cli_run):
    summary = json.loads((cli_run / "summary.json").read_text())
    assert summary["kd"] == "prokt" and summary["online_teacher"] and summary["cache"] is None
    assert summary["config"]["prokt"] == {"lam": 0.5, "teacher_lr": 1e-3}
    assert summary["config"]["loss"]["kind"] == "kd"
    steps = read_rows(cli_run / "steps.jsonl")
    assert len(steps) == 3
    for r in steps:
        assert all(math.isfinite(r[k]) for k in ("loss", "hard", "kd", "teacher_hard", "teacher_constraint")), r
        assert r["teacher_hard"] > 0 and r["teacher_constraint"] > 0 and r["kd"] > 0
        # The teacher's schedule is the student's, scaled by teacher_lr / lr.
        assert r["teacher_lr"] == pytest.approx(r["lr"] * 1e-3 / 4e-3, rel=1e-9)
    (epoch,) = read_rows(cli_run / "metrics.jsonl")
    for k in ("teacher_hard", "teacher_constraint"):
        assert epoch[k] == pytest.approx(sum(r[k] for r in steps) / 3)
    assert epoch["teacher_lr"] == pytest.approx(epoch["lr"] / 4)


def test_run_moves_the_teachers_weights_and_writes_them(cli_run, tiny_teacher):
    start = load_file(tiny_teacher)
    final = load_file(str(cli_run / "prokt_teacher.safetensors"))
    ckpt = load_file(str(cli_run / "checkpoint" / "prokt_teacher.safetensors"))
    assert final.keys() == start.keys() == ckpt.keys()
    assert all(torch.equal(final[k], ckpt[k]) for k in final)
    moved = [k for k in start if start[k].is_floating_point() and not torch.equal(start[k], final[k])]
    params = [k for k in start if k.endswith(".weight")]
    assert set(params) <= set(moved), f"unmoved: {sorted(set(params) - set(moved))[:5]}"
    # The written teacher is a teacher again (--teacher-weights), its input spec kept.
    again = Teacher("test_resnet", weights=str(cli_run / "prokt_teacher.safetensors"), num_classes=NUM_CLASSES)
    assert again.io == Teacher("test_resnet", weights=tiny_teacher, num_classes=NUM_CLASSES).io


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path, synth_data):
    """torchrun, 2 ranks (gloo): the DDP-wrapped teacher and student log the 1-process run's
    losses. Teacher and student are test_vit (no BatchNorm, whose per-rank statistics differ)."""
    import socket
    import subprocess
    import sys

    import timm
    from logitcache.trainer.checkpoint import save_student

    from logitcache.views.augment import create_recipe

    weights = tmp_path / "vit_teacher.safetensors"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        save_student(timm.create_model("test_vit", pretrained=False, num_classes=NUM_CLASSES), weights, "test_vit",
                     NUM_CLASSES, create_recipe("demo32"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = ["train", "--data", synth_data, "--student", "test_vit", "--epochs", "1", "--batch-size", "16",
            "--limit-batches", "3", "--workers", "0", "--deterministic", "--no-tensorboard", "--no-progress",
            "--device", "cpu", "--kd", "prokt", "--teacher", "test_vit", "--teacher-weights", str(weights),
            "--prokt-teacher-lr", "1e-3", "--seed", "1"]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for name, launcher in (("ddp", ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                                    "127.0.0.1", "--master-port", str(port)]), ("one", [])):
        proc = subprocess.run([sys.executable, *launcher, "-m", "logitcache.cli.main", *args, "--out",
                               str(tmp_path / name)], capture_output=True, text=True, timeout=300, env=env, cwd=root)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    ddp, one = read_rows(tmp_path / "ddp" / "steps.jsonl"), read_rows(tmp_path / "one" / "steps.jsonl")
    assert [r["step"] for r in ddp] == [r["step"] for r in one] == [1, 2, 3]
    keys = ("loss", "hard", "kd", "teacher_hard", "teacher_constraint")
    worst = max(abs(d[k] - o[k]) / abs(o[k]) for d, o in zip(ddp, one) for k in keys)
    assert worst <= 1e-5, (worst, ddp, one)


class _Killed(Exception):
    pass


@pytest.mark.parametrize("stop", ["epoch_checkpoint", "sigterm_mid_epoch"])
def test_stopped_and_resumed_equals_uninterrupted(tmp_path, synth_data, tiny_teacher, stop):
    """2 epochs straight vs. stopped and resumed: the same student, teacher and logged terms,
    bit for bit. ``epoch_checkpoint``: killed in the 2nd epoch, resumed from the 1st epoch's
    checkpoint; ``sigterm_mid_epoch``: SIGTERM during step 2 of the 1st epoch."""
    cfg = prokt_config(synth_data, tiny_teacher, tmp_path / "ref", epochs=2, batch_size=8, limit_batches=3,
                       deterministic=True, lr=3e-3, prokt=ProKTConfig(lam=0.4, teacher_lr=1e-3))
    train(cfg)

    def stop_run(info):
        if stop == "epoch_checkpoint" and info["step"] == 4:  # after the epoch-0 checkpoint
            raise _Killed()
        if stop == "sigterm_mid_epoch" and info["step"] == 1:  # the loop stops after the next step
            os.kill(os.getpid(), signal.SIGTERM)

    stopped = replace(cfg, out=str(tmp_path / "run"))
    with pytest.raises(_Killed if stop == "epoch_checkpoint" else TrainingStopped):
        train(stopped, on_step=stop_run)
    state = torch.load(tmp_path / "run" / "checkpoint" / "state.pt", weights_only=True)
    assert (state["epoch"], state["batch"]) == ((1, 0) if stop == "epoch_checkpoint" else (0, 2))
    assert set(state["prokt"]) == {"optimizer", "scheduler"}
    train(replace(stopped, resume=True))
    for name in ("model.safetensors", "prokt_teacher.safetensors"):
        ref, run = load_file(str(tmp_path / "ref" / name)), load_file(str(tmp_path / "run" / name))
        assert ref.keys() == run.keys()
        different = [k for k in ref if not torch.equal(ref[k], run[k])]
        assert not different, f"{name}: {len(different)} tensors differ, e.g. {different[:3]}"
    keys = ("step", "loss", "kd", "teacher_hard", "teacher_constraint", "lr", "teacher_lr")
    ref_steps, run_steps = read_rows(tmp_path / "ref" / "steps.jsonl"), read_rows(tmp_path / "run" / "steps.jsonl")
    assert [[r[k] for k in keys] for r in run_steps] == [[r[k] for k in keys] for r in ref_steps]
    assert len(run_steps) == 6


def test_resume_of_a_run_without_prokt_is_a_clear_error(tmp_path, synth_data, tiny_teacher):
    from logitcache.errors import LogitcacheError

    cfg = prokt_config(synth_data, tiny_teacher, tmp_path, limit_batches=1, prokt=None)
    train(cfg)
    with pytest.raises(LogitcacheError, match="no ProKT teacher"):
        train(replace(cfg, prokt=ProKTConfig(), epochs=2, resume=True))


# --- refusals -----------------------------------------------------------------------------

REFUSALS = {  # id -> (extra args, a word the one line must hold)
    "with a cache": (["--kd", "prokt", "--cache", "{tmp}/some.zarr"], "--cache"),
    "with dkd": (["--kd", "dkd", "--prokt-lambda", "0.5"], "dkd"),
    "with mkd": (["--kd", "prokt", "--mkd-meta-every", "2"], "MKD"),
    "without the online teacher": (["--kd", "prokt", "--no-online-teacher"], "online teacher"),
    "lambda above 1": (["--kd", "prokt", "--prokt-lambda", "1.5"], "prokt-lambda"),
    "no teacher name": (["--kd", "prokt", "--student", "test_resnet", "--epochs", "1", "--batch-size", "16",
                         "--workers", "0", "--device", "cpu", "--no-progress", "--no-tensorboard"], "--teacher"),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_refusals_are_one_line(name, tmp_path, synth_data, capsys):
    extra, word = REFUSALS[name]
    args = ["train", "--data", synth_data, "--out", str(tmp_path / "out"), *(a.format(tmp=tmp_path) for a in extra)]
    line = one_error_line(*run_main(args, capsys))
    assert word in line, line
    if name == "with a cache":
        assert "without --cache" in line and "frozen teacher" in line
    assert not (tmp_path / "out" / "steps.jsonl").exists()
