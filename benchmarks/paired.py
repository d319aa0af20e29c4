"""Seeded comparisons shared by the learning benchmarks (imported as ``benchmarks.paired``): the
common command line and dataset, the per-epoch scoring hook of ``fit``, runs a few processes at a
time, mean +- std per row, the difference to a reference row paired by seed with a 95%
t-interval, the per-epoch AP plot, and the MLflow parent run with one child run per (row, seed).

A run result is a dict with ``row``, ``seed``, ``ap``, ``ap50``, ``wall_s``, ``img_s`` and
``epochs`` (a list of per-epoch dicts with at least ``epoch``, ``AP``, ``AP50``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Sequence

from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # python benchmarks/paired.py FILE

from distillery.platform.config.sections import DataConfig, SyntheticDataConfig  # noqa: E402

__all__ = ["BaseSettings", "EpochScorer", "add_common_args", "common_setup", "log_runs", "markdown_table",
           "paired_difference", "plot_curves", "row_summary", "run_all"]


@dataclass(frozen=True)
class BaseSettings:
    """What every learning benchmark sizes: the synthetic data, batches, warm-up, EMA, scoring."""

    train: int = 192           # synthetic train images
    val: int = 128             # synthetic val images (more images, less AP noise)
    size: int = 128            # image side = the student's input size
    data_seed: int = 0
    batch: int = 8
    steps_per_epoch: int = 24  # one pass over the train images
    warmup_steps: int = 20
    ema_decay: float = 0.999   # the distillation job's EMA
    ema_warmups: int = 50
    eval_batch: int = 32


def add_common_args(parser: argparse.ArgumentParser, work_dir: str) -> None:
    """``--seeds --quick --out --work-dir --tracking-uri --jobs --threads``."""
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 in every row (default 5; --quick 1)")
    parser.add_argument("--quick", action="store_true", help="plumbing run for CI: 1 seed, a few steps")
    parser.add_argument("--out", help="also write the JSON document to this file")
    parser.add_argument("--work-dir", default=work_dir,
                        help=f"data, caches, the MLflow store, the plot (default {work_dir})")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///<work-dir>/mlflow.db)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="runs at a time, one process each (default 2; --quick 1)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the runs in <work-dir>/runs.jsonl made with the same settings (add seeds or rows "
                             "to a finished or interrupted benchmark)")


def common_setup(args: argparse.Namespace, train: int, val: int, size: int, data_seed: int
                 ) -> tuple[list[int], int, Path, str, DataConfig]:
    """(seeds, jobs, work dir, tracking URI, dataset) of a benchmark run; the synthetic dataset is
    generated under the work dir when it is not there."""
    from distillery.platform.cache.job import ensure_dataset

    seeds = list(range(args.seeds if args.seeds is not None else (1 if args.quick else 5)))
    jobs = args.jobs if args.jobs is not None else (1 if args.quick else 2)
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    tracking_uri = args.tracking_uri or f"sqlite:///{work / 'mlflow.db'}"
    data = DataConfig(root=str(work / "data" / f"synthetic-{train}-{val}-{size}"),
                      synthetic=SyntheticDataConfig(train=train, val=val, size=size, seed=data_seed))
    ensure_dataset(data)
    return seeds, jobs, work, tracking_uri, data


class EpochScorer:
    """``fit``'s ``on_epoch_end``: scores the EMA weights on the val split (COCO AP,
    ``distillery.evaluation``) after every epoch and records the epoch's mean losses and DSI
    weight; ``extra()`` adds a benchmark's own numbers. ``curve`` holds the records, ``seconds``
    the time spent scoring (the training throughput leaves it out)."""

    def __init__(self, data: DataConfig, size: int, batch_size: int, steps_per_epoch: int, label: str,
                 extra: Callable[[], dict[str, Any]] | None = None):
        import torch

        from distillery.platform.datasets.coco import load_image_resized
        from distillery.platform.datasets.formats import load_split

        self.val = load_split(data, "val")
        self.images = torch.stack([torch.from_numpy(load_image_resized(r.uri, size)) for r in self.val.records])
        self.categories, self.truth = list(self.val.categories.category_ids), self.val.coco_gt_dict()
        self.batch_size, self.steps_per_epoch, self.label, self.extra = batch_size, steps_per_epoch, label, extra
        self.curve: list[dict[str, Any]] = []
        self.seconds = 0.0
        self.started = time.perf_counter()

    def __call__(self, epoch: int, result) -> None:
        from distillery.evaluation.loop import evaluate_detector

        t0 = time.perf_counter()
        metrics = evaluate_detector(result.ema.module, self.val.records, self.images, self.categories, self.truth,
                                    batch_size=self.batch_size)
        self.seconds += time.perf_counter() - t0
        recent = [h for h in result.history if h["step"] > epoch * self.steps_per_epoch]
        record = {"epoch": epoch, "AP": round(metrics["AP"], 4), "AP50": round(metrics["AP50"], 4),
                  "lambda": recent[-1]["lambda"]}
        for key in ("loss", "loss_detection", "loss_dsi", "loss_aux"):
            if key in recent[-1]:
                record[key] = round(statistics.fmean(h[key] for h in recent), 4)
        record.update(self.extra() if self.extra is not None else {})
        self.curve.append(record)
        print(f"[{self.label}] epoch {epoch}: AP {record['AP']:.4f} AP50 {record['AP50']:.4f} "
              f"loss {record['loss']:.3f} ({time.perf_counter() - self.started:.0f} s)", file=sys.stderr, flush=True)


def run_all(fn: Callable[[Any], Any], tasks: Sequence[Any], jobs: int, log_path: str | os.PathLike,
            key: Callable[[Any], str] = repr, resume: bool = False, salt: str = "") -> list[Any]:
    """``[fn(task) for task in tasks]``, ``jobs`` at a time in spawned processes (``jobs`` 1: in this
    one). Each result is appended to ``log_path`` (JSON lines: ``key``, ``fingerprint``, ``result``)
    as it arrives, so an interrupted benchmark keeps the runs it finished; with ``resume`` a task
    whose key and fingerprint (a hash of ``salt`` and the task's repr: settings, row, seed,
    teacher, threads) are in the log is taken from it instead of run again (runs are deterministic: a rerun would give
    the same result), so more seeds or rows can be added to a finished benchmark."""
    log_path = Path(log_path)
    done: dict[tuple[str, str], Any] = {}
    if resume and log_path.is_file():
        for line in log_path.read_text().splitlines():
            entry = json.loads(line)
            done[(entry["key"], entry["fingerprint"])] = entry["result"]
    elif not resume:
        log_path.unlink(missing_ok=True)
    ids = [(key(task), hashlib.sha256((salt + repr(task)).encode()).hexdigest()[:16]) for task in tasks]
    results: list[Any] = [done.get(i) for i in ids]
    todo = [n for n, r in enumerate(results) if r is None]

    def keep(n: int, result: Any) -> None:
        with open(log_path, "a") as f:
            f.write(json.dumps({"key": ids[n][0], "fingerprint": ids[n][1], "result": result}) + "\n")
        results[n] = result

    if jobs <= 1:
        for n in todo:
            keep(n, fn(tasks[n]))
        return results
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(fn, tasks[n]): n for n in todo}
        for future in as_completed(futures):
            keep(futures[future], future.result())
    return results


def _std(values: Sequence[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def paired_difference(values: dict[int, float], reference: dict[int, float]) -> dict[str, Any] | None:
    """``values - reference`` over the seeds both have: mean, std, the 95% t-interval of the mean
    (t with n - 1 degrees of freedom over the per-seed differences) and where it lies (above,
    below or around zero), how many seeds are better, and the two-sided p-value of the paired
    t-test. None with fewer than 2 common seeds."""
    seeds = sorted(set(values) & set(reference))
    if len(seeds) < 2:
        return None
    diffs = [values[s] - reference[s] for s in seeds]
    n = len(diffs)
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    p = float(stats.ttest_1samp(diffs, 0.0).pvalue) if sd > 0 else (1.0 if mean == 0 else 0.0)
    low, high = mean - half, mean + half
    # Where the interval lies: a difference is resolved only when it excludes zero.
    interval = "above zero" if low > 0 else ("below zero" if high < 0 else "contains zero")
    return {"seeds": seeds, "mean": round(mean, 4), "std": round(sd, 4), "ci95": [round(low, 4), round(high, 4)],
            "interval": interval, "better": sum(d > 0 for d in diffs), "p": round(p, 4),
            "per_seed": [round(d, 4) for d in diffs]}


def row_summary(name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One table row from its runs (one per seed)."""
    runs = sorted(runs, key=lambda r: r["seed"])
    ap = [r["ap"] for r in runs]
    ap50 = [r["ap50"] for r in runs]
    std, std50 = _std(ap), _std(ap50)
    epochs = len(runs[0]["epochs"])
    curve = [statistics.fmean(r["epochs"][e]["AP"] for r in runs) for e in range(epochs)]
    return {"name": name, "seeds": [r["seed"] for r in runs],
            "ap_mean": round(statistics.fmean(ap), 4), "ap_std": round(std, 4) if std is not None else None,
            "ap50_mean": round(statistics.fmean(ap50), 4), "ap50_std": round(std50, 4) if std50 is not None else None,
            "ap_per_seed": [round(v, 4) for v in ap], "ap50_per_seed": [round(v, 4) for v in ap50],
            "ap_curve_mean": [round(v, 4) for v in curve],
            "wall_s": round(sum(r["wall_s"] for r in runs), 1),
            "wall_s_per_seed": round(statistics.fmean(r["wall_s"] for r in runs), 1),
            "img_s": round(statistics.fmean(r["img_s"] for r in runs), 2)}


