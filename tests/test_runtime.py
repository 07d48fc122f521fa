"""The runtime (launcher, coordinator, local target) against hand-made bundles.

Ground truth is greedy decoding of the unsplit model in one onnxruntime
session; the split pipeline must produce the same tokens, with several
requests in flight. Failure tests check what a user relies on: foreign keys are
refused, a dead or hung device is named within 10 s, nothing is left running.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from conftest import write_profile
from llc.bundle import schema
from llc.errors import LlcError
from helpers import Reference, compiled_build, free_port_range, write_tokenizer
from llc.runtime.coordinator import Coordinator, DeviceFailure
from llc.runtime.device.protocol import REQUEST
from llc.runtime.device.sampling import SamplingParams, sample
from llc.targets.base import TargetError, make_target
from llc.targets.local import LocalTarget
from models import genai_llama, tiny_gpt2, tiny_llama

REPO = Path(__file__).resolve().parent.parent
PROMPTS = [[1, 17], [1, 40, 41, 42, 43], [1] + list(range(100, 111)), [1, 7, 8, 9, 200, 201, 202, 203, 3, 4, 5, 6, 250]]
EOS = {2}


@pytest.fixture
def target():
    t = LocalTarget(ready_timeout=30)
    yield t
    t.stop()


def devices(build: Path) -> list[str]:
    return [s.device for s in schema.read(build, schema.PLAN).stages]


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def wait_gone(pids: list[int], timeout: float = 3.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def pids_of(build: Path) -> dict[str, int]:
    return {p.stem: int(p.read_text()) for p in (build / "run").glob("*.pid")}


# --- correctness ----------------------------------------------------------------------------


SPLITS = {1: None, 2: None, 3: [("embed", "layer 0"), ("layer 1", "layer 2"), ("layer 3", "head")]}


@pytest.mark.parametrize("stages", [1, 2, 3])
def test_split_pipeline_matches_unsplit_greedy(model, reference, target, tmp_path, stages):
    build = compiled_build(model, tmp_path / "build", stages, split=SPLITS[stages])
    target.start(build, devices(build))
    with Coordinator(build, health=target.health) as c:
        c.connect()
        results = c.generate(PROMPTS, SamplingParams(max_new_tokens=24), concurrency=3)
        stats = c.stats()
    for r, prompt in zip(results, PROMPTS):
        assert r.tokens == reference.greedy(prompt, 24, EOS), f"prompt {r.index}"
        assert r.ttft_ms is not None and r.finished is not None
    decode_steps = sum(len(r.tokens) - 1 for r in results)
    assert [s.decode_rows for s in stats] == [decode_steps] * stages
    assert all(s.decode_steps <= s.decode_rows for s in stats)
    if stages == 1:  # requests that wait together at the head run as one batch
        assert stats[0].decode_steps < decode_steps
    assert all(s.prefill_steps == len(PROMPTS) for s in stats)
    head, tail = stats[0], stats[-1]
    if stages > 1:
        assert set(tail.bytes_sent) == {"coordinator", head.device}  # only token ids go back
    if stages == 3:  # the mask skips stage 1: it goes from the head straight to the tail
        assert tail.device in head.bytes_sent




@pytest.mark.parametrize("builder", [lambda: tiny_llama("legacy"), lambda: tiny_gpt2("dynamo"),
                                     lambda: genai_llama("int4")], ids=["llama-legacy", "gpt2-dynamo", "genai-int4"])
def test_compiled_build_matches_unsplit_greedy(builder, target, tmp_path):
    """The same check on what `llc compile` emits (the real contract), not on hand-made bundles."""
    from llc.compiler import compile_model
    from llc.profile import load_profile

    model = builder()
    profile = load_profile(write_profile(tmp_path / "p.yaml", 3, stages=3, base_port=free_port_range(3)))
    build = tmp_path / "build"
    compile_model(model, profile, build, quiet=True)
    write_tokenizer(build / "tokenizer.json", 256)
    target.start(build, devices(build))
    with Coordinator(build, health=target.health) as c:
        c.connect()
        results = c.generate(PROMPTS, SamplingParams(max_new_tokens=16), concurrency=3)
    reference = Reference(model, schema.read(build, schema.PLAN).model)  # the plan knows the caches' shapes
    eos = set(schema.read_manifest(build / "devices" / devices(build)[-1] / "manifest.json").eos_token_ids)
    for r, prompt in zip(results, PROMPTS):
        assert r.tokens == reference.greedy(prompt, 16, eos), f"prompt {r.index}"


def test_sampling_is_repeatable_per_request(model, target, tmp_path):
    build = compiled_build(model, tmp_path / "build", 2)
    target.start(build, devices(build))
    with Coordinator(build, health=target.health) as c:
        c.connect()
        hot = SamplingParams(max_new_tokens=12, temperature=1.5, top_k=50, top_p=0.9, seed=7)
        a = c.generate(PROMPTS[:2] * 2, hot, concurrency=4)
        b = c.generate(PROMPTS[:2], hot, concurrency=1)
        greedy = c.generate(PROMPTS[:1], SamplingParams(max_new_tokens=12))
        top1 = c.generate(PROMPTS[:1], SamplingParams(max_new_tokens=12, temperature=1.0, top_k=1, seed=1))
    assert [r.tokens for r in a] == [r.tokens for r in b] * 2  # interleaving does not change a seeded request
    assert a[0].tokens != greedy[0].tokens
    assert top1[0].tokens == greedy[0].tokens


def test_sample_function():
    logits = np.array([0.0, 3.0, 2.9, -1.0])
    rng = np.random.default_rng(0)
    S = SamplingParams
    assert sample(logits, S(), rng) == 1
    assert {sample(logits, S(temperature=5, top_k=2), rng) for _ in range(200)} == {1, 2}
    assert {sample(logits, S(temperature=5, top_p=0.01), rng) for _ in range(50)} == {1}
    for bad in ({"max_new_tokens": 0}, {"top_p": 2.0}, {"temperature": "hot"}, {"top_k": 1.5}, {"nope": 1}, []):
        with pytest.raises(ValueError):
            S.parse(bad)


def test_tensors_cross_the_wire_exactly():
    """Every wire dtype, a transposed (non-contiguous) and a big-endian array arrive equal, little-endian;
    a dtype the protocol does not carry is refused on arrival."""
    from llc.runtime.device import protocol

    arrays = [(d, np.arange(6).astype(d).reshape(2, 3)) for d in sorted(protocol.DTYPES)]
    arrays += [("transposed", np.arange(6, dtype=np.float32).reshape(2, 3).T),
               ("big-endian", np.arange(6, dtype=">i8").reshape(3, 2)), ("scalar", np.array(7, np.int32))]
    fields = {"rids": [1], "steps": [3], "width": 2, "tokens": 1, "from": "dev0"}
    got = protocol.unpack(protocol.pack(protocol.TENSORS, arrays, **fields)).tensors
    for name, a in arrays:
        assert got[name].dtype.byteorder in "=<|" and got[name].dtype.name == a.dtype.name
        np.testing.assert_array_equal(got[name], a)
    with pytest.raises(protocol.ProtocolError, match="complex64"):
        protocol.unpack(protocol.pack(protocol.TENSORS, [("c", np.zeros(2, np.complex64))], **fields))


def test_device_runtime_is_self_contained():
    """The device modules import nothing of llc (they run on phones without it) and only each other."""
    import llc.runtime.device as device

    for path in sorted(Path(device.__file__).parent.glob("*.py")):
        for line in path.read_text().splitlines():
            if line.startswith(("import ", "from ")):
                module = line.split()[1]
                assert module.split(".")[0] != "llc", f"{path.name}: {line}"
                assert module.split(".")[0] in {"__future__", "argparse", "collections", "dataclasses", "hashlib",
                                                "json", "logging", "math", "os", "pathlib", "queue", "signal",
                                                "sys", "threading", "time", "types", "typing", "numpy",
                                                "onnxruntime", "zmq", ""} or module.startswith("."), line


# --- security ------------------------------------------------------------------------------------


def test_foreign_keys_are_refused_and_device_keeps_serving(model, reference, target, tmp_path):
    build = compiled_build(model, tmp_path / "build", 2)
    target.start(build, devices(build))
    head = schema.read(build, schema.COORDINATOR).devices[devices(build)[0]]
    ctx = zmq.Context()
    try:
        rogue_pub, rogue_sec = zmq.curve_keypair()
        rogue = ctx.socket(zmq.DEALER)
        rogue.linger = 0
        rogue.curve_publickey, rogue.curve_secretkey = rogue_pub, rogue_sec
        rogue.curve_serverkey = head.public.encode()
        rogue.connect(head.endpoint)
        plain = ctx.socket(zmq.DEALER)  # no CURVE at all
        plain.linger = 0
        plain.connect(head.endpoint)
        for s in (rogue, plain):
            s.send(b'{"type":"hello"}')
            s.send(b'{"type":"stop"}')
        assert not rogue.poll(1500) and not plain.poll(100)
        assert target.health() == {}
    finally:
        ctx.destroy(linger=0)
    assert "refused CURVE client" in target.logs(devices(build)[0])
    with Coordinator(build, health=target.health) as c:
        c.connect()
        (r,) = c.generate(PROMPTS[1:2], SamplingParams(max_new_tokens=8))
    assert r.tokens == reference.greedy(PROMPTS[1], 8, EOS)


def test_tampered_bundle_refuses_to_start(model, target, tmp_path):
    build = compiled_build(model, tmp_path / "build", 2)
    folder = build / "devices" / devices(build)[1]
    data = min(folder.glob("w-*.bin"))  # a weights file
    blob = bytearray(data.read_bytes())
    blob[100] ^= 1
    data.write_bytes(bytes(blob))
    with pytest.raises(TargetError) as e:
        target.start(build, devices(build))
    assert e.value.device == devices(build)[1]
    assert f"sha256 mismatch for {data.name}" in str(e.value)
    assert not target.procs  # the healthy device was stopped too


def test_device_error_is_reported_with_its_name(model, target, tmp_path):
    build = compiled_build(model, tmp_path / "build", 2)
    target.start(build, devices(build))
    with Coordinator(build, health=target.health) as c:
        c.connect()
        c.send(c.head, REQUEST, rid=1, prompt=[1, 2, 3], params={"max_new_tokens": 4, "top_p": 2.0})
        with pytest.raises(DeviceFailure) as e:
            for _ in range(100):
                list(c.receive(0.1))
    assert e.value.device == devices(build)[0] and "top_p" in str(e.value)


# --- failures: no device left behind -----------------------------------------------------------


def start_cli(build: Path, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "llc.runtime.run", str(build), "--prompt", "w5 w6 w7", "--max-new-tokens", "90000", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)


def wait_streaming(proc: subprocess.Popen, build: Path, n_devices: int, timeout: float = 60) -> dict[str, int]:
    """Block until the CLI prints generated text; return the device pids."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 0.1)[0] and os.read(proc.stdout.fileno(), 4096):
            pids = pids_of(build)
            assert len(pids) == n_devices
            return pids
        assert proc.poll() is None, proc.stderr.read().decode()
    raise AssertionError("no output from llc run")


