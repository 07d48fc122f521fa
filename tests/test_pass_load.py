"""load: the signature from structure, Constant short forms, inlined local functions, bad files."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper

from llc.compiler import new_state
from llc.compiler.passes.load import Load
from llc.compiler.passes.past_length import PastLength
from llc.compiler.pipeline import PassManager
from llc.compiler.state import KVBinding
from llc.errors import LlcError
from llc.profile import Workload
from test_pass_graphs import (DEFAULT_NAMES, assert_same_outputs, decoder_feeds, parse, run, save,
                              tiny_decoder)

WL = Workload(prompt_tokens=6, max_context=32)


def load(path):
    return Load().run(new_state(path, None, WL))


def test_signature_of_the_convention(tmp_path):
    state = load(tiny_decoder(tmp_path))
    sig = state.signature
    assert sig.input_roles == {"input_ids": "input_ids", "attention_mask": "attention_mask",
                               **{f"past_key_values.{l}.{kv}": "kv" for l in range(2) for kv in ("key", "value")}}
    assert sig.kv == tuple(KVBinding(f"past_key_values.{l}.{kv}", f"present.{l}.{kv}", 2)
                           for l in range(2) for kv in ("key", "value"))
    assert sig.logits == "logits"
    assert state.tensors["past_key_values.1.value"].shape == ("batch", 2, "past", 4)
    assert state.digests.model and state.digests.data == {}


# presents named in reverse order, so pairing by name or by position would get every one wrong
RENAMED_KV = {**{f"past{l}{kv}": f"kv_in_{l}_{kv}" for l in range(2) for kv in "kv"},
              "present0k": "cache_out_3", "present0v": "cache_out_2",
              "present1k": "cache_out_1", "present1v": "cache_out_0", "logits": "scores"}


@pytest.mark.parametrize("ids", ["tokens", "x"])  # "tokens": by name; "x": only by the Gather on the table
def test_signature_from_structure_when_renamed(tmp_path, ids):
    names = {**RENAMED_KV, "ids": ids, "mask": "mask"}
    sig = load(tiny_decoder(tmp_path, names=names)).signature
    assert sig.input_roles[ids] == "input_ids"
    assert sig.input_roles["mask"] == "attention_mask"
    assert {b.past: (b.present, b.seq_axis) for b in sig.kv} == {
        "kv_in_0_k": ("cache_out_3", 2), "kv_in_0_v": ("cache_out_2", 2),
        "kv_in_1_k": ("cache_out_1", 2), "kv_in_1_v": ("cache_out_0", 2)}
    assert sig.logits == "scores"


def test_seq_axis_with_a_symbolic_head_axis(tmp_path):
    text = """<ir_version: 8, opset_import: ["" : 17]>
g (int64[batch, seq] input_ids, int64[batch, total] attention_mask, float[batch, heads, past, 4] pk)
  => (float[batch, seq, 8] logits, float[batch, heads, total, 4] present, int64[1] n_heads)
