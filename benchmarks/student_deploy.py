"""RT-DETRv4 student inference speed by runtime: eager, ``torch.compile``, ONNX Runtime CUDA and
TensorRT execution providers.

Prints one JSON line. For each size in ``--sizes`` (S/M/L/X at ``--input-size`` 640), per
runtime: ``latency_ms`` at batch 1 (median of ``--iters`` after ``--warmup``) and ``img_s`` at
``--batch`` (32). Eager and compiled run under bf16 autocast on CUDA (fp32 on CPU); the ONNX
model (exported once per size, fp32 graph, no post-processing) runs on the CUDA execution
provider and on the TensorRT one with FP16 enabled, in the order the paper measures (T4,
TensorRT FP16: 273 / 169 / 124 / 78 FPS for S / M / L / X). A runtime that does not load here
(no CUDA device, no TensorRT libraries, a compile error) is recorded as
``{"status": "skipped", "reason": ...}`` or ``{"status": "failed", "error": ...}``, and the
other runtimes still run.

    python benchmarks/student_deploy.py [--sizes s m l x] [--input-size 640] [--batch 32]
        [--iters 20] [--warmup 5] [--runtimes eager compile ort_cuda ort_tensorrt] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.timing import timed  # noqa: E402

RUNTIMES = ("eager", "compile", "ort_cuda", "ort_tensorrt")
ORT_PROVIDERS = {"ort_cuda": "CUDAExecutionProvider", "ort_tensorrt": "TensorrtExecutionProvider"}


def _measure(run, images_1, images_b, iters: int, warmup: int, device: torch.device) -> dict:
    """Median batch-1 latency and batch-B throughput of ``run(images)``."""
    for _ in range(warmup):
        run(images_1)
        run(images_b)
    lat = statistics.median(timed(lambda: run(images_1), device) for _ in range(iters))
    big = statistics.median(timed(lambda: run(images_b), device) for _ in range(max(3, iters // 4)))
    return {"status": "ok", "latency_ms": round(lat * 1e3, 2), "fps_b1": round(1.0 / lat, 1),
            "batch": int(images_b.shape[0]), "img_s": round(images_b.shape[0] / big, 1)}


def torch_runtime(model, compiled: bool, images_1, images_b, args, device: torch.device) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else None
    if compiled and device.type != "cuda" and not args.compile_on_cpu:
        return {"status": "skipped", "reason": "torch.compile is timed on CUDA only (inductor's CPU build of a "
                                               "detector takes minutes; pass --compile-on-cpu to force it)"}
    fn = torch.compile(model) if compiled else model
    t0 = time.perf_counter()

    def run(x):
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            return fn(x)

    run(images_1)  # compiles (both shapes: dynamic=False, so two graphs)
    run(images_b)
    compile_s = time.perf_counter() - t0
    out = _measure(run, images_1, images_b, args.iters, args.warmup, device)
    out["autocast"] = "bfloat16" if dtype else "none"
    if compiled:
        out["compile_s"] = round(compile_s, 1)
    return out


def ort_runtime(onnx_path: Path | None, runtime: str, images_1, images_b, args) -> dict:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return {"status": "skipped", "reason": f"onnxruntime does not import: {exc}"}
    provider = ORT_PROVIDERS[runtime]
    available = ort.get_available_providers()
    if provider not in available:
        return {"status": "skipped", "reason": f"{provider} is not in this onnxruntime build ({ort.__version__}: "
                                               f"{', '.join(available)})"}
    if onnx_path is None:
        return {"status": "skipped", "reason": "the ONNX export failed (see onnx_export)"}
    options = {"trt_fp16_enable": True, "trt_engine_cache_enable": True,
               "trt_engine_cache_path": str(onnx_path.parent)} if runtime == "ort_tensorrt" else {}
    session = ort.InferenceSession(str(onnx_path), providers=[(provider, options)])
    if session.get_providers()[0] != provider:  # ORT falls back silently when the provider's libraries are missing
        return {"status": "skipped", "reason": f"{provider} did not load (libraries missing?); session runs on "
                                               f"{session.get_providers()}"}
    x1, xb = images_1.cpu().numpy(), images_b.cpu().numpy()
    out = _measure(lambda x: session.run(None, {"images": x}), x1, xb, args.iters, args.warmup,
                   torch.device("cpu"))  # session.run returns host arrays: it has synchronised
    out["precision"] = "fp16 (TensorRT)" if runtime == "ort_tensorrt" else "fp32"
    return out


def _ort_providers() -> list[str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return ort.get_available_providers()


def run_size(size: str, args, device: torch.device, work: Path) -> dict:
    from distillery.students import build_student
    from distillery.students.export import export_onnx

    torch.manual_seed(0)
    model = build_student(f"rtdetrv4_{size}", eval_spatial_size=args.input_size).to(device).eval()
    row: dict = {"params_m": round(model.num_inference_parameters() / 1e6, 2)}
    g = torch.Generator().manual_seed(1)
    images_1 = torch.rand(1, 3, args.input_size, args.input_size, generator=g).to(device)
    images_b = torch.rand(args.batch, 3, args.input_size, args.input_size, generator=g).to(device)
    onnx_path = None
    if any(r.startswith("ort_") and ORT_PROVIDERS[r] in _ort_providers() for r in args.runtimes):
        try:
            onnx_path = work / f"rtdetrv4_{size}.onnx"
            export_onnx(model.cpu(), onnx_path, args.input_size, with_postprocess=False)
            row["onnx_export"] = {"status": "ok"}
        except Exception as exc:  # recorded; the torch runtimes still run
            row["onnx_export"] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
            onnx_path = None
        model.to(device)
    for runtime in args.runtimes:
        try:
            if runtime in ("eager", "compile"):
                row[runtime] = torch_runtime(model, runtime == "compile", images_1, images_b, args, device)
            else:
                row[runtime] = ort_runtime(onnx_path, runtime, images_1, images_b, args)
        except Exception as exc:  # one runtime failing must not lose the others
            row[runtime] = {"status": "failed", "error": f"{type(exc).__name__}: {str(exc)[:500]}"}
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def run(args) -> dict:
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    out = {"benchmark": "student_deploy", "device": torch.cuda.get_device_name(device) if device.type == "cuda"
           else f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)", "torch": torch.__version__,
           "input_size": args.input_size, "batch": args.batch, "iters": args.iters, "results": {}}
    work = Path(tempfile.mkdtemp(prefix="student-deploy-"))
    for size in args.sizes:
        out["results"][f"rtdetrv4_{size}"] = run_size(size, args, device, work)
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["s", "m", "l", "x"], choices=["s", "m", "l", "x"])
    p.add_argument("--input-size", type=int, default=640)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    p.add_argument("--compile-on-cpu", action="store_true")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return p


def main() -> None:
    print(json.dumps(run(parser().parse_args())))


if __name__ == "__main__":
    main()
