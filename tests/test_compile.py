"""llc compile + llc verify on tiny decoders: two architectures, four exporters, 1-4 stages.

The contract is numerical: every stage split of a model must reproduce the
unsplit model's logits and present.* outputs in onnxruntime (prefill with an
empty cache, and a decode step with the prefill's cache).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
import yaml
from click.testing import CliRunner

from conftest import write_profile
from helpers import compiled_build
from llc.bundle import schema
from llc.cli import main
from llc.compiler import PASSES, compile_model
from llc.compiler.passes.load import check_onnx
from llc.compiler.segment import sha256_file
from llc.errors import LlcError
from llc.runtime.splitrun import SplitRunner
from llc.profile import load_profile
from llc.runtime.verify import verify_build
from models import genai_llama, tiny_gpt2, tiny_llama, tiny_llama_tied

# name -> (builder, number of layers)
BUILDERS = {
    "llama-legacy": (lambda: tiny_llama("legacy"), 4),
    "llama-dynamo": (lambda: tiny_llama("dynamo"), 4),
    "llama-dynamo-plain": (lambda: tiny_llama("dynamo-plain"), 4),
    "llama-onnxscript": (lambda: tiny_llama("onnxscript"), 4),
    "llama-tied-dynamo": (lambda: tiny_llama_tied("dynamo"), 2),
    "llama-legacy-llc-int4": (lambda: (tiny_llama("legacy"), "int4"), 4),
    "llama-dynamo-llc-int8": (lambda: (tiny_llama("dynamo"), "int8"), 4),
    "gpt2-legacy-llc-int4": (lambda: (tiny_gpt2("legacy"), "int4"), 4),
    "llama-genai-int4": (lambda: genai_llama("int4"), 4),
    "llama-genai-int8": (lambda: genai_llama("int8"), 4),
    "llama-genai-fp32": (lambda: genai_llama("fp32"), 4),
    "gpt2-legacy": (lambda: tiny_gpt2("legacy"), 4),
    "gpt2-dynamo": (lambda: tiny_gpt2("dynamo"), 4),
    "gpt2-dynamo-plain": (lambda: tiny_gpt2("dynamo-plain"), 4),
}


def model_of(name: str):
    """(model path, weights): an export as is (fp32, or quantized by its exporter), or quantized by llc."""
    made = BUILDERS[name][0]()
    return made if isinstance(made, tuple) else (made, "fp32")


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_layers_found_whatever_the_exporter(name):
    """Structure, not names: every export yields embed, its layers, head; one KV pair per layer."""
    from llc.compiler import analysis_passes, new_state
    from llc.compiler.pipeline import PassManager
    from llc.profile import Workload

    (model, weights), layers = model_of(name), BUILDERS[name][1]
    state = PassManager(analysis_passes(weights=weights)).run(new_state(model, None, Workload(16, 128)))
    labels = [b.label for b in state.blocks]
    assert labels == ["embed"] + [f"layer {i}" for i in range(layers)] + ["head"]
    assert len(state.signature.kv) == 2 * layers
    per_layer_kv = [b.kv_bytes for b in state.blocks if b.kind == "layer"]
    assert len(set(per_layer_kv)) == 1 and per_layer_kv[0] > 0
    layer_flops = [b.flops_decode for b in state.blocks if b.kind == "layer"]
    assert min(layer_flops) > 0 and max(layer_flops) == pytest.approx(min(layer_flops), rel=0.05)


def check_build(build, model) -> None:
    """Every graph output made by exactly one valid segment, no cache read on two stages, split == unsplit."""
    plan = schema.read(build, schema.PLAN)
    outputs = [o for s in plan.stages for o in s.outputs]
    originals = [o.name for o in onnx.load(str(model), load_external_data=False).graph.output]
    for o in originals:
        assert outputs.count(o) == 1, o
    kv_readers: dict[str, int] = {}
    kv = {k.past for k in plan.model.kv}
    for s in plan.stages:
        check_onnx(build / s.segment)
        for i in schema.read_manifest(build / s.manifest).inputs:
            if i.name in kv:
                kv_readers[i.name] = kv_readers.get(i.name, 0) + 1
                assert i.source == "kv", i  # a cache is never sent
    assert kv_readers and max(kv_readers.values()) == 1, kv_readers
    diffs = verify_build(build)
    batched = schema.read_manifest(build / plan.stages[0].manifest).max_batch > 1
    assert {d.step for d in diffs} == {"prefill", "decode"} | (
        {"batched decode", "batched vs alone"} if batched else set())
    assert len(diffs) == 2 * len(originals) + 2 * batched
    worst = max(d.max_abs_diff for d in diffs)
    assert worst <= 1e-4, diffs


@pytest.mark.parametrize("stages", [1, 2, 3, 4])
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_split_equals_unsplit(tmp_path, name, stages):
    model, weights = model_of(name)
    profile = load_profile(write_profile(tmp_path / "p.yaml", 4, stages=stages, requests_in_flight=3))
    compile_model(model, profile, tmp_path / "build", quiet=True, weights=weights)
    assert len(schema.read(tmp_path / "build", schema.PLAN).stages) == stages
    check_build(tmp_path / "build", model)


@pytest.mark.parametrize("shape", ["embed|layers|head", "embed|layers|layers|head", "embed+layer|rest"])
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_lone_embedding_and_lone_head_stages(tmp_path, name, shape):
    """A stage with only the embedding owns no cache, one with only the head reads no layer:
    both must still know the past length (from the mask) and give split == unsplit."""
    (model, weights), layers = model_of(name), BUILDERS[name][1]
    last = f"layer {layers - 1}"
    ranges = {"embed|layers|head": [["embed", "embed"], ["layer 0", last], ["head", "head"]],
              "embed|layers|layers|head": [["embed", "embed"], ["layer 0", "layer 0"], ["layer 1", last],
                                           ["head", "head"]],
              "embed+layer|rest": [["embed", "layer 0"], ["layer 1", "head"]]}[shape]
    split = tmp_path / "split.yaml"
    split.write_text(yaml.safe_dump({"stages": [{"device": f"dev{i}", "blocks": r} for i, r in enumerate(ranges)]}))
    profile = load_profile(write_profile(tmp_path / "p.yaml", 4))
    state, _ = compile_model(model, profile, tmp_path / "build", quiet=True, split=str(split), weights=weights)
    assert [(s.first_block, s.last_block) for s in state.plan.stages] == \
        [tuple(state.blocks.index(next(b for b in state.blocks if b.label == x)) for x in r) for r in ranges]
    check_build(tmp_path / "build", model)


def test_kv_cache_never_crosses_devices(tmp_path):
    model = tiny_llama("legacy")
    profile = load_profile(write_profile(tmp_path / "p.yaml", 4, stages=4))
    state, _ = compile_model(model, profile, tmp_path / "b", quiet=True, granularity="block")
    kv = state.signature.kv_inputs | state.signature.kv_outputs
    assert kv and not kv & {e.tensor for e in state.comm}
    for s in state.plan.stages:
        m = schema.read_manifest(tmp_path / "b" / "devices" / s.device / "manifest.json")
        pasts = [i.name for i in m.inputs if i.source == "kv"]
        presents = {i.present for i in m.inputs if i.source == "kv"}
        assert presents <= set(m.outputs)  # each past's present is made on the same device
        for send in m.sends:
            assert not set(send.tensors) & kv
        assert len(pasts) == len(set(pasts))


def test_skip_tensors_go_straight_to_their_reader(tmp_path):
    """Rotary tables / masks made on stage 0 are sent to stage 2 directly, not relayed."""
    model = tiny_llama("legacy")
    profile = load_profile(write_profile(tmp_path / "p.yaml", 4, stages=4, objective="throughput"))
    compile_model(model, profile, tmp_path / "b", quiet=True)
    plan = schema.read(tmp_path / "b", schema.PLAN)
    skips = [e for e in plan.comm_map if e.skip]
    assert skips, plan.comm_map
    made_on = {e.tensor: e.producer_stage for e in plan.comm_map}
    for s in plan.stages:  # every received tensor comes from the stage that makes it
        for i in schema.read_manifest(tmp_path / "b" / s.manifest).inputs:
            if i.source == "stage":
                assert i.from_stage == made_on[i.name]
    m0 = schema.read_manifest(tmp_path / "b" / plan.stages[0].manifest)
    assert len({s.to for s in m0.sends}) >= 2


def test_same_inputs_give_byte_identical_bundles(tmp_path):
    model = tiny_gpt2("legacy")
    profile = load_profile(write_profile(tmp_path / "p.yaml", 3, stages=3))
    for out in ("a", "b"):
        compile_model(model, profile, tmp_path / out, quiet=True)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) > 10
    for f in files_a:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def phones_profile(path, memory_mb: int) -> Path:
    """Two phones (the adb target: bundles get spares), 10.0.0.11 and .12."""
    path.write_text(yaml.safe_dump({
        "devices": [{"name": f"phone{i}", "target": "adb", "serial": f"10.0.0.1{i}:5555", "address": f"10.0.0.1{i}",
                     "memory_mb": memory_mb, "gflops": 8.0, "threads": 1} for i in (1, 2)],
        "network": {"bandwidth_mbps": 100, "latency_ms": 1},
        "workload": {"prompt_tokens": 16, "max_context": 128, "stages": 2}}))
    return path


def weight_files(build, device: str, spare: bool = False) -> dict[str, bytes]:
    folder = build / "devices" / device / ("spare" if spare else "")
    return {f.name: f.read_bytes() for f in folder.glob("w-*.bin")}


def test_a_re_plan_finds_its_weights_among_the_last_plans_files_and_spares(tmp_path):
    """Weights files are named by content and written whole per group, so moving layer 1 from phone1 to
    phone2 needs no new file on either phone: phone2 carried layer 1 as a spare. Without memory slack,
    a bundle carries no spares."""
    model = tiny_llama("legacy")
    profile = phones_profile(tmp_path / "phones.yaml", 2000)
    builds = {}
    for name, cut in (("a", "layer 1"), ("b", "layer 0")):
        split = tmp_path / f"{name}.yaml"
        split.write_text(yaml.safe_dump({"stages": [{"device": "phone1", "blocks": ["embed", cut]},
                                                    {"device": "phone2", "blocks": [f"layer {int(cut[-1]) + 1}",
                                                                                    "head"]}]}))
        builds[name] = tmp_path / name
        compile_model(model, load_profile(profile), builds[name], quiet=True, split=str(split))
    assert max(d.max_abs_diff for d in verify_build(builds["b"])) <= 1e-5
    for device in ("phone1", "phone2"):
        before = weight_files(builds["a"], device) | weight_files(builds["a"], device, spare=True)
        after = weight_files(builds["b"], device)
        assert after and set(after) <= set(before), device
        assert all(after[f] == before[f] for f in after)
    assert set(weight_files(builds["b"], "phone2")) - set(weight_files(builds["a"], "phone2"))  # layer 1 moved
    assert not set(weight_files(builds["a"], "phone1")) & set(weight_files(builds["a"], "phone1", spare=True))

    # memory for the stages of plan a and 30 KB more (after the 1.2 safety factor): no layer fits beside
    need = max(s.memory_bytes for s in schema.read(builds["a"], schema.PLAN).stages)
    tight = phones_profile(tmp_path / "tight.yaml", (need + 30_000) * 1.2 / (1 << 20))
    compile_model(model, load_profile(tight), tmp_path / "tight", quiet=True, split=str(tmp_path / "a.yaml"))
    assert not any((tmp_path / "tight" / "devices").glob("*/spare"))


def test_keys_are_per_build_and_per_device(tmp_path):
    model = tiny_llama("legacy")
    p3 = load_profile(write_profile(tmp_path / "p3.yaml", 3, stages=3))
    p2 = load_profile(write_profile(tmp_path / "p2.yaml", 3, stages=2))
    compile_model(model, p3, tmp_path / "a", quiet=True)
    compile_model(model, p2, tmp_path / "b", quiet=True)
    ka = {schema.read_manifest(m).keys.public for m in (tmp_path / "a").glob("devices/*/manifest.json")}
    kb = {schema.read_manifest(m).keys.public for m in (tmp_path / "b").glob("devices/*/manifest.json")}
    assert len(ka) == 3 and len(kb) == 2 and not ka & kb
    for m in (tmp_path / "a").glob("devices/*/manifest.json"):
        text = m.read_text()
        assert schema.read(tmp_path / "a", schema.COORDINATOR).secret not in text


def test_pass_registry_names_match():
    for key, cls in PASSES.items():
        assert key == cls.name
    assert list(PASSES) == ["load", "simplify", "quantize", "past-length", "annotate-cost", "coarsen", "partition",
                            "comm-map", "layout", "split", "emit"]


def test_report_shows_every_stage(tmp_path):
    model = tiny_llama("legacy")
    profile = load_profile(write_profile(tmp_path / "p.yaml", 3, stages=3))
    compile_model(model, profile, tmp_path / "b", quiet=True)
    html = (tmp_path / "b" / "report.html").read_text()
    assert html.count("<rect") >= 6 and all(f"dev{i}" in html for i in range(3))


SPLIT3 = [["embed", "layer 0"], ["layer 1", "layer 2"], ["layer 3", "head"]]


def three_stage_build(tmp_path):
    """tiny llama over 3 stages, the rotary tables and mask sent from stage 0 straight to stage 2."""
    split = tmp_path / "split.yaml"
    split.write_text(yaml.safe_dump({"stages": [{"device": f"dev{i}", "blocks": r} for i, r in enumerate(SPLIT3)]}))
    compile_model(tiny_llama("legacy"), load_profile(write_profile(tmp_path / "p.yaml", 3)), tmp_path / "b",
                  quiet=True, split=str(split))
    build = tmp_path / "b"
    plan = schema.read(build, schema.PLAN)
    values = SplitRunner(build).teacher_force([1, 5, 7], [9]).steps[0]
    # a rotary table, not the mask: scaling a mask of 0 and -inf would change nothing
    skip = next(e for e in plan.comm_map if e.skip and e.dtype == "float32" and 2 in e.consumer_stages
                and 0.1 < np.abs(values[e.tensor]).max() < 1e6)
    return build, plan, skip


def test_verify_catches_a_comm_map_that_drops_a_skip_tensor(tmp_path):
    build, plan, skip = three_stage_build(tmp_path)
    assert max(d.max_abs_diff for d in verify_build(build)) <= 1e-4
    path = build / plan.stages[0].manifest
    m = schema.read_manifest(path)
    sends = tuple(dataclasses.replace(s, tensors=tuple(t for t in s.tensors if t != skip.tensor)) for s in m.sends)
    schema.write_manifest(path, dataclasses.replace(m, sends=sends))
    with pytest.raises(LlcError, match=f"never received .*{re.escape(skip.tensor)}.*comm map does not deliver"):
        verify_build(build)


def test_verify_catches_a_comm_map_that_sends_the_wrong_values(tmp_path):
    """The producer sends something else under the skip tensor's name: the numbers must differ."""
    build, plan, skip = three_stage_build(tmp_path)
    seg_path = build / plan.stages[0].segment
    seg = onnx.load(str(seg_path), load_external_data=False)
    node = next(n for n in seg.graph.node if skip.tensor in n.output)
    node.output[list(node.output).index(skip.tensor)] = skip.tensor + "__right"
    seg.graph.initializer.append(onnx.numpy_helper.from_array(np.array(0.5, np.float32), "llc_test_half"))
    seg.graph.node.append(onnx.helper.make_node("Mul", [skip.tensor + "__right", "llc_test_half"], [skip.tensor]))
    onnx.save(seg, str(seg_path))
    mpath = build / plan.stages[0].manifest
    m = schema.read_manifest(mpath)
    schema.write_manifest(mpath, dataclasses.replace(m, files={**m.files, "segment.onnx": sha256_file(seg_path)}))
    worst = max(verify_build(build), key=lambda d: d.max_abs_diff)
    assert worst.max_abs_diff > 1e-3, worst
    r = CliRunner().invoke(main, ["verify", str(build)])
    assert r.exit_code == 2 and "split differs from unsplit" in r.output