@pytest.fixture
def cli_build(model, tmp_path):
    build = compiled_build(model, tmp_path / "build", 3, eos_token_ids=[], max_context=100_000, prompt_tokens=16)  # never stops by itself
    procs: list[subprocess.Popen] = []
    yield build, procs
    for p in procs:  # if a test failed half-way, do not leak what it started
        if p.poll() is None:
            p.kill()
            p.wait()
    for pid in pids_of(build).values():
        if alive(pid):
            os.killpg(pid, signal.SIGKILL)


@pytest.mark.parametrize("how", ["kill", "hang"])
def test_dead_or_hung_device_ends_run_within_10s(cli_build, how):
    build, procs = cli_build
    proc = start_cli(build, "--no-failover")
    procs.append(proc)
    pids = wait_streaming(proc, build, 3)
    t0 = time.monotonic()
    os.kill(pids["dev1"], signal.SIGKILL if how == "kill" else signal.SIGSTOP)
    out, err = proc.communicate(timeout=10)
    took = time.monotonic() - t0
    err = err.decode()
    assert proc.returncode == 1, err
    assert took < 10
    assert "llc: device 'dev1'" in err, err
    assert ("killed by signal 9" if how == "kill" else "no answer to ping") in err
    assert not wait_gone(list(pids.values()))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_killing_llc_run_leaves_no_device(cli_build, sig):
    build, procs = cli_build
    proc = start_cli(build)
    procs.append(proc)
    pids = wait_streaming(proc, build, 3)
    proc.send_signal(sig)
    proc.communicate(timeout=10)
    assert proc.returncode != 0
    assert not wait_gone(list(pids.values()))