def plot_curves(rows: dict[str, list[dict[str, Any]]], path: str | os.PathLike, title: str) -> None:
    """Per-epoch val AP of every row: the mean over seeds, with a band of +- one std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name, runs in rows.items():
        epochs = [e["epoch"] + 1 for e in runs[0]["epochs"]]
        per_epoch = [[r["epochs"][i]["AP"] for r in runs] for i in range(len(epochs))]
        mean = [statistics.fmean(v) for v in per_epoch]
        std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in per_epoch]
        line, = ax.plot(epochs, mean, "o-", ms=3, label=f"{name} ({mean[-1]:.3f})")
        ax.fill_between(epochs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=line.get_color(), alpha=0.12)
    ax.set_xlabel("epoch")
    ax.set_ylabel("val AP (mean over seeds, band: +- std)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def log_runs(tracking_uri: str, experiment: str, parent_name: str, params: dict[str, Any],
             runs: list[dict[str, Any]], document: dict[str, Any], artifacts: Sequence[str]) -> str:
    """An MLflow parent run (params, the summary JSON, ``artifacts`` such as the plot) with one
    child run per (row, seed): its per-epoch metrics and final AP. Returns the parent's run id."""
    # Here, not at the top: the per-run worker processes import this module and never log.
    from mlflow.tracking import MlflowClient

    from distillery.platform.tracking.runs import MetricsLogger, create_run

    parent = create_run(tracking_uri, experiment, parent_name, {k: str(v) for k, v in params.items()})
    client = MlflowClient(tracking_uri)
    for run in runs:
        child = create_run(tracking_uri, experiment, f"{run['row']}/seed{run['seed']}",
                           {"row": run["row"], "seed": str(run["seed"]),
                            **{k: str(v) for k, v in run.get("params", {}).items()}},
                           parent_run_id=parent)
        logger = MetricsLogger(tracking_uri, child, flush_every=1000)
        for e in run["epochs"]:
            logger.log({k: v for k, v in e.items() if k != "epoch" and isinstance(v, (int, float))}, step=e["epoch"])
        logger.log({"final/AP": run["ap"], "final/AP50": run["ap50"], "wall_s": run["wall_s"],
                    "img_s": run["img_s"]}, step=len(run["epochs"]))
        logger.flush()
        client.set_terminated(child)
    with tempfile.TemporaryDirectory() as tmp:
        summary = Path(tmp) / f"{parent_name}.json"
        summary.write_text(json.dumps(document, indent=1))
        client.log_artifact(parent, str(summary))
    for path in artifacts:
        client.log_artifact(parent, path, "plots")
    for row in document.get("rows", []):
        if row.get("ap_mean") is not None:
            client.log_metric(parent, f"{row['name']}/AP_mean", row["ap_mean"])
    client.set_terminated(parent)
    return parent


