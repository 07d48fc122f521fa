"""One pipeline stage: its requests, their KV caches, the inputs of each step and where outputs go.

No sockets here: messages come in through :meth:`Stage.handle` (frames as they
arrive), and everything this stage sends goes out through the ``send(dest,
frames)`` callback it is given, ``dest`` being a peer device or
``protocol.COORDINATOR``. ``main`` wires that to ZeroMQ on a phone; the split
runner (``llc.runtime.splitrun``) wires it to in-process queues, so ``llc
verify`` and the tests run the very code the devices run.

What a stage keeps per request id: its sampling params, the next step, the KV
cache (input name -> the present of the last step), and an inbox of tensors for
the next step. The head builds the graph inputs (ids, mask, positions) from the
prompt and then from each token the tail sends back; the tail samples. Limits
keep a confused or hostile peer from growing this state: at most
``max_requests`` (+ one per stage, for ends still on their way) requests, inputs
at most one step ahead, and requests idle for ``IDLE_EXPIRY_S`` are freed.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort

from . import protocol
from .manifest import Input, Manifest
from .protocol import COORDINATOR, END, ERROR, HELLO, PING, PONG, REQUEST, STATS, STOP, TENSORS, TOKEN, Message
from .sampling import SamplingParams, sample

EVENTS_KEPT = 4096  # last steps remembered for `llc run --timeline`
ENDED_KEPT = 1024  # ids of ended requests: late messages for them are dropped quietly
MAX_STEPS_AHEAD = 1  # a step's inputs can only come once the step before it ran everywhere
IDLE_EXPIRY_S = 300.0  # a request nobody moved for this long is freed (a coordinator that went away)

Send = Callable[[str, list], None]


class RequestError(ValueError):
    """A message about one request that this stage refuses; the request is dropped."""


@dataclass
class Request:
    """Everything this device keeps about one request id."""

    rid: int
    params: SamplingParams | None = None
    step: int = 0  # the next step to run
    kv: dict[str, np.ndarray] = field(default_factory=dict)  # input name -> cache so far
    inbox: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)  # step -> tensors
    busy: bool = False
    queued: bool = False
    next_ids: list[int] | None = None  # head: the ids to feed at `step`
    past: int = 0  # head: tokens already in the cache
    rng: np.random.Generator | None = None  # tail
    touched: float = 0.0  # monotonic time of the last message or step


@dataclass
class Job:
    rid: int
    step: int
    feeds: dict[str, np.ndarray]
    built: dict[str, np.ndarray]  # graph inputs the head made (some are only sent on)


@dataclass
class StepResult:
    job: Job
    outputs: dict[str, np.ndarray] | None
    error: str | None
    ms: float


def session_for(folder: Path, m: Manifest) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = m.threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(folder / m.segment), options, providers=["CPUExecutionProvider"])


class Stage:
    """One device's stage (see the module docstring)."""

    def __init__(self, folder: Path, manifest: Manifest, send: Send,
                 session: ort.InferenceSession | None = None, clock: Callable[[], float] = time.monotonic):
        m = self.m = manifest
        self.name = m.device
        self.send_raw = send
        self.clock = clock
        self.kv_inputs = [i for i in m.inputs if i.source == "kv"]
        self.graph_inputs = [(g.name, g.role, np.dtype(g.dtype)) for g in m.graph_inputs] if m.is_head else []
        # what must arrive over the network before a step can run
        self.awaited = {i.name for i in m.inputs if i.source == "stage"}
        self.session = session or session_for(folder, m)
        have = {o.name for o in self.session.get_outputs()}
        want = [i.present for i in self.kv_inputs] + ([m.logits] if m.is_tail else [])
        missing = [n for n in want if n not in have]
        known = have | {g.name for g in m.graph_inputs} | {i.name for i in m.inputs}
        missing += [t for s in m.sends for t in s.tensors if t not in known]
        if missing:
            raise ValueError(f"segment {m.segment} lacks outputs {missing}")
        if {i.name for i in self.session.get_inputs()} != {i.name for i in m.inputs}:
            raise ValueError(f"manifest inputs differ from {m.segment}'s")
        sent = [t for s in m.sends for t in s.tensors if t in have]
        self.output_names = list(dict.fromkeys(want + sent))
        self.dtypes = {i.name: np.dtype(i.dtype) for i in m.inputs}
        self.requests: dict[int, Request] = {}
        self.ended: deque[int] = deque(maxlen=ENDED_KEPT)
        self.ready: deque[int] = deque()
        self.compute_ms = {"prefill": 0.0, "decode": 0.0}
        self.steps = {"prefill": 0, "decode": 0}
        self.events: deque = deque(maxlen=EVENTS_KEPT)  # (rid, step, start, end), wall clock
        self.bytes_sent: dict[str, int] = {}
        self.stopping = False
        self.on_outputs: Callable[[Job, dict], None] | None = None  # the split runner looks at every step
        # teacher forcing (llc verify, llc eval): rid -> the tokens the head feeds next, whatever was sampled
        self.forced: dict[int, deque[int]] = {}

    # -- messages in ----------------------------------------------------------------------

    def handle(self, frames: list[bytes]) -> tuple[str | None, list[bytes] | None]:
        """One received message; returns its type and the reply for its sender, if it has one.

        A bad message is answered with one ``error`` to the coordinator and
        drops the request it names (if any); the stage keeps serving.
        """
        rid = None
        try:
            msg = protocol.unpack(frames)
            rid = msg.get("rid")
            return msg.type, self._dispatch(msg)
        except RequestError as e:
            self._error(str(e), rid)
            if rid in self.requests and not self.requests[rid].busy:
                self._drop(rid)
        except Exception as e:  # whatever a peer sent, the stage keeps serving
            self._error(f"{type(e).__name__}: {e}", rid)
        return None, None

    def _dispatch(self, msg: Message) -> list[bytes] | None:
        m = self.m
        if msg.type == HELLO:
            return protocol.pack(HELLO, device=self.name, stage=m.stage, num_stages=m.num_stages,
                                 build_id=m.build_id, version=m.llc_version)
        if msg.type == PING:
            return protocol.pack(PONG, device=self.name, t=msg.get("t"), active=len(self.requests))
        if msg.type == STATS:
            return protocol.pack(STATS, device=self.name, stage=m.stage, compute_ms=self.compute_ms,
                                 steps=self.steps, bytes_sent=self.bytes_sent, active=len(self.requests),
                                 events=[list(e) for e in self.events])
        if msg.type == STOP:
            self.stopping = True
        elif msg.type == REQUEST:
            self._on_request(msg)
        elif msg.type == TENSORS:
            self._on_tensors(msg)
        elif msg.type == TOKEN:
            self._on_token(msg["rid"], msg["token"], msg["done"])
        elif msg.type == END:
            self.end(msg["rid"], forward=msg["forward"])
        else:
            raise protocol.ProtocolError(f"{msg.type} is not a message a device takes")
        return None

    def _on_request(self, msg: Message) -> None:
        m = self.m
        rid, prompt = msg["rid"], msg["prompt"]
        if rid in self.requests:
            raise protocol.ProtocolError(f"request id {rid} already in flight")  # keep the one in flight
        params = SamplingParams.parse(msg["params"])
        if not m.is_head:
            raise protocol.ProtocolError("request sent to a stage that is not the head")
        if not prompt:
            raise RequestError("empty prompt")
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < (m.vocab_size or 2**62)
                   for t in prompt):
            raise RequestError(f"prompt has token ids outside 0..{(m.vocab_size or 2**62) - 1}")
        if len(prompt) + params.max_new_tokens > m.max_context:
            raise RequestError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({params.max_new_tokens}) "
                               f"exceeds the build's max context {m.max_context}")
        req = self._new_request(rid, step=0)
        req.params = params
        req.next_ids = list(prompt)
        self._check_ready(req)

    def _on_tensors(self, msg: Message) -> None:
        rid, step = msg["rid"], msg["step"]
        if rid in self.ended:
            return  # the request ended (or was cancelled) while these were on their way
        params = SamplingParams.parse(msg["params"]) if "params" in msg.fields else None
        req = self.requests.get(rid) or self._new_request(rid, step)
        req.params = req.params or params
        if not req.step <= step <= req.step + MAX_STEPS_AHEAD:
            raise RequestError(f"tensors for step {step} while the request is at step {req.step}")
        unknown = set(msg.tensors) - self.awaited
        if unknown:
            raise RequestError(f"tensors this stage does not take: {sorted(unknown)[:3]}")
        for name, a in msg.tensors.items():
            if a.dtype != self.dtypes[name]:
                raise RequestError(f"input {name}: got {a.dtype.name}, the segment takes {self.dtypes[name].name}")
        req.inbox.setdefault(step, {}).update(msg.tensors)
        req.touched = self.clock()
        self._check_ready(req)

    def _on_token(self, rid: int, token: int, done: bool) -> None:
        """Head: the tail's sampled token is the next step's input, unless the request is done."""
        req = self.requests.get(rid)
        if req is None:
            return  # ended or cancelled meanwhile
        if done:
            self.forced.pop(rid, None)
            self.end(rid, forward=True)
            return
        if self.forced.get(rid):
            token = self.forced[rid].popleft()
        if self.m.vocab_size is not None and not 0 <= token < self.m.vocab_size:
            raise RequestError(f"token {token} outside the vocabulary")
        req.next_ids = [token]
        req.touched = self.clock()
        self._check_ready(req)

    def _new_request(self, rid: int, step: int) -> Request:
        if step != 0:
            raise RequestError(f"unknown request id {rid} (at step {step})")
        if len(self.requests) >= self.m.max_requests + self.m.num_stages:
            raise RequestError(f"more than {self.m.max_requests} requests in flight "
                               f"(the build reserved KV cache for {self.m.max_requests})")
        req = self.requests[rid] = Request(rid, touched=self.clock())
        return req

    def end(self, rid: int, forward: bool) -> None:
        """Free the request's state; ``forward`` passes the end down the pipeline (idempotent)."""
        if self.requests.pop(rid, None) is None:
            return
        self.ended.append(rid)
        if forward:
            for peer in dict.fromkeys(s.to for s in self.m.sends):
                self._send(peer, protocol.pack(END, rid=rid, forward=True))

    def _drop(self, rid: int) -> None:
        self.requests.pop(rid, None)
        self.ended.append(rid)

    def expire(self) -> list[int]:
        """Free requests idle for longer than IDLE_EXPIRY_S; their ids."""
        now = self.clock()
        old = [r.rid for r in self.requests.values() if not r.busy and now - r.touched > IDLE_EXPIRY_S]
        for rid in old:
            self._drop(rid)
        return old

    # -- scheduling -------------------------------------------------------------------------

    def _check_ready(self, req: Request) -> None:
        if req.busy or req.queued:
            return
        if self.m.is_head and req.next_ids is None:
            return
        if not self.awaited <= req.inbox.get(req.step, {}).keys():
            return
        req.queued = True
        self.ready.append(req.rid)

    def next_job(self) -> Job | None:
        """The oldest ready (rid, step), its inputs gathered; None when nothing is ready."""
        while self.ready:
            req = self.requests.get(self.ready.popleft())
            if req is None:
                continue
            req.queued = False
            req.busy = True
            return self._job(req)
        return None

    def _job(self, req: Request) -> Job:
        feeds = dict(req.inbox.pop(req.step, {}))
        built: dict[str, np.ndarray] = {}
        if self.m.is_head:
            ids, req.next_ids = req.next_ids or [], None
            n = len(ids)
            for name, role, dtype in self.graph_inputs:
                if role == "input_ids":
                    built[name] = np.array([ids], dtype=dtype)
                elif role == "attention_mask":
                    built[name] = np.ones((1, req.past + n), dtype=dtype)
                else:
                    built[name] = np.arange(req.past, req.past + n, dtype=dtype)[None, :]
            req.past += n
        for i in self.m.inputs:
            if i.source == "kv":
                feeds[i.name] = req.kv[i.name] if req.step > 0 else empty_cache(i)
            elif i.source == "graph":
                feeds[i.name] = built[i.name]
        extra = set(feeds) - set(self.dtypes)
        return Job(req.rid, req.step, {k: v for k, v in feeds.items() if k not in extra},
                   {**built, **{k: feeds[k] for k in extra}})

    def run(self, job: Job) -> StepResult:
        """Run the segment (onnxruntime releases the GIL: safe in a worker thread)."""
        t0 = time.perf_counter()
        try:
            outs = self.session.run(self.output_names, job.feeds)
            outputs, error = dict(zip(self.output_names, outs)), None
        except Exception as e:  # onnxruntime's own errors: the request fails, the device stays
            outputs, error = None, f"step {job.step}: {type(e).__name__}: {e}"
        return StepResult(job, outputs, error, (time.perf_counter() - t0) * 1000.0)

    def complete(self, result: StepResult) -> None:
        """Keep the caches, send the outputs later stages need, sample on the tail."""
        job = result.job
        req = self.requests.get(job.rid)
        if req is None:
            return  # ended or cancelled while it ran
        req.busy = False
        if result.error is not None:
            self._error(result.error, job.rid)
            self._drop(job.rid)
            return
        outputs = result.outputs
        if self.on_outputs is not None:
            self.on_outputs(job, outputs)
        kind = "prefill" if job.step == 0 else "decode"
        self.compute_ms[kind] += result.ms
        self.steps[kind] += 1
        end = time.time()
        self.events.append((job.rid, job.step, end - result.ms / 1000.0, end))
        for i in self.kv_inputs:
            req.kv[i.name] = outputs[i.present]
        produced = {**job.feeds, **job.built, **outputs}
        extra = {"params": req.params.to_dict()} if job.step == 0 and req.params is not None else {}
        for s in self.m.sends:
            self._send(s.to, protocol.pack(TENSORS, [(t, produced[t]) for t in s.tensors], rid=job.rid,
                                           step=job.step, **{"from": self.name}, **extra))
        req.step += 1
        req.touched = self.clock()
        if self.m.is_tail:
            self._sample(req, outputs[self.m.logits], job.step)
        if job.rid in self.requests:
            self._check_ready(req)

    def _sample(self, req: Request, logits: np.ndarray, step: int) -> None:
        params = req.params or SamplingParams()
        if req.rng is None:
            req.rng = np.random.default_rng(params.seed)
        token = sample(logits[0, -1], params, req.rng)
        done = token in self.m.eos_token_ids or step + 1 >= params.max_new_tokens  # step k yields token k+1
        msg = protocol.pack(TOKEN, rid=req.rid, step=step, token=token, done=done)
        if self.m.is_head:
            self._on_token(req.rid, token, done)
        else:  # the head first: it waits for this token, the coordinator only records it
            self._send(self.m.head, msg)
            if done:
                self._drop(req.rid)
        self._send(COORDINATOR, msg)

    # -- messages out -------------------------------------------------------------------------

    def _send(self, dest: str, frames: list[bytes]) -> None:
        self.send_raw(dest, frames)
        self.bytes_sent[dest] = self.bytes_sent.get(dest, 0) + sum(len(f) for f in frames)

    def _error(self, message: str, rid: int | None = None) -> None:
        self._send(COORDINATOR, protocol.pack(ERROR, device=self.name, rid=rid, message=message[:2000]))


def empty_cache(i: Input) -> np.ndarray:
    """Zeros of the empty-cache shape; symbolic dims other than the sequence are 1 (batch)."""
    shape = [0 if a == i.seq_axis else (d if isinstance(d, int) else 1) for a, d in enumerate(i.shape)]
    return np.zeros(shape, dtype=np.dtype(i.dtype))
