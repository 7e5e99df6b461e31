"""Random damage, one fault per example, to a small cache (a mixing recipe's, and a PCA
feature cache): flipped, truncated, deleted or replaced bytes of any file; JSON-aware
mutations of any metadata document (values of other types, out-of-range numbers, missing
and extra keys); swapped, copied and deleted unit, commit, epoch and seal folders. What
``train`` is served from the damaged copy (reader, epoch states, every complete epoch's
rows and features, the plan check, the canary check, the basis) is either a
:class:`LogitcacheError` with a one-line message or exactly the undamaged cache's content.

``make test`` runs a bounded, derandomized number of examples; ``make test-damage`` the long
run (``LOGITCACHE_DAMAGE_EXAMPLES`` examples, random seeds)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from logitcache.errors import LogitcacheError

EXAMPLES = int(os.environ.get("LOGITCACHE_DAMAGE_EXAMPLES", "40"))
RANDOM = os.environ.get("LOGITCACHE_DAMAGE_RANDOM") == "1"
ODD_VALUES = [None, True, False, 0, -1, 1, 2 ** 62, -(2 ** 62), 1.5, float("nan"), "", "x", "0" * 64, [], [1], {},
              {"x": 1}]


def served(url: str, source) -> dict:
    """Everything a training run reads from the cache at ``url``, checked as train checks it."""
    from logitcache.replay.rows import check_plans
    from logitcache.storage.canary import check_views_of
    from logitcache.storage.manifest import check_serves
    from logitcache.storage.reader import CacheReader
    from logitcache.storage.views_compat import common_epochs

    reader = CacheReader(url)
    check_serves(reader.manifest, fingerprint=source.fingerprint(), num_classes=source.num_classes, where=url)
    epochs, _ = common_epochs([reader])
    check_views_of(reader, source, epochs[:1])
    manifest = reader.manifest.to_dict()
    manifest.pop("created")  # informative, and outside the manifest digest
    out: dict = {"manifest": manifest, "epochs": epochs}
    for e in epochs:
        a = reader.load_epoch(e, features=reader.has_features)
        check_plans(a, source, reader.manifest.recipe)
        out[e] = {k: getattr(a, k) for k in ("ids", "values", "tail", "feat", "feat_scale", "plans", "held")}
    basis = reader.feature_basis()
    if basis is not None:
        out["basis"] = {"mean": basis.mean, "components": basis.components}
    return out


def assert_same(got, want, where: str = "") -> None:
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), (where, set(got) ^ set(want))
        for k in want:
            assert_same(got[k], want[k], f"{where}/{k}")
    elif isinstance(want, np.ndarray):
        assert isinstance(got, np.ndarray) and got.dtype == want.dtype and np.array_equal(got, want), where
    else:
        assert got == want, (where, got, want)


@pytest.fixture(scope="module")
def damage_targets(built_cache_mix, small_feature_cache, synth_data) -> dict:
    """name -> (cache folder, its files, its folders, the content it serves undamaged)."""
    from logitcache.data.source import open_source

    source = open_source(synth_data, "train")
    out = {}
    for name, url in (("mix", built_cache_mix), ("features", small_feature_cache)):
        root = Path(url)
        files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        folders = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_dir()
                         and (p.parent.name in ("units", "commits", "seals", "epochs")))
        out[name] = {"url": url, "files": files, "folders": folders, "content": served(url, source)}
    return {"targets": out, "source": source}


# -- the faults ---------------------------------------------------------------------------------


def _json_paths(doc, prefix=()) -> list[tuple]:
    """Every path (keys and list positions) into a JSON document, containers included."""
    paths = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            paths += _json_paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:8]):
            paths += _json_paths(v, prefix + (i,))
    return paths


def _json_fault(data, doc):
    """``doc`` with one JSON-aware mutation (drawn from ``data``), and its description."""
    path = data.draw(st.sampled_from(_json_paths(doc)), label="path")
    kind = data.draw(st.sampled_from(["replace", "delete", "add", "nudge"]), label="kind")
    if not path:
        return (data.draw(st.sampled_from(ODD_VALUES)) if kind == "replace" else {**doc, "surplus": 1}), "root"
    *parents, last = path
    parent = doc
    for p in parents:
        parent = parent[p]
    value = parent[last]
    if kind == "delete":
        del parent[last]
    elif kind == "add" and isinstance(value, dict):
        value["surplus"] = data.draw(st.sampled_from(ODD_VALUES))
    elif kind == "nudge" and isinstance(value, (int, float)) and not isinstance(value, bool):
        parent[last] = value + data.draw(st.sampled_from([1, -1, value, 0.5]))
    elif kind == "nudge" and isinstance(value, str) and value:
        i = data.draw(st.integers(0, len(value) - 1))
        parent[last] = value[:i] + ("0" if value[i] != "0" else "1") + value[i + 1:]
    else:
        parent[last] = data.draw(st.sampled_from(ODD_VALUES))
    return doc, f"{kind} {'.'.join(map(str, path))}"


def _apply_fault(data, root: Path, files: list[str], folders: list[str]) -> str:
    """Damage the copy at ``root`` once; returns what was done."""
    kind = data.draw(st.sampled_from(["flip", "truncate", "delete", "replace", "json", "json", "folder"]),
                     label="fault")
    if kind == "folder":
        src = data.draw(st.sampled_from(folders), label="folder")
        op = data.draw(st.sampled_from(["delete", "copy", "swap", "copy-new"]), label="op")
        siblings = [f for f in folders if f.rsplit("/", 1)[0] == src.rsplit("/", 1)[0] and f != src]
        if op == "delete" or not siblings and op != "copy-new":
            shutil.rmtree(root / src)
            return f"delete {src}"
        if op == "copy-new":
            head, name = src.rsplit("/", 1)
            dst = f"{head}/{int(name) + 5:0{len(name)}d}"
            shutil.copytree(root / src, root / dst, dirs_exist_ok=True)
            return f"copy {src} -> {dst}"
        dst = data.draw(st.sampled_from(siblings), label="dst")
        if op == "swap":
            (root / src).rename(root / "swap.tmp")
            (root / dst).rename(root / src)
            (root / "swap.tmp").rename(root / dst)
            return f"swap {src} {dst}"
        shutil.rmtree(root / dst)
        shutil.copytree(root / src, root / dst)
        return f"copy {src} over {dst}"
    name = data.draw(st.sampled_from([f for f in files if f.endswith("zarr.json")] if kind == "json" else files),
                     label="file")
    path = root / name
    raw = path.read_bytes()
    if kind == "flip":
        i = data.draw(st.integers(0, max(0, len(raw) - 1)), label="byte")
        bit = data.draw(st.integers(0, 7), label="bit")
        path.write_bytes(raw[:i] + bytes([raw[i] ^ (1 << bit)]) + raw[i + 1:] if raw else b"\x01")
    elif kind == "truncate":
        path.write_bytes(raw[:data.draw(st.integers(0, max(0, len(raw) - 1)), label="length")])
    elif kind == "delete":
        path.unlink()
    elif kind == "replace":
        path.write_bytes(data.draw(st.binary(max_size=64), label="bytes"))
    else:
        doc, what = _json_fault(data, json.loads(raw))
        path.write_text(json.dumps(doc))
        return f"json {name}: {what}"
    return f"{kind} {name}"


@settings(max_examples=EXAMPLES, deadline=None, derandomize=not RANDOM, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_random_damage_is_one_line_or_the_undamaged_content(damage_targets, data):
    name = data.draw(st.sampled_from(sorted(damage_targets["targets"])), label="cache")
    target = damage_targets["targets"][name]
    work = Path(tempfile.mkdtemp(prefix="damage-"))
    try:
        url = work / "cache.zarr"
        shutil.copytree(target["url"], url)
        fault = _apply_fault(data, url, target["files"], target["folders"])
        data.draw(st.just(fault), label="applied")
        try:
            got = served(str(url), damage_targets["source"])
        except LogitcacheError as e:
            event(f"refused: {type(e).__name__}")
            message = str(e)
            assert message.strip() and "\n" not in message, (fault, message)
            assert str(url) in message or "views rendered here" in message, (fault, message)
            return
        event("served the undamaged content")
        assert_same(got, target["content"], fault)
    finally:
        shutil.rmtree(work, ignore_errors=True)
