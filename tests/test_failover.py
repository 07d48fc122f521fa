"""Failover: a device lost mid-generation is planned around, and every request ends with the tokens
an uninterrupted run gives (the unsplit model's greedy tokens)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import compiled_build
from llc.errors import DeviceError
from llc.runtime.device.sampling import SamplingParams
from llc.runtime.run import generate

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [[1, 5, 6, 7], [1, 9, 10], [1, 20, 21, 22, 23], [1, 40]]


def pid_of(build: Path, device: str) -> int:
    return int((build / "run" / f"{device}.pid").read_text())


def killer(build: Path, device: str, after_tokens: int):
    """An on_token callback that SIGKILLs ``device`` once ``after_tokens`` tokens have arrived."""
    seen = []

    def on_token(r, token, done):
        seen.append(token)
        if len(seen) == after_tokens:
            os.kill(pid_of(build, device), signal.SIGKILL)

    return on_token


def test_a_killed_device_loses_none_of_four_requests_in_flight(model, reference, tmp_path):
    build = compiled_build(model, tmp_path / "build", 3, eos_token_ids=[], requests=4, max_context=128)
    out = generate(build, PROMPTS, SamplingParams(max_new_tokens=40), 4, killer(build, "dev1", 12),
                   target_name="local", timeout=30)
    (f,) = out.failovers
    assert (f.device, f.devices_left, f.resumed) == ("dev1", ("dev0", "dev2"), 4)
    assert "killed by signal 9" in f.reason and f.lost_s is not None and f.lost_s < 30
    assert out.build == build / "failover" / "1"
    assert [s.device for s in out.stats] == ["dev0", "dev2"]
    for prompt, r in zip(PROMPTS, out.results):
        assert r.tokens == reference.greedy(prompt, 40), prompt  # nothing lost, nothing repeated
    assert all(r.finished is not None for r in out.results)


def test_a_loss_the_others_cannot_hold_is_one_clear_error(model, tmp_path):
    """Two devices that each hold half the model: after one is lost, the model fits nowhere."""
    build = compiled_build(model, tmp_path / "build", 2, eos_token_ids=[], requests=1, max_context=64,
                           memory_mb=0.7, runtime_overhead_mb=0, memory_safety=1.0)
    with pytest.raises(DeviceError, match=r"device 'dev0': lost, and the model cannot be re-planned over dev1: "):
        generate(build, PROMPTS[:1], SamplingParams(max_new_tokens=40), 1, killer(build, "dev0", 5),
                 target_name="local", timeout=30)


@pytest.mark.parametrize("how", ["kill", "hang"])
def test_llc_run_goes_on_after_a_device_is_killed_or_hangs(model, reference, tmp_path, how):
    build = compiled_build(model, tmp_path / "build", 3, eos_token_ids=[], max_context=1024, prompt_tokens=16)
    result = tmp_path / "run.json"
    proc = subprocess.Popen([sys.executable, "-m", "llc.runtime.run", str(build), "--prompt", "w5 w6 w7",
                             "--max-new-tokens", "600", "--json", str(result)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while not proc.stdout.read1(4096):  # streaming: the generation is under way
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
        os.kill(pid_of(build, "dev1"), signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        if how == "hang":
            try:
                os.kill(pid_of(build, "dev1"), signal.SIGKILL)
            except (FileNotFoundError, ProcessLookupError):
                pass
    err = err.decode()
    assert proc.returncode == 0, err
    assert "device dev1 lost (" + ("process" if how == "kill" else "no answer to ping") in err, err
    doc = json.loads(result.read_text())
    (f,) = doc["summary"]["failovers"]
    assert f["device"] == "dev1" and f["devices_left"] == ["dev0", "dev2"]
    (r,) = doc["results"]
    assert r["tokens"] == reference.greedy(r["prompt_ids"], 600)
