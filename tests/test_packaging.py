"""The installed distribution: one top-level import name (``logitcache``), the trainer and the
CLI under it, and the console script pointing there. Built and installed for real (a wheel
from this checkout, installed with pip into a fresh target folder)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("pkg")
    wheels, site, src = tmp / "wheels", tmp / "site", tmp / "src"
    # Build from a copy: setuptools writes build/ and *.egg-info beside the sources.
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("logitcache", "trainer", "cli"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)],
                   check=True, cwd=tmp, capture_output=True)
    (wheel,) = wheels.glob("logitcache-*.whl")
    subprocess.run(pip + ["install", "--no-deps", "--target", str(site), str(wheel)], check=True, cwd=tmp,
                   capture_output=True)
    return wheel, site


def test_only_logitcache_is_a_top_level_name(installed):
    wheel, site = installed
    with zipfile.ZipFile(wheel) as z:
        tops = {n.split("/", 1)[0] for n in z.namelist() if not n.split("/", 1)[0].endswith(".dist-info")}
        top_level = next(n for n in z.namelist() if n.endswith(".dist-info/top_level.txt"))
        declared = set(z.read(top_level).decode().split())
        entry_points = z.read(top_level.replace("top_level.txt", "entry_points.txt")).decode()
    assert tops == {"logitcache"}
    assert declared == {"logitcache"}
    installed_tops = {p.name for p in site.iterdir() if not p.name.endswith(".dist-info") and p.name != "bin"}
    assert installed_tops == {"logitcache"}, installed_tops
    assert "logitcache = logitcache.cli.main:main" in entry_points
    for sub in ("trainer/train.py", "trainer/losses.py", "cli/main.py", "data/__init__.py",
                "cli/assets/demo_teacher.safetensors", "cli/assets/demo_teacher.json"):  # the demo's teacher
        assert (site / "logitcache" / sub).is_file(), sub


def test_installed_copy_imports_from_another_folder(installed, tmp_path):
    """From a folder with no checkout on the path, the installed copy serves every subpackage."""
    _, site = installed
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import logitcache.trainer.train as t, "
            "logitcache.cli.main as m; print(t.__file__); print(m.__file__)\n"
            "try:\n import trainer\nexcept ModuleNotFoundError:\n print('no-trainer')\n"
            "try:\n import cli\nexcept ModuleNotFoundError:\n print('no-cli')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code, str(site)], cwd=tmp_path, env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    assert out[0].startswith(str(site)) and out[1].startswith(str(site))
    assert out[2:] == ["no-trainer", "no-cli"]
