"""comm-map: each crossing tensor goes straight from its producer to every stage that reads it; no KV."""

from __future__ import annotations

import itertools

import pytest
import yaml

from conftest import write_profile
from llc.compiler import analysis_passes, new_state
from llc.compiler.passes.comm_map import CommMap, stage_of_nodes
from llc.compiler.passes.partition import Partition
from llc.compiler.pipeline import PassManager
from llc.compiler.state import Block, node_inputs
from llc.profile import load_profile
from test_pass_graphs import HIDDEN, SHAPE_READS, tiny_decoder

F32 = 4


def analysed(tmp_path, shape_read=None, past_length=True):
    profile = load_profile(write_profile(tmp_path / "p.yaml", 4))
    passes = analysis_passes(simplify=False)
    if not past_length:
        passes = [p for p in passes if p.name != "past-length"]
    state = new_state(tiny_decoder(tmp_path, shape_read=shape_read), profile, profile.workload)
    return PassManager(passes).run(state)


def plan(state, tmp_path, sizes) -> None:
    """Stages of ``sizes`` consecutive blocks each, on dev0, dev1, ..."""
    stages, first = [], 0
    for k, n in enumerate(sizes):
        stages.append({"device": f"dev{k}", "blocks": [first, first + n - 1]})
        first += n
    path = tmp_path / f"split-{'-'.join(map(str, sizes))}.yaml"
    path.write_text(yaml.safe_dump({"stages": stages}))
    Partition(split=str(path)).run(state)


def test_skip_tensor_goes_straight_to_its_reader(tmp_path):
    """pad_bias, made with the embedding, is read by both layers: stage 0 sends it to 1 and to 2 itself."""
    state = analysed(tmp_path)
    plan(state, tmp_path, [1, 1, 1, 1])
    comm = CommMap().run(state).comm
    assert {(e.tensor, e.kind, e.producer_stage, e.consumer_stages) for e in comm} == {
        ("h0", "activation", 0, (1,)), ("pad_bias", "side", 0, (1, 2)),
        ("h1", "activation", 1, (2,)), ("h2", "activation", 2, (3,))}
    by = {e.tensor: e for e in comm}
    P, C = state.workload.prompt_tokens, state.workload.max_context
    assert (by["h0"].bytes_decode, by["h0"].bytes_prefill) == (HIDDEN * F32, P * HIDDEN * F32)
    assert (by["pad_bias"].bytes_decode, by["pad_bias"].bytes_prefill) == (C * F32, P * F32)
    assert by["pad_bias"].dtype == "float32" and by["pad_bias"].shape == ("batch", 1, 1, "total")


def test_mask_inputs_go_from_the_head_to_the_layer_that_rebuilds_the_past_length(tmp_path):
    state = analysed(tmp_path, shape_read="full")
    plan(state, tmp_path, [1, 1, 2])
    by = {e.tensor: e for e in CommMap().run(state).comm}
    assert (by["attention_mask"].kind, by["attention_mask"].producer_stage, by["attention_mask"].consumer_stages) \
        == ("graph_input", 0, (1,))
    assert (by["causal"].producer_stage, by["causal"].consumer_stages) == (1, (2,))  # made in layer 0, read in 1
    assert by["pad_bias"].consumer_stages == (1, 2)


@pytest.mark.parametrize("shape_read", [None, *SHAPE_READS])
def test_kv_never_crosses_and_every_crossing_is_mapped(tmp_path, shape_read):
    state = analysed(tmp_path, shape_read=shape_read)
    kv = state.signature.kv_inputs | state.signature.kv_outputs
    g = state.model.graph
    nb = len(state.blocks)
    for k in range(1, nb + 1):  # every way to cut the blocks into k stages
        for cuts in itertools.combinations(range(1, nb), k - 1):
            bounds = (0, *cuts, nb)
            plan(state, tmp_path, [b - a for a, b in zip(bounds, bounds[1:])])
            comm = CommMap().run(state).comm
            assert not kv & {e.tensor for e in comm}, bounds
            stage = stage_of_nodes(state)
            made = {o: stage[i] for i, n in enumerate(g.node) for o in n.output}
            made.update({t: 0 for t in state.signature.input_roles if t not in state.signature.kv_inputs})
            need = {(t, made[t], stage[i]) for i, n in enumerate(g.node) for t in node_inputs(n)
                    if t in made and made[t] != stage[i] and state.classes.get(t) != "const"}
            sent = {(e.tensor, e.producer_stage, c) for e in comm for c in e.consumer_stages}
            assert sent == need, bounds
            assert all(e.producer_stage < min(e.consumer_stages) for e in comm)


def test_a_cache_read_on_two_stages_is_refused(tmp_path):
    """Forced blocks that cut between layer 0's shape read of past_key_values.1.key and layer 1."""
    state = analysed(tmp_path, shape_read="full", past_length=False)
    assert [b.label for b in state.blocks] == ["embed", "layer 0", "head"]
    g = state.model.graph
    q1 = next(i for i, n in enumerate(g.node) if n.output[0] == "q1")
    merged = state.blocks[1]
    state.blocks[1:2] = [Block(1, "layer 0", "layer", [i for i in merged.nodes if i < q1]),
                         Block(2, "layer 1", "layer", [i for i in merged.nodes if i >= q1])]
    state.blocks[3].index = 3
    plan(state, tmp_path, [1, 1, 1, 1])
    with pytest.raises(AssertionError, match="past_key_values.1.key"):
        CommMap().run(state)
