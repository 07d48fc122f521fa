"""Batched decode: requests that wait together at the head run as one padded batch on every stage.

The contract: a request's tokens do not depend on whether it ran batched
(greedy and seeded sampling), for caches grown by Concat (left padding) and by
GroupQueryAttention (right padding), split over several stages; a request
cancelled while its batch is on the way leaves the other rows as they were.
The stages run in-process (llc.runtime.splitrun: the device code, the real
message framing), which drains the pipeline before the head starts new work, so
every decode step after the prefills is one batch of all the requests.
"""

from __future__ import annotations

import json
from collections import deque

import numpy as np
import pytest

from helpers import Reference, compiled_build
from llc.bundle import schema
from llc.runtime.device import protocol
from llc.runtime.device.sampling import SamplingParams
from llc.runtime.splitrun import Recorder, SplitRunner, Trace
from llc.runtime.verify import verify_build
from models import genai_llama, tiny_gpt2, tiny_llama

PROMPTS = [[1, 17], [1, 40, 41, 42, 43], [1] + list(range(100, 111)), [1, 7, 8, 9, 200, 201, 202]]
MODELS = {"llama-legacy": lambda: (tiny_llama("legacy"), "fp32"),
          "gpt2-dynamo": lambda: (tiny_gpt2("dynamo"), "fp32"),
          "llama-legacy-llc-int4": lambda: (tiny_llama("legacy"), "int4"),
          "llama-genai-int4": lambda: (genai_llama("int4"), "fp32")}


def build_pair(tmp_path, name: str, stages: int):
    model, weights = MODELS[name]()
    return [compiled_build(model, tmp_path / f"b{batch}", stages, eos_token_ids=[], requests=4, max_batch=batch,
                           weights=weights) for batch in (4, 1)]


@pytest.mark.parametrize("stages", [1, 3])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_batched_tokens_equal_one_at_a_time(tmp_path, name, stages):
    batched, alone = build_pair(tmp_path, name, stages)
    head = schema.read_manifest(batched / "devices" / "dev0" / "manifest.json")
    assert head.max_batch == 4 and head.batch_padding == ("right" if "genai" in name else "left")
    assert head.kv_in_place == ("genai" in name)  # GroupQueryAttention writes its caches in place
    assert schema.read_manifest(alone / "devices" / "dev0" / "manifest.json").max_batch == 1
    for params in (SamplingParams(max_new_tokens=10), SamplingParams(max_new_tokens=10, temperature=0.9, seed=7)):
        runner = SplitRunner(batched, threads=1)
        got = runner.generate(PROMPTS, params)
        assert runner.batched_steps() >= 9  # every decode step ran all four requests at once
        assert got == SplitRunner(alone, threads=1).generate(PROMPTS, params)
        assert all(len(t) == 10 for t in got)


def test_batched_logits_equal_the_request_alone(tmp_path):
    """Rows of a padded batch against the unsplit model fed each request alone, at every step."""
    model = tiny_llama("legacy")
    build = compiled_build(model, tmp_path / "b", 3, eos_token_ids=[], requests=4)
    ref = Reference(model, schema.read(build, schema.PLAN).model)
    rng = np.random.default_rng(1)
    nexts = [rng.integers(3, 256, 6).tolist() for _ in PROMPTS]
    traces = SplitRunner(build, threads=1).teacher_force_many(PROMPTS, nexts)
    for prompt, continuation, trace in zip(PROMPTS, nexts, traces):
        past, n = {}, 0
        for step, tokens in enumerate([prompt] + [[t] for t in continuation]):
            out, past = ref.step(np.array([tokens], np.int64), past, n)
            n += len(tokens)
            np.testing.assert_allclose(trace.steps[step]["logits"], out["logits"], atol=1e-4)


