"""The feature-cache job end to end on a local Ray instance: local disk and moto S3, resume
after a forced interruption (proved by counting teacher forwards), fingerprint refusal, CLI."""

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from distillery.platform.io import storage
from distillery.platform.cache.codec import CODEC_FILE, CodecFileError, fit_codec
from distillery.platform.cache.job import (CacheFeaturesConfig, CacheInterrupted, build_teacher, open_training_cache,
                                           run_cache_job)
from distillery.platform.datasets.coco import load_coco, load_image_resized
from distillery.platform.engine.ingest import build_train_dataset, rows_to_samples
from distillery.platform.config.sections import load_config
from distillery.platform.cache.feature_cache import (CacheError, CodecMismatchError, FeatureCache,
                                                     FingerprintMismatchError)

REPO = __import__("pathlib").Path(__file__).resolve().parent.parent
TINY_TEACHER = ["teacher.allow_random_init=true", "teacher.input_size=128",
                "teacher.model_kwargs={embed_dim: 32, depth: 1, num_heads: 2}"]


def job_config(synthetic_data, cache_uri, *extra):
    return load_config(CacheFeaturesConfig, None, [
        f"data.root={synthetic_data}", f"cache.uri={cache_uri}", "cache.shard_size=5", *TINY_TEACHER, *extra])


def test_cache_job_writes_faithful_features(ray_local, synthetic_data, tmp_path):
    cfg = job_config(synthetic_data, tmp_path / "cache", "cache.splits=[train,val]")
    summary = run_cache_job(cfg)
    train = summary["train"]
    assert train["images"] == 24 and train["shards"] == 5 and train["teacher_forwards"] == 24
    assert summary["val"]["images"] == 8 and train["grid"] == [32, 4, 4]
    teacher = build_teacher(cfg.teacher.model_dump(), "float32")
    cache = FeatureCache(train["uri"], expected_fingerprint=teacher.fingerprint)
    cache.verify()
    ds = load_coco(str(synthetic_data / "annotations" / "instances_train.json"), str(synthetic_data / "images" / "train"))
    cache.check_covers(ds.image_ids)
    manifest = cache.manifest
    assert manifest["dataset"]["annotation_sha256"] == ds.annotation_sha256
    assert manifest["fingerprint"]["weights_sha256"].startswith("random-init")
    # The cached grid is the teacher run on the same resized image (fp16 storage).
    rec = ds.records[7]
    image = torch.from_numpy(load_image_resized(rec.uri, 128))[None].float() / 255
    online = teacher(image)[0].numpy()
    assert np.abs(cache.get(rec.image_id) - online).max() < 2e-2 * np.abs(online).max()


def test_interrupted_job_resumes_only_missing_shards(ray_local, synthetic_data, tmp_path):
    full = run_cache_job(job_config(synthetic_data, tmp_path / "full"))["train"]
    uri = tmp_path / "part"
    with pytest.raises(CacheInterrupted):
        run_cache_job(job_config(synthetic_data, uri, "debug.stop_after_shards=2"))
    written = [n for n in storage.listdir(uri / "train") if n.startswith("shard-")]
    assert len(written) == 2 and not (uri / "train" / "manifest.json").exists()
    resumed = run_cache_job(job_config(synthetic_data, uri))["train"]
    expected_forwards = sum(min(5, 24 - 5 * i) for i in range(5) if f"shard-{i:05d}.parquet" not in written)
    assert resumed["teacher_forwards"] == expected_forwards < 24
    assert resumed["shards_reused"] == len(written)
    a = json.loads((tmp_path / "full" / "train" / "manifest.json").read_text())
    b = json.loads((uri / "train" / "manifest.json").read_text())
    assert a == b  # the same manifest as the uninterrupted run, shard checksums included
    # A finished cache is not recomputed.
    again = run_cache_job(job_config(synthetic_data, uri))["train"]
    assert again["teacher_forwards"] == 0 and again["shards_computed"] == 0
    assert full["fingerprint_digest"] == resumed["fingerprint_digest"]


