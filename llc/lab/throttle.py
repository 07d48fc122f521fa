"""Slow a local device down: stop its process (SIGSTOP) for (slow-1) ms of every ``slow`` ms.

    python -m llc.lab.throttle BUILD DEVICE [--slow 4]      (until SIGTERM or SIGINT)

A phone that heats up or shares its CPU runs slower than its profile; the
balancer's test and benchmark play that on local devices with this. It follows
the device across restarts (a balancing move or a failover starts a new process
and writes BUILD/**/run/DEVICE.pid): it reads the newest pid file every 50 ms,
and at once when the process it stops is gone.

It is a process of its own at real-time priority (SCHED_FIFO, as root), so that
neither a loaded machine nor the GIL of the process running the coordinator
stretches its sleeps: as a thread of the test, beside another process's load it
stopped the device so irregularly that the device looked no slower than the
others in one window of two, and the balancer moved nothing. It always resumes
the device before it exits, and never outlives the process that started it.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PERIOD_S = 0.004
LIFETIME_S = 600.0


def start(build: Path, device: str, slow: float) -> subprocess.Popen:
    """Throttle ``device`` of ``build`` from now on; stop it with :func:`stop`."""
    return subprocess.Popen([sys.executable, "-m", "llc.lab.throttle", str(build), device, "--slow", str(slow)])


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def newest_pid(build: Path, device: str) -> int | None:
    try:  # a pid file may go between the glob and the read: a restart under way
        files = sorted(build.glob(f"**/run/{device}.pid"), key=lambda p: p.stat().st_mtime)
        return int(files[-1].read_text()) if files else None
    except (OSError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("build", type=Path)
    ap.add_argument("device")
    ap.add_argument("--slow", type=float, default=4.0, help="times slower (stopped (slow-1)/slow of the time)")
    args = ap.parse_args(argv)
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    except (AttributeError, OSError) as e:
        print(f"throttle: no real-time priority ({e}); under load the device is stopped less evenly",
              file=sys.stderr)
    running = [True]
    signal.signal(signal.SIGTERM, lambda *_: running.clear())
    signal.signal(signal.SIGINT, lambda *_: running.clear())
    parent, deadline = os.getppid(), time.monotonic() + LIFETIME_S
    pid, looked = None, 0.0
    while running and os.getppid() == parent and time.monotonic() < deadline:
        if time.monotonic() - looked > 0.05:  # a restart writes a new pid file
            looked = time.monotonic()
            pid = newest_pid(args.build, args.device) or pid
        if pid is not None:
            try:
                os.kill(pid, signal.SIGSTOP)
            except OSError:  # gone: a restart under way; look for the new process at once
                pid, looked = None, 0.0
            else:
                time.sleep(PERIOD_S * (args.slow - 1) / args.slow)  # (a signal here still resumes it below)
                try:
                    os.kill(pid, signal.SIGCONT)
                except OSError:
                    pass
        time.sleep(PERIOD_S / args.slow)
    return 0


if __name__ == "__main__":
    sys.exit(main())
