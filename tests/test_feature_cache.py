"""Feature cache format: shards + manifest, int8 quantisation error, plan guard, fingerprint refusal."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from distillery.platform.cache.codec import decode_features, dequantize_int8, encode_features, quantize_int8
from distillery.platform.cache.feature_cache import (CacheError, FeatureCache, FeatureCacheWriter,
                                               FingerprintMismatchError, plan_shards)

FP = {"model": "tiny", "weights_sha256": "abc", "input_size": 64, "dtype": "float32"}
GRID = [16, 4, 4]


def _features(n, seed=0):
    return np.random.default_rng(seed).normal(size=(n, *GRID)).astype(np.float32)


def _build(uri, ids, dtype="fp16", shard_size=3, fp=FP):
    writer = FeatureCacheWriter(uri, fp, GRID, dtype, shard_size, {"annotation_sha256": "d" * 64})
    shards = plan_shards(ids, shard_size)
    todo = writer.begin(shards)
    feats = {i: _features(1, seed=i)[0] for i in ids}
    infos = [writer.write_shard(k, shards[k], np.stack([feats[i] for i in shards[k]])) for k in todo]
    return writer.finalize(len(shards), infos), feats


def test_plan_is_deterministic_and_sorted():
    assert plan_shards([5, 1, 3, 9, 7], 2) == [[1, 3], [5, 7], [9]]
    with pytest.raises(ValueError, match="unique"):
        plan_shards([1, 1], 2)


def test_int8_roundtrip_error_and_cosine():
    x = np.random.default_rng(0).normal(size=(400, 768)).astype(np.float32) * \
        np.random.default_rng(1).uniform(0.1, 10, size=(400, 1)).astype(np.float32)
    q, scale = quantize_int8(x)
    y = dequantize_int8(q, scale)
    # Per-token symmetric: the error of each value is at most half a quantisation step.
    assert np.all(np.abs(x - y) <= scale[:, None] / 2 + 1e-6)
    cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
    assert cos.min() > 0.999


@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_encode_decode_layout(dtype):
    g = _features(1)[0]
    f, s = encode_features(g, dtype)
    back = decode_features(f, s, dtype, GRID)
    assert back.shape == tuple(GRID)
    assert np.allclose(back, g, atol=0.05 if dtype == "int8" else 2e-3)
    assert len(f) == 16 * 16 * (2 if dtype == "fp16" else 1)


def test_write_read_and_manifest(tmp_path):
    ids = [10, 3, 7, 21, 15, 2, 8]
    manifest, feats = _build(str(tmp_path / "c"), ids)
    assert manifest["count"] == 7 and len(manifest["shards"]) == 3
    assert [s["count"] for s in manifest["shards"]] == [3, 3, 1]
    cache = FeatureCache(str(tmp_path / "c"), expected_fingerprint=FP)
    cache.verify()
    cache.check_covers(ids)
    for i in ids:
        assert np.allclose(cache.get(i), feats[i], atol=2e-3)
    # Shards are plain Parquet that any reader opens.
    t = pq.read_table(tmp_path / "c" / "shard-00000.parquet")
    assert t.column_names == ["image_id", "view", "features", "scale", "params"]
    with pytest.raises(CacheError, match="lacks 1 images of the dataset: 99"):
        cache.check_covers(ids + [99])
    with pytest.raises(CacheError, match="image id 99"):
        cache.get(99)


def test_pca_rows_decode_with_the_recorded_basis_and_bad_records_are_named(tmp_path):
    """The pca dtype through the writer and reader (the cache job's codec fit: test_cache_job):
    a row holds codes + float16 scales; a manifest whose codec record is damaged is refused,
    naming the field."""
    import hashlib

    from distillery.platform.cache.codec import CODEC_FILE, fit_codec

    rng = np.random.default_rng(0)
    mix = rng.normal(size=(4, GRID[0]))  # features with structure: 4 directions plus a little noise
    feats = {i: (np.einsum("kc,khw->chw", mix, rng.normal(size=(4, *GRID[1:]))) + 0.01 * rng.normal(size=GRID))
             .astype(np.float32) for i in range(1, 8)}
    codec = fit_codec(np.stack(list(feats.values())), dims=6, bits=8)
    data = codec.to_bytes()
    uri = tmp_path / "c"
    uri.mkdir()
    (uri / CODEC_FILE).write_bytes(data)
    record = {"method": "pca", "channels": GRID[0], "dims": 6, "bits": 8, "fit_images": 7, "file": CODEC_FILE,
              "sha256": hashlib.sha256(data).hexdigest()}
    writer = FeatureCacheWriter(str(uri), FP, GRID, "pca", 4, {}, codec=codec, codec_record=record)
    shards = plan_shards(feats, 4)
    writer.begin(shards)
    writer.finalize(len(shards), [writer.write_shard(k, s, np.stack([feats[i] for i in s]))
                                  for k, s in enumerate(shards)])
    cache = FeatureCache(str(uri), expected_codec={"dtype": "pca", "dims": 6, "bits": 8, "fit_images": 7})
    row = pq.read_table(uri / "shard-00000.parquet")
    assert len(row.column("features")[0].as_py()) == 16 * 6 and len(row.column("scale")[0].as_py()) == 16 * 2
    for i, f in feats.items():
        x, y = f.reshape(GRID[0], -1), cache.get(i).reshape(GRID[0], -1)
        assert ((x * y).sum(0) / np.linalg.norm(x, axis=0) / np.linalg.norm(y, axis=0)).min() > 0.999
    manifest = json.loads((uri / "manifest.json").read_text())
    manifest["codec"]["bits"] = 5
    (uri / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="codec.bits must be 4 or 8, got 5"):
        FeatureCache(str(uri))
    del manifest["codec"]
    (uri / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="codec must be the pca codec's record"):
        FeatureCache(str(uri))


def test_fingerprint_mismatch_prints_both(tmp_path):
    _build(str(tmp_path / "c"), [1, 2, 3])
    other = dict(FP, input_size=128)
    with pytest.raises(FingerprintMismatchError) as exc:
        FeatureCache(str(tmp_path / "c"), expected_fingerprint=other)
    msg = str(exc.value)
    assert "input_size" in msg and '"input_size": 64' in msg and '"input_size": 128' in msg


def test_checksum_and_missing_manifest(tmp_path):
    uri = str(tmp_path / "c")
    _build(uri, [1, 2, 3, 4])
    shard = tmp_path / "c" / "shard-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(CacheError, match="shard-00001.parquet does not match its checksum"):
        FeatureCache(uri).verify()
    (tmp_path / "c" / "manifest.json").unlink()
    with pytest.raises(CacheError, match="rerun the cache job to resume"):
        FeatureCache(uri)


def test_coverage_check_reads_the_id_columns_not_the_grids(tmp_path, monkeypatch):
    """The training driver checks that the cache covers the dataset from each shard's image_id/view
    columns: no grid is read or kept (a COCO-size cache is tens of GB). The grids' checksums are
    checked where they are read."""
    from distillery.platform.cache import checks
    from test_errors_data import flip_feature_byte

    uri = str(tmp_path / "c")
    _build(uri, list(range(1, 13)), shard_size=4)
    shard = tmp_path / "c" / "shard-00001.parquet"
    flip_feature_byte(shard)  # the ids and the footer still read
    full_reads = []
    real = checks.storage.read_bytes_sha256
    monkeypatch.setattr(checks.storage, "read_bytes_sha256", lambda u, *a: full_reads.append(u) or real(u, *a))
    cache = FeatureCache(uri)
    cache.check_shards()
    cache.check_covers(range(1, 13))
    assert full_reads == [] and cache._tables == {}
    with pytest.raises(CacheError, match="lacks 1 images of the dataset: 13"):
        cache.check_covers(range(1, 14))
    with pytest.raises(CacheError, match="shard-00001.parquet does not match its checksum"):
        cache.get(5)
    assert full_reads == [str(shard)]


def test_resume_writes_only_missing_shards_and_same_manifest(tmp_path):
    ids = list(range(1, 11))
    full, _ = _build(str(tmp_path / "full"), ids)
    # An interrupted build: plan written, shards 0 and 2 finished, no manifest.
    uri = str(tmp_path / "part")
    writer = FeatureCacheWriter(uri, FP, GRID, "fp16", 3, {"annotation_sha256": "d" * 64})
    shards = plan_shards(ids, 3)
    assert writer.begin(shards) == [0, 1, 2, 3]
    for k in (0, 2):
        writer.write_shard(k, shards[k], np.stack([_features(1, seed=i)[0] for i in shards[k]]))
    (tmp_path / "part" / ".shard-00001.parquet.tmp-deadbeef").write_bytes(b"half")
    todo = FeatureCacheWriter(uri, FP, GRID, "fp16", 3, {"annotation_sha256": "d" * 64}).begin(shards)
    assert todo == [1, 3]
    assert not (tmp_path / "part" / ".shard-00001.parquet.tmp-deadbeef").exists()
    resumed, _ = _build(uri, ids)
    assert json.dumps(resumed, sort_keys=True) == json.dumps(full, sort_keys=True)


def test_plan_guard_refuses_different_settings(tmp_path):
    uri = str(tmp_path / "c")
    _build(uri, [1, 2, 3])
    writer = FeatureCacheWriter(uri, FP, GRID, "int8", 3, {"annotation_sha256": "d" * 64})
    with pytest.raises(CacheError, match="different plan .*dtype"):
        writer.begin(plan_shards([1, 2, 3], 3))


def test_cache_on_s3(moto_s3):
    uri = f"s3://{moto_s3['bucket']}/unit-cache"
    manifest, feats = _build(uri, [4, 5, 6, 7], dtype="int8")
    cache = FeatureCache(uri, expected_fingerprint=FP)
    cache.verify()
    assert np.allclose(cache.get(6), feats[6], atol=0.05)
    assert manifest["dtype"] == "int8"
