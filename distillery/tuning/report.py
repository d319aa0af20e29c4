"""After a sweep: the results table, the plots, and the parent MLflow run's closing entries."""

from __future__ import annotations

import csv
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from distillery.platform.tracking.runs import child_runs, finish_sweep_runs

__all__ = ["finish_sweep", "plot_sweep", "results_table"]

log = logging.getLogger(__name__)

_METRICS = ("AP", "AP50", "AP75", "lambda", "aifi_ratio", "training_iteration")


def results_table(results, children: list[Any], space_keys: list[str], epochs: int) -> list[dict[str, Any]]:
    """One row per trial: its sampled values, last and best metrics, status and MLflow run id."""
    run_of_trial = {}
    for run in children:
        trial_id = run.data.tags.get("distillery.trial_id")
        if trial_id and (trial_id not in run_of_trial or run.info.status == "FINISHED"):
            run_of_trial[trial_id] = run
    rows = []
    for result in results:
        m = result.metrics or {}
        trial_id = m.get("trial_id") or Path(result.path).name
        run = run_of_trial.get(trial_id)
        row: dict[str, Any] = {"trial_id": trial_id, "run_id": run.info.run_id if run else "",
                               "status": "ERROR" if result.error else ("STOPPED" if m.get("training_iteration", 0) < epochs else "DONE")}
        config = result.config or {}
        for key in space_keys:
            row[key] = config.get(key)
        if "gam.delta_fraction" in config and "gam.rho" in config:
            row["gam.delta"] = config["gam.delta_fraction"] * config["gam.rho"]
        for key in _METRICS:
            row[key] = m.get(key)
        # The score of the model the run exported (its best checkpoint); Tune's own history also
        # holds reports of attempts cut short by an interruption, so it is only the fallback.
        history = result.metrics_dataframe
        tune_best = float(history["AP"].max()) if history is not None and "AP" in history else m.get("AP")
        row["best_AP"] = run.data.metrics.get("best/AP", tune_best) if run else tune_best
        rows.append(row)
    rows.sort(key=lambda r: -_num(r["best_AP"]))
    return rows


def _num(value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return -math.inf
    return v if v == v else -math.inf


def plot_sweep(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """AP against each swept value, AP vs rho/delta, AP vs granularity, parallel coordinates."""
    # matplotlib (and its backend choice) loads only in the process that draws a sweep's plots.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    keys = [k for k in rows[0] if "." in k and any(_num(r[k]) > -math.inf for r in rows)] if rows else []
    ap = [_num(r["best_AP"]) for r in rows]
    if "gam.rho" in keys and "gam.delta" in keys:
        fig, ax = plt.subplots(figsize=(5, 4))
        sc = ax.scatter([r["gam.rho"] for r in rows], [r["gam.delta"] for r in rows], c=ap, cmap="viridis", s=60)
        fig.colorbar(sc, label="best val AP")
        ax.set(xlabel="GAM rho", ylabel="GAM delta", title="val AP over the GAM band")
        paths.append(_save(fig, out / "ap_vs_rho_delta.png"))
    for key in keys:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.scatter([_num(r[key]) for r in rows], ap, s=40)
        ax.set(xlabel=key, ylabel="best val AP", title=f"val AP vs {key}")
        if key.endswith("granularity"):
            ax.set_xticks(sorted({int(_num(r[key])) for r in rows}))
        paths.append(_save(fig, out / f"ap_vs_{key.replace('.', '_')}.png"))
    if keys:
        cols = keys + ["best_AP"]
        fig, ax = plt.subplots(figsize=(1.8 * len(cols) + 2, 4))
        lo = {c: min(_num(r[c]) for r in rows) for c in cols}
        hi = {c: max(_num(r[c]) for r in rows) for c in cols}
        cmap = plt.get_cmap("viridis")
        best, worst = max(ap), min(ap)
        for r, a in zip(rows, ap):
            ys = [(_num(r[c]) - lo[c]) / ((hi[c] - lo[c]) or 1.0) for c in cols]
            ax.plot(range(len(cols)), ys, color=cmap((a - worst) / ((best - worst) or 1.0)), marker="o")
        ax.set_xticks(range(len(cols)), cols, rotation=20)
        ax.set(ylabel="normalised value", title="parallel coordinates (colour: best val AP)")
        paths.append(_save(fig, out / "parallel_coordinates.png"))
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def finish_sweep(cfg, results, state: dict[str, Any], tracking_uri: str, sweep_path: str, epochs: int
                 ) -> dict[str, Any]:
    """Close stopped trials' runs, log the table and plots to the parent run, mark it finished."""
    parent = state["parent_run_id"]
    client = MlflowClient(tracking_uri)
    finish_sweep_runs(tracking_uri, parent, "KILLED", reason=f"stopped early by the {cfg.sweep.scheduler.type} scheduler")
    trials = [r for r in child_runs(tracking_uri, parent) if r.data.tags.get("distillery.sweep_role") == "trial"]
    space_keys = sorted(set(cfg.sweep.space) | ({"gam.rho", "gam.delta_fraction"} if cfg.sweep.gam == "auto" else set()))
    rows = results_table(results, trials, space_keys, epochs)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        table = tmp / "results.csv"
        columns = list(rows[0]) if rows else ["trial_id"]
        with table.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        client.log_artifact(parent, str(table))
        for path in plot_sweep(rows, tmp / "plots"):
            client.log_artifact(parent, str(path), "plots")
    best = rows[0] if rows and _num(rows[0]["best_AP"]) > -math.inf else None
    if best:
        client.log_metric(parent, "best_AP", float(best["best_AP"]))
        client.set_tag(parent, "distillery.best_run_id", best["run_id"])
        client.set_tag(parent, "distillery.best_trial_id", best["trial_id"])
    if state.get("calibration"):
        client.log_metric(parent, "calibration/aifi_share", state["calibration"]["aifi_share"])
    client.set_terminated(parent, "FINISHED")
    log.info("sweep %s: %d trials, best %s", sweep_path, len(rows), best)
    return {"sweep_path": sweep_path, "parent_run_id": parent, "sweep_id": state["sweep_id"],
            "tracking_uri": tracking_uri, "experiment": cfg.tracking.experiment, "trials": rows,
            "best": best, "calibration": state.get("calibration"), "interrupted": False}
