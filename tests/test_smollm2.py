"""SmolLM2-135M end to end: compile + verify for 1..4 stages, and `llc run` against unsplit onnxruntime.

Both torch exporters: the legacy one (models/smollm2) and torch.export with
per-input symbols and a tied embedding shared by the first and last block
(models/smollm2-dynamo). Ground truth is greedy decoding of the unsplit model
in one onnxruntime session. The models are exported first when missing
(examples/smollm2/export.py is a no-op when the export is complete).

The builds are compiled with no EOS token so every request yields exactly the
40 tokens asked for (SmolLM2 ends "The capital of France is" after 30). Each
compile runs in a subprocess, and each build is deleted once verified: eight
fp32 builds at once filled a CI machine's disk.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import write_profile
from llc.bundle import schema
from helpers import Reference, free_port_range

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
MODEL_DIR = REPO / "models" / "smollm2"
EXPORTS = {"legacy": MODEL_DIR, "dynamo": REPO / "models" / "smollm2-dynamo"}
STAGES = (1, 2, 3, 4)
NEW_TOKENS = 40
PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea, there lived"]

COMPILE = """
import sys
from pathlib import Path
from llc.compiler import compile_model, with_overrides
from llc.profile import load_profile
model, profile, out, stages = sys.argv[1:]
p = load_profile(Path(profile))
compile_model(Path(model), p, Path(out), workload=with_overrides(p.workload, stages=int(stages)),
              quiet=True, eos_token_ids=())
"""




def export(exporter: str) -> Path:
    """The model.onnx of one export, made first if missing (the script does nothing when complete)."""
    out = EXPORTS[exporter]
    proc = subprocess.run([sys.executable, "examples/smollm2/export.py", "--out", str(out), "--exporter", exporter],
                          cwd=REPO, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, f"export failed:\n{proc.stdout}\n{proc.stderr}"
    return out / "model.onnx"


@pytest.fixture(scope="module")
def model() -> Path:
    return export("legacy")


@dataclass(frozen=True)
class Builds:
    """Where and how this module compiles: one profile of 4 local devices (1 thread each), no EOS."""

    root: Path
    profile: Path
    env: dict[str, str]
    models: dict[str, Path]

    def compile(self, exporter: str, stages: int, out: Path) -> Path:
        proc = subprocess.run([sys.executable, "-c", COMPILE, str(self.models[exporter]), str(self.profile), str(out),
                               str(stages)], cwd=REPO, env=self.env, capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, f"compile of the {exporter} export for {stages} stage(s) failed:\n{proc.stderr}"
        return out


@pytest.fixture(scope="module")
def compiler(tmp_path_factory) -> Builds:
    root = tmp_path_factory.mktemp("smollm2")
    # The builds' keys come from the test session's secret (see conftest), created once here:
    # compiles in subprocesses would each try to create it.
    secret = tmp_path_factory.getbasetemp() / "build-secret"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLC_SECRET_FILE", str(secret))
        from llc.compiler.passes.layout import build_secret

        build_secret()
    return Builds(root, write_profile(root / "devices.yaml", 4, base_port=free_port_range(4), requests_in_flight=2),
                  dict(os.environ, LLC_SECRET_FILE=str(secret)), {e: export(e) for e in EXPORTS})


@pytest.fixture(scope="module")
def three_stages(compiler) -> Iterator[Path]:
    """The legacy export over 3 devices, which the run and serve tests share."""
    out = compiler.compile("legacy", 3, compiler.root / "legacy-stages3")
    yield out
    shutil.rmtree(out, ignore_errors=True)


@pytest.fixture(scope="module")
def reference(model) -> Reference:
    return Reference(model, threads=1)


@pytest.mark.parametrize("stages", STAGES)
@pytest.mark.parametrize("exporter", sorted(EXPORTS))
def test_compile_and_verify(compiler, three_stages, exporter, stages):
    """Each fp32 build is 650 MB: one at a time is on disk (besides the shared 3-stage one)."""
    own = (exporter, stages) != ("legacy", 3)
    build = compiler.compile(exporter, stages, compiler.root / f"{exporter}-stages{stages}") if own else three_stages
    try:
        plan = schema.read(build, schema.PLAN)
        assert len(plan.stages) == stages
        assert all(schema.read_manifest(build / s.manifest).threads == 1 for s in plan.stages)
        from llc.cli import main

        result = CliRunner().invoke(main, ["verify", str(build), "--tolerance", "1e-4"])
        assert result.exit_code == 0, result.output
        assert "ok: split == unsplit within 0.0001" in result.output
    finally:
        if own:
            shutil.rmtree(build, ignore_errors=True)

def llc_run(build: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "llc.cli", "run", str(build), "--max-new-tokens", str(NEW_TOKENS), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_llc_run_3_devices_matches_unsplit_greedy(three_stages, reference, tmp_path):
    build = three_stages
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    want = {p: reference.greedy(tok.encode(p).ids, NEW_TOKENS) for p in PROMPTS}
    assert len({len(tok.encode(p).ids) for p in PROMPTS}) == len(PROMPTS)  # prompts of different lengths

    # One request, its text streamed to stdout.
    out = tmp_path / "one.json"
    proc = llc_run(build, "--prompt", PROMPTS[0], "--json", str(out))
    (r,) = json.loads(out.read_text())["results"]
    assert r["prompt_ids"] == tok.encode(PROMPTS[0]).ids
    assert r["tokens"] == want[PROMPTS[0]]
    assert len(r["tokens"]) == NEW_TOKENS
    assert proc.stdout.strip() == tok.decode(want[PROMPTS[0]], skip_special_tokens=True).strip()

    # Two prompts of different lengths, both in flight.
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "two.json"
    llc_run(build, "--prompts", str(prompts), "--concurrency", "2", "--json", str(out))
    report = json.loads(out.read_text())
    assert report["concurrency"] == 2
    assert [r["prompt"] for r in report["results"]] == PROMPTS
    for r in report["results"]:
        assert r["tokens"] == want[r["prompt"]], r["prompt"]
    summary = report["summary"]
    assert summary["tokens"] == 2 * NEW_TOKENS
    assert [s["decode_steps"] for s in summary["stages"]] == [2 * (NEW_TOKENS - 1)] * 3
    devices = [s["device"] for s in summary["stages"]]
    assert f"{devices[0]}->{devices[1]}" in summary["hops"] and f"{devices[2]}->{devices[0]}" in summary["hops"]


def test_serve_chat_equals_transformers_greedy_chat(three_stages):
    """llc serve over 3 devices: a greedy chat answer is transformers' greedy chat answer, same template."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from openai import OpenAI
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from test_serve import Server

    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    sys.path.insert(0, str(REPO / "examples" / "smollm2"))
    import export as ex

    src = ex.gguf_dir()
    tok = AutoTokenizer.from_pretrained(src, gguf_file=ex.GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=ex.GGUF_FILE, dtype=torch.float32).eval()
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():  # the builds have no EOS, so neither does this: the same 24 tokens
        out = model.generate(**ids, do_sample=False, max_new_tokens=24, eos_token_id=None, pad_token_id=0)
    want = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    server = Server(three_stages)
    try:
        client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        model_id = client.models.list().data[0].id
        got = client.chat.completions.create(model=model_id, messages=messages, max_tokens=24, temperature=0)
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=model_id, messages=messages, max_tokens=24, temperature=0, stream=True) if c.choices)
    finally:
        server.stop()
    assert got.choices[0].message.content == want
    assert streamed == want
    assert "Paris" in want
