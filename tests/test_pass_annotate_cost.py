"""annotate-cost: FLOPs per scenario, weight bytes on the first reader, KV bytes on the present's maker."""

from __future__ import annotations

import pytest
from onnx import numpy_helper

from llc.compiler import new_state
from llc.compiler.passes.annotate_cost import AnnotateCost
from llc.compiler.passes.load import Load
from llc.compiler.passes.past_length import PastLength
from llc.compiler.pipeline import PassManager
from llc.profile import Workload
from test_pass_graphs import HEAD_DIM, HEADS, HIDDEN, LAYERS, VOCAB, tiny_decoder

F32 = 4


def annotate(path, wl):
    return PassManager([Load(), PastLength(), AnnotateCost()]).run(new_state(path, None, wl))


def costs_by_output(state) -> dict:
    return {n.output[0]: c for n, c in zip(state.model.graph.node, state.costs)}


@pytest.mark.parametrize("shape_read", [None, "full"])
@pytest.mark.parametrize("P,C", [(6, 32), (3, 20)])
def test_matmul_flops_are_2mnk(tmp_path, shape_read, P, C):
    state = annotate(tiny_decoder(tmp_path, shape_read=shape_read), Workload(prompt_tokens=P, max_context=C))
    assert not state.notes  # every shape inferred
    assert len(state.costs) == len(state.model.graph.node)
    cost = costs_by_output(state)
    # (M*N per head, K) for prefill (P tokens, total P) and decode (1 token, total C)
    for scenario, seq, total in (("prefill", P, P), ("decode", 1, C)):
        expect = {}
        for l in range(LAYERS):
            for w in "qkvo":
                expect[f"{w}{l}"] = 2 * seq * HIDDEN * HIDDEN
            expect[f"s{l}"] = 2 * HEADS * seq * total * HEAD_DIM  # q @ k^T
            expect[f"c{l}"] = 2 * HEADS * seq * HEAD_DIM * total  # p @ v
        expect["logits"] = 2 * seq * VOCAB * HIDDEN
        got = {n.output[0]: getattr(cost[n.output[0]], f"flops_{scenario}")
               for n in state.model.graph.node if n.op_type == "MatMul"}
        assert got == expect, scenario
    assert cost["logits"].act_bytes_prefill == P * VOCAB * F32
    assert cost["present.0.key"].act_bytes_prefill == HEADS * P * HEAD_DIM * F32
    # movement ops are free; the softmax is a few flops per element
    assert cost["kT0"].flops_decode == 0 and cost["p0"].flops_decode == 5 * HEADS * C


def test_weight_bytes_counted_once_per_initializer(tmp_path):
    """A tied embedding is read by the Gather and by the head's Transpose: its bytes go to the Gather only."""
    state = annotate(tiny_decoder(tmp_path, tied=True), Workload(6, 32))
    cost = costs_by_output(state)
    assert cost["h0"].weight_bytes == VOCAB * HIDDEN * F32
    assert cost["embed_t"].weight_bytes == 0
    assert cost["logits"].weight_bytes == 0
    assert cost["q0"].weight_bytes == HIDDEN * HIDDEN * F32
    read = {i for n in state.model.graph.node for i in n.input}
    sizes = {t.name: numpy_helper.to_array(t).nbytes for t in state.model.graph.initializer}
    assert sum(c.weight_bytes for c in state.costs) == sum(b for name, b in sizes.items() if name in read)


def test_weight_bytes_once_when_a_node_reads_an_initializer_twice(tmp_path):
    state = annotate(tiny_decoder(tmp_path, shape_read="negative"), Workload(6, 32))
    cost = costs_by_output(state)
    assert cost["merge_dyn"].weight_bytes == 8  # keep, int64[1], read twice by this Concat
    read = {i for n in state.model.graph.node for i in n.input}
    sizes = {t.name: numpy_helper.to_array(t).nbytes for t in state.model.graph.initializer}
    assert sum(c.weight_bytes for c in state.costs) == sum(b for name, b in sizes.items() if name in read)


@pytest.mark.parametrize("C", [32, 100])
def test_kv_bytes_on_the_node_making_the_present(tmp_path, C):
    state = annotate(tiny_decoder(tmp_path, shape_read="start_end"), Workload(prompt_tokens=6, max_context=C))
    presents = state.signature.kv_outputs
    kv = {n.output[0]: c.kv_bytes for n, c in zip(state.model.graph.node, state.costs) if c.kv_bytes}
    assert kv == {p: HEADS * C * HEAD_DIM * F32 for p in presents}  # batch 1, max context, float32
    assert len(kv) == 2 * LAYERS


def test_decode_costs_the_bytes_it_reads_at_their_precision():
    """int4 weights read an eighth of fp32's bytes; an embedding lookup reads one row, not its table.
    With a compute rate and a read bandwidth in the profile, a decode step costs both; without,
    FLOPs at the decode rate (which folds fp32 reads in)."""
    from llc.compiler import analysis_passes
    from llc.compiler.costmodel import decode_ms, prefill_ms
    from llc.profile import Device, Rates
    from models import tiny_llama

    wl = Workload(16, 128)
    blocks = {w: PassManager(analysis_passes(weights=w)).run(new_state(tiny_llama("legacy"), None, wl)).blocks
              for w in ("fp32", "int4")}
    fp32, int4 = ([b for b in blocks[w] if b.kind == "layer"][0] for w in ("fp32", "int4"))
    kv = fp32.kv_bytes
    assert fp32.read_bytes_decode == pytest.approx(fp32.weight_bytes + kv, rel=0.01)  # constants shared with earlier blocks read there
    assert int4.read_bytes_decode - kv < 0.3 * (fp32.read_bytes_decode - kv)
    embed = blocks["fp32"][0]
    assert embed.kind == "embed" and embed.weight_bytes > 0 and embed.read_bytes_decode == 0
    measured = Device("d", "local", 1000, gflops=2.0, gflops_prefill=30.0, memory_gbps=5.0)
    folded = Device("d", "local", 1000, gflops=2.0)
    assert decode_ms(int4, measured) < 0.5 * decode_ms(fp32, measured)
    assert decode_ms(fp32, measured) == pytest.approx(fp32.flops_decode / 30e6 + fp32.read_bytes_decode / 5e6)
    assert decode_ms(int4, folded) == decode_ms(fp32, folded) == pytest.approx(fp32.flops_decode / 2e6)
    # the rates `llc profile` measured for int4 layers cost int4 blocks; fp32 blocks keep fp32's
    assert (fp32.precision, int4.precision, embed.precision) == ("fp32", "int4", "fp32")
    both = Device("d", "local", 1000, gflops=2.0, gflops_prefill=30.0, memory_gbps=5.0, int4=Rates(60.0, 2.0))
    assert decode_ms(int4, both) == pytest.approx(int4.flops_decode / 60e6 + int4.read_bytes_decode / 2e6)
    assert decode_ms(fp32, both) == decode_ms(fp32, measured)
    assert prefill_ms(int4, both) == pytest.approx(int4.flops_prefill / 60e6)
