"""`llc profile`: measure the devices of a profile and write a profile `llc compile` accepts.

Why measure: the partitioner splits layers by each device's speed, memory and
links; a spec sheet says little about sustained onnxruntime speed on a phone
that throttles, and nothing about the Wi-Fi between two phones.

Per device (over adb, or as a process here for `target: local`):
  - compute: a stack of 4 llama-style transformer layers (SmolLM2-135M sizes:
    RMSNorm, grouped-query attention with a KV cache, SwiGLU MLP) built here
    with onnx.helper and run by llc/probe.py with the device's thread count,
    for a few seconds of wall time after a warm-up. Two shapes are timed:
    decode (1 token over a 256-token cache, one run at a time with a 10 ms
    pause after each, as a pipeline stage runs its steps) and prefill (64
    tokens, with the same pause: a stage's prefill follows an idle wait too;
    back to back, a 0.25-core phone measured 0.17 of a full one). `gflops`
    is the decode rate, because per-token decode is what the plan's latency
    (and, with several requests, throughput) is made of. Weights are fed as
    inputs filled on the device, so the pushed model is a few KB.
  - the same at int8 and int4: the layers with constant random weights,
    quantized by compile's own quantize pass (onnxruntime's MatMulNBits,
    blocks of 32, accuracy level 4), pushed (15 and 8 MB) and timed the same
    way. Those kernels compute in int8 and unpack weights as they read them,
    so their rates differ from fp32's in both ways; compile costs a block at
    the rates of its own precision.
  - memory: MemAvailable from /proc/meminfo (what the OS would give now).
Per pair of adb devices: phone-to-phone TCP (not through the host): round-trip
time of 1-byte pings (latency_ms = half the median) and bandwidth of a bulk
stream measured by the receiver, one direction (a -> b, a listed first).

Names, serials, addresses, ports, threads, workload and anything else in the
input are kept; memory_mb, gflops and network.links are replaced by
measurements. memory_mb and gflops may be missing from the input.
"""

from __future__ import annotations

import itertools
import json
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import yaml

from llc.errors import LlcError
from llc.profile import QUANTIZED, Profile, load_profile
from llc.targets.adb import SH_LIB, REMOTE_ROOT, Adb, Phone, check_runtime, connect, sync
from llc.targets.base import TargetError

PROBE = Path(__file__).with_name("probe.py")
PROFILE_DIR = f"{REMOTE_ROOT}/profile"
PROBE_PREFIX = "llc-probe "
WEIGHT_BYTES = {"fp32": 4.0, "int8": 1 + (4 + 1) / 32, "int4": 0.5 + (4 + 0.5) / 32}  # per weight, with
# each block of 32's fp32 scale and zero point


@dataclass(frozen=True)
class BenchLayers:
    """The benchmark's layer shape (default: SmolLM2-135M's).

    Four layers are 57 MB of weights: more than a big L3 (32 MB here), so decode
    reads them from DRAM as a real model's decode does. With two layers (28 MB)
    a core that keeps its cache warm looked up to 1.5x faster per CPU second
    than one that is paused (a CPU quota, other apps) and comes back cold.
    """

    hidden: int = 576
    heads: int = 9
    kv_heads: int = 3
    ffn: int = 1536
    layers: int = 4
    decode_context: int = 256
    prefill_tokens: int = 64

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def flops(self, tokens: int, past: int) -> int:
        """Multiply-adds x 2 of every MatMul: projections, MLP, attention scores and mix."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        proj = 2 * tokens * h * (h + 2 * kv + h)
        mlp = 2 * tokens * 3 * h * self.ffn
        attn = 2 * 2 * tokens * (past + tokens) * h
        return self.layers * (proj + mlp + attn)

    def bytes_read(self, past: int, precision: str = "fp32") -> float:
        """Bytes a step reads: every weight once (MatMul weights at ``precision``), and the fp32 KV
        cache of ``past`` tokens."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        matmuls = h * (h + 2 * kv + h) + 3 * h * self.ffn
        return self.layers * (WEIGHT_BYTES[precision] * matmuls + 4 * (2 * h + 2 * past * kv))

    def memory_gbps(self, gflops_decode: float, gflops_prefill: float, precision: str = "fp32") -> float:
        """The read bandwidth a decode step saw: its time less its FLOPs at the compute rate
        (the prefill's), over the bytes it read. At least the bytes over the whole step."""
        flops, nbytes = self.flops(1, self.decode_context), self.bytes_read(self.decode_context, precision)
        step_s = flops / (gflops_decode * 1e9)
        memory_s = max(step_s - flops / (gflops_prefill * 1e9), 0.1 * step_s)
        return nbytes / memory_s / 1e9

    def modes(self) -> list[dict]:
        return [
            {"name": "decode", "dims": {"T": 1, "P": self.decode_context},
             "flops": self.flops(1, self.decode_context), "idle_ms": 10},
            {"name": "prefill", "dims": {"T": self.prefill_tokens, "P": 0},
             "flops": self.flops(self.prefill_tokens, 0), "idle_ms": 10},
        ]


