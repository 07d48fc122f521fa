"""The coordinator: the host side of the runtime protocol (llc.runtime.device.protocol).

It connects a CURVE DEALER to every device of a build, says hello, submits
requests to the head and collects the tokens the tail sends back. It never
touches tensors: activations flow device to device and KV caches stay put.

Failure is the normal case on phones, so every wait is bounded: a device that
reports an error, whose process is gone (the target's ``health``), or that stops
answering pings ends the run with :class:`DeviceFailure` naming it, within
``ping_after + dead_after`` seconds of the last progress. Requests still in
flight when a run fails or is interrupted are cancelled on every device that
still listens, so no KV cache is left behind.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import zmq

from llc.bundle import schema
from llc.errors import DeviceError, LlcError
from llc.runtime.device import protocol
from llc.runtime.device.protocol import END, ERROR, HELLO, PING, PONG, REQUEST, STATS, STOP, TOKEN
from llc.runtime.device.sampling import SamplingParams

Health = Callable[[], dict[str, str]]  # device -> problem, for devices known to be dead
MAX_MESSAGE_BYTES = 64 << 20  # what the coordinator takes from a device (stats with events are the largest)


class DeviceFailure(DeviceError):
    """A device died, hung, or reported an error; the run cannot go on with these devices.

    ``lost``: the device itself is gone (its process died, it stopped answering
    pings), as opposed to one that answers but reports an error: only a lost
    device is worth re-planning without (llc.runtime.failover).
    """

    def __init__(self, device: str, reason: str, lost: bool = False):
        super().__init__(device, reason)
        self.lost = lost


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
    decode_steps: int  # onnxruntime runs; a batched step counts once
    bytes_sent: dict[str, int]
    active: int
    events: list = field(default_factory=list)  # (rid, step, start, end, slot, rows), device wall clock
    decode_rows: int = 0  # request steps in those runs
    rss_bytes: int = 0  # the device process's resident memory now, and its peak
    peak_rss_bytes: int = 0

    @property
    def mean_batch(self) -> float | None:
        return self.decode_rows / self.decode_steps if self.decode_steps else None

    @property
    def ms_per_decode_step(self) -> float | None:
        return self.decode_ms / self.decode_steps if self.decode_steps else None


class Coordinator:
    """Drives generation across the running devices of one build."""

    def __init__(self, build_dir: str | Path, *, health: Health | None = None, ping_after: float = 1.0,
                 dead_after: float = 4.0, stall_after: float = 300.0):
        self.build = schema.open_build(Path(build_dir))
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
        self.owned = False  # the devices were started for this coordinator's run, and stop with it
        keys = self.build.keys
        for name in self.build.devices:
            d = keys.devices[name]
            s = self.ctx.socket(zmq.DEALER)
            s.linger = 0
            s.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
            s.curve_publickey = keys.public.encode()
            s.curve_secretkey = keys.secret.encode()
            s.curve_serverkey = d.public.encode()
            s.connect(d.endpoint)
            self.socks[name] = s
            self._by_sock[s] = name
            self.poller.register(s, zmq.POLLIN)

    @property
    def head(self) -> str:
        return self.build.devices[0]

    # -- plumbing ----------------------------------------------------------------------------

    def close(self, linger_ms: int = 500) -> None:
        """Close the sockets; ``linger_ms`` lets the last messages (stop, cancels) reach live devices."""
        for s in self.socks.values():
            s.close(linger=linger_ms)
        self.ctx.term()

    def __enter__(self) -> "Coordinator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send(self, device: str, kind: str, **fields) -> None:
        self.socks[device].send_multipart(protocol.pack(kind, **fields))

    def receive(self, timeout_s: float, errors: bool = True) -> Iterator[tuple[str, protocol.Message]]:
        """Messages that arrive within ``timeout_s`` (all that are queued, at least one wait).

        A device's ``error`` raises DeviceFailure, unless ``errors`` is False (then it is
        yielded like any message, for a caller that fails only the request it names).
        """
        for sock, _ in self.poller.poll(max(0, int(timeout_s * 1000))):
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                device = self._by_sock[sock]
                try:
                    msg = protocol.unpack(frames)
                except protocol.ProtocolError as e:
                    raise DeviceFailure(device, f"sent a malformed message ({e})") from None
                if msg.type == PONG:
                    self._awaiting_pong.pop(device, None)
                elif msg.type == ERROR and errors:
                    raise DeviceFailure(msg["device"], f"reported: {msg['message']}")
                yield device, msg

    def _check_health(self) -> None:
        if self.health:
            for device, problem in self.health().items():
                raise DeviceFailure(device, problem, lost=True)

    def _ping_all(self) -> None:
        now = time.monotonic()
        for name in self.socks:
            if name not in self._awaiting_pong:
                self._awaiting_pong[name] = now
                self.send(name, PING, t=time.time())

    def _check_pongs(self) -> None:
        now = time.monotonic()
        for name, since in self._awaiting_pong.items():
            if now - since > self.dead_after:
                raise DeviceFailure(name, f"no answer to ping for {now - since:.1f} s", lost=True)

    def _collect(self, kind: str, timeout: float) -> dict[str, protocol.Message]:
        """Send ``kind`` to every device and wait for each one's reply of the same type."""
        for name in self.socks:
            self.send(name, kind)
        got: dict[str, protocol.Message] = {}
        deadline = time.monotonic() + timeout
        while len(got) < len(self.socks):
            self._check_health()
            left = deadline - time.monotonic()
            if left <= 0:
                missing = [n for n in self.socks if n not in got]
                raise DeviceFailure(missing[0], f"did not answer {kind} within {timeout:.0f} s")
            for device, msg in self.receive(min(left, 0.1)):
                if msg.type == kind and not msg.get("poll"):  # not a late answer to a balancer's poll
                    got[device] = msg
        return got

    # -- the protocol --------------------------------------------------------------------------

    def connect(self, timeout: float = 30.0) -> dict[str, protocol.Message]:
        """Say hello to every device (they learn where to send tokens); check stage and build id."""
        replies = self._collect(HELLO, timeout)
        for stage, name in enumerate(self.build.devices):
            h = replies[name]
            if h.get("stage") != stage or h.get("device") != name:
                raise DeviceFailure(name, f"answers as {h.get('device')!r} stage {h.get('stage')}, "
                                          f"the plan says stage {stage}")
            if h.get("build_id") != self.build.build_id:
                raise DeviceFailure(name, f"runs build {h.get('build_id')}, not {self.build.build_id}: redeploy it")
        return replies

    def generate(self, prompts: list[list[int]], params: SamplingParams, concurrency: int = 1,
                 on_token: Callable[[RequestResult, int, bool], None] | None = None,
                 results: list[RequestResult] | None = None,
                 watch: Callable[[dict[str, protocol.Message]], None] | None = None,
                 watch_every: float = 2.0) -> list[RequestResult]:
        """Run every prompt, keeping up to ``concurrency`` requests in the pipeline at once.

        ``results`` (one per prompt) may carry tokens from an earlier, interrupted
        run: such a request resumes, its prompt and those tokens going in as one
        prompt for the tokens still missing, and a finished one is left alone.
        They are filled in place, so a caller still has the tokens if this fails.
        ``watch`` is called every ``watch_every`` seconds with each device's ``stats``
        reply (counters only, no events); it may raise to stop the run (a rebalance).
        If it fails or is interrupted, the requests in flight are cancelled on every device.
        """
        if results is None:
            results = [RequestResult(i, list(p)) for i, p in enumerate(prompts)]
        base = secrets.randbelow(1 << 40) << 20  # request ids unique across runs on long-lived devices
        queue = [r for r in reversed(results) if r.finished is None]
        active: dict[int, RequestResult] = {}
        had: dict[int, int] = {}  # request -> tokens it had when (re)submitted
        last_progress = next_watch = time.monotonic()
        polled: dict[str, protocol.Message] | None = None  # stats replies of the round under way
        try:
            while queue or active:
                if watch and polled is None and time.monotonic() >= next_watch:
                    polled = {}
                    for name in self.socks:
                        self.send(name, STATS, poll=True)
                while queue and len(active) < max(1, concurrency):
                    r = queue.pop()
                    if not r.submitted:  # a resumed request keeps its first submission time
                        r.submitted = time.monotonic()
                    active[r.index], had[r.index] = r, len(r.tokens)
                    left = replace(params, max_new_tokens=params.max_new_tokens - len(r.tokens))
                    self.send(self.head, REQUEST, rid=base + r.index, prompt=r.prompt + r.tokens,
                              params=left.to_dict())
                for device, msg in self.receive(0.1):
                    if msg.type == STATS and msg.get("poll"):
                        if polled is None:
                            continue  # a poll's reply that came after the run moved on
                        polled[device] = msg
                        if len(polled) == len(self.socks):
                            round_, polled, next_watch = polled, None, time.monotonic() + watch_every
                            watch(round_)
                        continue
                    if msg.type != TOKEN:
                        continue
                    r = active.get(msg["rid"] - base)
                    if r is None or had[r.index] + msg["step"] != len(r.tokens):
                        continue  # a duplicate or a request from an earlier run: not ours
                    now = last_progress = time.monotonic()
                    r.tokens.append(msg["token"])
                    if r.first_token is None:
                        r.first_token = now
                    if msg["done"]:
                        r.finished = now
                        del active[r.index]
                    if on_token:
                        on_token(r, r.tokens[-1], msg["done"])
                self._check_health()
                idle = time.monotonic() - last_progress
                if idle > self.ping_after:
                    self._ping_all()
                self._check_pongs()
                if idle > self.stall_after:
                    raise DeviceFailure(self.head, f"no token for {idle:.0f} s although every device answers pings")
        except BaseException:
            self.cancel([base + i for i in active])
            raise
        return results

    def cancel(self, rids: list[int]) -> None:
        """Free these requests on every device (each frees its own; nobody forwards)."""
        for name, sock in self.socks.items():
            for rid in rids:
                try:
                    sock.send_multipart(protocol.pack(END, rid=rid, forward=False), zmq.NOBLOCK)
                except zmq.ZMQError:
                    break  # that device is gone or not reading; nothing to free there

    def stats(self, timeout: float = 5.0) -> list[StageStats]:
        """Each device's compute time and bytes sent so far."""
        got = self._collect(STATS, timeout)
        return [StageStats(name, got[name]["stage"], got[name]["compute_ms"]["prefill"],
                           got[name]["steps"]["prefill"], got[name]["compute_ms"]["decode"],
                           got[name]["steps"]["decode"], dict(got[name]["bytes_sent"]), got[name]["active"],
                           list(got[name].get("events", [])), got[name].get("rows", {}).get("decode", 0),
                           got[name].get("rss_bytes", 0), got[name].get("peak_rss_bytes", 0))
                for name in self.build.devices]

    def stop_devices(self) -> None:
        """Ask every device to exit; the target makes sure they did."""
        for name in self.socks:
            self.send(name, STOP)

    def tokenizer(self):
        """The model's HF tokenizer from build/tokenizer.json (loaded on first use)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.build.dir)
        return self._tokenizer


def load_tokenizer(build_dir: Path):
    from tokenizers import Tokenizer

    path = Path(build_dir) / "tokenizer.json"
    if not path.is_file():
        raise LlcError(path, "no tokenizer in the build (was tokenizer.json beside the model?)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own exception type
        raise LlcError(path, f"not a tokenizer ({str(e)[:80]})") from None


def wait_ready(build_dir: str | Path, devices: list[str] | None = None, timeout: float = 30.0,
               health: Health | None = None) -> None:
    """Block until every device answers hello (or raise DeviceFailure naming the first that cannot)."""
    with Coordinator(build_dir, health=health) as c:
        if devices is not None:
            unknown = set(devices) - set(c.socks)
            if unknown:
                raise LlcError(build_dir, f"devices not in the build: {sorted(unknown)}")
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
