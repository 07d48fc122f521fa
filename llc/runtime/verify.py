"""llc verify: run the build's stages as the devices would, and compare with the unsplit model.

The split side is the split runner: every stage from its own manifest, inputs
it builds or receives per the manifests' sends, the real message framing. The
reference is the model the user gave, in one onnxruntime session, fed the same
tokens: a prefill of a few random tokens with an empty KV cache, then a decode
step of one more token on the prefill's cache. Every graph output (logits and
each present) is compared at both steps. This also checks simplify and every
graph rewrite, since the stages come from the rewritten graph.

A build that batches decode steps is also checked batched: up to three requests of
different prompt lengths at once, so every decode step runs them as one padded
batch on every stage. Each row's logits must equal the unsplit model's on the
same padded batch. How far a row is from the same request run alone is
reported too, unchecked: on fp32 kernels it is float noise (1e-7), but
onnxruntime's int8-activation MatMulNBits kernels (accuracy_level 4, what
``--weights int4`` uses) sum one row and several rows in a different order,
and re-quantizing activations at every layer turns those last-bit differences
into visible ones (about 0.2 on SmolLM2's logits).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort

from llc.bundle import schema
from llc.errors import LlcError
from llc.progress import WORTH_SAYING
from llc.runtime.device.stage import mask_row, pad_stack, unpad
from llc.runtime.splitrun import SplitRunner


ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
             "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool"}


@dataclass(frozen=True)
class OutputDiff:
    step: str  # prefill | decode | batched decode | batched vs alone
    output: str
    max_abs_diff: float
    checked: bool = True  # False: reported, never held against a tolerance


class Unsplit:
    """The model the user gave, in one onnxruntime session: the ground truth.

    Its inputs are built from the roles of its signature (the plan's, or found
    by the compiler's load pass), never from an exporter's names.
    """

    def __init__(self, path: Path, model: schema.ModelDoc | None = None, threads: int = 1):
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        if not Path(path).is_file():
            raise LlcError(path, "model file not found")
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        if model is None:
            import onnx

            from llc.compiler.passes.load import detect_signature

            sig = detect_signature(onnx.load(str(path), load_external_data=False), Path(path))
            model = schema.ModelDoc(str(path), sig.logits, tuple(schema.KVDoc(b.past, b.present, b.seq_axis)
                                                                 for b in sig.kv), dict(sig.input_roles))
        self.model = model
        self.path = Path(path)
        self.names = [o.name for o in self.session.get_outputs()]

    def feeds(self, tokens: np.ndarray, pasts: list[dict[str, np.ndarray]], lens: list[int],
              right: bool = False) -> dict[str, np.ndarray]:
        """Inputs for ``tokens`` [B, S], row b after ``lens[b]`` cached tokens (``pasts[b]``: input name ->
        cache, empty for none); rows of different lengths are padded as a head pads a batch."""
        seq, width = tokens.shape[1], max(lens)
        pads = tuple(width - n for n in lens)
        kv_axis = {k.past: k.seq_axis for k in self.model.kv}
        empty = {k.past: k.empty_shape for k in self.model.kv}
        feeds = {}
        for i in self.session.get_inputs():
            role = self.model.input_roles.get(i.name)
            dtype = np.dtype(ORT_TYPES[i.type])
            if role == "input_ids":
                feeds[i.name] = tokens.astype(dtype)
            elif role == "attention_mask":
                feeds[i.name] = np.stack([mask_row(n, width, seq, dtype, right) for n in lens])
            elif role == "position_ids":
                feeds[i.name] = np.stack([np.arange(n, n + seq, dtype=dtype) for n in lens])
            elif role == "kv" and not pasts[0]:
                feeds[i.name] = np.zeros(empty[i.name] or [
                    0 if a == kv_axis[i.name] else (d if isinstance(d, int) else 1) for a, d in enumerate(i.shape)],
                    dtype=dtype)
            elif role == "kv":
                caches = [p[i.name] for p in pasts]
                feeds[i.name] = caches[0] if pads == (0,) else pad_stack(caches, kv_axis[i.name], width, pads, right)
            else:
                raise LlcError(None, f"do not know how to feed model input {i.name}")
        return feeds

    def step(self, tokens: np.ndarray, past: dict[str, np.ndarray], past_len: int
             ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """All outputs for one step, and the cache for the next (input name -> present)."""
        out = dict(zip(self.names, self.session.run(None, self.feeds(tokens, [past], [past_len]))))
        return out, {k.past: out[k.present] for k in self.model.kv}

    def pads_right(self) -> bool:
        """Where a batch pads this model's caches, from the model itself (not from a manifest):
        GroupQueryAttention writes each row's token after its own length, so on the right."""
        import onnx

        graph = onnx.load(str(self.path), load_external_data=False).graph
        return any(n.op_type == "GroupQueryAttention" for n in graph.node)

    def batch_step(self, tokens: list[int], pasts: list[dict[str, np.ndarray]], lens: list[int], right: bool
                   ) -> tuple[np.ndarray, list[dict[str, np.ndarray]]]:
        """One decode step of several requests as one padded batch, as a head pads it: logits, caches."""
        pads = [max(lens) - n for n in lens]
        out = dict(zip(self.names, self.session.run(None, self.feeds(np.array([[t] for t in tokens]), pasts,
                                                                     lens, right))))
        caches = [{k.past: unpad(out[k.present], row, k.seq_axis, pads[row], right) for k in self.model.kv}
                  for row in range(len(tokens))]
        return out[self.model.logits], caches

    def greedy(self, prompt: list[int], max_new_tokens: int, eos: set[int] = frozenset()) -> list[int]:
        ids, past, n_past, out = list(prompt), {}, 0, []
        while len(out) < max_new_tokens:
            res, past = self.step(np.array([ids], np.int64), past, n_past)
            n_past += len(ids)
            token = int(np.argmax(res[self.model.logits][0, -1]))
            out.append(token)
            if token in eos:
                break
            ids = [token]
        return out


def verify_build(build: Path, prompt_len: int = 7, seed: int = 0,
                 say: Callable[[str], None] | None = None) -> list[OutputDiff]:
    """Every graph output of the split build against the unsplit model, at a prefill and a decode step.

    The unsplit model runs first and is dropped before the stages load, so
    verify holds one copy of the model's weights at a time, not two.
    """
    plan = schema.read(build, schema.PLAN)
    model = Path(plan.model.unsplit)
    if not model.is_file():
        raise LlcError(build / schema.PLAN, f"the unsplit model {model} is gone; cannot compare "
                                            f"(`llc compile --force` makes it again)")
    if say is None or sum(f.stat().st_size for f in build.glob("devices/*/segment.onnx*")) < WORTH_SAYING:
        say = lambda line: None  # noqa: E731  (a small model verifies in a second or two)
    say(f"verify: the unsplit model {model.name} on random tokens")
    full = Unsplit(model, plan.model)
    rng = np.random.default_rng(seed)
    vocab = plan.model.vocab_size or 32
    prompt = rng.integers(0, vocab, (1, prompt_len)).astype(np.int64)
    nxt = rng.integers(0, vocab, (1, 1)).astype(np.int64)
    refs: list[dict[str, np.ndarray]] = []
    past: dict[str, np.ndarray] = {}
    for step, tokens in enumerate((prompt, nxt)):
        ref, past = full.step(tokens, past, 0 if step == 0 else prompt_len)
        refs.append(ref)
    names, logits = full.names, plan.model.logits
    max_batch = schema.read_manifest(build / plan.stages[0].manifest).max_batch
    batch = batched_refs(full, rng, vocab, logits, (5, 2, 9)[:max_batch]) if max_batch > 1 else None
    del full, past

    say(f"verify: the {len(plan.stages)} stage(s) on the same tokens")
    runner = SplitRunner(build, threads=1)
    trace = runner.teacher_force(prompt[0].tolist(), nxt[0].tolist())
    diffs: list[OutputDiff] = []
    for step, label in enumerate(("prefill", "decode")):
        got = trace.steps[step]
        for name in names:
            if name not in got:
                raise LlcError(build, f"verify: no stage produces graph output {name}")
            diffs.append(OutputDiff(label, name, max_diff(refs[step][name], got[name])))
    if batch is not None:
        diffs += batched_diffs(build, runner, batch, logits)
    return diffs


def max_diff(ref: np.ndarray, got: np.ndarray) -> float:
    if ref.shape != got.shape:
        return float("inf")
    return float(np.max(np.abs(ref.astype(np.float64) - got))) if ref.size else 0.0


@dataclass
class BatchedRefs:
    """What the unsplit model gave for requests of different lengths: each alone, and as one padded batch."""

    prompts: list[list[int]]
    continuations: list[list[int]]
    alone: list[list[np.ndarray]]  # request -> decode step -> logits
    batched: list[np.ndarray]  # decode step -> logits [rows, 1, vocab]


def batched_refs(full: Unsplit, rng: np.random.Generator, vocab: int, logits: str,
                 lengths: tuple[int, ...], steps: int = 3) -> BatchedRefs:
    prompts = [rng.integers(0, vocab, n).tolist() for n in lengths]
    nexts = [rng.integers(0, vocab, steps).tolist() for _ in lengths]
    right = full.pads_right()
    alone, caches, lens = [], [], []
    for prompt, continuation in zip(prompts, nexts):
        past, n, rows = {}, 0, []
        for step, tokens in enumerate([prompt] + [[t] for t in continuation]):
            ref, past = full.step(np.array([tokens], np.int64), past, n)
            n += len(tokens)
            if step:
                rows.append(ref[logits])
            else:
                caches.append(past)
                lens.append(n)
        alone.append(rows)
    batched = []
    for step in range(steps):
        ref, caches = full.batch_step([c[step] for c in nexts], caches, lens, right)
        lens = [n + 1 for n in lens]
        batched.append(ref)
    return BatchedRefs(prompts, nexts, alone, batched)


def batched_diffs(build: Path, runner: SplitRunner, refs: BatchedRefs, logits: str) -> list[OutputDiff]:
    """The split build decoding the requests together: each row against the unsplit model's row
    of the same batch (checked), and against the request run alone (reported)."""
    traces = runner.teacher_force_many(refs.prompts, refs.continuations)
    steps = len(refs.batched)
    if runner.batched_steps() < steps:
        raise LlcError(build, "verify: the build batches decode steps, but the head never ran a batch")
    batched = alone = 0.0
    for row, trace in enumerate(traces):
        for step in range(1, steps + 1):
            got = trace.steps[step][logits]
            alone = max(alone, max_diff(refs.alone[row][step - 1], got))
            batched = max(batched, max_diff(refs.batched[step - 1][row:row + 1], got))
    return [OutputDiff("batched decode", logits, batched), OutputDiff("batched vs alone", logits, alone, False)]
