"""One command for a GPU node: every speed figure Distillery needs from a GPU, in one JSON document.

    python benchmarks/gpu_suite.py [--quick] [--out gpu_suite.json] [--only PART ...]

Parts, in this order (each its own process with its own time limit, so a crash, a hang or an
out-of-memory in one part is recorded and the others still run):

* ``gpu_tests``: ``pytest -m gpu`` (bf16 autocast, SyncBatchNorm under NCCL, NCCL all-reduce,
  GPU actor placement in the cache job); skipped on CPU, where those tests skip anyway.
* ``teacher_cache``: bare DINOv3-B/16 forward (bf16 on GPU) vs the end-to-end cache job at the
  RT-DETRv4 teacher input (640 -> 320 px), one ``benchmarks/cache_throughput.py`` run per batch
  size of the sweep. Goal: job >= 0.9x bare; >= 2,000 img/s end to end on one H100-class GPU.
* ``train_step``: RT-DETRv4-S training step at 640 px (bf16 autocast on GPU), cached teacher grid
  vs the online ViT-B/16 teacher (``benchmarks/train_throughput.py --skip-job``). Goal >= 1.6x.
* ``distill_e2e``: the distillation job end to end (``jobs/distill.py``: Ray Train, DeepSpeed,
  NCCL on GPU / gloo on CPU, one worker; synthetic data and feature cache built in a temporary
  directory); wall time, img/s and the validation AP it prints.
* ``student_deploy``: RT-DETRv4 S/M/L/X latency at batch 1 and img/s at batch 32, eager bf16,
  ``torch.compile`` (S only), ONNX Runtime CUDA and TensorRT (FP16) execution providers where they load
  (``benchmarks/student_deploy.py``). Paper reference (T4, TensorRT FP16): 273/169/124/78 FPS.
* ``moe_vs_dense``: decoder and detector latency/throughput of Dynamic-DINO MoE N=16, k=2 vs the
  dense decoder (``benchmarks/moe_speed.py``). Goal: MoE <= 1.3x dense latency.
* ``adaroute_vs_full``: DEIMv2-S training step with AdaRoute adapters vs full fine-tuning, and
  LoRA at the same budget (``benchmarks/peft.py``). Goal: AdaRoute step <= 0.8x full on GPU.

Each part is ``{"status": "ok" | "skipped" | "failed", "seconds", "reason" | "error", "result"}``
with ``result`` the part's own JSON line. ``--quick`` uses small sizes (a smoke check: about 2
minutes on a 2-core CPU, less on a GPU); without it, sizes are the papers' (under 8 minutes on
one H200). On CPU every part runs at small sizes so CI keeps the suite alive; CUDA-only parts
and runtimes are skipped with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
TINY_TEACHER = '{"embed_dim": 32, "depth": 1, "num_heads": 2}'


def _gpu() -> tuple[bool, str]:
    import torch

    if torch.cuda.is_available():
        return True, torch.cuda.get_device_name(0)
    return False, f"cpu x{os.cpu_count()} ({platform.processor() or platform.machine()})"


def _last_json_line(stdout: str) -> dict[str, Any]:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("the part printed no JSON line")


def run_process(argv: list[str], timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one part as a child process; its last JSON line is the result."""
    try:
        proc = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stderr or b"")[-1500:]
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        return {"status": "failed", "error": f"timed out after {timeout:.0f} s", "stderr_tail": tail}
    if proc.returncode != 0:
        return {"status": "failed", "error": f"exit status {proc.returncode}", "stderr_tail": proc.stderr[-3000:]}
    try:
        return {"status": "ok", "result": _last_json_line(proc.stdout)}
    except ValueError as exc:
        return {"status": "failed", "error": str(exc), "stdout_tail": proc.stdout[-1500:]}


# --------------------------------------------------------------------------- parts

