"""benchmarks/gpu_suite.py --quick on CPU: the one-command GPU suite stays alive in CI.

Every part (cache job on Ray, training step, the distillation job with one gloo worker, student
runtimes, MoE, PEFT) runs at small sizes and must succeed; parts that need CUDA (the gpu-marked
tests, torch.compile timing, ONNX Runtime's CUDA/TensorRT providers) are skipped with a reason.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.gpu_suite import PARTS  # noqa: E402


@pytest.mark.slow
def test_quick_suite_runs_every_part_on_cpu(tmp_path):
    out = tmp_path / "suite.json"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--quick", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == doc  # the file holds the same document
    assert doc["quick"] is True and set(doc["parts"]) == set(PARTS)
    for name, part in doc["parts"].items():
        assert part["status"] in ("ok", "skipped"), (name, part.get("error"), part.get("stderr_tail", "")[-2000:])
        if part["status"] == "skipped":
            assert part["reason"], name
    assert doc["parts"]["gpu_tests"]["status"] == "skipped"  # no CUDA in CI: its reason says so
    parts = doc["parts"]
    assert parts["teacher_cache"]["result"]["best_job_img_s"] > 0
    assert parts["train_step"]["result"]["cached_vs_online"]["ratio"] > 0
    assert parts["distill_e2e"]["result"]["backend"] == "gloo" and parts["distill_e2e"]["result"]["AP"] >= 0
    deploy = parts["student_deploy"]["result"]["results"]["rtdetrv4_s"]
    assert deploy["eager"]["status"] == "ok" and deploy["eager"]["img_s"] > 0
    assert all(deploy[r]["status"] == "skipped" and deploy[r]["reason"] for r in ("compile", "ort_cuda", "ort_tensorrt"))
    assert "dense" in parts["moe_vs_dense"]["result"]["detector_latency_ms"]
    assert set(parts["adaroute_vs_full"]["result"]["step_s"]) >= {"full", "adaroute"}
