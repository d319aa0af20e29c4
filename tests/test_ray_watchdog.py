"""The local-cluster watchdog: a SIGKILLed driver's Ray agents are gone within seconds, not ~100 s.

Stand-ins, no Ray: a "raylet" process with two children (its "agents"), and a "driver" that
starts the watchdog on it the way ``ray_session`` does, holding the write end of its pipe. The
driver is SIGKILLed; the agents must die soon after, and the raylet stand-in is left alone (the
real raylet dies with the driver by Ray's own parent-death signal).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
SLEEPER = "import time; time.sleep(300)"


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_for(predicate, timeout: float) -> float:
    start = time.time()
    while not predicate():
        assert time.time() - start < timeout, "timed out"
        time.sleep(0.1)
    return time.time() - start


def test_killed_drivers_agents_end_within_seconds():
    raylet = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time\n"
                               f"kids = [subprocess.Popen([sys.executable, '-c', {SLEEPER!r}]) for _ in range(2)]\n"
                               "time.sleep(300)"])
    driver, agents = None, []
    try:
        _wait_for(lambda: len(psutil.Process(raylet.pid).children()) == 2, timeout=30)
        agents = [c.pid for c in psutil.Process(raylet.pid).children()]
        driver = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time\n"
                                   "w = subprocess.Popen([sys.executable, '-m', 'distillery.platform.cluster.watchdog', "
                                   f"'{raylet.pid}'], stdin=subprocess.PIPE, start_new_session=True)\n"
                                   "print(w.pid, flush=True)\n"
                                   "time.sleep(300)"], cwd=REPO, stdout=subprocess.PIPE, text=True)
        watchdog = int(driver.stdout.readline())
        # The watchdog has looked at the raylet's children at least once (it polls every second).
        _wait_for(lambda: psutil.Process(watchdog).cpu_times().user > 0 and time.sleep(1.5) is None, timeout=30)
        driver.kill()
        driver.wait()
        took = _wait_for(lambda: not any(_alive(pid) for pid in agents), timeout=10)
        assert took < 5
        assert _alive(raylet.pid)  # only the raylet's children are the watchdog's business
        _wait_for(lambda: not _alive(watchdog), timeout=10)
    finally:
        for pid in agents:  # (if the watchdog failed)
            if _alive(pid):
                psutil.Process(pid).kill()
        for proc in (driver, raylet):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