def part_gpu_tests(gpu: bool, quick: bool) -> dict[str, Any]:
    if not gpu:
        return {"status": "skipped", "reason": "no CUDA device: the gpu-marked tests skip on CPU "
                                               "(their CPU analogues run in the ordinary suite)"}
    argv = ["-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"]
    try:
        proc = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "error": "pytest -m gpu timed out after 240 s"}
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    status = "ok" if proc.returncode == 0 else "failed"
    out = {"status": status, "result": {"summary": summary}}
    if status == "failed":
        out["error"] = f"pytest exit status {proc.returncode}"
        out["stdout_tail"] = proc.stdout[-3000:]
    return out


def part_teacher_cache(gpu: bool, quick: bool) -> dict[str, Any]:
    if gpu:
        sweep, images, extra = ([32] if quick else [32, 64, 128]), (64 if quick else 512), []
    else:  # a 2-layer ViT stands in for ViT-B on CPU: the plumbing is what CI checks
        sweep, images = [8], 8
        extra = ["--input-size", "128", "--image-size", "128", "--teacher-kwargs", TINY_TEACHER]
    runs = {}
    for batch in sweep:
        r = run_process(["benchmarks/cache_throughput.py", "--images", str(images), "--batch", str(batch),
                         "--shard-size", str(max(batch, 32)), *extra], timeout=240 if gpu else 300)
        if r["status"] != "ok":
            return {**r, "failed_batch": batch, "result": {"sweep": runs}}
        runs[str(batch)] = r["result"]
    best = max(runs, key=lambda b: runs[b]["job_img_s"])
    return {"status": "ok", "result": {"sweep": runs, "best_batch": int(best),
                                       "best_job_img_s": runs[best]["job_img_s"],
                                       "best_ratio": runs[best]["ratio"]}}


def part_train_step(gpu: bool, quick: bool) -> dict[str, Any]:
    if gpu:
        argv = ["--student", "rtdetrv4_s", "--input-size", "640", "--batch", "8" if quick else "16",
                "--rounds", "2" if quick else "5"]
    else:
        argv = ["--student", "rtdetrv4_tiny", "--input-size", "128", "--batch", "2", "--rounds", "1",
                "--teacher-kwargs", TINY_TEACHER]
    return run_process(["benchmarks/train_throughput.py", "--skip-job", *argv], timeout=180 if gpu else 240)


def part_distill_e2e(gpu: bool, quick: bool) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="gpu-suite-distill-"))
    paths = [f"data.root={work / 'data'}", f"cache.uri={work / 'cache'}", f"output.storage_path={work / 'train'}",
             f"output.local_dir={work / 'local'}", "output.name=gpu-suite", "train.num_workers=1"]
    if gpu and not quick:
        argv = paths  # the embedded default (synthetic set, 256 px, 12 epochs), on one GPU worker
    else:
        # Two steps of the plumbing-size config on 4 images: the job's start-up (Ray Train,
        # DeepSpeed, cache build, MLflow, model logging) is what a smoke check needs to see, not
        # the learning (tests/test_learning.py shows that).
        argv = ["--config", "configs/distill_tiny.yaml", *paths, "train.cpus_per_worker=1", "train.epochs=1",
                "optim.flat_epochs=1", "optim.no_aug_epochs=1", "debug.max_steps_per_epoch=2",
                "data.synthetic={train: 4, val: 2, size: 128, seed: 0}"]
    r = run_process(["jobs/distill.py", *argv], timeout=300 if gpu else 400)
    if r["status"] == "ok":
        s = r["result"]
        m = s.get("best_metrics") or s.get("metrics") or {}
        r["result"] = {"backend": "nccl" if gpu else "gloo", "workers": 1, "wall_seconds": s.get("wall_seconds"),
                       "AP": m.get("AP"), "AP50": m.get("AP50"),
                       "images_per_second": (s.get("metrics") or {}).get("images_per_second"),
                       "config": "embedded default" if gpu and not quick else "configs/distill_tiny.yaml"}
    return r


