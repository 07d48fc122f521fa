"""Run every device of a build as a process on this machine.

Used by `llc run` for local profiles and by the tests. Each launcher gets its
own process group (so a stop also takes whatever it spawned), its log goes to
build/run/<device>.log and its pid to build/run/<device>.pid. Processes are
stopped on ``stop()``, at interpreter exit (atexit), and by the launcher itself
when its parent disappears (LLC_WATCH_PARENT), so even a SIGKILLed `llc run`
leaves nothing behind.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from llc.runtime.coordinator import DeviceFailure, wait_ready
from llc.targets.base import TargetError


class LocalTarget:
    name = "local"

    def __init__(self, ready_timeout: float = 60.0, stop_timeout: float = 3.0, python: str = sys.executable):
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.python = python  # the interpreter run.sh execs: it must have numpy, onnxruntime, pyzmq
        self.procs: dict[str, subprocess.Popen] = {}
        self.run_dir: Path | None = None

    def start(self, build_dir: Path, devices: list[str]) -> None:
        build_dir = Path(build_dir)
        self.run_dir = build_dir / "run"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atexit.register(self.stop)
        env = dict(os.environ, PYTHON=self.python, LLC_WATCH_PARENT="1", PYTHONUNBUFFERED="1")
        try:
            for device in devices:
                folder = build_dir / "devices" / device
                if not (folder / "run.sh").is_file():
                    raise TargetError(device, f"no bundle at {folder} (run.sh missing)")
                with open(self.run_dir / f"{device}.log", "wb") as log:
                    proc = subprocess.Popen(["sh", "run.sh"], cwd=folder, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
                self.procs[device] = proc
                (self.run_dir / f"{device}.pid").write_text(f"{proc.pid}\n")
            wait_ready(build_dir, devices, self.ready_timeout, health=self.health)
        except DeviceFailure as e:
            self.stop()
            raise TargetError(e.device, e.reason) from e
        except BaseException:
            self.stop()
            raise

    def health(self) -> dict[str, str]:
        dead = {}
        for device, proc in self.procs.items():
            code = proc.poll()
            if code is not None:
                how = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
                last = self._last_line(device)
                dead[device] = f"process {proc.pid} {how}" + (f" (last log line: {last})" if last else "")
        return dead

    def logs(self, device: str) -> str:
        if self.run_dir is None:
            return ""
        path = self.run_dir / f"{device}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _last_line(self, device: str) -> str:
        lines = [line for line in self.logs(device).splitlines() if line.strip()]
        return lines[-1].strip() if lines else ""

    def stop(self) -> None:
        """SIGTERM every process group, wait, then SIGKILL what is left."""
        alive = {d: p for d, p in self.procs.items() if p.poll() is None}
        for proc in alive.values():
            _signal_group(proc.pid, signal.SIGTERM)
            _signal_group(proc.pid, signal.SIGCONT)  # a stopped (SIGSTOP) process must see the TERM
        deadline = time.monotonic() + self.stop_timeout
        for proc in alive.values():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.procs.values():
            # Only groups whose leader is not yet reaped: a reaped pid may belong to someone else now.
            if proc.poll() is None:
                _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
        if self.run_dir is not None:
            for device in self.procs:
                (self.run_dir / f"{device}.pid").unlink(missing_ok=True)
        self.procs.clear()
        atexit.unregister(self.stop)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
