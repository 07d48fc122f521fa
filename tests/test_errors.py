"""Bad input: one line naming the file and the problem, exit code 2, no traceback, no output."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_profile
from models import tiny_llama

GOOD_PROFILE = """\
devices:
  - name: a
    memory_mb: 2000
    gflops: 8
  - name: b
    memory_mb: 2000
    gflops: 8
"""


def llc(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ}
    env.pop("LLC_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "llc.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_clean_failure(r: subprocess.CompletedProcess, out: Path, *needles: str) -> None:
    lines = [ln for ln in r.stderr.splitlines() if not ln.startswith("llc: [")]  # progress lines
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))


@pytest.fixture
def model(tmp_path) -> Path:
    return tiny_llama("legacy")


@pytest.fixture
def profile(tmp_path) -> Path:
    p = tmp_path / "devices.yaml"
    p.write_text(GOOD_PROFILE)
    return p


def test_not_an_onnx_file(tmp_path, profile):
    bad = tmp_path / "model.onnx"
    bad.write_text("this is not a model\n" * 50)
    r = llc("compile", str(bad), "--devices", str(profile), "-o", "out", cwd=tmp_path)
    assert_clean_failure(r, tmp_path / "out", str(bad), "ONNX")


def test_truncated_onnx(tmp_path, profile, model):
    bad = tmp_path / "model.onnx"
    data = model.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    r = llc("compile", str(bad), "--devices", str(profile), "-o", "out", cwd=tmp_path)
    assert_clean_failure(r, tmp_path / "out", str(bad))


def test_missing_external_data(tmp_path, profile):
    src = tiny_llama("legacy", external_data=True)
    copy = tmp_path / "m" / "model.onnx"
    copy.parent.mkdir()
    shutil.copy(src, copy)  # the .data file is not copied
    r = llc("compile", str(copy), "--devices", str(profile), "-o", "out", cwd=tmp_path)
    assert_clean_failure(r, tmp_path / "out", str(copy), "external data", "not found")


def test_missing_model(tmp_path, profile):
    r = llc("compile", "nope.onnx", "--devices", str(profile), "-o", "out", cwd=tmp_path)
    assert_clean_failure(r, tmp_path / "out", "nope.onnx", "not found")


@pytest.mark.parametrize("text,needles", [
    ("devices:\n  - name: a\n    memory_mb: [1, 2\n", ["devices.yaml:", "YAML syntax error"]),
    (GOOD_PROFILE + "    memroy_mb: 5\n", ["devices.yaml:8", "memroy_mb", "unknown key"]),
    (GOOD_PROFILE.replace("name: b", "name: a"), ["devices.yaml:5", "duplicate device name"]),
    (GOOD_PROFILE.replace("memory_mb: 2000\n    gflops: 8\n  - name: b", "memory_mb: -5\n    gflops: 8\n  - name: b"),
     ["devices.yaml:3", "memory_mb", "must be > 0"]),
    ("devices: []\n", ["devices.yaml:1", "at least one device"]),
    ("", ["devices.yaml", "empty"]),
    (GOOD_PROFILE + "workload:\n  objective: fastest\n", ["devices.yaml:9", "objective"]),
    (GOOD_PROFILE + "network:\n  links:\n    - between: [a, zz]\n", ["devices.yaml:10", "between"]),
    (GOOD_PROFILE + "    int4: {gflops_prefill: 9}\n", ["devices.yaml:8", "int4.memory_gbps", "required"]),
    (GOOD_PROFILE + "    int4: 9\n", ["devices.yaml:8", "int4", "expected a mapping"]),
])
def test_bad_profile(tmp_path, model, text, needles):
    p = tmp_path / "devices.yaml"
    p.write_text(text)
    r = llc("compile", str(model), "--devices", str(p), "-o", "out", cwd=tmp_path)
    assert_clean_failure(r, tmp_path / "out", *needles)


def test_model_that_does_not_fit(tmp_path, model):
    p = write_profile(tmp_path / "devices.yaml", 2, memory_mb=97, runtime_overhead_mb=96)
    r = llc("compile", str(model), "--devices", str(p), "-o", "out", cwd=tmp_path)
    assert_clean_failure(r, tmp_path / "out", "does not fit", "short by", "MB")


def test_failed_compile_keeps_the_previous_build(tmp_path, model, profile):
    ok = llc("compile", str(model), "--devices", str(profile), "-o", "out", "-q", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    before = (tmp_path / "out" / "plan.json").read_bytes()
    bad = tmp_path / "bad.yaml"
    bad.write_text("devices: []\n")
    r = llc("compile", str(model), "--devices", str(bad), "-o", "out", cwd=tmp_path)
    assert r.returncode == 2
    assert (tmp_path / "out" / "plan.json").read_bytes() == before


def test_verify_rejects_non_build(tmp_path):
    r = llc("verify", str(tmp_path), cwd=tmp_path)
    assert r.returncode == 2 and "plan.json" in r.stderr and "Traceback" not in r.stderr


def test_inspect_lists_layers(tmp_path, model):
    r = llc("inspect", str(model), "--prompt-tokens", "8", "--max-context", "64", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = [ln.split()[0] for ln in r.stdout.splitlines()[3:]]
    assert rows[:2] == ["embed", "layer"] and "head" in rows and rows[-1] == "total"


def test_compile_prints_plan_and_progress(tmp_path, model):
    p = write_profile(tmp_path / "devices.yaml", 3, stages=3)
    r = llc("compile", str(model), "--devices", str(p), "-o", "out", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "[11/11] emit done" in r.stderr
    assert "3 stage(s)" in r.stdout and "ms/token" in r.stdout and "B/token" in r.stdout


def test_bad_split_file_is_one_line(tmp_path, model, profile):
    split = tmp_path / "split.yaml"
    split.write_text("stages:\n  - {device: a, blocks: [embed, layer 1]}\n  - {device: b, blocks: [layer 3, head]}\n")
    r = llc("compile", str(model), "--devices", str(profile), "--split", str(split), "-o", "out", cwd=tmp_path)
    assert_clean_failure(r, tmp_path / "out", str(split), "stages[1].blocks", "layer 2")


def test_a_bug_in_a_pass_names_the_pass_and_what_to_report(tmp_path, model, profile, monkeypatch):
    """Not the user's fault: exit 1, one line naming the pass and the passes before it."""
    from click.testing import CliRunner

    from llc.cli import main
    from llc.compiler.passes.coarsen import Coarsen

    def broken(self, state):
        raise ValueError("boom")

    monkeypatch.delenv("LLC_DEBUG", raising=False)
    monkeypatch.setattr(Coarsen, "run", broken)
    r = CliRunner().invoke(main, ["compile", str(model), "--devices", str(profile), "-o", str(tmp_path / "o"), "-q"])
    assert r.exit_code == 1
    line = r.output.strip().splitlines()[-1]
    assert line.startswith("llc: internal error: in pass coarsen (after load, simplify, quantize, past-length, "
                           "annotate-cost): ValueError: boom; this is a bug in llc"), line
    assert "LLC_DEBUG=1" in line and not (tmp_path / "o").exists()


@pytest.mark.parametrize("option,value", [("--latency", "abc"), ("--memory", "lots"), ("--cpu", "1,1,1")])
def test_bad_lab_option_is_a_usage_error(tmp_path, option, value):
    """A bad value for `llc lab up` is click's usage error (exit 2, the option named), before anything is made."""
    r = llc("lab", "up", "--phones", "2", option, value, "--state-dir", str(tmp_path / "lab"), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert option in r.stderr and "Traceback" not in r.stderr and "internal error" not in r.stderr
    assert not (tmp_path / "lab").exists()