def test_cli_streams_and_writes_json(model, reference, tmp_path):
    build = compiled_build(model, tmp_path / "build", 2)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w5 w6 w7\nw40\nw100 w101 w102 w103 w104\n")
    out = tmp_path / "out.json"
    cmd = [sys.executable, "-m", "llc.runtime.run", str(build), "--prompts", str(prompts), "--max-new-tokens", "10",
           "--concurrency", "2", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    for r in report["results"]:
        assert r["prompt_ids"][0] == 1  # the tokenizer adds <s>
        assert r["tokens"] == reference.greedy(r["prompt_ids"], 10, EOS)
        assert r["text"] in proc.stdout
    summary = report["summary"]
    assert summary["tokens"] == sum(len(r["tokens"]) for r in report["results"])
    head, tail = devices(build)
    assert {f"{head}->{tail}", f"{tail}->{head}", f"{tail}->coordinator"} <= set(summary["hops"])
    assert "ms/token" in proc.stderr
    assert not list((build / "run").glob("*.pid"))


def test_targets_registry():
    assert isinstance(make_target("local"), LocalTarget)
    with pytest.raises(LlcError):
        make_target("nope")


def test_timeline_picture_has_a_row_per_device_and_a_bar_per_step(tmp_path):
    """`llc run --timeline` draws every step each device ran in this run."""
    build = compiled_build(tiny_llama("legacy"), tmp_path / "b", 2)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w5 w9 w11\nw7 w3\n")
    out, res = tmp_path / "timeline.html", tmp_path / "run.json"
    r = subprocess.run([sys.executable, "-m", "llc.cli", "run", str(build), "--prompts", str(prompts),
                        "--concurrency", "2", "--max-new-tokens", "5", "--timeline", str(out),
                        "--json", str(res)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    steps = sum(len(x["tokens"]) for x in json.loads(res.read_text())["results"])  # one step per token
    html = out.read_text()
    assert html.count("<rect") == 2 * steps  # one bar per step on each of the 2 devices
    assert "dev0" in html and "dev1" in html and "request 1" in html


# --- a device keeps serving whatever it is sent ----------------------------------------------------


def raw_replies(sock: zmq.Socket, timeout_s: float = 2.0) -> list:
    """Every message that comes back on a coordinator socket within timeout_s, decoded."""
    from llc.runtime.device import protocol

    out, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sock.poll(50):
            out.append(protocol.unpack(sock.recv_multipart()))
    return out


def test_malformed_messages_are_refused_and_the_device_keeps_generating(model, reference, target, tmp_path):
    """Garbage of every kind at a running head and tail: one error each, no crash, right tokens after."""
    from llc.runtime.device import protocol

    build = compiled_build(model, tmp_path / "build", 2, requests=2)
    head, tail = devices(build)
    tail_input = next(i for i in schema.open_build(build).manifest(tail).inputs if i.source == "stage")
    target.start(build, devices(build))

    def tensors(rid, step, name=tail_input.name, dtype="float32", shape=(1, 1, 64), buf=None, **fields):
        header = {"type": "tensors", "rids": [rid], "steps": [step], "width": 0, "tokens": 1, "from": head, **fields,
                  "tensors": [{"name": name, "dtype": dtype, "shape": list(shape)}]}
        return [json.dumps(header).encode(), buf if buf is not None else np.zeros(shape, np.float32).tobytes()]

    good = {"max_new_tokens": 4}
    bad = {  # what, to which device, the frames
        "not JSON": (head, [b"\xff\x00 not json"]),
        "not an object": (head, [b"[1, 2, 3]"]),
        "unknown type": (head, [b'{"type": "reboot"}']),
        "wrong field type": (head, [json.dumps({"type": "request", "rid": "one", "prompt": [1], "params": good}).encode()]),
        "unknown field": (head, [json.dumps({"type": "request", "rid": 5, "prompt": [1], "params": good,
                                             "sudo": True}).encode()]),
        "bad sampling params": (head, [json.dumps({"type": "request", "rid": 6, "prompt": [1, 2],
                                                   "params": {"max_new_tokens": 4, "top_p": 2.0}}).encode()]),
        "unknown sampling param": (head, [json.dumps({"type": "request", "rid": 7, "prompt": [1, 2],
                                                      "params": {"beam": 4}}).encode()]),
        "token ids out of the vocabulary": (head, [json.dumps({"type": "request", "rid": 8, "prompt": [1, 10**9],
                                                               "params": good}).encode()]),
        "negative token id": (head, [json.dumps({"type": "request", "rid": 9, "prompt": [-1], "params": good}).encode()]),
        "empty prompt": (head, [json.dumps({"type": "request", "rid": 10, "prompt": [], "params": good}).encode()]),
        "beyond max context": (head, [json.dumps({"type": "request", "rid": 11, "prompt": [1] * 100,
                                                  "params": {"max_new_tokens": 100}}).encode()]),
        "request to a non-head": (tail, [json.dumps({"type": "request", "rid": 12, "prompt": [1], "params": good}).encode()]),
        "huge declared shape": (tail, tensors(13, 0, shape=(2**30, 2**30, 64), buf=b"\0" * 16)),
        "wrong dtype name": (tail, tensors(14, 0, dtype="object")),
        "dtype the segment does not take": (tail, [tensors(15, 0)[0].replace(b"float32", b"int64"),
                                                   np.zeros((1, 1, 64), np.int64).tobytes()]),
        "missing buffer": (tail, tensors(16, 0)[:1]),
        "tensor it does not take": (tail, tensors(17, 0, name="nope")),
        "unknown request id": (tail, tensors(18, 7)),
        "far-future step": (tail, tensors(19, 40)),
        "a request twice in one batch": (tail, tensors(21, 1, rids=[19, 19], steps=[1, 1])),
        "a batched prefill": (tail, tensors(22, 0, rids=[22, 23], steps=[0, 0])),
        "a batch over max_batch": (tail, tensors(24, 1, rids=[24, 25, 26], steps=[1, 1, 1])),
        "rids and steps differ in length": (tail, tensors(27, 1, rids=[27, 28], steps=[1])),
        "width beyond the max context": (tail, tensors(29, 0, width=10**6)),
        "tensors to the head": (head, tensors(30, 0)),
        "a prefill of no tokens": (tail, tensors(31, 0, shape=(1, 0, 64))),
        "zero new tokens": (tail, tensors(33, 0, tokens=0)),
        "new tokens beyond the max context": (tail, tensors(34, 0, tokens=10**6)),
    }
    with Coordinator(build, health=target.health) as c:
        c.connect()
        c.socks[tail].send_multipart(tensors(19, 0))  # a real step 0 for request 19 on the tail: it samples
        assert [m.type for m in raw_replies(c.socks[tail], 1.0)] == [protocol.TOKEN]
        for what, (device, frames) in bad.items():
            c.socks[device].send_multipart(frames)
            replies = raw_replies(c.socks[device], 1.0)
            errors = [m for m in replies if m.type == protocol.ERROR]
            assert len(errors) == 1, (what, replies)
            assert target.health() == {}, what
        # a batch of two requests whose tensors hold one row: both fail, the device lives on
        c.socks[tail].send_multipart(tensors(32, 0))
        assert [m.type for m in raw_replies(c.socks[tail], 1.0)] == [protocol.TOKEN]
        c.socks[tail].send_multipart(tensors(19, 1, rids=[19, 32], steps=[1, 1], width=1))
        assert {m.type for m in raw_replies(c.socks[tail], 1.0)} == {protocol.ERROR}
        assert target.health() == {}
        # a message over the device's size limit: the connection is dropped, the device lives on
        c.socks[tail].send_multipart(tensors(20, 0, shape=(1, 1 << 16, 64)) * 1 + [b"\0" * (32 << 20)])
        time.sleep(0.5)
        assert target.health() == {}
    with Coordinator(build, health=target.health) as c:
        c.connect()
        results = c.generate(PROMPTS, SamplingParams(max_new_tokens=12), concurrency=2)
        stats = c.stats()
    for r, prompt in zip(results, PROMPTS):
        assert r.tokens == reference.greedy(prompt, 12, EOS)
    assert max(s.active for s in stats) <= 2  # at most the far-future/unknown requests that never started


def test_a_failed_run_frees_its_requests_on_every_device(model, target, tmp_path):
    """An exception in the middle of generation cancels every request in flight: no KV cache stays."""
    build = compiled_build(model, tmp_path / "build", 3, eos_token_ids=[], requests=3)
    target.start(build, devices(build))

    def boom(r, token, done):
        if len(r.tokens) == 3:
            raise KeyboardInterrupt

    with Coordinator(build, health=target.health) as c:
        c.connect()
        with pytest.raises(KeyboardInterrupt):
            c.generate(PROMPTS[:3], SamplingParams(max_new_tokens=40), concurrency=3, on_token=boom)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(s.active for s in c.stats()):
            time.sleep(0.1)
        assert [s.active for s in c.stats()] == [0, 0, 0]