def test_unchanged_inputs_and_intact_build_compile_to_a_no_op(tmp_path):
    """The build records what it was made from; the same inputs again change nothing, anything else does."""
    model, profile = tiny_llama("legacy"), write_profile(tmp_path / "p.yaml", 2, stages=2)
    args = ["compile", str(model), "--devices", str(profile), "-o", str(tmp_path / "b"), "-q"]
    assert CliRunner().invoke(main, args).exit_code == 0
    plan = schema.read(tmp_path / "b", schema.PLAN)
    assert plan.inputs.model_sha256 == sha256_file(model) and plan.inputs.llc_version
    stamp = (tmp_path / "b" / "plan.json").stat().st_mtime_ns
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and f"up to date (build id {plan.build_id})" in again.output
    assert (tmp_path / "b" / "plan.json").stat().st_mtime_ns == stamp
    # a damaged bundle file, a new option, a new profile: each compiles again
    seg = tmp_path / "b" / plan.stages[1].segment
    seg.write_bytes(seg.read_bytes()[:-1])
    assert "up to date" not in CliRunner().invoke(main, args).output
    assert verify_build(tmp_path / "b")
    other = CliRunner().invoke(main, args + ["--max-context", "96"])
    assert "up to date" not in other.output
    assert schema.read(tmp_path / "b", schema.PLAN).build_id != plan.build_id


def test_eval_reports_quantized_quality_against_fp32(tmp_path):
    """llc eval: an fp32 build agrees with itself on every token; int8 stays close; int4 costs more."""
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{3 + (i * 37) % 250}" for i in range(90)))
    seen = {}
    for weights in ("fp32", "int8", "int4"):
        build = compiled_build(tiny_llama("legacy"), tmp_path / weights, 2, requests=1, weights=weights)
        r = CliRunner().invoke(main, ["eval", str(build), "--text", str(text), "--json", str(tmp_path / f"{weights}.json")])
        assert r.exit_code == 0, r.output
        seen[weights] = json.loads((tmp_path / f"{weights}.json").read_text())
    assert seen["fp32"]["top1_agreement"] == 1.0 and seen["fp32"]["max_abs_logit_diff"] == 0.0
    assert seen["fp32"]["perplexity"] == pytest.approx(seen["fp32"]["perplexity_fp32"])
    assert seen["int8"]["max_abs_logit_diff"] < seen["int4"]["max_abs_logit_diff"]
    assert seen["int8"]["top1_agreement"] >= 0.9
    assert 0 < seen["int4"]["top1_agreement"] <= 1.0 and seen["int4"]["tokens"] == 90