def bench_model(shape: BenchLayers = BenchLayers(), constant: bool = False):
    """An ONNX decoder layer stack: x[1,T,H] + KV cache[1,KVH,P,D] per layer -> x; weights are inputs,
    or with ``constant`` random initializers (what quantization needs)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    H, NH, KVH, D, F = shape.hidden, shape.heads, shape.kv_heads, shape.head_dim, shape.ffn
    G = NH // KVH
    nodes, inputs, inits = [], [], []
    f32 = TensorProto.FLOAT

    def const(name: str, value) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(op: str, ins: list[str], out: str, **attrs) -> str:
        nodes.append(helper.make_node(op, ins, [out], name=out, **attrs))
        return out

    rng = np.random.default_rng(0)

    def weight(name: str, dims: list[int]) -> str:
        if constant:
            const(name, (rng.standard_normal(dims, dtype=np.float32) * 0.02).astype(np.float32))
        else:
            inputs.append(helper.make_tensor_value_info(name, f32, dims))
        return name

    eps = const("eps", np.float32(1e-5))
    scale = const("scale", np.float32(1 / np.sqrt(D)))
    shapes = {k: const(k, np.array(v, np.int64)) for k, v in {
        "q5": [1, -1, KVH, G, D], "qg": [1, KVH, -1, D], "kv4": [1, -1, KVH, D],
        "a5": [1, KVH, G, -1, D], "a3": [1, -1, H]}.items()}

    def rms(x: str, w: str, p: str) -> str:
        ms = node("ReduceMean", [node("Mul", [x, x], f"{p}.sq")], f"{p}.ms", axes=[-1], keepdims=1)
        r = node("Sqrt", [node("Add", [ms, eps], f"{p}.mse")], f"{p}.r")
        return node("Mul", [node("Div", [x, r], f"{p}.n"), w], f"{p}.y")

    inputs.append(helper.make_tensor_value_info("x", f32, [1, "T", H]))
    x = "x"
    for i in range(shape.layers):
        p = f"l{i}"
        for kv in ("k", "v"):
            inputs.append(helper.make_tensor_value_info(f"past.{i}.{kv}", f32, [1, KVH, "P", D]))
        n1 = rms(x, weight(f"w.{i}.norm1", [H]), f"{p}.norm1")
        q = node("MatMul", [n1, weight(f"w.{i}.q", [H, H])], f"{p}.q")
        q = node("Transpose", [node("Reshape", [q, shapes["q5"]], f"{p}.q5")], f"{p}.qt", perm=[0, 2, 3, 1, 4])
        q = node("Reshape", [q, shapes["qg"]], f"{p}.qg")  # [1, KVH, G*T, D]: grouped queries share K/V
        cache = {}
        for kv in ("k", "v"):
            t = node("MatMul", [n1, weight(f"w.{i}.{kv}", [H, KVH * D])], f"{p}.{kv}")
            t = node("Transpose", [node("Reshape", [t, shapes["kv4"]], f"{p}.{kv}4")], f"{p}.{kv}t",
                     perm=[0, 2, 1, 3])
            cache[kv] = node("Concat", [f"past.{i}.{kv}", t], f"{p}.present.{kv}", axis=2)
        kt = node("Transpose", [cache["k"]], f"{p}.kT", perm=[0, 1, 3, 2])
        s = node("Mul", [node("MatMul", [q, kt], f"{p}.s"), scale], f"{p}.ss")
        a = node("MatMul", [node("Softmax", [s], f"{p}.p", axis=-1), cache["v"]], f"{p}.a")
        a = node("Transpose", [node("Reshape", [a, shapes["a5"]], f"{p}.a5")], f"{p}.at", perm=[0, 3, 1, 2, 4])
        a = node("Reshape", [a, shapes["a3"]], f"{p}.a3")
        x = node("Add", [x, node("MatMul", [a, weight(f"w.{i}.o", [H, H])], f"{p}.o")], f"{p}.h")
        n2 = rms(x, weight(f"w.{i}.norm2", [H]), f"{p}.norm2")
        g = node("MatMul", [n2, weight(f"w.{i}.gate", [H, F])], f"{p}.g")
        u = node("MatMul", [n2, weight(f"w.{i}.up", [H, F])], f"{p}.u")
        m = node("Mul", [node("Mul", [g, node("Sigmoid", [g], f"{p}.sg")], f"{p}.silu"), u], f"{p}.m")
        x = node("Add", [x, node("MatMul", [m, weight(f"w.{i}.down", [F, H])], f"{p}.d")], f"{p}.out")
    outputs = [helper.make_tensor_value_info(x, f32, [1, "T", H])]
    outputs += [helper.make_tensor_value_info(f"l{i}.present.{kv}", f32, [1, KVH, "P+T", D])
                for i in range(shape.layers) for kv in ("k", "v")]
    graph = helper.make_graph(nodes, "llc_profile_layers", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="llc profile")
    model.ir_version = 8  # readable by onnxruntime >= 1.13, which phones may still have
    return model


def bench_files(shape: BenchLayers, folder: Path) -> dict[str, dict[str, Path]]:
    """precision -> the probe's files for it (name on the device -> path here): fp32 with its weights as
    inputs; int8 and int4 quantized by compile's quantize pass, with their data files."""
    import onnx

    from llc.compiler.passes.quantize import Quantize

    onnx.save(bench_model(shape), str(folder / "bench.onnx"))
    files = {"fp32": {"bench.onnx": folder / "bench.onnx"}}
    constant = bench_model(shape, constant=True)
    for precision in QUANTIZED:
        out = folder / precision
        out.mkdir()
        Quantize(weights=precision).write(constant, folder, out)
        files[precision] = {f"{precision}/{p.name}": p for p in sorted(out.iterdir())}
    return files


