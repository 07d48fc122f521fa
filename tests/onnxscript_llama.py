"""A tiny LLaMA-style decoder written by hand with onnxscript: the third exporter in the matrix.

Not from torch: the layer is onnxscript functions (RMSNorm, rotary, grouped-query
attention, SwiGLU), so the model holds ONNX *local functions* and one call node
per layer, as onnxscript-authored models do. Like torch.export, it reads the
past length from the shape of the *last* layer's cache, in the embedding. The
shapes follow the llc export convention (see examples/smollm2/export.py).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxscript import FLOAT, script
from onnxscript import opset18 as op
from onnxscript.values import Opset

HIDDEN, HEADS, KV_HEADS, FFN, VOCAB = 64, 4, 2, 128, 256
HEAD_DIM = HIDDEN // HEADS
GROUPS = HEADS // KV_HEADS
DOMAIN = "llc.tiny"
tiny = Opset(DOMAIN, 1)


@script(tiny, default_opset=op)
def RMSNorm(x: FLOAT, w: FLOAT) -> FLOAT:
    ms = op.ReduceMean(op.Mul(x, x), op.Constant(value_ints=[-1]), keepdims=1)
    return op.Mul(op.Div(x, op.Sqrt(op.Add(ms, op.Constant(value_float=1e-5)))), w)


@script(tiny, default_opset=op)
def Rotary(x: FLOAT, cos: FLOAT, sin: FLOAT) -> FLOAT:
    half = op.Constant(value_ints=[8])
    x1 = op.Slice(x, op.Constant(value_ints=[0]), half, op.Constant(value_ints=[-1]))
    x2 = op.Slice(x, half, op.Constant(value_ints=[16]), op.Constant(value_ints=[-1]))
    rotated = op.Concat(op.Neg(x2), x1, axis=-1)
    return op.Add(op.Mul(x, cos), op.Mul(rotated, sin))


@script(tiny, default_opset=op)
def Attention(x: FLOAT, wq: FLOAT, wk: FLOAT, wv: FLOAT, wo: FLOAT, cos: FLOAT, sin: FLOAT, mask: FLOAT,
              past_k: FLOAT, past_v: FLOAT):
    heads = op.Constant(value_ints=[0, 0, 4, 16])
    kv_heads = op.Constant(value_ints=[0, 0, 2, 16])
    q = Rotary(op.Transpose(op.Reshape(op.MatMul(x, wq), heads), perm=[0, 2, 1, 3]), cos, sin)
    k = Rotary(op.Transpose(op.Reshape(op.MatMul(x, wk), kv_heads), perm=[0, 2, 1, 3]), cos, sin)
    v = op.Transpose(op.Reshape(op.MatMul(x, wv), kv_heads), perm=[0, 2, 1, 3])
    present_k = op.Concat(past_k, k, axis=2)
    present_v = op.Concat(past_v, v, axis=2)
    groups = op.Constant(value_ints=[1, 1, 2, 1, 1])  # each KV head serves 2 query heads
    per_head = op.Constant(value_ints=[0, 4, -1, 16])
    k_all = op.Reshape(op.Expand(op.Unsqueeze(present_k, op.Constant(value_ints=[2])), groups), per_head)
    v_all = op.Reshape(op.Expand(op.Unsqueeze(present_v, op.Constant(value_ints=[2])), groups), per_head)
    scores = op.Add(op.Mul(op.MatMul(q, op.Transpose(k_all, perm=[0, 1, 3, 2])),
                           op.Constant(value_float=0.25)), mask)
    mixed = op.MatMul(op.Softmax(scores, axis=-1), v_all)
    merged = op.Reshape(op.Transpose(mixed, perm=[0, 2, 1, 3]), op.Constant(value_ints=[0, 0, 64]))
    return op.MatMul(merged, wo), present_k, present_v


@script(tiny, default_opset=op)
def DecoderLayer(x: FLOAT, ln1: FLOAT, wq: FLOAT, wk: FLOAT, wv: FLOAT, wo: FLOAT, ln2: FLOAT, wg: FLOAT,
                 wu: FLOAT, wd: FLOAT, cos: FLOAT, sin: FLOAT, mask: FLOAT, past_k: FLOAT, past_v: FLOAT):
    a, present_k, present_v = Attention(RMSNorm(x, ln1), wq, wk, wv, wo, cos, sin, mask, past_k, past_v)
    h = op.Add(x, a)
    n = RMSNorm(h, ln2)
    gate = op.MatMul(n, wg)
    mlp = op.MatMul(op.Mul(op.Mul(gate, op.Sigmoid(gate)), op.MatMul(n, wu)), wd)
    return op.Add(h, mlp), present_k, present_v


def build(path, layers: int = 4, seed: int = 0) -> None:
    """Write the model (weights inside the file) to ``path``."""
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []

    def weight(name: str, shape, scale: float = 0.08, around: float = 0.0) -> str:
        inits.append(numpy_helper.from_array((around + scale * rng.standard_normal(shape)).astype(np.float32), name))
        return name

    def const(name: str, value) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    nodes: list[onnx.NodeProto] = []

    def node(op_type: str, ins: list[str], out: str | list[str], domain: str = "", **attrs) -> str:
        outs = [out] if isinstance(out, str) else out
        nodes.append(helper.make_node(op_type, ins, outs, name=f"/{outs[0]}", domain=domain, **attrs))
        return outs[0]

    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [helper.make_tensor_value_info("input_ids", i64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", i64, ["batch", "total"]),
              helper.make_tensor_value_info("position_ids", i64, ["batch", "seq"])]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch", "seq", VOCAB])]
    for i in range(layers):
        for kv in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kv}", f32,
                                                        ["batch", KV_HEADS, "past", HEAD_DIM]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kv}", f32,
                                                         ["batch", KV_HEADS, "total", HEAD_DIM]))

    x = node("Gather", [weight("embed", (VOCAB, HIDDEN), 0.5), "input_ids"], "embed_out")
    # rotary tables from the positions
    inv_freq = const("inv_freq", (1.0 / 10000 ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM)).astype(np.float32))
    pos = node("Unsqueeze", [node("Cast", ["position_ids"], "pos_f", to=f32), const("ax_last", np.array([-1]))],
               "pos_col")
    freqs = node("Mul", [pos, inv_freq], "freqs")
    emb = node("Concat", [freqs, freqs], "rot_emb", axis=-1)
    one = const("ax_1", np.array([1]))
    cos = node("Unsqueeze", [node("Cos", [emb], "cos3"), one], "cos")
    sin = node("Unsqueeze", [node("Sin", [emb], "sin3"), one], "sin")
    # causal mask: the past length comes from the last layer's cache, as torch.export does it
    past = node("Shape", [f"past_key_values.{layers - 1}.key"], "past_len", start=2, end=3)
    seq = node("Shape", ["input_ids"], "seq_len", start=1, end=2)
    total = node("Add", [past, seq], "total_len")
    zero_s, one_s = const("zero", np.array(0)), const("one", np.array(1))
    rows = node("Add", [node("Unsqueeze", [node("Range", [zero_s, node("Squeeze", [seq], "seq_s"), one_s], "rows0"),
                                          const("ax_row", np.array([1]))], "rows1"), past], "rows")
    cols = node("Unsqueeze", [node("Range", [zero_s, node("Squeeze", [total], "total_s"), one_s], "cols0"),
                              const("ax_col", np.array([0]))], "cols")
    causal = node("LessOrEqual", [cols, rows], "causal")
    am = node("Unsqueeze", [node("Cast", ["attention_mask"], "am_b", to=TensorProto.BOOL),
                            const("ax_mask", np.array([1, 2]))], "am4")
    allowed = node("And", [causal, am], "allowed")
    mask = node("Where", [allowed, const("open", np.float32(0)), const("shut", np.float32(-1e9))], "mask")

    for i in range(layers):
        w = [weight(f"l{i}.ln1", (HIDDEN,), 0.1, 1.0), weight(f"l{i}.wq", (HIDDEN, HIDDEN)),
             weight(f"l{i}.wk", (HIDDEN, KV_HEADS * HEAD_DIM)), weight(f"l{i}.wv", (HIDDEN, KV_HEADS * HEAD_DIM)),
             weight(f"l{i}.wo", (HIDDEN, HIDDEN)), weight(f"l{i}.ln2", (HIDDEN,), 0.1, 1.0),
             weight(f"l{i}.wg", (HIDDEN, FFN)), weight(f"l{i}.wu", (HIDDEN, FFN)), weight(f"l{i}.wd", (FFN, HIDDEN))]
        x = node("DecoderLayer", [x, *w, cos, sin, mask, f"past_key_values.{i}.key", f"past_key_values.{i}.value"],
                 [f"layer{i}_out", f"present.{i}.key", f"present.{i}.value"], domain=DOMAIN)
    x = node("RMSNorm", [x, weight("final_ln", (HIDDEN,), 0.1, 1.0)], "final_norm", domain=DOMAIN)
    node("MatMul", [x, weight("lm_head", (HIDDEN, VOCAB), 0.3)], "logits")

    graph = helper.make_graph(nodes, "tiny_onnxscript_llama", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)],
                              producer_name="onnxscript")
    model.functions.extend(f.to_function_proto() for f in (RMSNorm, Rotary, Attention, DecoderLayer))
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