def test_other_teacher_is_refused(ray_local, synthetic_data, tmp_path):
    run_cache_job(job_config(synthetic_data, tmp_path / "c"))
    other = job_config(synthetic_data, tmp_path / "c", "teacher.seed=1")
    other_fp = build_teacher(other.teacher.model_dump(), "float32").fingerprint
    with pytest.raises(FingerprintMismatchError, match="weights_sha256") as exc:
        FeatureCache(str(tmp_path / "c" / "train"), expected_fingerprint=other_fp)
    assert "random-init:seed=0" in str(exc.value) and "random-init:seed=1" in str(exc.value)
    with pytest.raises(CacheError, match="different plan"):
        run_cache_job(other)  # resuming into a cache of another teacher is refused too


def test_pca_cache_fits_once_resumes_and_decodes_in_the_ingest(ray_local, synthetic_data, tmp_path):
    """cache.dtype=pca end to end: the basis is fitted by the first (interrupted) run and read back,
    not refitted, by the resumed one; the training ingest decodes the rows close to the teacher's
    own grids at <= 0.2x the fp16 bytes; a changed codec, a swapped or missing basis are refused."""
    pca = ["cache.dtype=pca", "cache.pca.dims=16", "cache.pca.bits=4", "cache.pca.fit_images=10"]
    uri = tmp_path / "pca"
    with pytest.raises(CacheInterrupted):
        run_cache_job(job_config(synthetic_data, uri, *pca, "debug.stop_after_shards=2"))
    codec_file = uri / "train" / CODEC_FILE
    basis = codec_file.read_bytes()
    plan = json.loads((uri / "train" / "plan.json").read_text())
    assert plan["dtype"] == "pca" and plan["codec"]["sha256"] == hashlib.sha256(basis).hexdigest()
    cfg = job_config(synthetic_data, uri, *pca)
    summary = run_cache_job(cfg)["train"]
    assert summary["codec"]["fit_forwards"] == 0 and codec_file.read_bytes() == basis  # reused, not refitted
    assert summary["teacher_forwards"] == 24 - 10 and summary["codec"]["dims"] == 16
    teacher = build_teacher(cfg.teacher.model_dump(), "float32")
    ds = load_coco(str(synthetic_data / "annotations" / "instances_train.json"), str(synthetic_data / "images" / "train"))
    cache = open_training_cache(summary["uri"], teacher.fingerprint, ds.image_ids, codec=cfg.cache.codec_spec(32))
    assert cache.manifest["codec"] == plan["codec"]

    # The ingest's rows carry the codes (<= 0.2x fp16) and decode to the teacher's grids.
    uri_of = {r.image_id: r.uri for r in ds.records}
    cosines, seen = [], set()
    for batch in build_train_dataset(ds, cache).iter_batches(batch_size=8, batch_format="numpy"):
        assert all(len(f) + len(s) <= 0.2 * 16 * 32 * 2 for f, s in zip(batch["features"], batch["scale"]))
        for sample in rows_to_samples(batch, cache.ingest_meta()):
            image = torch.from_numpy(load_image_resized(uri_of[sample.image_id], 128))[None].float() / 255
            online = teacher(image)[0].reshape(32, -1).T
            decoded = sample.layers[0].grid.reshape(32, -1).T
            assert np.array_equal(decoded.numpy(), cache.get(sample.image_id).reshape(32, -1).T)
            cosines.append(torch.nn.functional.cosine_similarity(decoded, online, dim=1))
            seen.add(sample.image_id)
    cos = torch.cat(cosines)
    assert seen == set(ds.image_ids) and cos.mean() >= 0.93 and cos.min() >= 0.6, (cos.mean(), cos.min())

    # Refusals: another codec configured (reading, or building into the same uri), another or no basis.
    with pytest.raises(CodecMismatchError, match=r"fields differ: cache\.pca\.bits, cache\.pca\.dims"):
        FeatureCache(summary["uri"], expected_codec=job_config(synthetic_data, uri, *pca, "cache.pca.dims=8",
                                                               "cache.pca.bits=8").cache.codec_spec(32))
    with pytest.raises(CodecMismatchError, match=r"fields differ: cache\.dtype"):
        open_training_cache(summary["uri"], teacher.fingerprint, ds.image_ids, codec={"dtype": "fp16"})
    with pytest.raises(CacheError, match=r"codec-pca\.safetensors was fitted for another cache \(fields differ: dims\)"):
        run_cache_job(job_config(synthetic_data, uri, *pca, "cache.pca.dims=8"))
    other = fit_codec(np.random.default_rng(0).normal(size=(100, 32)), dims=16, bits=4)
    codec_file.write_bytes(other.to_bytes())
    with pytest.raises(CodecFileError, match=r"codec-pca\.safetensors is not the basis the cache was encoded with"):
        open_training_cache(summary["uri"], teacher.fingerprint, ds.image_ids, codec=cfg.cache.codec_spec(32))
    codec_file.unlink()
    with pytest.raises(CodecFileError, match=r"codec-pca\.safetensors is missing"):
        open_training_cache(summary["uri"], teacher.fingerprint, ds.image_ids, codec=cfg.cache.codec_spec(32))
    with pytest.raises(CacheError, match=r"codec-pca\.safetensors, which is missing"):
        run_cache_job(cfg)


