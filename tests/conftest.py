"""Shared fixtures: tiny exported decoders and device profiles written on the fly."""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))  # tests/models.py and friends


@pytest.fixture(autouse=True)
def _isolated_llc_state(tmp_path_factory, monkeypatch):
    """Each test session gets its own build secret (and never touches ~/.config)."""
    root = tmp_path_factory.getbasetemp()
    monkeypatch.setenv("LLC_SECRET_FILE", str(root / "build-secret"))


@pytest.fixture(scope="module")
def model() -> Path:
    """The tiny random llama that most runtime tests split; a module may define its own ``model``."""
    from models import tiny_llama

    return tiny_llama()


@pytest.fixture(scope="module")
def reference(model):
    """``model`` unsplit in one onnxruntime session: what every split run must equal."""
    from helpers import Reference

    return Reference(model)


def write_profile(path: Path, n: int, *, memory_mb=2000, gflops=8.0, target="local",
                  base_port=None, **workload) -> Path:
    """A profile of ``n`` local devices; per-device lists are allowed for memory and speed."""
    mem = memory_mb if isinstance(memory_mb, list) else [memory_mb] * n
    speed = gflops if isinstance(gflops, list) else [gflops] * n
    doc = {
        "devices": [{"name": f"dev{i}", "target": target, "memory_mb": mem[i], "gflops": speed[i],
                     "threads": 1} for i in range(n)],
        "network": {"bandwidth_mbps": 1000, "latency_ms": 0.1,
                    **({"base_port": base_port} if base_port else {})},
        "workload": {"prompt_tokens": 16, "max_context": 128, **workload},
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


LAB_LOCK = Path("/tmp/llc-lab-tests.lock")
MACHINE_LOCK = Path("/tmp/llc-tests-machine.lock")


_held: list = []  # this process's (lock file, mode) while it holds the machine lock


@contextlib.contextmanager
def machine_lock(exclusive: bool):
    """Shared by every test; exclusive for a measurement that compares speeds.

    Test sessions on one machine (CI and a developer, the suite run twice) run
    side by side, but a test that measures how fast an emulated phone is waits
    until no other test runs, and none starts while it measures: their work
    would land on the phones' cores and skew the ratio it asserts.
    """
    if _held:  # within a test's lock (a fixture that measures): convert this process's lock, then back
        lock, mode = _held[-1]
        fcntl.flock(lock, fcntl.LOCK_EX if exclusive else mode)
        try:
            yield
        finally:
            fcntl.flock(lock, mode)
        return
    with open(MACHINE_LOCK, "a") as lock:
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        fcntl.flock(lock, mode)
        _held.append((lock, mode))
        try:
            yield
        finally:
            _held.pop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Each test holds the machine lock from its setup to its teardown, module fixtures included (a
    module's first test sets them up: an autouse fixture would take the lock only after them)."""
    with machine_lock(exclusive=item.get_closest_marker("alone") is not None):
        yield


@contextlib.contextmanager
def lab_up(state_dir: Path, specs, *, name: str, subnet: str, adb_port: int):
    """A phone lab for one test module, held under a machine-wide lock.

    A lab owns cores (cpusets), bridges and cgroups of this machine, so two test
    sessions at once (CI and a developer, or the suite run twice) take turns
    rather than measure each other's phones. Fails, never skips, without root.
    """
    from llc.lab.phones import Lab, LabError

    if os.geteuid() != 0:
        pytest.fail("the phone lab tests need root (namespaces, tc, cgroups)")
    with open(LAB_LOCK, "a") as lock:
        # Released when the file closes, even if this process dies. Never wait for it holding the machine
        # lock: another session's lab test may hold the lab lock and wait for the machine lock (deadlock,
        # seen with two suites at once). So the lab lock comes first, the machine lock after it.
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held = _held[-1] if _held else None
            if held is not None:
                fcntl.flock(held[0], fcntl.LOCK_UN)
            fcntl.flock(lock, fcntl.LOCK_EX)
            if held is not None:
                fcntl.flock(held[0], held[1])
        the_lab = Lab(state_dir, adb_port=adb_port, name=name, subnet=subnet)
        try:
            the_lab.down()  # sweep whatever a crashed earlier run left
            the_lab.up(specs)
        except LabError as e:
            pytest.fail(f"lab up failed: {e}")
        try:
            yield the_lab
        finally:
            the_lab.down()
