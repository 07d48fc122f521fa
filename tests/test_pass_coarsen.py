"""coarsen: blocks at legal cuts (embed, layer 0, layer 1, head); never a cut through a cache's readers."""

from __future__ import annotations

import pytest

from llc.compiler import new_state
from llc.compiler.passes.annotate_cost import AnnotateCost
from llc.compiler.passes.coarsen import Coarsen, legal_cuts
from llc.compiler.passes.load import Load
from llc.compiler.passes.past_length import PastLength
from llc.compiler.pipeline import PassManager
from llc.compiler.state import consumers
from llc.profile import Workload
from test_pass_graphs import HIDDEN, SHAPE_READS, VOCAB, tiny_decoder

F32 = 4
WL = Workload(prompt_tokens=6, max_context=32)


def coarsen(path, past_length=True, granularity="layer"):
    passes = [Load()] + ([PastLength()] if past_length else []) + [AnnotateCost(), Coarsen(granularity=granularity)]
    return PassManager(passes).run(new_state(path, None, WL))


def block_of(state) -> dict[str, int]:
    """Output tensor -> index of the block whose nodes make it."""
    g = state.model.graph
    return {o: b.index for b in state.blocks for i in b.nodes for o in g.node[i].output}


@pytest.mark.parametrize("shape_read", [None, *SHAPE_READS])
def test_blocks_are_embed_layers_head(tmp_path, shape_read):
    state = coarsen(tiny_decoder(tmp_path, shape_read=shape_read))
    assert [(b.label, b.kind) for b in state.blocks] == [
        ("embed", "embed"), ("layer 0", "layer"), ("layer 1", "layer"), ("head", "head")]
    assert [i for b in state.blocks for i in b.nodes] == list(range(len(state.model.graph.node)))
    where = block_of(state)
    assert where["h0"] == 0 and where["pad_bias"] == 0
    assert {where[t] for t in ("q0", "present.0.key", "present.0.value", "h1")} == {1}
    assert {where[t] for t in ("q1", "present.1.key", "present.1.value", "h2")} == {2}
    assert where["logits"] == 3
    assert [b.kv_bytes > 0 for b in state.blocks] == [False, True, True, False]
    assert state.classes["h1"] == "stream" and state.classes["pad_bias"] == "side"


def test_cut_bytes(tmp_path):
    """After embed: the stream h0 and the mask bias both layers read; after layer 1: only h2."""
    state = coarsen(tiny_decoder(tmp_path))
    C, P = WL.max_context, WL.prompt_tokens
    assert [b.cut_bytes_decode for b in state.blocks] == [HIDDEN * F32 + C * F32, HIDDEN * F32 + C * F32,
                                                          HIDDEN * F32, 0]
    assert [b.cut_bytes_prefill for b in state.blocks] == [P * HIDDEN * F32 + P * F32, P * HIDDEN * F32 + P * F32,
                                                           P * HIDDEN * F32, 0]


@pytest.mark.parametrize("granularity", ["layer", "block"])
@pytest.mark.parametrize("shape_read", SHAPE_READS)
def test_no_cut_between_a_caches_readers(tmp_path, shape_read, granularity):
    """Without past-length, layer 0 reads past_key_values.1.key's shape and layer 1 the cache itself:
    no cut may fall between, so the two layers are one block."""
    state = coarsen(tiny_decoder(tmp_path, shape_read=shape_read), past_length=False, granularity=granularity)
    g = state.model.graph
    cons = consumers(g)
    cuts = legal_cuts(state.model, state.classes, state.signature.kv_inputs)
    block = {i: b.index for b in state.blocks for i in b.nodes}
    for kv in state.signature.kv_inputs:
        readers = cons[kv]
        assert len({block[i] for i in readers}) == 1, kv
        assert not [c for c in cuts if min(readers) < c <= max(readers)], kv
    shape_reader = next(i for i in cons["past_key_values.1.key"] if g.node[i].op_type == "Shape")
    assert block[shape_reader] == block[cons["past_key_values.0.key"][0]]  # layer 0 went with layer 1
    if granularity == "layer":
        assert [b.label for b in state.blocks] == ["embed", "layer 0", "head"]
    # the same model after past-length can be cut between the layers again
    assert len(coarsen(tiny_decoder(tmp_path, "b.onnx", shape_read=shape_read),
                       granularity=granularity).blocks) > len(state.blocks)


def test_resident_memory_maps_lookup_tables_and_counts_the_packed_copy(tmp_path):
    """An embedding table only looked up by row is charged a page per row a run can touch, never more
    than its size; the head's MatMul weight is a transient (its packed copy at load); a tied table
    that the head also reads is held whole there."""
    from llc.compiler.costmodel import PAGE, resident_weights
    from llc.compiler.state import Block

    state = coarsen(tiny_decoder(tmp_path))
    embed, head = state.blocks[0], state.blocks[-1]
    assert embed.lookups == {"embed": HIDDEN * F32} and head.lookups == {}
    assert head.packed_bytes == HIDDEN * VOCAB * F32 and embed.packed_bytes == 0
    assert resident_weights(embed, WL) == embed.weights  # 16 rows of 32 bytes: smaller than one page a row
    table = Block(0, "embed", "embed", [], weights={"t": 50_000 * 2304, "w": 7}, lookups={"t": 2304})
    assert resident_weights(table, Workload(max_context=256)) == {"t": 256 * PAGE, "w": 7}
    assert resident_weights(table, Workload(max_context=4096, requests_in_flight=8)) == {"t": 50_000 * 2304, "w": 7}
    tied = coarsen(tiny_decoder(tmp_path / "tied", tied=True))
    assert tied.blocks[0].lookups == {"embed": HIDDEN * F32} and "embed" not in tied.blocks[-1].lookups
