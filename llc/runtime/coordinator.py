"""The coordinator: the `llc run` side of the runtime protocol (docs/BUNDLE.md).

It connects a CURVE DEALER to every device of a build, says hello, submits
requests to the head and collects the tokens the tail sends back. It never
touches tensors: activations flow device to device and KV caches stay put.

Failure is the normal case on phones, so every wait is bounded: a device that
reports an error, whose process is gone (the target's ``health``), or that stops
answering pings ends the run with :class:`DeviceFailure` naming it, within
``ping_after + dead_after`` seconds of the last progress.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import zmq

Health = Callable[[], dict[str, str]]  # device -> problem, for devices known to be dead


class DeviceFailure(RuntimeError):
    """A device died, hung, or reported an error; the run cannot go on."""

    def __init__(self, device: str, reason: str):
        self.device = device
        self.reason = reason
        super().__init__(f"device {device!r}: {reason}")


@dataclass(frozen=True)
class DeviceLink:
    """How the coordinator reaches one device (from build/coordinator.json)."""

    name: str
    stage: int
    endpoint: str
    public: str


@dataclass(frozen=True)
class BuildInfo:
    """What the runtime needs from a build directory: stage order, keys, endpoints."""

    build_dir: Path
    devices: tuple[DeviceLink, ...]  # in stage order
    public: str
    secret: str
    build_id: str | None
    targets: dict[str, str]  # device -> target name (local, adb)

    @staticmethod
    def load(build_dir: str | Path) -> "BuildInfo":
        build_dir = Path(build_dir)
        plan = json.loads((build_dir / "plan.json").read_text())
        keys = json.loads((build_dir / "coordinator.json").read_text())
        stages = sorted(plan["stages"], key=lambda s: s.get("index", s.get("stage", 0)))
        plan_devices = plan.get("devices", {})
        if isinstance(plan_devices, list):
            plan_devices = {d["name"]: d for d in plan_devices}
        links, targets = [], {}
        for i, s in enumerate(stages):
            name = s["device"]
            where = keys["devices"].get(name)
            if where is None:
                raise ValueError(f"{build_dir / 'coordinator.json'}: no endpoint for device {name!r}")
            links.append(DeviceLink(name, i, where["endpoint"], where["public"]))
            targets[name] = s.get("target") or plan_devices.get(name, {}).get("target") or "local"
        return BuildInfo(build_dir, tuple(links), keys["public"], keys["secret"], plan.get("build_id"), targets)

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.devices]


@dataclass(frozen=True)
class SamplingParams:
    """Sent with every request; the tail samples with them (temperature 0 = greedy)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class RequestResult:
    """One prompt's tokens and timings (monotonic seconds)."""

    index: int
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    submitted: float = 0.0
    first_token: float | None = None
    finished: float | None = None
    text: str | None = None  # filled in by the caller that owns the tokenizer

    @property
    def ttft_ms(self) -> float | None:
        return None if self.first_token is None else (self.first_token - self.submitted) * 1000

    @property
    def ms_per_token(self) -> float | None:
        """Decode pace after the first token: what a reader of the stream sees."""
        if self.first_token is None or self.finished is None or len(self.tokens) < 2:
            return None
        return (self.finished - self.first_token) * 1000 / (len(self.tokens) - 1)


@dataclass(frozen=True)
class StageStats:
    """A device's own counters, from the `stats` message."""

    device: str
    stage: int
    prefill_ms: float
    prefill_steps: int
    decode_ms: float
    decode_steps: int
    bytes_sent: dict[str, int]
    events: list = field(default_factory=list)  # (rid, step, start, end), device wall clock

    @property
    def ms_per_decode_step(self) -> float | None:
        return self.decode_ms / self.decode_steps if self.decode_steps else None


