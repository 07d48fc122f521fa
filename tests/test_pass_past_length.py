"""past-length: a cache's Shape reads rebuilt from input_ids and attention_mask, same numbers."""

from __future__ import annotations

import numpy as np
import pytest

from llc.compiler import new_state
from llc.compiler.passes.load import Load
from llc.compiler.passes.past_length import PastLength
from llc.compiler.pipeline import PassManager
from llc.profile import Workload
from test_pass_graphs import SHAPE_READS, assert_same_outputs, decoder_feeds, parse, run, save, tiny_decoder

WL = Workload(prompt_tokens=6, max_context=32)


def past_length(path):
    return PassManager([Load(), PastLength()]).run(new_state(path, None, WL))


def kv_shape_reads(state) -> list[int]:
    kv = state.signature.kv_inputs
    return [i for i, n in enumerate(state.model.graph.node) if n.op_type in ("Shape", "Size") and n.input[0] in kv]


@pytest.mark.parametrize("shape_read", SHAPE_READS)
def test_shape_reads_of_caches_are_gone_and_numbers_equal(tmp_path, shape_read):
    path = tiny_decoder(tmp_path, shape_read=shape_read)
    state = past_length(path)
    assert kv_shape_reads(Load().run(new_state(path, None, WL))), "the model should read a cache's shape"
    assert kv_shape_reads(state) == []
    assert not any(n.op_type == "Shape" and n.input[0].startswith("past_key_values") for n in state.model.graph.node)
    assert state.notes == []
    for past, seq, batch in ((0, 4, 1), (5, 1, 1), (3, 2, 2)):  # prefill, decode, a batch of two
        feeds = decoder_feeds(past, seq, batch=batch, seed=past + seq)
        assert_same_outputs(run(state.model, feeds), run(path, feeds), atol=1e-6)


# a cache read with every kind of start/end the Shape op allows, returned as a graph output
MICRO = """<ir_version: 8, opset_import: ["" : 17]>
g (int64[batch, seq] input_ids, int64[batch, total] attention_mask, float[batch, 2, past, 4] pk)
  => (float[batch, seq, 8] logits, float[batch, 2, total, 4] present, int64[n] sh)
<float[16, 8] embed = {%s}, int64[4] split = {0, 0, 2, 4}>
{
  logits = Gather(embed, input_ids)
  r = Reshape(logits, split)
  t = Transpose <perm = [0, 2, 1, 3]> (r)
  present = Concat <axis = 2> (pk, t)
  sh = Shape %s (pk)
}"""


@pytest.mark.parametrize("attrs", ["", "<start = 2, end = 3>", "<start = -2>", "<end = 1>", "<start = 1, end = -1>",
                                   "<start = -1>", "<start = 3, end = 2>", "<start = -9, end = 9>"])
def test_shape_start_end(tmp_path, attrs):
    table = ", ".join(str(float(i % 7)) for i in range(128))
    model = parse(MICRO % (table, attrs))
    path = save(model, tmp_path / "model.onnx")
    state = past_length(path)
    assert kv_shape_reads(state) == []
    for past in (0, 3):
        feeds = {"input_ids": np.zeros((2, 2), np.int64), "attention_mask": np.ones((2, past + 2), np.int64),
                 "pk": np.zeros((2, 2, past, 4), np.float32)}
        want, got = run(path, feeds)["sh"], run(state.model, feeds)["sh"]
        assert got.dtype == want.dtype and got.tolist() == want.tolist(), (attrs, past)


def test_the_past_length_is_read_from_the_mask(tmp_path):
    """After the pass the read no longer looks at the cache: a mask over 2 + 7 positions says past 7,
    whatever the cache holds (the original says 3, the cache's length); batch from input_ids."""
    table = ", ".join(str(float(i % 7)) for i in range(128))
    path = save(parse(MICRO % (table, "")), tmp_path / "model.onnx")
    state = past_length(path)
    feeds = {"input_ids": np.zeros((2, 2), np.int64), "attention_mask": np.ones((2, 9), np.int64),
             "pk": np.zeros((2, 2, 3, 4), np.float32)}
    assert run(path, feeds)["sh"].tolist() == [2, 2, 3, 4]
    assert run(state.model, feeds)["sh"].tolist() == [2, 2, 7, 4]


def test_without_attention_mask_the_graph_is_left_alone(tmp_path):
    path = tiny_decoder(tmp_path, shape_read="full", mask=False)
    before = Load().run(new_state(path, None, WL)).model.SerializeToString()
    state = past_length(path)
    assert "attention_mask" not in state.signature.input_roles.values()
    assert state.model.SerializeToString() == before
    assert len(kv_shape_reads(state)) == 1
    assert len(state.notes) == 1 and "no attention_mask" in state.notes[0]
