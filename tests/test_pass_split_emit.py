"""split and emit: each stage's segment is valid ONNX with the planned inputs and outputs, and the
segments run in order give the unsplit model's numbers."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import yaml

from conftest import write_profile
from llc.bundle import schema
from llc.compiler import analysis_passes, compile_model, new_state
from llc.compiler.passes.comm_map import CommMap, stage_of_nodes
from llc.compiler.passes.partition import Partition
from llc.compiler.passes.split import Split
from llc.compiler.pipeline import PassManager
from llc.profile import load_profile
from llc.runtime.verify import verify_build
from test_pass_graphs import assert_same_outputs, decoder_feeds, run, tiny_decoder


def split_file(tmp_path, sizes) -> str:
    stages, first = [], 0
    for k, n in enumerate(sizes):
        stages.append({"device": f"dev{k}", "blocks": [first, first + n - 1]})
        first += n
    path = tmp_path / "split.yaml"
    path.write_text(yaml.safe_dump({"stages": stages}))
    return str(path)


def test_split_segments_inputs_and_outputs(tmp_path):
    profile = load_profile(write_profile(tmp_path / "p.yaml", 4))
    passes = analysis_passes(simplify=False) + [Partition(split=split_file(tmp_path, [1, 1, 1, 1])), CommMap(),
                                                 Split()]
    state = PassManager(passes).run(new_state(tiny_decoder(tmp_path), profile, profile.workload))
    kv = [f"past_key_values.{l}.{x}" for l in range(2) for x in ("key", "value")]
    pr = [k.replace("past_key_values", "present") for k in kv]
    assert [(s.stage, set(s.inputs), s.outputs) for s in state.segments] == [
        (0, {"input_ids", "attention_mask"}, ("h0", "pad_bias")),
        (1, {"h0", "pad_bias", *kv[:2]}, (*pr[:2], "h1")),
        (2, {"h1", "pad_bias", *kv[2:]}, (*pr[2:], "h2")),
        (3, {"h2"}, ("logits",))]
    stage = stage_of_nodes(state)
    for s in state.segments:  # its own nodes, plus only constant-only ones from elsewhere
        own = {i for i, k in enumerate(stage) if k == s.stage}
        assert own <= set(s.nodes)
        for i in set(s.nodes) - own:
            assert all(state.classes[o] == "const" for o in state.model.graph.node[i].output)
    assert sorted(i for s in state.segments for i in s.nodes if stage[i] == s.stage) == \
        list(range(len(state.model.graph.node)))


def run_segments(build, plan, feeds) -> dict[str, np.ndarray]:
    """Run every stage's segment in pipeline order, tensors passed on by name."""
    env = dict(feeds)
    for s in plan.stages:
        env.update(run(build / s.segment, env))
    return env


@pytest.mark.parametrize("sizes", [[1, 1, 1, 1], [2, 2], [1, 3]])
@pytest.mark.parametrize("shape_read", [None, "full", "negative"])
def test_segments_are_valid_and_chain_to_the_unsplit_model(tmp_path, shape_read, sizes):
    model = tiny_decoder(tmp_path, shape_read=shape_read)
    profile = load_profile(write_profile(tmp_path / "p.yaml", 4))
    build = tmp_path / "build"
    state, _ = compile_model(model, profile, build, quiet=True, simplify=False, split=split_file(tmp_path, sizes))
    plan = schema.read(build, schema.PLAN)
    assert [s.index for s in plan.stages] == list(range(len(sizes)))
    for s, seg in zip(plan.stages, state.segments):
        onnx.checker.check_model(str(build / s.segment), full_check=True)
        proto = onnx.load(str(build / s.segment))
        assert tuple(i.name for i in proto.graph.input) == seg.inputs == s.inputs
        assert tuple(o.name for o in proto.graph.output) == seg.outputs == s.outputs
        manifest = schema.read_manifest(build / s.manifest)
        assert [i.name for i in manifest.inputs] == list(seg.inputs)
    outputs = [o for s in plan.stages for o in s.outputs
               if o in ("logits",) or o.startswith("present.")]
    assert sorted(outputs) == sorted(o.name for o in onnx.load(str(model)).graph.output)
    for past, seq in ((0, 5), (5, 1)):
        feeds = decoder_feeds(past, seq, seed=seq)
        want = run(model, feeds)
        got = run_segments(build, plan, feeds)
        assert_same_outputs({k: got[k] for k in want}, want)


def test_verify_build_after_the_whole_pipeline(tmp_path, monkeypatch):
    """Every pass, simplify included (its cache in this test's folder), the MIP choosing three stages."""
    monkeypatch.setenv("LLC_CACHE", str(tmp_path / "cache"))
    model = tiny_decoder(tmp_path, shape_read="full")
    profile = load_profile(write_profile(tmp_path / "p.yaml", 3, stages=3))
    state, _ = compile_model(model, profile, tmp_path / "build", quiet=True)
    assert state.plan.split == "mip" and len(state.plan.stages) == 3
    assert (tmp_path / "cache").is_dir()
    diffs = verify_build(tmp_path / "build")
    assert {(d.step, d.output) for d in diffs} == {
        (step, o) for step in ("prefill", "decode")
        for o in ["logits"] + [f"present.{l}.{x}" for l in range(2) for x in ("key", "value")]}
    assert max(d.max_abs_diff for d in diffs) <= 1e-5, diffs
    doc = json.loads((tmp_path / "build" / "plan.json").read_text())
    assert [s["device"] for s in doc["stages"]] == [s.device for s in state.plan.stages]