@dataclass
class DeviceResult:
    name: str
    threads: int
    memory_mb: int | None
    gflops_decode: float
    gflops_prefill: float
    cpu_share: float  # CPU seconds per wall second during decode (a quota or a busy phone shows here)
    memory_gbps: float = 0.0
    quantized: dict[str, dict[str, float]] = field(default_factory=dict)  # int8/int4 -> their rates


@dataclass
class LinkResult:
    a: str
    b: str
    mbps: float
    rtt_ms: float


@dataclass
class Measured:
    devices: dict[str, DeviceResult]
    links: list[LinkResult]
    out: Path


def read_input(path: Path) -> tuple[dict, Profile]:
    """The raw YAML (to write back with its keys kept) and the validated profile.

    memory_mb and gflops may be missing (they are what gets measured): they are
    filled with 1 for validation only. Any other problem is reported with the
    input's own line numbers.
    """
    try:
        return yaml.safe_load(path.read_text()), load_profile(path)
    except LlcError as e:
        if not re.search(r"\.(memory_mb|gflops): required", e.message):
            raise
    raw = yaml.safe_load(path.read_text())
    filled = {**raw, "devices": [{"memory_mb": 1, "gflops": 1, **d} for d in raw["devices"]]}
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / path.name
        probe.write_text(yaml.safe_dump(filled, sort_keys=False))
        try:
            profile = load_profile(probe)
        except LlcError as e:
            raise LlcError(path, e.message) from None
    return raw, profile