class Coordinator:
    """Drives generation across the running devices of one build."""

    def __init__(self, build_dir: str | Path, *, health: Health | None = None, ping_after: float = 1.0,
                 dead_after: float = 4.0, stall_after: float = 300.0):
        self.build = BuildInfo.load(build_dir)
        self.health = health
        self.ping_after = ping_after  # no progress for this long: ping everyone
        self.dead_after = dead_after  # a ping unanswered this long: the device is gone
        self.stall_after = stall_after  # devices answer but nothing moves: give up
        self.ctx = zmq.Context()
        self.socks: dict[str, zmq.Socket] = {}
        self.poller = zmq.Poller()
        self._by_sock: dict[zmq.Socket, str] = {}
        self._awaiting_pong: dict[str, float] = {}
        self._tokenizer = None
        for d in self.build.devices:
            s = self.ctx.socket(zmq.DEALER)
            s.linger = 0
            s.curve_publickey = self.build.public.encode()
            s.curve_secretkey = self.build.secret.encode()
            s.curve_serverkey = d.public.encode()
            s.connect(d.endpoint)
            self.socks[d.name] = s
            self._by_sock[s] = d.name
            self.poller.register(s, zmq.POLLIN)

    # -- plumbing ----------------------------------------------------------------------------

    def close(self, linger_ms: int = 500) -> None:
        """Close the sockets; ``linger_ms`` lets a just-sent stop reach live devices."""
        for s in self.socks.values():
            s.close(linger=linger_ms)
        self.ctx.term()

    def __enter__(self) -> "Coordinator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send(self, device: str, header: dict) -> None:
        self.socks[device].send(json.dumps(header).encode())

    def _receive(self, timeout_s: float) -> Iterator[tuple[str, dict]]:
        """Messages that arrive within ``timeout_s`` (all that are queued, at least one wait)."""
        for sock, _ in self.poller.poll(max(0, int(timeout_s * 1000))):
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                device = self._by_sock[sock]
                header = json.loads(frames[0])
                if header.get("type") == "pong":
                    self._awaiting_pong.pop(device, None)
                elif header.get("type") == "error":
                    raise DeviceFailure(header.get("device", device), f"reported: {header.get('message')}")
                yield device, header

    def _check_health(self) -> None:
        if self.health:
            for device, problem in self.health().items():
                raise DeviceFailure(device, problem)

    def _ping_all(self) -> None:
        now = time.monotonic()
        for name in self.socks:
            if name not in self._awaiting_pong:
                self._awaiting_pong[name] = now
                self.send(name, {"type": "ping", "t": time.time()})

    def _check_pongs(self) -> None:
        now = time.monotonic()
        for name, since in self._awaiting_pong.items():
            if now - since > self.dead_after:
                raise DeviceFailure(name, f"no answer to ping for {now - since:.1f} s")

    # -- the protocol --------------------------------------------------------------------------

    def connect(self, timeout: float = 30.0) -> dict[str, dict]:
        """Say hello to every device (they learn where to send tokens); check stage and build id."""
        for name in self.socks:
            self.send(name, {"type": "hello"})
        replies: dict[str, dict] = {}
        deadline = time.monotonic() + timeout
        while len(replies) < len(self.socks):
            self._check_health()
            left = deadline - time.monotonic()
            if left <= 0:
                missing = [n for n in self.socks if n not in replies]
                raise DeviceFailure(missing[0], f"did not answer hello within {timeout:.0f} s")
            for device, h in self._receive(min(left, 0.1)):
                if h.get("type") == "hello":
                    replies[device] = h
        for d in self.build.devices:
            h = replies[d.name]
            if h.get("stage") != d.stage or h.get("device") != d.name:
                raise DeviceFailure(d.name, f"answers as {h.get('device')!r} stage {h.get('stage')}, "
                                            f"the plan says stage {d.stage}")
            want = self.build.build_id or replies[self.build.devices[0].name].get("build_id")
            if want and h.get("build_id") != want:
                raise DeviceFailure(d.name, f"runs build {h.get('build_id')}, not {want}: redeploy it")
        return replies

    def generate(self, prompts: list[list[int]], params: SamplingParams, concurrency: int = 1,
                 on_token: Callable[[RequestResult, int, bool], None] | None = None) -> list[RequestResult]:
        """Run every prompt, keeping up to ``concurrency`` requests in the pipeline at once."""
        results = [RequestResult(i, list(p)) for i, p in enumerate(prompts)]
        head = self.build.devices[0].name
        base = secrets.randbelow(1 << 40) << 20  # request ids unique across runs on long-lived devices
        queue = list(reversed(results))
        active: dict[int, RequestResult] = {}
        last_progress = time.monotonic()
        while queue or active:
            while queue and len(active) < max(1, concurrency):
                r = queue.pop()
                r.submitted = time.monotonic()
                active[r.index] = r
                self.send(head, {"type": "request", "rid": base + r.index, "prompt": r.prompt,
                                 "params": asdict(params)})
            for device, h in self._receive(0.1):
                if h.get("type") != "token":
                    continue
                r = active.get(int(h["rid"]) - base)
                if r is None or int(h["step"]) != len(r.tokens):
                    continue  # a duplicate or a request from an earlier run: not ours
                now = time.monotonic()
                last_progress = now
                r.tokens.append(int(h["token"]))
                if r.first_token is None:
                    r.first_token = now
                if h.get("done"):
                    r.finished = now
                    del active[r.index]
                if on_token:
                    on_token(r, r.tokens[-1], bool(h.get("done")))
            self._check_health()
            idle = time.monotonic() - last_progress
            if idle > self.ping_after:
                self._ping_all()
            self._check_pongs()
            if idle > self.stall_after:
                raise DeviceFailure(head, f"no token for {idle:.0f} s although every device answers pings")
        return results

    def stats(self, timeout: float = 5.0) -> list[StageStats]:
        """Each device's compute time and bytes sent so far."""
        for name in self.socks:
            self.send(name, {"type": "stats"})
        got: dict[str, dict] = {}
        deadline = time.monotonic() + timeout
        while len(got) < len(self.socks):
            left = deadline - time.monotonic()
            if left <= 0:
                missing = [n for n in self.socks if n not in got]
                raise DeviceFailure(missing[0], f"did not answer stats within {timeout:.0f} s")
            for device, h in self._receive(min(left, 0.1)):
                if h.get("type") == "stats":
                    got[device] = h
        out = []
        for d in self.build.devices:
            h = got[d.name]
            out.append(StageStats(d.name, d.stage, h["compute_ms"]["prefill"], h["steps"]["prefill"],
                                  h["compute_ms"]["decode"], h["steps"]["decode"], dict(h["bytes_sent"]),
                                  list(h.get("events", []))))
        return out

    def stop_devices(self) -> None:
        """Ask every device to exit; the target makes sure they did."""
        for name in self.socks:
            self.send(name, {"type": "stop"})

    def tokenizer(self):
        """The model's HF tokenizer from build/tokenizer.json (loaded on first use)."""
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            path = self.build.build_dir / "tokenizer.json"
            if not path.exists():
                raise FileNotFoundError(f"{path}: no tokenizer in the build (was tokenizer.json beside the model?)")
            self._tokenizer = Tokenizer.from_file(str(path))
        return self._tokenizer


def wait_ready(build_dir: str | Path, devices: list[str] | None = None, timeout: float = 30.0,
               health: Health | None = None) -> None:
    """Block until every device answers hello (or raise DeviceFailure naming the first that cannot)."""
    with Coordinator(build_dir, health=health) as c:
        if devices is not None:
            unknown = set(devices) - set(c.socks)
            if unknown:
                raise ValueError(f"devices not in the build: {sorted(unknown)}")
        c.connect(timeout)


class TextStream:
    """Incremental detokenizer: text grows only when the bytes form whole characters.

    Byte-level BPE splits characters across tokens, so decoding token by token
    prints garbage; decoding the whole sequence and emitting the new suffix does not.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self.text):
            return ""
        new, self.text = text[len(self.text):], text
        return new
