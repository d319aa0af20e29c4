"""Storage over fsspec: local atomic writes and the same operations against a moto S3 server."""

import os

import pytest

from distillery.platform.io import storage


def test_local_roundtrip_and_listing(tmp_path):
    uri = str(tmp_path / "a" / "b.bin")
    storage.write_bytes(uri, b"hello")
    assert storage.read_bytes(uri) == b"hello"
    assert storage.exists(uri)
    assert storage.listdir(tmp_path / "a") == ["b.bin"]
    assert storage.listdir(tmp_path / "nope") == []
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        storage.read_bytes(str(tmp_path / "nope.bin"))


def test_file_uri(tmp_path):
    uri = "file://" + str(tmp_path / "x.txt")
    storage.write_text(uri, "data")
    assert storage.read_text(uri) == "data"
    assert (tmp_path / "x.txt").read_text() == "data"


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    uri = str(tmp_path / "out.bin")
    storage.write_bytes(uri, b"old")
    with pytest.raises(RuntimeError):
        with storage.open_atomic(uri) as fh:
            fh.write(b"partial")
            raise RuntimeError("interrupted")
    assert storage.read_bytes(uri) == b"old"  # the old file is intact
    assert os.listdir(tmp_path) == ["out.bin"]  # and no temporary is left behind


def test_s3_roundtrip(moto_s3):
    base = f"s3://{moto_s3['bucket']}/storage-test"
    storage.write_bytes(storage.join(base, "k", "v.bin"), b"\x00\x01")
    assert storage.read_bytes(storage.join(base, "k", "v.bin")) == b"\x00\x01"
    assert storage.exists(storage.join(base, "k", "v.bin"))
    assert not storage.exists(storage.join(base, "k", "missing"))
    assert storage.listdir(storage.join(base, "k")) == ["v.bin"]
    with pytest.raises(RuntimeError):
        with storage.open_atomic(storage.join(base, "k", "w.bin")) as fh:
            fh.write(b"partial")
            raise RuntimeError("interrupted")
    assert not storage.exists(storage.join(base, "k", "w.bin"))


def test_join_uses_slashes_for_uris():
    assert storage.join("s3://b/p", "x", "y.json") == "s3://b/p/x/y.json"
    assert storage.is_remote("s3://b/p") and not storage.is_remote("/tmp/x")


def test_protocol_absolute_and_remote_are_different_questions():
    # file:// is a URI (kept as given, never resolved against a root) but not remote.
    assert storage.has_protocol("file:///tmp/x") and not storage.is_remote("file:///tmp/x")
    assert storage.has_protocol("s3://b/p") and storage.is_remote("s3://b/p")
    assert not storage.has_protocol("/tmp/x") and not storage.has_protocol("images/a.jpg")
    assert storage.is_absolute("/tmp/x") and storage.is_absolute("memory://x")
    assert not storage.is_absolute("images/a.jpg")


def test_storage_env_carries_endpoint_and_region_never_credentials(monkeypatch):
    for name in storage.SHAREABLE_S3_VARIABLES:  # other tests' moto settings
        monkeypatch.delenv(name, raising=False)
    for name, value in (("AWS_ACCESS_KEY_ID", "canary-id"), ("AWS_SECRET_ACCESS_KEY", "canary-secret"),
                        ("AWS_SESSION_TOKEN", "canary-token"), ("AWS_REGION", "eu-west-3")):
        monkeypatch.setenv(name, value)
    env = storage.storage_env("http://127.0.0.1:9")
    assert env == {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_REGION": "eu-west-3"}


def test_streamed_checksum_and_sizes(tmp_path):
    data = os.urandom(3000)
    storage.write_bytes(str(tmp_path / "d" / "x.bin"), data)
    got, digest = storage.read_bytes_sha256(str(tmp_path / "d" / "x.bin"), chunk_size=1024)  # 3 chunks
    assert got == data and digest == __import__("hashlib").sha256(data).hexdigest()
    assert storage.file_sizes(str(tmp_path / "d")) == {"x.bin": 3000}
    assert storage.file_sizes(str(tmp_path / "none")) == {}


def test_configured_endpoint_is_used_for_every_uri_kind(moto_s3, tmp_path, monkeypatch):
    """``storage.s3_endpoint_url`` alone (no AWS_ENDPOINT_URL in the environment) reaches the
    dataset (the cache job's prologue, before Ray), the cache, Ray Train's run storage and
    MLflow's artifacts; a wrong endpoint fails naming it instead of going to AWS."""
    import boto3
    from mlflow.tracking import MlflowClient

    from distillery.platform.cache.job import CacheFeaturesConfig, load_cache_inputs
    from distillery.platform.config.sections import load_config
    from distillery.platform.cache.feature_cache import FeatureCache, FeatureCacheWriter, plan_shards
    from distillery.platform.datasets.synthetic import generate_synthetic_coco

    endpoint, bucket = moto_s3["endpoint"], moto_s3["bucket"]
    base = f"s3://{bucket}/endpoint-test"
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    objects = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")

    def keys(prefix: str) -> list[str]:
        return [o["Key"] for o in objects.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]

    try:
        storage.configure_s3(endpoint)
        generate_synthetic_coco(f"{base}/data", train=2, val=1, size=64, seed=0)
        storage.configure_s3(None)
        job = [f"data.root={base}/data", "data.synthetic=null", f"cache.uri={base}/cache",
               "teacher.allow_random_init=true"]
        # data: read with the job's setting, configured before the first access
        cfg, datasets = load_cache_inputs(load_config(CacheFeaturesConfig, None,
                                                      [*job, f"storage.s3_endpoint_url={endpoint}"]))
        assert len(datasets["train"]) == 2
        # cache: written and read back
        writer = FeatureCacheWriter(f"{base}/cache/train", {"m": 1}, [2, 1, 1], "fp16", 2, {})
        writer.begin(plan_shards([1, 2], 2))
        writer.finalize(1, [writer.write_shard(0, [1, 2], __import__("numpy").ones((2, 2, 1, 1)))])
        FeatureCache(f"{base}/cache/train").verify()
        assert "endpoint-test/cache/train/manifest.json" in keys("endpoint-test/cache/")
        # runs: the pyarrow filesystem Ray Train writes checkpoints through
        fs = storage.pyarrow_filesystem(f"{base}/runs")
        with fs.open_output_stream(f"{bucket}/endpoint-test/runs/checkpoint_000000/state.json") as out:
            out.write(b"{}")
        assert keys("endpoint-test/runs/") == ["endpoint-test/runs/checkpoint_000000/state.json"]
        # artifacts: MLflow's own S3 client (boto3)
        client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        experiment = client.create_experiment("endpoint-test", artifact_location=f"{base}/mlflow")
        run = client.create_run(experiment)
        client.log_text(run.info.run_id, "model card", "card.txt")
        assert keys("endpoint-test/mlflow/") == [f"endpoint-test/mlflow/{run.info.run_id}/artifacts/card.txt"]
        # a wrong endpoint is named, and never replaced by AWS's
        with pytest.raises(storage.StorageError) as info:
            load_cache_inputs(load_config(CacheFeaturesConfig, None,
                                          [*job, "storage.s3_endpoint_url=http://127.0.0.1:9"]))
        first = str(info.value).splitlines()[0]
        assert first.startswith(f"cannot reach {base}/data/annotations/instances_train.json "
                                "(S3 endpoint http://127.0.0.1:9)")
        assert "amazonaws.com" not in str(info.value)
    finally:
        storage.configure_s3(None)
    assert "MLFLOW_S3_ENDPOINT_URL" not in os.environ  # configure_s3(None) restored the environment
