"""The feature-cache job end to end on a local Ray instance: local disk and moto S3, resume
after a forced interruption (proved by counting teacher forwards), fingerprint refusal, CLI."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from distillery.platform.io import storage
from distillery.platform.cache.job import CacheFeaturesConfig, CacheInterrupted, build_teacher, run_cache_job
from distillery.platform.datasets.coco import load_coco, load_image_resized
from distillery.platform.config.sections import load_config
from distillery.platform.cache.feature_cache import CacheError, FeatureCache, FingerprintMismatchError

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
    """What decides a cache's bytes: the data it reads, the teacher, the storage settings."""
    return {"data": cfg.data.model_dump(exclude={"check_images"}),
            "teacher": cfg.teacher.model_dump(), "dtype": cfg.cache.dtype, "shard_size": cfg.cache.shard_size,
            "views": cfg.cache.views}


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