def measure(path: Path, out: Path, adb: Adb, seconds: float = 2.0, net_seconds: float = 1.5,
            port: int = 5590, network: bool = True, log: Callable[[str], None] = print,
            json_out: Path | None = None, shape: BenchLayers = BenchLayers()) -> Measured:
    """Measure every device and link of the profile at ``path``; write the result to ``out``
    (and the raw numbers to ``json_out``)."""
    raw, profile = read_input(path)
    if network:
        _fill_addresses(raw, path)
        profile = _with_addresses(raw, profile)
    modes = shape.modes()
    phones = {d.name: Phone(d.name, d.serial) for d in profile.devices if d.target == "adb"}
    results: dict[str, DeviceResult] = {}
    links: list[LinkResult] = []
    with tempfile.TemporaryDirectory() as tmp:
        models = bench_files(shape, Path(tmp))
        files = {"probe.py": PROBE, **{n: p for f in models.values() for n, p in f.items()}}
        listed = adb.devices() if phones else {}
        for phone in phones.values():
            connect(adb, phone, listed)
        for phone in phones.values():
            check_runtime(adb, phone)  # the launcher's needs, so a later deploy does not fail
            sync(adb, phone, files, PROFILE_DIR)
        for dev in profile.devices:  # one at a time: on a shared host (the lab) they would compete
            got = {}
            for precision, model in models.items():  # a process each: the probe holds one model at a time
                onnx_file = next(n for n in model if n.endswith(".onnx"))
                args = ["compute", onnx_file, "--threads", str(dev.threads), "--seconds", str(seconds),
                        "--modes", json.dumps(modes)]
                if dev.target == "adb":
                    got[precision] = _probe_adb(adb, phones[dev.name], args, timeout=300 + 4 * seconds)
                else:
                    got[precision] = _probe_local(Path(tmp), args, dev.name, timeout=300 + 4 * seconds)
            rates = {p: (g["modes"]["decode"]["gflops"], g["modes"]["prefill"]["gflops"]) for p, g in got.items()}
            dec = got["fp32"]["modes"]["decode"]
            mem = got["fp32"].get("mem_available_kb")
            results[dev.name] = r = DeviceResult(
                dev.name, dev.threads, mem // 1024 if mem else None, *rates["fp32"], dec["cpu_s"] / dec["wall_s"],
                shape.memory_gbps(*rates["fp32"]),
                {p: {"gflops": d, "gflops_prefill": q, "memory_gbps": shape.memory_gbps(d, q, p)}
                 for p, (d, q) in rates.items() if p != "fp32"})
            log(f"{dev.name}: {r.gflops_decode:.2f} GFLOP/s decode, {r.gflops_prefill:.2f} prefill, "
                f"{r.memory_gbps:.1f} GB/s read "
                f"({dev.threads} thread(s), {r.cpu_share:.2f} CPU s/s), "
                + (f"{r.memory_mb} MB available" if r.memory_mb else "MemAvailable unknown") + "; "
                + ", ".join(f"{p} {q['gflops']:.2f} / {q['gflops_prefill']:.2f} / {q['memory_gbps']:.1f}"
                            for p, q in r.quantized.items()))
        if network:
            for a, b in itertools.combinations([d for d in profile.devices if d.target == "adb"], 2):
                got = _link(adb, phones[a.name], phones[b.name], b.address, port, net_seconds)
                links.append(LinkResult(a.name, b.name, got["mbps"], got["rtt_ms"]))
                log(f"{a.name} -> {b.name}: {got['mbps']:.1f} Mbit/s, round trip {got['rtt_ms']:.2f} ms")
    out.write_text(_render(raw, profile, results, links, path))
    load_profile(out)  # what we write must be what compile accepts
    if json_out is not None:
        json_out.write_text(json.dumps({"devices": {n: asdict(r) for n, r in results.items()},
                                        "links": [asdict(x) for x in links], "bench": asdict(shape)}, indent=1) + "\n")
    return Measured(results, links, out)


def _fill_addresses(raw: dict, path: Path) -> None:
    """Links are measured to each phone's address: take it from a host:port serial when not given."""
    for d in raw["devices"]:
        if d.get("target") == "adb" and "address" not in d:
            host, _, port = str(d.get("serial", "")).rpartition(":")
            if not (host and port.isdigit()):
                raise LlcError(path, f"devices: {d.get('name')}: address: required to measure links (the "
                                     "phone's IP address on the network the phones share), or use --no-network")
            d["address"] = host


def _with_addresses(raw: dict, profile: Profile) -> Profile:
    """The profile with the addresses _fill_addresses derived."""
    by_name = {d["name"]: d for d in raw["devices"]}
    return replace(profile, devices=tuple(replace(d, address=by_name[d.name].get("address", d.address))
                                          for d in profile.devices))


def _probe_adb(adb: Adb, phone: Phone, args: list[str], timeout: float) -> dict:
    cmd = f"cd {PROFILE_DIR} && python3 probe.py {' '.join(shlex.quote(a) for a in args)} 2>&1"
    return _parse(adb.shell(phone.serial, cmd, device=phone.name, timeout=timeout), phone.name)


def _probe_local(folder: Path, args: list[str], name: str, timeout: float) -> dict:
    proc = subprocess.run([sys.executable, str(PROBE)] + args, cwd=folder, capture_output=True, text=True,
                          timeout=timeout)
    return _parse(proc.stdout + proc.stderr, name)