def _interval(diff: dict[str, Any] | None) -> str:
    if not diff:
        return "-"
    low, high = diff["ci95"]
    return f"{diff['mean']:+.3f} [{low:+.3f}, {high:+.3f}] ({diff['better']}/{len(diff['seeds'])})"


def markdown_table(document: dict[str, Any]) -> str:
    """A benchmark document's rows as the README's table: AP and AP50 mean +- std, the paired
    differences (mean [95% interval] (seeds better)) to the reference rows, and the speed."""
    rows = document["rows"]
    refs = [k for k in ("vs_baseline", "vs_online", "vs_dense") if any(r.get(k) for r in rows)]
    head = ["row", "AP", "AP50", *(f"{k.replace('_', ' ')}" for k in refs), "img/s", "wall s / seed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        std = lambda v: f" ± {v:.3f}" if v is not None else ""  # noqa: E731
        cells = [r["name"], f"{r['ap_mean']:.3f}{std(r['ap_std'])}", f"{r['ap50_mean']:.3f}{std(r.get('ap50_std'))}",
                 *(_interval(r.get(k)) for k in refs), f"{r['img_s']:.1f}", f"{r['wall_s_per_seed']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    # python benchmarks/paired.py FILE.json: the document's table, as the README shows it
    print(markdown_table(json.loads(Path(sys.argv[1]).read_text())))
