"""Device profile YAML -> typed objects, validated once at the edge.

Everything inside llc trusts these objects; every problem found here is raised
as ``LlcError("<file>:<line>", "<key>: <problem>")``. Unknown keys are errors so
that a typo (``memroy_mb``) never silently falls back to a default.

Example (see examples/devices/)::

    devices:
      - name: pixel-8
        target: adb
        serial: 192.168.1.20:5555
        address: 192.168.1.20
        memory_mb: 2500
        gflops: 12.0
        threads: 4
        int4: {gflops_prefill: 20.0, memory_gbps: 3.5}   # optional (llc profile writes it)
    network:
      bandwidth_mbps: 100
      latency_ms: 4
      links:
        - between: [pixel-8, galaxy-a54]
          bandwidth_mbps: 300
          latency_ms: 2
    workload:
      prompt_tokens: 128
      max_context: 1024
      requests_in_flight: 1
      objective: latency
      stages: 3            # optional: exactly this many stages
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llc.errors import LlcError

TARGETS = ("local", "adb")
OBJECTIVES = ("latency", "throughput")
QUANTIZED = ("int8", "int4")


@dataclass(frozen=True)
class Rates:
    """How fast a device runs layers of one weight precision: the compute rate and the read bandwidth
    a decode step sees. onnxruntime's int8 and int4 kernels (MatMulNBits) differ from fp32's in both."""

    gflops_prefill: float
    memory_gbps: float


@dataclass(frozen=True)
class Device:
    """One phone (or local process) that can run pipeline stages."""

    name: str
    target: str
    memory_mb: float  # usable by llc: what the OS leaves free for the launcher
    gflops: float  # sustained, measured by `llc profile` on real transformer layers
    threads: int = 4
    # From `llc profile` too: the compute rate (prefill-shaped layers) and how fast the weights are
    # read (what a decode step, one token, waits on). With both, compile costs a decode step as
    # FLOPs at the compute rate plus bytes read at this bandwidth, so int4 weights cost less
    # than fp32 ones; without, as FLOPs at `gflops`.
    gflops_prefill: float | None = None
    memory_gbps: float | None = None
    serial: str | None = None  # adb serial (USB serial or host:port)
    address: str = "127.0.0.1"  # where the data-plane port is reachable from peers
    port: int | None = None  # data-plane port; assigned from base_port when absent
    int8: Rates | None = None  # layers with int8 / int4 weights, as `llc profile` measures them
    int4: Rates | None = None

    def rates(self, precision: str) -> Rates | None:
        """The rates of layers of this precision (fp32's where it was not measured), if known."""
        measured = getattr(self, precision) if precision in QUANTIZED else None
        if measured is not None:
            return measured
        return Rates(self.gflops_prefill, self.memory_gbps) if self.gflops_prefill and self.memory_gbps else None


@dataclass(frozen=True)
class Link:
    bandwidth_mbps: float
    latency_ms: float


@dataclass(frozen=True)
class Network:
    bandwidth_mbps: float = 100.0
    latency_ms: float = 5.0
    links: dict[tuple[str, str], Link] = field(default_factory=dict)
    base_port: int = 5600

    def link(self, a: str, b: str) -> Link:
        """The link between two devices; a device to itself is free."""
        if a == b:
            return Link(bandwidth_mbps=float("inf"), latency_ms=0.0)
        return self.links.get(tuple(sorted((a, b))), Link(self.bandwidth_mbps, self.latency_ms))


@dataclass(frozen=True)
class Workload:
    """What the plan is optimised for; command-line options override these."""

    prompt_tokens: int = 128
    max_context: int = 1024
    requests_in_flight: int = 1
    objective: str = "latency"
    memory_safety: float = 1.2  # multiply the predicted need by this
    runtime_overhead_mb: float = 96.0  # python + onnxruntime + zmq per device
    stages: int | None = None  # exactly this many stages; None lets the solver choose
    max_batch: int | None = None  # decode steps batched at most; None: as many as requests in flight


@dataclass(frozen=True)
class Profile:
    path: Path
    devices: tuple[Device, ...]
    network: Network
    workload: Workload

    def device(self, name: str) -> Device:
        return next(d for d in self.devices if d.name == name)

    def port(self, device: Device) -> int:
        if device.port is not None:
            return device.port
        return self.network.base_port + [d.name for d in self.devices].index(device.name)


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that remembers the line of every mapping key, for error messages."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> "_Map":
    mapping = _Map()
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in mapping:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        mapping[key] = loader.construct_object(value_node, deep=True)
        mapping.lines[key] = key_node.start_mark.line + 1
    mapping.line = node.start_mark.line + 1
    return mapping


class _Map(dict):
    """A dict with the line of each key."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: dict[Any, int] = {}
        self.line = 0


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


class _Reader:
    """Reads typed fields out of a parsed mapping, naming file, line and key on error."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, line: int, key: str, problem: str) -> LlcError:
        return LlcError(f"{self.path}:{line}" if line else self.path, f"{key}: {problem}")

    def mapping(self, value: Any, key: str, line: int, allowed: set[str]) -> _Map:
        if not isinstance(value, _Map):
            raise self.fail(line, key, f"expected a mapping, got {type(value).__name__}")
        unknown = sorted(set(value) - allowed, key=str)
        if unknown:
            k = unknown[0]
            raise self.fail(
                value.lines.get(k, value.line),
                f"{key}.{k}" if key else str(k),
                f"unknown key (allowed: {', '.join(sorted(allowed))})",
            )
        return value

    def number(self, m: _Map, key: str, where: str, default: Any = None, *,
               positive: bool = True, integer: bool = False, minimum: float | None = None):
        if key not in m:
            if default is None:
                raise self.fail(m.line, f"{where}.{key}" if where else key, "required")
            return default
        v = m[key]
        line = m.lines.get(key, m.line)
        name = f"{where}.{key}" if where else key
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self.fail(line, name, f"expected a number, got {v!r}")
        if integer and not float(v).is_integer():
            raise self.fail(line, name, f"expected a whole number, got {v!r}")
        if positive and v <= 0:
            raise self.fail(line, name, f"must be > 0, got {v!r}")
        if minimum is not None and v < minimum:
            raise self.fail(line, name, f"must be >= {minimum}, got {v!r}")
        return int(v) if integer else float(v)

    def rates(self, m: _Map, key: str, where: str) -> Rates:
        sub = self.mapping(m[key], f"{where}.{key}", m.lines.get(key, m.line), {"gflops_prefill", "memory_gbps"})
        return Rates(self.number(sub, "gflops_prefill", f"{where}.{key}"),
                     self.number(sub, "memory_gbps", f"{where}.{key}"))

    def string(self, m: _Map, key: str, where: str, default: Any = None,
               choices: tuple[str, ...] | None = None) -> str | None:
        if key not in m:
            if default is ...:
                raise self.fail(m.line, f"{where}.{key}", "required")
            return default
        v = m[key]
        line = m.lines.get(key, m.line)
        if not isinstance(v, (str, int)) or isinstance(v, bool):
            raise self.fail(line, f"{where}.{key}", f"expected a string, got {v!r}")
        v = str(v)
        if choices and v not in choices:
            raise self.fail(line, f"{where}.{key}", f"must be one of {', '.join(choices)}, got {v!r}")
        return v


def load_profile(path: str | Path) -> Profile:
    """Parse and validate a device profile; raise LlcError naming file, line and key."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise LlcError(path, f"cannot read device profile ({e.strerror or e})") from None
    try:
        doc = yaml.load(text, Loader=_LineLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark else ""
        raise LlcError(f"{path}{line}", f"YAML syntax error: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise LlcError(path, f"YAML syntax error: {e}") from None
    r = _Reader(path)
    if doc is None:
        raise LlcError(path, "empty device profile (expected keys: devices, network, workload)")
    top = r.mapping(doc, "", 1, {"devices", "network", "workload"})

    raw_devices = top.get("devices")
    if not isinstance(raw_devices, list) or not raw_devices:
        raise r.fail(top.lines.get("devices", 1), "devices", "need at least one device")
    devices: list[Device] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(raw_devices):
        where = f"devices[{i}]"
        line = getattr(raw, "line", top.lines["devices"])
        m = r.mapping(raw, where, line, {"name", "target", "serial", "address", "port", "memory_mb", "gflops",
                                         "threads", "gflops_prefill", "memory_gbps", *QUANTIZED})
        name = r.string(m, "name", where, ...)
        if not name or not all(c.isalnum() or c in "-_." for c in name):
            raise r.fail(m.lines.get("name", m.line), f"{where}.name",
                         f"use letters, digits, '-', '_' or '.', got {name!r}")
        if name in seen:
            raise r.fail(m.lines.get("name", m.line), f"{where}.name",
                         f"duplicate device name {name!r} (first at line {seen[name]})")
        seen[name] = m.lines.get("name", m.line)
        target = r.string(m, "target", where, "local", TARGETS)
        serial = r.string(m, "serial", where, None)
        if target == "adb" and not serial:
            raise r.fail(m.line, f"{where}.serial", "required for target adb")
        port = r.number(m, "port", where, 0, integer=True, positive=False) or None
        if port is not None and not 1024 <= port <= 65535:
            raise r.fail(m.lines["port"], f"{where}.port", f"must be 1024..65535, got {port}")
        devices.append(Device(
            name=name,
            target=target,
            serial=serial,
            address=r.string(m, "address", where, "127.0.0.1"),
            port=port,
            memory_mb=r.number(m, "memory_mb", where),
            gflops=r.number(m, "gflops", where),
            threads=r.number(m, "threads", where, 4, integer=True),
            gflops_prefill=r.number(m, "gflops_prefill", where, 0) or None,
            memory_gbps=r.number(m, "memory_gbps", where, 0) or None,
            **{p: r.rates(m, p, where) for p in QUANTIZED if p in m},
        ))

    net_raw = top.get("network", _Map())
    nm = r.mapping(net_raw, "network", top.lines.get("network", 1),
                   {"bandwidth_mbps", "latency_ms", "links", "base_port"})
    links: dict[tuple[str, str], Link] = {}
    default_bw = r.number(nm, "bandwidth_mbps", "network", 100.0)
    default_lat = r.number(nm, "latency_ms", "network", 5.0, positive=False, minimum=0)
    for j, raw in enumerate(nm.get("links") or []):
        where = f"network.links[{j}]"
        lm = r.mapping(raw, where, getattr(raw, "line", nm.line),
                       {"between", "bandwidth_mbps", "latency_ms"})
        pair = lm.get("between")
        if not (isinstance(pair, list) and len(pair) == 2 and all(p in seen for p in pair)
                and pair[0] != pair[1]):
            raise r.fail(lm.lines.get("between", lm.line), f"{where}.between",
                         f"expected two different device names, got {pair!r}")
        links[tuple(sorted(pair))] = Link(
            bandwidth_mbps=r.number(lm, "bandwidth_mbps", where, default_bw),
            latency_ms=r.number(lm, "latency_ms", where, default_lat, positive=False, minimum=0),
        )
    network = Network(
        bandwidth_mbps=default_bw,
        latency_ms=default_lat,
        links=links,
        base_port=r.number(nm, "base_port", "network", 5600, integer=True),
    )

    wl_raw = top.get("workload", _Map())
    wm = r.mapping(wl_raw, "workload", top.lines.get("workload", 1),
                   {"prompt_tokens", "max_context", "requests_in_flight", "objective",
                    "memory_safety", "runtime_overhead_mb", "stages", "max_batch"})
    d = Workload()
    workload = Workload(
        prompt_tokens=r.number(wm, "prompt_tokens", "workload", d.prompt_tokens, integer=True),
        max_context=r.number(wm, "max_context", "workload", d.max_context, integer=True),
        requests_in_flight=r.number(wm, "requests_in_flight", "workload",
                                    d.requests_in_flight, integer=True),
        objective=r.string(wm, "objective", "workload", d.objective, OBJECTIVES),
        memory_safety=r.number(wm, "memory_safety", "workload", d.memory_safety, minimum=1.0),
        runtime_overhead_mb=r.number(wm, "runtime_overhead_mb", "workload",
                                     d.runtime_overhead_mb, positive=False, minimum=0),
        stages=r.number(wm, "stages", "workload", 0, integer=True, positive=False) or None,
        max_batch=r.number(wm, "max_batch", "workload", 0, integer=True) or None,  # 0: not given
    )
    if workload.stages is not None and not 1 <= workload.stages <= len(devices):
        raise r.fail(wm.lines.get("stages", wm.line), "workload.stages",
                     f"must be between 1 and the number of devices ({len(devices)})")
    if workload.prompt_tokens >= workload.max_context:
        raise r.fail(wm.lines.get("prompt_tokens", wm.line), "workload.prompt_tokens",
                     f"must be below max_context ({workload.max_context})")
    return Profile(path=path, devices=tuple(devices), network=network, workload=workload)
