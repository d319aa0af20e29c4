"""Ends a local Ray instance's agents as soon as the driver that started it dies.

Run as ``python -m distillery.platform.cluster.watchdog RAYLET_PID`` with a pipe from the driver on
stdin. The driver's GCS and raylet die with it (Ray binds them to the driver with the kernel's
parent-death signal), but the raylet's dashboard and runtime-env agents then try to report the
raylet's death to the dead GCS with a fixed 60 s timeout, and linger that long (about 100 s on a
loaded machine). This process remembers the raylet's children while the driver lives; when the
pipe closes (the driver exited or was killed) it kills those that are still running. It imports
nothing of Ray, so it starts in a fraction of a second.
"""

from __future__ import annotations

import os
import select
import signal
import sys

import psutil

POLL_S = 1.0


def _children(pid: int) -> dict[int, float]:
    """{pid: start time} of the children of ``pid`` (the start time guards against pid reuse)."""
    try:
        return {c.pid: c.create_time() for c in psutil.Process(pid).children()}
    except psutil.Error:
        return {}


def watch(raylet_pid: int, driver_pipe=sys.stdin) -> int:
    """Track ``raylet_pid``'s children until ``driver_pipe`` reaches EOF; then kill them. Returns how many."""
    seen: dict[int, float] = {}
    while True:
        seen.update(_children(raylet_pid))
        ready, _, _ = select.select([driver_pipe], [], [], POLL_S)
        if ready and not os.read(driver_pipe.fileno(), 4096):
            break
    killed = 0
    for pid, started in seen.items():
        try:
            if psutil.Process(pid).create_time() == started:
                os.kill(pid, signal.SIGKILL)
                killed += 1
        except (psutil.Error, ProcessLookupError):
            pass
    return killed


if __name__ == "__main__":
    watch(int(sys.argv[1]))
