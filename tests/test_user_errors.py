"""Every user mistake is one line on stderr (``error: ...``), exit 2, no traceback; and
every command's ``--help`` reads as typer users expect."""

from __future__ import annotations

import subprocess
import sys

import pytest

from main_entry import one_error_line, run_main

COMMANDS = [["build"], ["train"], ["demo"], ["inspect"], ["verify"], ["ls"], ["data", "synth"], ["data", "digits"],
            ["data", "index"]]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("mistakes")
    (d / "a_file").write_text("x")
    (d / "empty").mkdir()
    (d / "unknown.yaml").write_text("foo: 1\n")
    (d / "bad.yaml").write_text("a: [\n")
    (d / "bad.toml").write_text("a = \n")
    (d / "badloss.yaml").write_text("loss:\n  kind: kd\n  nope: 1\n")
    return d


MISTAKES = {  # id -> (args with {data}, {dir}), a word the message must hold
    "unknown student": (["train", "--data", "{data}", "--student", "resnet5000"], "resnet5000"),
    "unknown recipe (build)": (["build", "--data", "{data}", "--teacher", "test_resnet", "--recipe", "foo"], "foo"),
    "unknown recipe (train)": (["train", "--data", "{data}", "--kd", "none", "--recipe", "foo"], "foo"),
    "unknown optimiser": (["train", "--data", "{data}", "--opt", "foo"], "optimiser"),
    "unknown scheduler": (["train", "--data", "{data}", "--sched", "foo"], "scheduler"),
    "unknown loss kind": (["train", "--data", "{data}", "--kd", "foo"], "foo"),
    "unknown hard loss": (["train", "--data", "{data}", "--hard-loss", "foo"], "foo"),
    "zero temperature": (["train", "--data", "{data}", "--temperature", "0"], "temperature"),
    "config unknown key": (["train", "--data", "{data}", "--config", "{dir}/unknown.yaml"], "foo"),
    "config unknown loss key": (["train", "--data", "{data}", "--config", "{dir}/badloss.yaml"], "nope"),
    "config bad yaml": (["train", "--data", "{data}", "--config", "{dir}/bad.yaml"], "YAML"),
    "config bad toml": (["train", "--data", "{data}", "--config", "{dir}/bad.toml"], "TOML"),
    "config missing": (["train", "--data", "{data}", "--config", "{dir}/none.yaml"], "none.yaml"),
    "data is a file": (["train", "--data", "{dir}/a_file", "--kd", "none"], "a_file"),
    "data is an empty folder": (["build", "--data", "{dir}/empty", "--teacher", "test_resnet"], "empty"),
    "no data": (["train", "--kd", "none"], "--data"),
    "synth image size 4": (["data", "synth", "--out", "{dir}/s", "--image-size", "4"], "image-size"),
    "synth zero classes": (["data", "synth", "--out", "{dir}/s", "--num-classes", "0"], "num-classes"),
    "epochs 3:1": (["build", "--data", "{data}", "--teacher", "test_resnet", "--epochs", "3:1"], "3:1"),
    "epochs not a number": (["build", "--data", "{data}", "--teacher", "test_resnet", "--epochs", "x"], "epochs"),
    "missing cache (train)": (["train", "--data", "{data}", "--cache", "{dir}/nocache"], "nocache"),
    "missing cache (inspect)": (["inspect", "{dir}/nocache"], "nocache"),
    "unknown teacher": (["build", "--data", "{data}", "--teacher", "resnet5000"], "resnet5000"),
    "unknown split": (["build", "--data", "{data}", "--teacher", "test_resnet", "--split", "foo"], "foo"),
    "zero train epochs": (["train", "--data", "{data}", "--kd", "none", "--epochs", "0"], "epochs"),
    "zero batch size": (["train", "--data", "{data}", "--kd", "none", "--batch-size", "0"], "batch-size"),
    "negative lr": (["train", "--data", "{data}", "--kd", "none", "--lr", "-1"], "lr"),
    "unknown device": (["train", "--data", "{data}", "--kd", "none", "--device", "foo"], "foo"),
    "zero topk": (["build", "--data", "{data}", "--teacher", "test_resnet", "--topk", "0"], "topk"),
    "unknown flag": (["train", "--no-such-flag"], "no-such-flag"),
    "not an integer": (["train", "--epochs", "many"], "--epochs"),
    "missing required option": (["build", "--teacher", "test_resnet"], "--data"),
}


@pytest.mark.parametrize("name", list(MISTAKES))
def test_user_mistake_is_one_line(name, files, synth_data, capsys):
    args, word = MISTAKES[name]
    args = [a.format(data=synth_data, dir=files) for a in args]
    line = one_error_line(*run_main(args, capsys))
    assert word in line, line


def test_console_script_path_prints_one_line(files):
    proc = subprocess.run([sys.executable, "-m", "logitcache.cli.main", "train", "--data", str(files / "a_file"),
                           "--student", "resnet5000"], capture_output=True, text=True, timeout=120)
    one_error_line(proc.returncode, proc.stderr)


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_uses_the_usual_metavars(command, capsys):
    from typer.testing import CliRunner

    from logitcache.cli.main import app

    assert run_main([*command, "--help"], capsys)[0] == 0
    out = CliRunner().invoke(app, [*command, "--help"], terminal_width=100).output
    for typed in ("<str>", "<int>", "<float>", "<path>"):  # options and positional arguments alike
        assert typed not in out, f"{' '.join(command)} --help shows {typed}"
