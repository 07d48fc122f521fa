"""A tiny two-layer "decoder" written as ONNX text, shared by the per-pass tests (tests/test_pass_*.py).

No torch: the graph is text parsed by ``onnx.parser``, small enough (hidden 8,
2 heads of 4, vocab 16) that every pass runs in milliseconds, and built with
the structure the passes look for:

    embed:  pad_bias = Unsqueeze((1 - Cast(attention_mask)) * -1e4)      [b, 1, 1, total]
            h0 = Gather(embed, input_ids)                                [b, s, 8]
    layer:  q/k/v = MatMul(h, w) -> Reshape [b, s, 2, 4] -> Transpose [b, 2, s, 4]
            present.L.key = Concat(past_key_values.L.key, k, axis=2)  (same for value)
            p = Softmax(q @ present_k^T * 0.5 + pad_bias [+ causal]);  h' = h + (p @ present_v) Wo
    head:   logits = MatMul(h2, lm_head)                                 [b, s, 16]

``shape_read`` adds what torch.export writes at the top of layer 0: a read of
``Shape(past_key_values.1.key)`` (a *later* layer's cache) whose past length
builds a causal mask read by both layers; "full" also takes the batch from it
for the Reshape that merges the heads, "negative" (``start = -2``) the head width. This file's own tests check the model
itself (valid, and a decode step on the cache equals the longer prefill).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
import pytest

HIDDEN, HEADS, HEAD_DIM, VOCAB, LAYERS = 8, 2, 4, 16, 2
SHAPE_READS = ("full", "start_end", "negative")

# the names of the llc export convention; tests rename them through ``names``
DEFAULT_NAMES = {"ids": "input_ids", "mask": "attention_mask", "logits": "logits",
                 **{f"past{l}{kv}": f"past_key_values.{l}.{'key' if kv == 'k' else 'value'}"
                    for l in range(LAYERS) for kv in "kv"},
                 **{f"present{l}{kv}": f"present.{l}.{'key' if kv == 'k' else 'value'}"
                    for l in range(LAYERS) for kv in "kv"}}


def _values(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 0.5) -> str:
    return "{" + ", ".join(f"{x:.6f}" for x in (rng.standard_normal(shape) * scale).ravel()) + "}"


def _shape_read(kind: str, pk1: str) -> list[str]:
    """Nodes (in layer 0) that read the past length off ``pk1`` into ``past_len`` [1] (and ``merge_dyn``)."""
    if kind == "full":  # Shape -> Gather, the batch from the same read feeds a Reshape
        return [f'kshape = Shape("{pk1}")',
                "past_len = Gather(kshape, i2)",
                "batch = Gather(kshape, i0)",
                "merge_dyn = Concat <axis = 0> (batch, m1, c8)"]
    if kind == "start_end":
        return [f'past_len = Shape <start = 2, end = 3> ("{pk1}")']
    if kind == "negative":  # [past, 4]: a negative start, and the head width next to it
        return [f'tail = Shape <start = -2> ("{pk1}")',
                "past_len = Gather(tail, i0)",
                "width = Gather(tail, i1)",
                "merged = Mul(width, c2)",
                "merge_dyn = Concat <axis = 0> (keep, keep, merged)"]  # [0, 0, 8]: one initializer read twice
    raise ValueError(kind)


CAUSAL = ["seq_len = Shape <start = 1, end = 2> ({ids})",
          "total_len = Add(past_len, seq_len)",
          "past_s = Squeeze(past_len, i0)",
          "total_s = Squeeze(total_len, i0)",
          "q_pos = Range(past_s, total_s, one_i)",
          "k_pos = Range(zero_i, total_s, one_i)",
          "q_col = Unsqueeze(q_pos, i1)",
          "k_row = Unsqueeze(k_pos, i0)",
          "allowed = LessOrEqual(k_row, q_col)",
          "causal = Where(allowed, zero_f, neg)"]


def decoder_text(*, names: dict[str, str] | None = None, shape_read: str | None = None, mask: bool = True,
                 tied: bool = False, seed: int = 0) -> str:
    """The tiny decoder as ONNX text (see the module docstring)."""
    n = {**DEFAULT_NAMES, **(names or {})}
    q = lambda key: f'"{n[key]}"'  # noqa: E731  (quoted: the convention's names have dots)
    rng = np.random.default_rng(seed)
    ins = [f"int64[batch, seq] {q('ids')}"] + ([f"int64[batch, total] {q('mask')}"] if mask else [])
    ins += [f"float[batch, {HEADS}, past, {HEAD_DIM}] {q(f'past{l}{kv}')}" for l in range(LAYERS) for kv in "kv"]
    outs = [f"float[batch, seq, {VOCAB}] {q('logits')}"]
    outs += [f"float[batch, {HEADS}, total, {HEAD_DIM}] {q(f'present{l}{kv}')}" for l in range(LAYERS) for kv in "kv"]
    inits = [f"float[{VOCAB}, {HIDDEN}] embed = {_values(rng, (VOCAB, HIDDEN))}"]
    for l in range(LAYERS):
        for w in "qkvo":
            inits.append(f"float[{HIDDEN}, {HIDDEN}] w{w}{l} = {_values(rng, (HIDDEN, HIDDEN))}")
    if not tied:
        inits.append(f"float[{HIDDEN}, {VOCAB}] lm_head = {_values(rng, (HIDDEN, VOCAB))}")
    inits += ["int64[4] split_heads = {0, 0, 2, 4}", "int64[3] merge_heads = {0, 0, 8}",
              "float scale = {0.5}", "float one = {1.0}", "float neg = {-10000.0}", "float zero_f = {0.0}",
              "int64[2] mask_axes = {1, 2}", "int64[1] i0 = {0}", "int64[1] i1 = {1}", "int64[1] i2 = {2}",
              "int64[1] keep = {0}", "int64[1] m1 = {-1}", "int64[1] c8 = {8}", "int64[1] c2 = {2}",
              "int64 zero_i = {0}", "int64 one_i = {1}"]
    body = []
    if mask:
        body += [f"mask_f = Cast <to = 1> ({q('mask')})", "inv = Sub(one, mask_f)", "pad = Mul(inv, neg)",
                 "pad_bias = Unsqueeze(pad, mask_axes)"]
    body.append(f"h0 = Gather(embed, {q('ids')})")
    merge = "merge_heads"
    for l in range(LAYERS):
        if l == 0 and shape_read:
            body += _shape_read(shape_read, n["past1k"])
            body += [line.format(ids=q("ids")) for line in CAUSAL]
            if shape_read in ("full", "negative"):
                merge = "merge_dyn"
        h, h_next = f"h{l}", f"h{l + 1}"
        for w in "qkv":
            body += [f"{w}{l} = MatMul({h}, w{w}{l})", f"{w}r{l} = Reshape({w}{l}, split_heads)",
                     f"{w}t{l} = Transpose <perm = [0, 2, 1, 3]> ({w}r{l})"]
        body += [f"{q(f'present{l}k')} = Concat <axis = 2> ({q(f'past{l}k')}, kt{l})",
                 f"{q(f'present{l}v')} = Concat <axis = 2> ({q(f'past{l}v')}, vt{l})",
                 f"kT{l} = Transpose <perm = [0, 1, 3, 2]> ({q(f'present{l}k')})",
                 f"s{l} = MatMul(qt{l}, kT{l})", f"ss{l} = Mul(s{l}, scale)"]
        last = f"ss{l}"
        if mask:
            body.append(f"sb{l} = Add({last}, pad_bias)")
            last = f"sb{l}"
        if shape_read:
            body.append(f"sc{l} = Add({last}, causal)")
            last = f"sc{l}"
        body += [f"p{l} = Softmax <axis = -1> ({last})", f"c{l} = MatMul(p{l}, {q(f'present{l}v')})",
                 f"ct{l} = Transpose <perm = [0, 2, 1, 3]> (c{l})", f"cm{l} = Reshape(ct{l}, {merge})",
                 f"o{l} = MatMul(cm{l}, wo{l})", f"{h_next} = Add({h}, o{l})"]
    if tied:
        body += ["embed_t = Transpose <perm = [1, 0]> (embed)", f"{q('logits')} = MatMul(h{LAYERS}, embed_t)"]
    else:
        body.append(f"{q('logits')} = MatMul(h{LAYERS}, lm_head)")
    return ('<ir_version: 8, opset_import: ["" : 17]>\n'
            f"tiny ({', '.join(ins)}) => ({', '.join(outs)})\n"
            f"<{', '.join(inits)}>\n{{\n  " + "\n  ".join(body) + "\n}\n")


def parse(text: str) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    onnx.checker.check_model(model, full_check=True)
    return model


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def tiny_decoder(folder: Path, name: str = "model.onnx", **options) -> Path:
    """Write the tiny decoder (options as :func:`decoder_text`) to ``folder/name``."""
    return save(parse(decoder_text(**options)), folder / name)


def session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    src = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto | Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every output of ``model`` by name (feeds the model does not take are left out)."""
    s = session(model)
    wanted = {i.name for i in s.get_inputs()}
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, {k: v for k, v in feeds.items() if k in wanted})))


