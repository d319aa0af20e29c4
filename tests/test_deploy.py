"""The KubeRay RayJob manifest under deploy/: parses, has the fields KubeRay requires, and runs a
job entry point and config that exist in this repository."""

import shlex
from pathlib import Path

import yaml

from distillery.platform.config.sections import load_config
from distillery.tuning.sweep_config import SweepConfig

REPO = Path(__file__).resolve().parent.parent


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def test_rayjob_manifest():
    doc = yaml.safe_load((REPO / "deploy" / "rayjob-sweep.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    assert doc["metadata"]["name"]
    spec = doc["spec"]
    cluster = spec["rayClusterSpec"]
    import ray

    assert cluster["rayVersion"] == ray.__version__  # the image runs the Ray we pin
    assert cluster["authOptions"]["mode"] == "token"  # Ray 2.60 token auth stays on
    head = cluster["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict) and _containers(head)
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert _containers(group)
    for container in _containers(head) + [c for g in cluster["workerGroupSpecs"] for c in _containers(g)]:
        assert container["name"] and container["image"]
        assert set(container["resources"]["requests"]) >= {"cpu", "memory"}
        # No credentials written into the manifest: they come from a Secret.
        assert not any(e.get("name", "").startswith("AWS_SECRET") and "value" in e for e in container.get("env", []))
    assert spec["shutdownAfterJobFinishes"] is True
    # The entry point is a job of this repository with a config that validates.
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "jobs/sweep.py"] and (REPO / argv[1]).is_file()
    config = argv[argv.index("--config") + 1]
    overrides = [a for a in argv[argv.index("--config") + 2:] if "=" in a]
    cfg = load_config(SweepConfig, REPO / config, overrides)
    assert cfg.sweep.storage_path.startswith("s3://") and cfg.tracking.tracking_uri.startswith("http")