def part_student_deploy(gpu: bool, quick: bool) -> dict[str, Any]:
    """One process per size (a hang or out-of-memory in one loses only that size).
    ``torch.compile`` for S only on the full run: compiling takes about a minute per model."""
    if gpu:
        sizes = ["s"] if quick else ["s", "m", "l", "x"]
        common = ["--batch", "32", "--iters", "5" if quick else "20", "--warmup", "2" if quick else "5"]
    else:
        sizes, common = ["s"], ["--input-size", "128", "--batch", "2", "--iters", "2", "--warmup", "1"]
    results, failed = {}, []
    for size in sizes:
        runtimes = ["eager", "compile", "ort_cuda", "ort_tensorrt"] if size == "s" else \
            ["eager", "ort_cuda", "ort_tensorrt"]
        r = run_process(["benchmarks/student_deploy.py", "--sizes", size, "--runtimes", *runtimes, *common],
                        timeout=240)
        if r["status"] == "ok":
            results.update(r["result"]["results"])
        else:
            results[f"rtdetrv4_{size}"] = r
            failed.append(size)
    out: dict[str, Any] = {"status": "failed" if failed else "ok", "result": {"results": results}}
    if failed:
        out["error"] = f"sizes {failed} failed (their records hold the errors)"
    return out


def part_moe_vs_dense(gpu: bool, quick: bool) -> dict[str, Any]:
    if gpu:
        argv = ["--batch", "32", "--iters", "5" if quick else "20"]
    else:
        argv = ["--name", "rtdetrv4_tiny", "--input-size", "128", "--batch", "2", "--iters", "2", "--warmup", "1"]
    return run_process(["benchmarks/moe_speed.py", *argv], timeout=180 if gpu else 240)


def part_adaroute_vs_full(gpu: bool, quick: bool) -> dict[str, Any]:
    if gpu:
        argv = ["--model", "deimv2_s", "--input-size", "640", "--batch", "8", "--rounds", "2" if quick else "5"]
    else:
        argv = ["--model", "deimv2_s", "--input-size", "160", "--batch", "1", "--rounds", "1", "--no-cpu-memory"]
    return run_process(["benchmarks/peft.py", *argv], timeout=180 if gpu else 240)


PARTS: dict[str, Callable[[bool, bool], dict[str, Any]]] = {
    "gpu_tests": part_gpu_tests,
    "teacher_cache": part_teacher_cache,
    "train_step": part_train_step,
    "distill_e2e": part_distill_e2e,
    "student_deploy": part_student_deploy,
    "moe_vs_dense": part_moe_vs_dense,
    "adaroute_vs_full": part_adaroute_vs_full,
}


def run_suite(quick: bool, only: list[str] | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    gpu, device = _gpu()
    doc: dict[str, Any] = {"benchmark": "gpu_suite", "device": device, "quick": quick,
                           "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "parts": {}}
    t_all = time.perf_counter()
    for name, part in PARTS.items():
        if only and name not in only:
            continue
        t = time.perf_counter()
        try:
            record = part(gpu, quick)
        except Exception as exc:  # a bug in the part's own set-up: recorded, the next part runs
            record = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
        record["seconds"] = round(time.perf_counter() - t, 1)
        doc["parts"][name] = record
        log(f"[gpu_suite] {name}: {record['status']} ({record['seconds']} s)"
            + (f": {record.get('reason') or record.get('error')}" if record["status"] != "ok" else ""))
    doc["seconds"] = round(time.perf_counter() - t_all, 1)
    return doc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke check")
    parser.add_argument("--out", default="gpu_suite.json", help="where the JSON document is written too")
    parser.add_argument("--only", nargs="+", choices=list(PARTS), help="run only these parts")
    args = parser.parse_args()
    doc = run_suite(args.quick, args.only, log=lambda line: print(line, file=sys.stderr, flush=True))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, out)  # atomic: a half-written document never replaces a previous one
    print(json.dumps(doc))


if __name__ == "__main__":
    main()
