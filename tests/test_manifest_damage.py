"""A damaged or hand-edited manifest (and root zarr.json) is one line naming the cache and the
field, through the reader, ``train`` and ``inspect``: never a traceback, never other views
served silently (the first part of issue 22: the manifest's schema, logitcache/storage/manifest_schema.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from main_entry import one_error_line, run_main

from logitcache.errors import LogitcacheError
from logitcache.storage.reader import CacheReader


def _edit(doc: dict, path: str, value) -> None:
    """Set (or with value ``...`` delete) the manifest field at dotted ``path``."""
    *parents, last = path.split(".")
    d = doc
    for p in parents:
        d = d[p]
    if value is ...:
        del d[last]
    else:
        d[last] = value


#: (manifest field, new value or ... to delete it, what the message names)
EDITS = [
    ("num_classes", "16", "num_classes"),
    ("num_classes", ..., "num_classes: missing"),
    ("num_classes", 2 ** 62, "num_classes"),
    ("dataset.split", True, "dataset.split"),
    ("dataset.num_samples", 2 ** 62, "dataset.num_samples"),
    ("dataset.shard_sizes", [1, 2], "dataset.shard_sizes"),
    ("dataset.extra", 1, "dataset.extra: not a field"),
    ("codec.k", "5", "codec.k"),
    ("codec.values", "gap99", "codec"),
    ("codec.values", False, "codec.values"),
    ("codec.id_bits", 3, "codec.id_bits"),
    ("recipe.re_prob", 0.25, "field recipe: it does not match recipe_sha256"),
    ("recipe.no_such_field", 1, "field recipe: it does not match recipe_sha256"),
    ("recipe_sha256", ..., "recipe_sha256: missing"),
    ("teacher", None, "teacher"),
    ("surplus", {}, "surplus: not a field"),
]


def _damaged_copy(built_cache: str, tmp_path: Path, change) -> str:
    url = tmp_path / "cache.zarr"
    shutil.copytree(built_cache, url)
    root = url / "zarr.json"
    doc = json.loads(root.read_text())
    out = change(doc, root)
    if out is None:
        root.write_text(json.dumps(doc))
    return str(url)


def _assert_refused_everywhere(url: str, synth_data: str, tmp_path: Path, capsys, names: str) -> None:
    with pytest.raises(LogitcacheError) as info:
        CacheReader(url)
    message = str(info.value)
    assert "\n" not in message and url in message and names in message, message
    for args in (["inspect", url], ["train", "--data", synth_data, "--cache", url, "--student", "test_resnet",
                                    "--epochs", "1", "--limit-batches", "1", "--workers", "0", "--no-progress",
                                    "--no-tensorboard", "--device", "cpu", "--out", str(tmp_path / "run")],
                 ["verify", url, "--data", synth_data, "--sample", "4", "--device", "cpu"]):
        line = one_error_line(*run_main(args, capsys))
        assert url in line and names in line, line


@pytest.mark.parametrize("field, value, names", EDITS, ids=[f"{f}={v!r:.20}" for f, v, _ in EDITS])
def test_an_edited_manifest_field_is_one_line_naming_it(field, value, names, built_cache, synth_data, tmp_path,
                                                        capsys):
    url = _damaged_copy(built_cache, tmp_path, lambda doc, _: _edit(doc["attributes"]["logitcache"], field, value))
    _assert_refused_everywhere(url, synth_data, tmp_path, capsys, names)


ROOT_DAMAGE = {
    "manifest a string": (lambda doc, _: doc["attributes"].__setitem__("logitcache", "oops"), "is a str"),
    "flipped byte": (lambda doc, root: root.write_bytes(root.read_bytes().replace(b"{", b"\xfb", 1)) or True,
                     "root zarr.json"),
    "truncated": (lambda doc, root: root.write_bytes(root.read_bytes()[:40]) or True, "root zarr.json"),
    "a JSON list": (lambda doc, root: root.write_text("[1, 2]") or True, "root zarr.json"),
    "an array's node type": (lambda doc, _: doc.__setitem__("node_type", "array"), "root zarr.json"),
}


@pytest.mark.parametrize("damage", sorted(ROOT_DAMAGE))
def test_a_damaged_root_document_is_one_line(damage, built_cache, synth_data, tmp_path, capsys):
    change, names = ROOT_DAMAGE[damage]
    url = _damaged_copy(built_cache, tmp_path, change)
    _assert_refused_everywhere(url, synth_data, tmp_path, capsys, names)


def test_the_committed_old_formats_still_pass_the_schema():
    data = Path(__file__).resolve().parent / "data"
    for url in (data / "v1" / "cache_v1.zarr", data / "v2" / "cache_v2.zarr"):
        assert CacheReader(str(url)).manifest.num_classes == 8


#: (commit record field of epoch 0, unit 1, new value or ... to delete it, what the message names)
RECORD_EDITS = [
    ("n", True, "field n"),
    ("n", ..., "field n"),
    ("crc32", [1, 2], "field crc32"),
    ("plan", 7, "field plan"),
    ("canary", "x", "field canary"),
    ("canary.index", True, "field canary"),
    ("canary.index", [], "field canary"),
    ("canary.sha256", [], "field canary"),
    ("canary.extra", 1, "field canary"),
    ("canary.index", [2 ** 62], "field canary"),
]


@pytest.mark.parametrize("field, value, names", RECORD_EDITS, ids=[f"{f}={v!r:.20}" for f, v, _ in RECORD_EDITS])
def test_an_edited_commit_record_is_one_line_naming_it(field, value, names, built_cache, synth_data, tiny_teacher,
                                                       tmp_path, capsys):
    from logitcache.storage.layout import commit_path

    url = tmp_path / "cache.zarr"
    shutil.copytree(built_cache, url)
    meta = url / commit_path(0, 1) / "zarr.json"
    doc = json.loads(meta.read_text())
    _edit(doc["attributes"]["commit"], field, value)
    meta.write_text(json.dumps(doc))
    with pytest.raises(LogitcacheError) as info:
        CacheReader(str(url)).read_unit(0, 1)
    message = str(info.value)
    assert "\n" not in message and str(url) in message and "epoch 0, unit 1" in message and names in message, message
    for args in (["train", "--data", synth_data, "--cache", str(url), "--student", "test_resnet", "--epochs", "1",
                  "--batch-size", "16", "--limit-batches", "1", "--workers", "0", "--no-progress", "--no-tensorboard",
                  "--device", "cpu", "--out", str(tmp_path / "run")], ["inspect", str(url)],
                 ["verify", str(url), "--data", synth_data, "--teacher-weights", tiny_teacher, "--sample", "4",
                  "--device", "cpu"]):
        line = one_error_line(*run_main(args, capsys))
        assert str(url) in line and "epoch 0, unit 1" in line and names in line, (args[0], line)
