"""The README's day, command by command as a user types it, in a fresh copy of the repository.

The commands are read from README.md (the ```bash block after the marker
``<!-- the day, as tests/test_readme_day.py runs it -->``), so a README change changes this test.
Each line runs through ``bash`` in the copy, in order, with the environment the previous lines
exported. Three departures from typing, all about sharing the CI machine, none about the jobs:

- ``ray start``: runs with ``--block`` in a process group of its own, on free ports and a temp dir
  of its own (the test session's own Ray instance may hold the default ports); the address the
  README exports is rewritten to that dashboard port;
- ``ray stop`` would stop every Ray instance of the user on the machine: the test ends exactly
  its own head instead;
- ``<parent run id>`` is replaced by the id the previous command printed, as a user would.

The shell has canary AWS credentials (the cluster inherits them, as the README says): afterwards
every file of the cluster's temp dir (session logs), the copy's ``runs/`` (dataset, cache,
checkpoints, MLflow store and artifacts), the home directory and all console output are searched
for them: zero hits.

Token authentication is on (``RAY_AUTH_MODE=token``, as Ray 2.60 does by default): a client
without the token is turned away. The submitted distillation job's log carries rank 0's progress
and epoch-summary lines once each and ends with its summary, whose MLflow run is FINISHED.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import free_port, wait_for_http
from distillery.platform.config.distill import DistillConfig
from distillery.platform.config.sections import load_config
from test_secrets import canary_credentials, files_containing

REPO = Path(__file__).resolve().parent.parent
MARKER = "<!-- the day, as tests/test_readme_day.py runs it -->"
DEFAULT_DASHBOARD = "127.0.0.1:8265"
PLACEHOLDERS = {"<parent run id>": r"MLflow parent run: (\w+)"}
DISTILL_SUBMIT = "ray job submit --working-dir . -- python jobs/distill.py"


def readme_day_commands(readme: str) -> list[str]:
    """The lines of the ```bash block that follows MARKER (blank lines and comments dropped)."""
    after = readme.split(MARKER, 1)
    assert len(after) == 2, f"README.md lost the marker {MARKER!r} of the day this test runs"
    block = re.search(r"```bash\n(.*?)```", after[1], re.S)
    assert block, "no ```bash block after the day marker"
    return [line.strip() for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


def fresh_copy(dst: Path) -> Path:
    """The repository as a fresh clone would have it: tracked and new files, nothing git ignores."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    return dst


def exported(line: str, env: dict[str, str], cwd: Path) -> dict[str, str]:
    """The environment after ``line`` (an ``export``) ran in a shell with ``env``."""
    out = subprocess.run(["bash", "-c", f"{line}\nenv -0"], env=env, cwd=cwd, capture_output=True, check=True)
    return dict(item.split("=", 1) for item in out.stdout.decode().split("\0") if "=" in item)


class Head:
    """`ray start --head ... --block` in a process group of its own, on ports and a temp dir of its own."""

    def __init__(self, line: str, env: dict[str, str], cwd: Path, log: Path):
        self.ports = {flag: free_port() for flag in (
            "port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
            "runtime-env-agent-port", "metrics-export-port", "ray-client-server-port")}
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rday-", dir="/tmp"))  # short: socket paths are length-limited
        extra = " ".join(f"--{flag}={port}" for flag, port in self.ports.items())
        self.log = open(log, "w")
        self.proc = subprocess.Popen(["bash", "-c", f"exec {line} --block {extra} --temp-dir={self.temp_dir}"],
                                     env=env, cwd=cwd, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.address = f"127.0.0.1:{self.ports['dashboard-port']}"
        wait_for_http(f"http://{self.address}", timeout=120, proc=self.proc)

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 30)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        self.log.close()


def assert_clients_need_the_token(head: Head, env: dict[str, str], elsewhere: Path) -> None:
    """A client with neither RAY_AUTH_TOKEN(_PATH) nor ~/.ray/auth_token is refused by the head."""
    no_token = {k: v for k, v in env.items() if k not in ("RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN")}
    no_token["HOME"] = str(elsewhere)
    denied = subprocess.run(["ray", "job", "list", "--address", f"http://{head.address}"], env=no_token,
                            capture_output=True, text=True, timeout=120)
    assert denied.returncode != 0, denied.stdout + denied.stderr


def assert_distill_job_log(output: str, epochs: int) -> dict:
    """Rank 0's progress and epoch-summary lines reach the submitted job's log once each; the
    job's summary (its last JSON line) names a checkpoint and a FINISHED MLflow run."""
    from mlflow.tracking import MlflowClient

    assert re.search(rf"\[train\] epoch 1/{epochs} step 1/\d+ \| loss [\d.]+ \(mal ", output), output[-4000:]
    for epoch in range(1, epochs + 1):
        assert output.count(f"[train] epoch {epoch}/{epochs} done in ") == 1, output[-4000:]
    summary = json.loads([line for line in output.splitlines() if line.startswith('{"run_id"')][-1])
    assert Path(summary["best_checkpoint"], "distillery_state.json").is_file()
    run = MlflowClient(summary["tracking_uri"]).get_run(summary["run_id"])
    assert run.info.status == "FINISHED" and "epoch/AP" in run.data.metrics
    return summary


def run_line(line: str, env: dict[str, str], cwd: Path, timeout: float) -> str:
    """Run one typed line; a `ray job submit` is retried while the new head's job agent registers."""
    deadline = time.time() + 120
    while True:
        done = subprocess.run(["bash", "-c", line], env=env, cwd=cwd, capture_output=True, text=True,
                              timeout=timeout)
        output = done.stdout + done.stderr
        if "No available agent" in output and time.time() < deadline:
            time.sleep(2)
            continue
        assert done.returncode == 0, f"$ {line}\n{output[-6000:]}"
        return output


@pytest.mark.slow
def test_the_readme_day_runs_as_typed(tmp_path):
    commands = readme_day_commands((REPO / "README.md").read_text())
    assert any(c.startswith("ray start") for c in commands) and commands[-1] == "ray stop"
    work = fresh_copy(tmp_path / "distillery")
    canaries = canary_credentials()
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "MLFLOW_", "AWS_", "DISTILLERY_"))}
    env.update(canaries, HOME=str(home), AWS_DEFAULT_REGION="us-east-1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    head, outputs, last, distill_log = None, [], "", ""
    try:
        for line in commands:
            if head is not None:
                line = line.replace(DEFAULT_DASHBOARD, head.address)
            for placeholder, pattern in PLACEHOLDERS.items():
                if placeholder in line:
                    found = re.search(pattern, last)
                    assert found, f"{placeholder} not printed by the previous command:\n{last[-3000:]}"
                    line = line.replace(placeholder, found.group(1))
            if line.startswith("export "):
                env = exported(line, env, work)
            elif line.startswith("ray start"):
                head = Head(line, env, work, tmp_path / "ray_head.log")
                assert_clients_need_the_token(head, env, tmp_path)
            elif line == "ray stop":
                head.stop()
            else:
                last = run_line(line, env, work, timeout=600)
                outputs.append(f"$ {line}\n{last}")
                if line.startswith(DISTILL_SUBMIT):
                    distill_log = last
        console = "\n".join(outputs)
        (tmp_path / "console.txt").write_text(console)

        # Everything landed under DISTILLERY_HOME (the copy), none of it in Ray's temporary copy.
        runs = work / "runs"
        assert (runs / "mlflow.db").is_file(), console[-3000:]
        assert any(runs.glob("cache/**/manifest.json")), "no feature cache under runs/"
        assert "champion" in last or "challenger" in last, last
        assert not any(head.temp_dir.glob("session_*/runtime_resources/working_dir_files/*/runs"))
        assert distill_log, f"the day has no line starting {DISTILL_SUBMIT!r}"
        epochs = load_config(DistillConfig, work / "configs" / "distill_tiny.yaml").train.epochs
        distill = assert_distill_job_log(distill_log, epochs)
        assert Path(distill["run_storage"]).is_relative_to(runs)

        hits = files_containing([head.temp_dir, runs, home, tmp_path / "console.txt"], list(canaries.values()))
        assert not hits, f"credentials found in: {hits}"
    finally:
        if head is not None:
            head.stop()
            shutil.rmtree(head.temp_dir, ignore_errors=True)