<float[16, 8] embed = {%s}, int64[4] split = {0, 0, 2, 4}>
{
  logits = Gather(embed, input_ids)
  r = Reshape(logits, split)
  t = Transpose <perm = [0, 2, 1, 3]> (r)
  present = Concat <axis = 2> (pk, t)
  n_heads = Shape <start = 1, end = 2> (pk)
}""" % ", ".join(str(float(i % 5)) for i in range(128))
    path = save(parse(text), tmp_path / "model.onnx")
    state = PassManager([Load(), PastLength()]).run(new_state(path, None, WL))
    assert state.signature.kv[0].seq_axis == 2
    feeds = {"input_ids": np.zeros((1, 2), np.int64), "attention_mask": np.ones((1, 5), np.int64),
             "pk": np.zeros((1, 2, 3, 4), np.float32)}
    assert run(state.model, feeds)["n_heads"].tolist() == [2]


CONSTANTS = """<ir_version: 8, opset_import: ["" : 17]>
g (int64[batch, seq] input_ids) => (float[batch, seq, 4] logits, int64[3] ints, float[2] floats, int64 one_int)
<float[16, 4] embed = {%s}>
{
  h = Gather(embed, input_ids)
  f = Constant <value_float = 0.25> ()
  logits = Mul(h, f)
  ints = Constant <value_ints = [3, -1, 7]> ()
  floats = Constant <value_floats = [1.5, -2.0]> ()
  one_int = Constant <value_int = 42> ()
}""" % ", ".join(str(float(i % 9)) for i in range(64))


def test_constants_as_tensors(tmp_path):
    path = save(parse(CONSTANTS), tmp_path / "model.onnx")
    state = load(path)
    consts = {n.output[0]: n for n in state.model.graph.node if n.op_type == "Constant"}
    expected = {"f": (np.float32, 0.25, ()), "ints": (np.int64, [3, -1, 7], (3,)),
                "floats": (np.float32, [1.5, -2.0], (2,)), "one_int": (np.int64, 42, ())}
    assert sorted(consts) == sorted(expected)
    for name, (dtype, values, shape) in expected.items():
        assert [a.name for a in consts[name].attribute] == ["value"], name
        array = numpy_helper.to_array(consts[name].attribute[0].t)
        assert array.dtype == dtype and array.shape == shape, name
        np.testing.assert_array_equal(array, np.array(values, dtype))
    feeds = {"input_ids": np.array([[1, 5, 15]], np.int64)}
    assert_same_outputs(run(state.model, feeds), run(path, feeds), atol=0)


# a layer as a model-local function (as onnxscript writes it), called once per layer;
# its Constant in the short form must come out of load in the tensor form too
FUNCTION = """<ir_version: 8, opset_import: ["" : 17, "local" : 1]>
g (int64[batch, seq] input_ids) => (float[batch, seq, 4] logits)
<float[16, 4] embed = {%s}, float[4, 4] w0 = {%s}, float[4, 4] w1 = {%s}, float[4, 4] head = {%s}>
{
  h0 = Gather(embed, input_ids)
  h1 = local.Layer(h0, w0)
  h2 = local.Layer(h1, w1)
  logits = MatMul(h2, head)
}
<domain: "local", opset_import: ["" : 17]>
Layer (x, w) => (y)
{
  t = MatMul(x, w)
  half = Constant <value_float = 0.5> ()
  u = Mul(t, half)
  a = Tanh(u)
  y = Add(x, a)
}"""


def test_inline_functions(tmp_path):
    rng = np.random.default_rng(0)
    vals = lambda n: ", ".join(f"{x:.5f}" for x in rng.standard_normal(n))  # noqa: E731
    path = save(parse(FUNCTION % (vals(64), vals(16), vals(16), vals(16))), tmp_path / "model.onnx")
    state = load(path)
    g = state.model.graph
    assert len(state.model.functions) == 0
    assert all(n.domain in ("", "ai.onnx") for n in g.node)
    assert [n.op_type for n in g.node].count("MatMul") == 3
    assert [n.op_type for n in g.node].count("Tanh") == 2
    assert all([a.name for a in n.attribute] == ["value"] for n in g.node if n.op_type == "Constant")
    feeds = {"input_ids": rng.integers(0, 16, (2, 5)).astype(np.int64)}
    want = run(path, feeds)
    assert_same_outputs(run(state.model, feeds), want)
    assert np.abs(want["logits"]).max() > 0.1  # not a trivially zero comparison


@pytest.mark.parametrize("content", [b"this is not a model\n", b"\x08\x07\x12\xff\xff\xff", None])
def test_bad_model_file_names_the_file(tmp_path, content):
    path = tmp_path / "model.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(LlcError) as e:
        load(path)
    assert e.value.where == str(path)
    assert str(path) in str(e.value)


def test_no_token_input_is_an_error(tmp_path):
    text = """<ir_version: 8, opset_import: ["" : 17]>
g (float[batch, 4] x) => (float[batch, 4] logits) { logits = Relu(x) }"""
    path = save(parse(text), tmp_path / "model.onnx")
    with pytest.raises(LlcError, match="token input") as e:
        load(path)
    assert e.value.where == str(path)


def test_renamed_model_runs_like_the_original(tmp_path):
    """Sanity for the renaming above: the same weights give the same numbers under the new names."""
    names = {**RENAMED_KV, "ids": "x", "mask": "mask"}
    a = tiny_decoder(tmp_path, "a.onnx")
    b = tiny_decoder(tmp_path, "b.onnx", names=names)
    fa = decoder_feeds(3, 2)
    fb = decoder_feeds(3, 2, names=names)
    out_a, out_b = run(a, fa), run(b, fb)
    n = {**DEFAULT_NAMES, **names}
    np.testing.assert_array_equal(out_a["present.0.key"], out_b[n["present0k"]])
    np.testing.assert_array_equal(out_a["logits"], out_b["scores"])
