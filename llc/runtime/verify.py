"""llc verify: run the split stages in order and compare with the unsplit model.

Both run in onnxruntime on this machine with the same inputs: a prefill of a
few random tokens with an empty KV cache, then a decode step with the cache the
prefill produced. Every graph output (logits and each present.*) is compared;
the build is good when the largest absolute difference is within tolerance.
This also checks the simplify pass, since the stages come from the simplified
graph and the reference is the model the user gave.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from llc.errors import LlcError


@dataclass(frozen=True)
class OutputDiff:
    step: str  # prefill | decode
    output: str
    max_abs_diff: float


def _session(path: Path, threads: int = 1) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _feeds(sess: ort.InferenceSession, roles: dict[str, str], kv_axis: dict[str, int],
           tokens: np.ndarray, past: dict[str, np.ndarray], past_len: int) -> dict[str, np.ndarray]:
    seq = tokens.shape[1]
    feeds = {}
    for i in sess.get_inputs():
        role = roles.get(i.name)
        if role == "input_ids":
            feeds[i.name] = tokens
        elif role == "attention_mask":
            feeds[i.name] = np.ones((1, past_len + seq), dtype=np.int64)
        elif role == "position_ids":
            feeds[i.name] = np.arange(past_len, past_len + seq, dtype=np.int64)[None, :]
        elif role == "kv":
            if i.name in past:
                feeds[i.name] = past[i.name]
            else:
                shape = [0 if a == kv_axis[i.name] else (d if isinstance(d, int) else 1)
                         for a, d in enumerate(i.shape)]
                feeds[i.name] = np.zeros(shape, dtype=np.float32)
        else:
            raise LlcError(None, f"verify: do not know how to feed model input {i.name}")
    return feeds


def verify_build(build: Path, prompt_len: int = 7, seed: int = 0) -> list[OutputDiff]:
    plan_path = build / "plan.json"
    if not plan_path.is_file():
        raise LlcError(build, "not a build directory (no plan.json)")
    plan = json.loads(plan_path.read_text())
    model = Path(plan["model"]["path"])
    if not model.is_file():
        raise LlcError(plan_path, f"the original model {model} is gone; cannot compare")
    roles = plan["model"]["input_roles"]
    kv_axis = {b["past"]: b["seq_axis"] for b in plan["model"]["kv"]}
    present_of = {b["past"]: b["present"] for b in plan["model"]["kv"]}
    full = _session(model)
    stages = [_session(build / s["segment"]) for s in plan["stages"]]
    rng = np.random.default_rng(seed)
    vocab = full.get_outputs()[0].shape[-1]
    vocab = vocab if isinstance(vocab, int) else 32
    diffs: list[OutputDiff] = []
    past_full: dict[str, np.ndarray] = {}
    past_len = 0
    for step, tokens in (("prefill", rng.integers(0, vocab, (1, prompt_len))),
                         ("decode", rng.integers(0, vocab, (1, 1)))):
        tokens = tokens.astype(np.int64)
        feeds = _feeds(full, roles, kv_axis, tokens, past_full, past_len)
        names = [o.name for o in full.get_outputs()]
        ref = dict(zip(names, full.run(None, feeds)))
        env = dict(feeds)  # the split run sees exactly the same inputs
        got: dict[str, np.ndarray] = {}
        for sess in stages:
            outs = sess.run(None, {i.name: env[i.name] for i in sess.get_inputs()})
            for o, v in zip(sess.get_outputs(), outs):
                env[o.name] = v
                got[o.name] = v
        for name in names:
            if name not in got:
                raise LlcError(build, f"verify: no stage produces graph output {name}")
            d = float(np.max(np.abs(ref[name].astype(np.float64) - got[name]))) if ref[name].size else 0.0
            diffs.append(OutputDiff(step, name, d))
        past_full = {p: ref[present_of[p]] for p in present_of}
        past_len += tokens.shape[1]
    return diffs