def _parse(out: str, device: str) -> dict:
    for line in out.splitlines():
        if line.startswith(PROBE_PREFIX):
            return json.loads(line[len(PROBE_PREFIX):])
    tail = [line.strip() for line in out.splitlines() if line.strip()]
    raise TargetError(device, f"probe failed: {tail[-1] if tail else 'no output'}")


def _link(adb: Adb, a: Phone, b: Phone, b_address: str, port: int, seconds: float) -> dict:
    """a streams to a probe server on b, directly phone to phone; the server is stopped by its pid file."""
    start = (f"cd {PROFILE_DIR} && nohup python3 probe.py serve {port} >serve.log 2>&1 </dev/null &\n"
             f"echo $! > {PROFILE_DIR}/serve.pid")
    adb.shell(b.serial, start, device=b.name)
    try:
        out = adb.shell(a.serial, f"cd {PROFILE_DIR} && python3 probe.py client {shlex.quote(b_address)} "
                                  f"{port} --seconds {seconds} 2>&1", device=a.name, timeout=120)
        try:
            return _parse(out, a.name)
        except TargetError as e:
            raise TargetError(a.name, f"cannot measure the link to {b.name} at {b_address}:{port} "
                                      f"({str(e).split('probe failed: ', 1)[-1]}); phones must reach each "
                                      "other directly (Wi-Fi client isolation off)") from None
    finally:
        adb.shell(b.serial, SH_LIB + f"halt {PROFILE_DIR}/serve.pid probe.py", device=b.name)


def _render(raw: dict, profile: Profile, results: dict[str, DeviceResult], links: list[LinkResult],
            source: Path) -> str:
    doc = dict(raw)
    devices = []
    for d in raw["devices"]:
        r = results[d["name"]]
        d = dict(d)
        if r.memory_mb:
            d["memory_mb"] = r.memory_mb
        elif "memory_mb" not in d:
            raise LlcError(source, f"devices: {r.name}: no MemAvailable in /proc/meminfo; give memory_mb")
        d["gflops"] = round(r.gflops_decode, 3)
        d["gflops_prefill"] = round(r.gflops_prefill, 3)
        d["memory_gbps"] = round(r.memory_gbps, 3)
        for p, q in r.quantized.items():
            d[p] = {"gflops_prefill": round(q["gflops_prefill"], 3), "memory_gbps": round(q["memory_gbps"], 3)}
        devices.append(d)
    doc["devices"] = devices
    net = dict(raw.get("network") or {})
    if links:
        measured = {tuple(sorted((x.a, x.b))) for x in links}
        kept = [l for l in net.get("links") or [] if tuple(sorted(l.get("between", []))) not in measured]
        net["links"] = kept + [{"between": [x.a, x.b], "bandwidth_mbps": round(x.mbps, 2),
                                "latency_ms": round(x.rtt_ms / 2, 3)} for x in links]
        net.setdefault("bandwidth_mbps", round(min(x.mbps for x in links), 2))
        net.setdefault("latency_ms", round(max(x.rtt_ms for x in links) / 2, 3))
    if net:
        doc["network"] = net
    head = [f"# Measured by `llc profile {source}`.",
            "# gflops: decode (1 token, 256-token cache) on 4 SmolLM2-135M-sized layers; gflops_prefill: 64-token",
            "# prefill on them (the compute rate); memory_gbps: bytes a decode step reads over its time beyond",
            "# its FLOPs at that rate (compile costs a decode step with these two). int8 and int4: the same",
            "# for those layers with quantized MatMul weights (onnxruntime's MatMulNBits). CPU share below.",
            "# latency_ms is half the measured phone-to-phone round trip."]
    for r in results.values():
        head.append(f"#   {r.name}: decode {r.gflops_decode:.2f} GFLOP/s, prefill {r.gflops_prefill:.2f} GFLOP/s, "
                    f"{r.threads} thread(s), {r.cpu_share:.2f} CPU s/s, MemAvailable {r.memory_mb} MB"
                    + "".join(f"; {p} decode {q['gflops']:.2f} GFLOP/s" for p, q in r.quantized.items()))
    for x in links:
        head.append(f"#   {x.a} -> {x.b}: {x.mbps:.1f} Mbit/s, round trip {x.rtt_ms:.3f} ms")
    return "\n".join(head) + "\n" + yaml.safe_dump(doc, sort_keys=False)