def decoder_feeds(past: int, seq: int, *, names: dict[str, str] | None = None, seed: int = 1,
                  batch: int = 1) -> dict[str, np.ndarray]:
    """Random tokens, an all-ones mask over past + seq, and random caches of ``past`` positions."""
    n = {**DEFAULT_NAMES, **(names or {})}
    rng = np.random.default_rng(seed)
    feeds = {n["ids"]: rng.integers(0, VOCAB, (batch, seq)).astype(np.int64),
             n["mask"]: np.ones((batch, past + seq), np.int64)}
    for l in range(LAYERS):
        for kv in "kv":
            feeds[n[f"past{l}{kv}"]] = rng.standard_normal((batch, HEADS, past, HEAD_DIM)).astype(np.float32)
    return feeds


def assert_same_outputs(got: dict[str, np.ndarray], want: dict[str, np.ndarray], atol: float = 1e-5) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].shape == want[k].shape, k
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=atol, err_msg=k)


# ---------------------------------------------------------------- the model itself


@pytest.mark.parametrize("shape_read", [None, *SHAPE_READS])
def test_tiny_decoder_is_valid_and_shaped_as_the_convention(shape_read):
    model = parse(decoder_text(shape_read=shape_read))
    assert [i.name for i in model.graph.input][:2] == ["input_ids", "attention_mask"]
    out = run(model, decoder_feeds(past=3, seq=2, batch=2))
    assert out["logits"].shape == (2, 2, VOCAB)
    assert out["present.1.value"].shape == (2, HEADS, 5, HEAD_DIM)


@pytest.mark.parametrize("shape_read", SHAPE_READS)
def test_tiny_decoder_decode_step_equals_longer_prefill(shape_read):
    """With the causal mask from the cache's shape, prefill(5) then decode(1) == prefill(6)."""
    model = parse(decoder_text(shape_read=shape_read))
    whole = decoder_feeds(past=0, seq=6)
    ids = whole["input_ids"]
    pre = run(model, {**whole, "input_ids": ids[:, :5], "attention_mask": np.ones((1, 5), np.int64)})
    step = {"input_ids": ids[:, 5:], "attention_mask": np.ones((1, 6), np.int64),
            **{k.replace("present", "past_key_values"): v for k, v in pre.items() if k.startswith("present")}}
    got = run(model, step)
    want = run(model, whole)
    np.testing.assert_allclose(got["logits"][:, -1], want["logits"][:, -1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["present.1.key"], want["present.1.key"], rtol=1e-5, atol=1e-6)
