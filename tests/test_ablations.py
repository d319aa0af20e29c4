"""The learning benchmarks stay runnable: ``benchmarks/distill_ablations.py --quick`` and
``benchmarks/moe_ablation.py --quick`` (plumbing runs: a few steps, one seed; not learning claims)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from distillery.platform.tracking.runs import child_runs

REPO = Path(__file__).resolve().parent.parent
RUN_FIELDS = {"name", "ap_mean", "ap_std", "ap50_mean", "seeds", "wall_s", "img_s", "ap_curve_mean"}


def _quick(script: str, tmp_path: Path) -> dict:
    """Run ``script --quick``; its stdout is one JSON document, the same as the ``--out`` file."""
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, f"benchmarks/{script}", "--quick", "--work-dir", str(tmp_path / "work"),
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout[-2000:]
    document = json.loads(lines[0])
    assert json.loads(out.read_text()) == document
    return document


def _check_tracking(document: dict, names: list[str], plot: str) -> None:
    """The parent run holds the summary and the plot; one child run per (row, seed) with its AP curve."""
    uri, parent = document["tracking_uri"], document["mlflow_parent_run_id"]
    client = MlflowClient(uri)
    children = child_runs(uri, parent)
    assert sorted(c.info.run_name for c in children) == sorted(f"{n}/seed0" for n in names)
    epochs = len(document["runs"][0]["epochs"])
    for child in children:
        assert len(client.get_metric_history(child.info.run_id, "AP")) == epochs
        assert "final/AP" in child.data.metrics
    artifacts = {a.path for folder in (None, "plots") for a in client.list_artifacts(parent, folder)}
    assert f"{document['benchmark']}.json" in artifacts and f"plots/{plot}" in artifacts
    assert Path(document["plot"]).stat().st_size > 1000


def test_distill_ablations_quick(tmp_path):
    document = _quick("distill_ablations.py", tmp_path)
    rows = {r["name"]: r for r in document["rows"]}
    assert list(rows) == ["baseline", "random_teacher"]
    for row in rows.values():
        assert RUN_FIELDS <= set(row) and row["seeds"] == [0] and "skipped" not in row
        assert 0.0 <= row["ap_mean"] <= 1.0 and row["wall_s"] > 0 and row["img_s"] > 0
    assert rows["random_teacher"]["vs_baseline"] is None  # one seed: no interval

    runs = {r["row"]: r for r in document["runs"]}
    # The baseline never sees a teacher grid; the random-teacher row distils from its cache at the
    # chosen weight, and GAM measures the AIFI share.
    assert all("loss_dsi" not in e and e["lambda"] == 0.0 for e in runs["baseline"]["epochs"])
    for e in runs["random_teacher"]["epochs"]:
        assert e["loss_dsi"] > 0 and 0 < e["aifi_share"] < 1
        assert e["loss"] == pytest.approx(e["loss_detection"] + e["lambda"] * e["loss_dsi"], rel=1e-3)
    assert runs["random_teacher"]["epochs"][0]["lambda"] == document["settings"]["lambda0"] == 5.0
    # The GAM band was fixed before the runs, from the calibration run's AIFI share.
    calibration = document["gam_calibration"]
    assert calibration["seed"] not in document["seeds"]
    assert calibration["rho"] == pytest.approx(statistics.fmean(e["aifi_share"] for e in calibration["epochs"]),
                                               abs=1e-6)
    assert calibration["delta"] == pytest.approx(calibration["rho"] / 10, abs=1e-6)
    # The cache the row read was written by the cache job: every train image through the teacher once.
    cache = document["caches"]["random_fp16"]
    assert cache["images"] == cache["teacher_forwards"] == document["settings"]["train"]
    assert (cache["dtype"], cache["views"]) == ("fp16", 1)
    manifest = json.loads((tmp_path / "work" / "cache" / "random_fp16" / "train" / "manifest.json").read_text())
    assert manifest["count"] == cache["images"] and manifest["fingerprint"]["weights_sha256"].startswith("random-init")
    _check_tracking(document, ["baseline", "random_teacher"], "distill_ablations.png")


def test_moe_ablation_quick(tmp_path):
    document = _quick("moe_ablation.py", tmp_path)
    rows = {r["name"]: r for r in document["rows"]}
    assert list(rows) == ["dense", "moe_n16_k2", "moe_n8_k4"]
    for row in rows.values():
        assert RUN_FIELDS <= set(row) and row["seeds"] == [0]
    dense = rows["dense"]
    assert dense["params_total"] == dense["params_active"]
    for name, (copies, granularity) in (("moe_n16_k2", (16, 2)), ("moe_n8_k4", (8, 4))):
        row = rows[name]
        assert (row["copies"], row["granularity"]) == (copies, granularity)
        # Top-k = granularity: the active parameters are the dense ones plus the routers (< 1%).
        assert row["params_total"] > dense["params_total"]
        assert 0 < row["params_active"] - dense["params_active"] < 0.01 * dense["params_active"]
        assert row["vs_dense"] is None  # one seed: no interval
    runs = {r["row"]: r for r in document["runs"]}
    assert all("loss_aux" not in e for e in runs["dense"]["epochs"])
    assert all(e["loss_aux"] > 0 for n in ("moe_n16_k2", "moe_n8_k4") for e in runs[n]["epochs"])
    # Every arm was fine-tuned from the same dense base.
    assert len({r["base_ap"] for r in document["runs"]}) == 1
    _check_tracking(document, list(rows), "moe_ablation.png")


def test_run_all_resume_reuses_only_runs_of_the_same_settings(tmp_path):
    """``--resume``: a finished run is read back when its key and settings fingerprint match; new
    seeds run, and other settings (the salt) run again."""
    sys.path.insert(0, str(REPO))
    from benchmarks.paired import run_all

    calls: list[int] = []

    def run(seed: int) -> dict:
        calls.append(seed)
        return {"seed": seed, "ap": seed / 10}

    log = tmp_path / "runs.jsonl"
    assert run_all(run, [0, 1], 1, log) == [{"seed": 0, "ap": 0.0}, {"seed": 1, "ap": 0.1}]
    assert run_all(run, [0, 1, 2], 1, log, resume=True)[2] == {"seed": 2, "ap": 0.2}
    assert calls == [0, 1, 2]  # seeds 0 and 1 were read back
    run_all(run, [0], 1, log, resume=True, salt="lr=2e-4")
    assert calls == [0, 1, 2, 0]  # other settings: run again
    run_all(run, [1], 1, log)  # without resume the log starts afresh
    assert calls[-1] == 1 and len(log.read_text().splitlines()) == 1