def test_cache_on_s3(ray_local, moto_s3, synthetic_data):
    uri = f"s3://{moto_s3['bucket']}/job-cache"
    summary = run_cache_job(job_config(synthetic_data, uri, "cache.dtype=int8"))["train"]
    assert summary["uri"] == uri + "/train" and summary["dtype"] == "int8"
    cache = FeatureCache(summary["uri"])
    cache.verify()
    assert cache.get(5).shape == (32, 4, 4)
    assert "manifest.json" in storage.listdir(summary["uri"])


def test_cli_rejects_unknown_key_before_starting_ray(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "cache_features.py"), "cache.dtyp=int8"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert "cache.dtyp: unknown key" in proc.stderr
    assert "Ray" not in proc.stderr and not (tmp_path / "runs").exists()


def _cache_recipe(cfg) -> dict:
    """What decides a cache's bytes: the data it reads, the teacher, the storage settings (the codec's too)."""
    return {"data": cfg.data.model_dump(exclude={"check_images"}),
            "teacher": cfg.teacher.model_dump(), "dtype": cfg.cache.dtype, "shard_size": cfg.cache.shard_size,
            "views": cfg.cache.views, "pca": cfg.cache.pca.model_dump() if cfg.cache.dtype == "pca" else None}


def test_recipes_sharing_a_cache_uri_agree():
    """The shipped recipes (and the embedded defaults) that name one cache.uri describe one cache:
    the README's day (cache_features -> distill -> sweep) never meets a FingerprintMismatchError
    or a foreign plan. Sweep recipes train through their trial config (a distill recipe)."""
    from test_recipes import CONFIGS, model_for

    from distillery.platform.config.distill import DistillConfig

    by_uri: dict[str, list[tuple[str, dict]]] = {}
    configs = [("embedded cache_features", CacheFeaturesConfig()), ("embedded distill", DistillConfig())]
    configs += [(p.name, load_config(model_for(p), p)) for p in sorted(CONFIGS.glob("*.yaml"))
                if model_for(p) in (CacheFeaturesConfig, DistillConfig)]
    for name, cfg in configs:
        if getattr(cfg, "teacher_mode", "cached") == "cached":
            by_uri.setdefault(cfg.cache.uri, []).append((name, _cache_recipe(cfg)))
    assert by_uri["runs/cache/synthetic-tiny-128"][0][0] == "cache_features_tiny.yaml"
    for uri, users in by_uri.items():
        (first, expected), *others = users
        for name, recipe in others:
            differ = sorted(k for k in expected if recipe[k] != expected[k])
            assert not differ, f"{name} and {first} share cache.uri {uri} but differ in {differ}"
