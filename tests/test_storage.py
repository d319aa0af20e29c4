"""Storage over fsspec: local atomic writes and the same operations against a moto S3 server."""

import os

import pytest

from distillery.platform import storage


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


def test_storage_env_never_invents_credentials(monkeypatch):
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    env = storage.storage_env("http://127.0.0.1:9")
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9"
    assert "AWS_SECRET_ACCESS_KEY" not in env
