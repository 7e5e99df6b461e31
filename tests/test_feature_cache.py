"""Feature caches (`build --features`): what is stored matches the teacher's features within
the codec's bound; every feature byte read is checked; a killed or extended build ends
identical to one straight build; caches of another feature spec, or without features, are
refused with one line that says what to do."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from cache_edit import reseal
from main_entry import one_error_line, run_main

from logitcache.codecs.features import decode_features, project, quantisation_bound
from logitcache.errors import CorruptCacheError
from logitcache.storage.layout import unit_path
from logitcache.storage.reader import CacheReader

RANK = 24  # PCA components of the test caches (test_resnet's features are 96 wide)


def _build(url: str, synth_data: str, tiny_teacher: str, *extra: str, epochs: str = "2") -> list[str]:
    return ["build", "--data", synth_data, "--teacher", "test_resnet", "--teacher-weights", tiny_teacher,
            "--recipe", "demo32_mix", "--epochs", epochs, "--topk", "5", "--out", url, "--batch-size", "16",
            "--workers", "0", "--no-progress", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def feature_caches(tmp_path_factory, synth_data, tiny_teacher) -> dict[str, str]:
    """A PCA (int8) feature cache and a full float32 one of the same views and teacher."""
    from logitcache.cli.main import app
    from typer.testing import CliRunner

    root = tmp_path_factory.mktemp("feature_caches")
    urls = {"pca": str(root / "pca.zarr"), "full32": str(root / "full32.zarr")}
    flags = {"pca": ["--features", "--feature-dims", str(RANK), "--feature-fit-views", "64"],
             "full32": ["--features", "--feature-dims", "full", "--feature-dtype", "float32"]}
    for name, url in urls.items():
        result = CliRunner().invoke(app, _build(url, synth_data, tiny_teacher, *flags[name]))
        assert result.exit_code == 0, result.output
    return urls


def _unit_arrays(url: str) -> dict[str, np.ndarray]:
    import zarr

    root = zarr.open_group(url, mode="r")
    out = {}
    for epoch in (0, 1):
        for shard in range(3):
            group = root[unit_path(epoch, shard)]
            out.update({f"{epoch}/{shard}/{k}": group[k][...] for k in group.array_keys()})
    if "features" in root:
        out.update({f"basis/{k}": root["features"][k][...] for k in ("mean", "components")})
    return out


def test_cached_features_are_the_teachers_within_the_codec_bound(feature_caches):
    full, pca = CacheReader(feature_caches["full32"]), CacheReader(feature_caches["pca"])
    assert full.manifest.features["label"] == "full/float32" and full.feature_basis() is None
    assert pca.manifest.features["label"] == f"pca{RANK}/int8" and pca.manifest.features["fit_views"] == 64
    basis = pca.feature_basis()
    assert basis.components.shape == (RANK, 96)
    for epoch in (0, 1):
        true = torch.from_numpy(full.load_epoch(epoch, features=True).feat)  # float32: the teacher's own
        a = pca.load_epoch(epoch, features=True)
        assert a.feat.dtype == np.int8 and a.feat.shape == (96, RANK) and a.feat_scale.shape == (96,)
        spec, scale = pca.manifest.feature_spec, torch.from_numpy(a.feat_scale)
        decoded = decode_features(spec, basis.to_torch("cpu"), torch.from_numpy(a.feat), scale)
        err = (decoded - project(basis, true)).norm(dim=1)
        assert (err <= quantisation_bound(spec, scale) + 1e-4 * true.norm(dim=1)).all()
        cos = torch.nn.functional.cosine_similarity(decoded, true, dim=1)
        assert cos.min() > 0.95, cos.min()
    # A logits-only read leaves the feature arrays alone and gives the same logit rows.
    plain, with_feats = pca.load_epoch(1), pca.load_epoch(1, features=True)
    assert plain.feat is None and np.array_equal(plain.values, with_feats.values)


def test_damaged_feature_bytes_stop_the_read_naming_the_array(feature_caches, tmp_path):
    url = str(tmp_path / "damaged.zarr")
    shutil.copytree(feature_caches["pca"], url)
    (chunk,) = [p for p in (Path(url) / unit_path(1, 2) / "feat" / "c").rglob("*") if p.is_file()]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x40
    chunk.write_bytes(bytes(data))
    with pytest.raises(CorruptCacheError, match=r"epoch 1, unit 2 .*array feat\b.*--recheck"):
        CacheReader(url).load_epoch(1, features=True)
    CacheReader(url).load_epoch(1)  # logit KD does not read the features
    (chunk,) = [p for p in (Path(url) / "features" / "components" / "c").rglob("*") if p.is_file()]
    chunk.write_bytes(chunk.read_bytes()[:20])  # truncated basis chunk
    with pytest.raises(CorruptCacheError, match=r"feature basis, array features/components"):
        CacheReader(url).feature_basis()


def test_resumed_and_extended_feature_builds_end_identical(feature_caches, synth_data, tiny_teacher, tmp_path,
                                                           capsys):
    url = str(tmp_path / "steps.zarr")
    flags = ["--features", "--feature-dims", str(RANK), "--feature-fit-views", "64"]
    # A build killed after writing its basis but before its manifest left only features/.
    from logitcache.codecs.features import fit_basis
    from logitcache.storage.basis import write_basis
    from logitcache.storage.layout import open_group

    write_basis(open_group(url, mode="a"), fit_basis(np.random.default_rng(0).normal(size=(64, 96)), RANK))
    assert run_main(_build(url, synth_data, tiny_teacher, *flags, epochs="1"), capsys)[0] == 0
    shutil.rmtree(Path(url) / "epochs" / "0000" / "commits" / "00001")  # killed before unit 1's commit
    assert run_main(_build(url, synth_data, tiny_teacher, *flags, epochs="0:2"), capsys)[0] == 0
    mine, straight = _unit_arrays(url), _unit_arrays(feature_caches["pca"])
    assert mine.keys() == straight.keys()
    assert all(np.array_equal(mine[k], straight[k]) for k in straight)


def test_feature_spec_mismatches_are_refused_in_one_line(feature_caches, synth_data, tiny_teacher, built_cache_mix,
                                                         tmp_path, capsys):
    pca = feature_caches["pca"]
    line = one_error_line(*run_main(_build(pca, synth_data, tiny_teacher, epochs="2:3"), capsys))
    assert "built with --features" in line and f"pca{RANK}/int8" in line
    line = one_error_line(*run_main(_build(pca, synth_data, tiny_teacher, "--features", "--feature-dims", "8",
                                           epochs="2:3"), capsys))
    assert f"holds features pca{RANK}/int8" in line and "pca8/int8" in line
    logits_only = str(tmp_path / "logits.zarr")
    shutil.copytree(built_cache_mix, logits_only)
    line = one_error_line(*run_main(_build(logits_only, synth_data, tiny_teacher, "--features", epochs="2:3"),
                                    capsys))
    assert "built without --features" in line and "new cache" in line
    line = one_error_line(*run_main(_build(str(tmp_path / "x.zarr"), synth_data, tiny_teacher,
                                           "--feature-dims", "8"), capsys))
    assert "--feature-dims without --features" in line
    line = one_error_line(*run_main(_build(str(tmp_path / "y.zarr"), synth_data, tiny_teacher, "--features",
                                           "--feature-dims", "64", "--feature-fit-views", "40"), capsys))
    assert "at least 64 views" in line
    assert CacheReader(pca).epochs() == [0, 1]


def test_feature_and_logit_caches_are_format_5_and_older_readers_refuse_them(feature_caches, built_cache_mix):
    import zarr

    from logitcache.storage.manifest import ATTR_KEY, Manifest

    for url in feature_caches.values():
        assert zarr.open_group(url, mode="r").attrs[ATTR_KEY]["format_version"] == 5
        assert CacheReader(url).format_version == 5
    assert CacheReader(built_cache_mix).format_version == 5 and CacheReader(built_cache_mix).manifest.features is None
    # A reader that knows formats up to 4 only (a logitcache from before checked metadata)
    # refuses a format 5 cache instead of extending it with units that name no manifest.
    d = zarr.open_group(feature_caches["pca"], mode="r").attrs[ATTR_KEY]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("logitcache.storage.manifest.READABLE_VERSIONS", (1, 2, 3, 4))
        with pytest.raises(Exception, match="format version 5 is not supported"):
            Manifest.from_dict(d)


def test_verify_checks_cached_features_against_the_teacher(feature_caches, synth_data, tiny_teacher, tmp_path):
    import zarr

    from logitcache.storage.layout import array_crc32, commit_path
    from logitcache.verify.run import verify_cache

    for name in ("pca", "full32"):
        rep = verify_cache(feature_caches[name], data=synth_data, teacher_weights=tiny_teacher, sample=192,
                           device="cpu")
        assert rep.passed, rep.reasons
        assert rep.feature_views == 192 and rep.feature_cos_min > (0.95 if name == "pca" else 0.99999)
        assert rep.feature_max_excess < 1e-5  # recomputation noise only (allowed: 2**-13)
    from logitcache.cli.main import app
    from typer.testing import CliRunner

    res = CliRunner().invoke(app, ["verify", feature_caches["pca"], "--sample", "32", "--data", synth_data,
                                   "--teacher-weights", tiny_teacher, "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "32 views: least cosine 0.9" in res.output and res.output.rstrip().endswith("PASS")
    # One view's stored features swapped with another's, checksums fixed: only verify can tell.
    url = str(tmp_path / "swapped.zarr")
    shutil.copytree(feature_caches["pca"], url)
    root = zarr.open_group(url, mode="a")
    feat = root[unit_path(0, 1)]["feat"][...]
    feat[[3, 4]] = feat[[4, 3]]
    root[unit_path(0, 1)]["feat"][...] = feat
    record = root[commit_path(0, 1)]
    commit = record.attrs["commit"]
    commit["crc32"]["feat"] = array_crc32(feat)
    record.attrs["commit"] = commit
    reseal(url)
    rep = verify_cache(url, data=synth_data, teacher_weights=tiny_teacher, sample=192, device="cpu")
    assert not rep.passed and rep.feature_max_excess > 0.01
    assert any("cached features of epoch 0" in r for r in rep.reasons), rep.reasons


def test_public_api_gives_the_cached_teacher_features(feature_caches, synth_data, tiny_teacher, built_cache_mix):
    import logitcache
    from logitcache.build.teacher import Teacher

    full = logitcache.CachedTrainData(synth_data, feature_caches["full32"])
    assert full.feature_dim == 96
    teacher = Teacher("test_resnet", weights=tiny_teacher, num_classes=full.num_classes, device="cpu")
    batch = next(iter(full.loader(1, batch_size=16, features=True)))
    assert batch["feat"].shape == (16, 96) and "feat_scale" not in batch
    _, true = teacher(batch["images"], full.recipe.mean, full.recipe.std, features=True)
    got = logitcache.teacher_features(batch, full, "cpu")
    assert torch.allclose(got, true, rtol=1e-4, atol=1e-5), (got - true).abs().max()

    pca = logitcache.CachedTrainData(synth_data, feature_caches["pca"])
    batch = next(iter(pca.loader(1, batch_size=16, features=True)))
    assert batch["feat"].dtype == torch.int8 and batch["feat_scale"].shape == (16,)
    got = logitcache.teacher_features(batch, pca)
    assert torch.nn.functional.cosine_similarity(got, true, dim=1).min() > 0.95  # the same views, same order
    # a projector step from the public names: the distance falls as the projector trains
    torch.manual_seed(0)
    import timm

    student = logitcache.FeatureStudent(timm.create_model("test_resnet", num_classes=16), pca.feature_dim)
    opt = torch.optim.SGD(student.projector.parameters(), lr=0.05)
    distances = []
    for _ in range(5):
        _, projected = student(batch["images"])
        d = logitcache.projector_distance(projected, got)
        opt.zero_grad()
        d.backward()
        opt.step()
        distances.append(d.item())
    assert distances[-1] < distances[0], distances

    plain = logitcache.CachedTrainData(synth_data, built_cache_mix)
    assert plain.feature_dim is None
    with pytest.raises(logitcache.LogitcacheError, match="build --features"):
        plain.loader(0, batch_size=16, features=True)
    with pytest.raises(logitcache.LogitcacheError, match=r"features=True"):
        logitcache.teacher_features(next(iter(plain.loader(0, batch_size=16))), plain)