def test_a_request_cancelled_mid_batch_leaves_the_others_as_they_were(tmp_path):
    """An end that reaches later stages before its batch does: they run the batch with that row
    on an empty cache and throw it away; the other requests' logits stay those of each alone."""
    model = tiny_llama("legacy")
    build = compiled_build(model, tmp_path / "b", 3, eos_token_ids=[], requests=4)
    ref = Reference(model, schema.read(build, schema.PLAN).model)
    runner = SplitRunner(build, threads=1)
    rids, nexts = [1, 2, 3], [[5, 6, 7, 8, 9, 10]] * 3
    recorder = Recorder({rid: Trace() for rid in rids})
    cancelled = []

    def head_outputs(job, outputs):
        recorder.record(job, outputs)
        if len(job.rows) == 3 and job.rows[0][1] == 2 and not cancelled:  # queued before the batch's tensors
            cancelled.append(1)
            for stage in runner.stages.values():
                runner.queue.append((stage.name, protocol.pack(protocol.END, rid=1, forward=False)))

    for stage in runner.stages.values():
        stage.on_outputs = head_outputs if stage is runner.head else recorder.record
    for rid, prompt, continuation in zip(rids, PROMPTS, nexts):
        runner.head.forced[rid] = deque(continuation)
        runner.queue.append((runner.head.name, protocol.pack(
            protocol.REQUEST, rid=rid, prompt=prompt, params=SamplingParams(max_new_tokens=7).to_dict())))
    runner._pump()
    assert cancelled and not [m for m in runner.inbox if m.type == protocol.ERROR]
    later = list(runner.stages.values())[1:]
    assert any(e[5] == 3 and e[1] == 2 for s in later for e in s.events)  # they ran the batch with the dead row
    assert max(recorder.traces[1].steps) == 2  # nothing ran for it after
    assert all(1 not in s.requests for s in runner.stages.values())
    for rid in (2, 3):
        prompt, trace = PROMPTS[rid - 1], recorder.traces[rid]
        assert sorted(trace.steps) == list(range(7))
        past, n = {}, 0
        for step, tokens in enumerate([prompt] + [[t] for t in nexts[rid - 1]]):
            out, past = ref.step(np.array([tokens], np.int64), past, n)
            n += len(tokens)
            np.testing.assert_allclose(trace.steps[step]["logits"], out["logits"], atol=1e-4)


def test_verify_catches_padding_on_the_wrong_side(tmp_path):
    build = compiled_build(tiny_llama("legacy"), tmp_path / "b", 2, requests=4)
    assert max(d.max_abs_diff for d in verify_build(build) if d.checked) <= 1e-4
    for manifest in (build / "devices").glob("*/manifest.json"):
        doc = json.loads(manifest.read_text())
        doc["batch_padding"] = "right"
        manifest.write_text(json.dumps(doc))
    bad = {d.step: d.max_abs_diff for d in verify_build(build)}
    assert bad["batched decode"] > 1e-3 and bad["prefill"] <= 1e-4 and bad["decode"] <= 1e-4


def test_group_query_attention_caches_stay_in_place(tmp_path):
    """A GroupQueryAttention stage keeps one max_context buffer per cache and request for the whole
    request, batched steps or not; every output equals the same build's with caches copied each step."""
    build = compiled_build(genai_llama("int4"), tmp_path / "b", 2, eos_token_ids=[], requests=2)
    max_context = schema.read(build, schema.PLAN).workload.max_context
    nexts = [[5, 6, 7, 8], [9, 10, 11, 12]]

    def run(watch: bool) -> tuple[dict, list[Trace]]:
        runner = SplitRunner(build, threads=1)
        buffers: dict[tuple[str, int], set] = {}
        for stage in runner.stages.values() if watch else ():
            def complete(result, stage=stage, complete=stage.complete):
                for rid, _ in result.job.rows:
                    kv = stage.requests[rid].kv
                    buffers.setdefault((stage.name, rid), set()).update(
                        (i.name, id(kv[i.name]), kv[i.name].shape[i.seq_axis]) for i in stage.kv_inputs)
                complete(result)
            stage.complete = complete
        traces = runner.teacher_force_many(PROMPTS[:2], nexts)
        assert runner.batched_steps() >= 3
        return buffers, traces

    buffers, in_place = run(watch=True)
    held = {key: ids for key, ids in buffers.items() if ids}  # stages with caches
    assert len(held) >= 2  # both requests on at least one stage
    for ids in held.values():  # one buffer per cache input, the same at every step
        assert {length for _, _, length in ids} == {max_context} and len(ids) == len({n for n, _, _ in ids})
    for manifest in (build / "devices").glob("*/manifest.json"):
        doc = json.loads(manifest.read_text())
        assert doc["kv_in_place"]
        doc["kv_in_place"] = False
        manifest.write_text(json.dumps(doc))
    _, copied = run(watch=False)
    for a, b in zip(in_place, copied):
        assert sorted(a.steps) == sorted(b.steps) == list(range(5))
        for step in a.steps:
            for name, value in b.steps[step].items():
                np.testing.assert_array_equal(a.steps[step][name], value, err_msg=f"{name} at step {step}")
