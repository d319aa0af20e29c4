"""The configuration's way through the code, measured: from ``jobs/distill.py`` to the first checkpoint.

    python tools/config_walk.py [--repo PATH] [--json OUT]

Runs the distillation job on ``configs/distill_tiny.yaml`` (1 epoch, 1 worker, synthetic data,
no tracking server) of the checkout ``--repo`` (default: this one) and records every place where
the job's configuration is read: each read of a config field (any section, a ``StrictModel``
attribute, intercepted by a class-level ``__getattribute__`` in the driver and, through Ray's
``worker_process_setup_hook``, in the training worker) is attributed to the project function
(file, qualified name) that made it. A *stop* is a function's first read, in order: the driver's
stops up to the worker's first, then the worker's up to its first checkpoint
(``save_checkpoint_files``).
Printed as one JSON line:

- ``stops``: project functions that read the configuration, in first-read order;
- ``files``: the distinct files among them;
- ``returns``: how often the walk comes back to a file it had left (a stop in a file visited
  before, not the previous stop's file): how much a reader must jump back and forth.

Pass ``--repo`` to measure another checkout (e.g. ``git worktree add /tmp/old <commit>``) with the
same rule: the numbers compare commits, not methods.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _install_reader(repo: str, out_file: str, stop_at: str | None) -> None:
    """Record (time, file, qualname) of each first read of a config field by a project function,
    appended to ``out_file``; stop recording when a function named ``stop_at`` is called."""
    import threading

    from distillery.platform.config.sections import StrictModel

    roots = tuple(str(Path(repo) / d) + os.sep for d in ("distillery", "jobs"))
    seen: set[tuple[str, str]] = set()
    state = {"on": True}
    lock = threading.Lock()
    plain = object.__getattribute__

    def reading(self, name):
        value = plain(self, name)
        if state["on"] and not name.startswith("_") and name in type(self).model_fields:
            frame = sys._getframe(1)
            while frame is not None and not frame.f_code.co_filename.startswith(roots):
                frame = frame.f_back   # a helper outside the project (pydantic, the stdlib): its caller
            if frame is not None:
                key = (str(Path(frame.f_code.co_filename).relative_to(repo)), frame.f_code.co_qualname)
                with lock:
                    if key not in seen:
                        seen.add(key)
                        with open(out_file, "a") as fh:
                            fh.write(json.dumps([time.time(), *key]) + "\n")
        return value

    StrictModel.__getattribute__ = reading
    if stop_at is not None:
        def profile(frame, event, arg):
            if event == "call" and frame.f_code.co_name == stop_at:
                state["on"] = False

        sys.setprofile(profile)
        threading.setprofile(profile)


def _worker_hook() -> None:
    """Ray's worker_process_setup_hook: every worker process records into its own file."""
    out_dir = os.environ.get("CONFIG_WALK_DIR")
    if out_dir:
        _install_reader(os.environ["CONFIG_WALK_REPO"], os.path.join(out_dir, f"worker_{os.getpid()}.jsonl"),
                        stop_at="save_checkpoint_files")


def _read(path: Path) -> list[tuple[float, str, str]]:
    return [tuple(json.loads(line)) for line in path.read_text().splitlines()] if path.is_file() else []


def walk_numbers(stops: list[tuple[str, str]]) -> dict:
    files: list[str] = []
    returns = 0
    for i, (file, _) in enumerate(stops):
        if file in files and stops[i - 1][0] != file:
            returns += 1
        if file not in files:
            files.append(file)
    return {"stops": len(stops), "files": len(files), "returns": returns}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=REPO)
    parser.add_argument("--json", type=Path, help="also write the whole walk (every stop) here")
    args = parser.parse_args()
    repo = args.repo.resolve()
    sys.path.insert(0, str(repo))
    os.environ["PYTHONPATH"] = f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    import ray

    work = Path(tempfile.mkdtemp(prefix="config-walk-"))
    os.environ.update(CONFIG_WALK_DIR=str(work), CONFIG_WALK_REPO=str(repo))
    driver_file = work / "driver.jsonl"
    _install_reader(str(repo), str(driver_file), stop_at=None)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": _worker_hook,
                          "env_vars": {"CONFIG_WALK_DIR": str(work), "CONFIG_WALK_REPO": str(repo)}})
    sys.argv = ["jobs/distill.py", "--config", str(repo / "configs" / "distill_tiny.yaml"),
                f"data.root={work / 'data'}", f"cache.uri={work / 'cache'}", f"output.storage_path={work / 'train'}",
                f"output.local_dir={work / 'local'}", "output.name=walk", "train.epochs=1", "train.num_workers=1",
                "tracking.log_model=false"]
    sys.path.insert(0, str(repo / "jobs"))
    import importlib

    importlib.import_module("distill").main()
    ray.shutdown()

    # The training worker: the process whose walk is longest (the Ray Train controller reads little).
    worker = max((_read(w) for w in work.glob("worker_*.jsonl")), key=len, default=[])
    start = worker[0][0] if worker else float("inf")
    driver = [r for r in _read(driver_file) if r[0] < start]
    stops = [(f, q) for _, f, q in driver + worker]
    if not worker:
        raise SystemExit(f"no training worker's walk found under {work}")
    result = {"repo": str(repo), "driver_stops": len(driver), "worker_stops": len(worker), **walk_numbers(stops)}
    if args.json:
        args.json.write_text(json.dumps({**result, "walk": stops}, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
