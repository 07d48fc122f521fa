"""One pipeline stage: its requests, their KV caches, the inputs of each step and where outputs go.

No sockets here: messages come in through :meth:`Stage.handle` (frames as they
arrive), and everything this stage sends goes out through the ``send(dest,
frames)`` callback it is given, ``dest`` being a peer device or
``protocol.COORDINATOR``. ``main`` wires that to ZeroMQ on a phone; the split
runner (``llc.runtime.splitrun``) wires it to in-process queues, so ``llc
verify`` and the tests run the very code the devices run.

What a stage keeps per request id: its sampling params, the next step, the KV
cache (input name -> the present of the last step) and how many tokens it holds.
The head builds the graph inputs (ids, mask, positions) from the prompt and
then from each token the tail sends back; the tail samples.

Batched decode. When several requests wait for a decode step at the head, it
runs them as one batch (up to the manifest's ``max_batch``): one onnxruntime
call reads every weight once for all of them, which is what a decode step costs
on a phone. Their caches differ in length, so the head pads them to the
longest (``width``) and says which positions are padding in the attention mask:
``left`` padding for caches a graph grows by Concat (the padding sits before
each row's tokens), ``right`` for GroupQueryAttention, which writes each row's
new token right after its own ``seqlens_k``. Positions stay each row's own. The
batch then travels as one unit: every later stage gets the batch's rows and
width with its tensors, pads its own caches the same way, runs the same rows,
and keeps each row's cache without the padding. Each row's numbers are the ones
it gets alone; only the float summation order may differ.

Caches in place. When every cache is a GroupQueryAttention's (``kv_in_place``),
a request's cache is one buffer of ``max_context`` tokens per input, bound
(onnxruntime IO binding) as both the past and the present: the op writes each
step's keys and values after the row's ``seqlens_k`` and nothing is copied. A
batch still pads and stacks copies of the rows' caches, and each row's new
entries are written back into its buffer.

Limits keep a confused or hostile peer from growing this state: at most
``max_requests`` (+ one per stage, for ends still on their way) requests and as
many waiting batches, inputs at most one step ahead, and requests idle for
``IDLE_EXPIRY_S`` are freed.
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

Row = tuple[int, int]  # (request id, step) of one row of a batch
Send = Callable[[str, list], None]


class RequestError(ValueError):
    """A message about one request that this stage refuses; the request is dropped."""


@dataclass
class Request:
    """Everything this device keeps about one request id."""

    rid: int
    params: SamplingParams | None = None
    step: int = 0  # the next step to run
    kv: dict[str, np.ndarray] = field(default_factory=dict)  # input name -> cache so far (in place: its buffer)
    binding: ort.IOBinding | None = None  # in place: the buffers bound as past and present
    past: int = 0  # tokens in this device's cache (the head counts them whether or not it holds a cache)
    busy: bool = False
    queued: bool = False  # head: waiting in the ready queue
    next_ids: list[int] | None = None  # head: the ids to feed at `step`
    rng: np.random.Generator | None = None  # tail
    touched: float = 0.0  # monotonic time of the last message or step


@dataclass
class Unit:
    """A later stage's inputs for one step of a batch, gathered from every stage that sends them."""

    rows: tuple[Row, ...]
    width: int  # the batch's padded past length (see the module docstring)
    tokens: int  # new tokens per row
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    queued: bool = False


@dataclass
class Job:
    """One onnxruntime run: one prefill, or the decode steps of ``rows`` as one batch."""

    rows: tuple[Row, ...]
    feeds: dict[str, np.ndarray]
    built: dict[str, np.ndarray]  # graph inputs the head made (some are only sent on)
    width: int = 0  # the batch's padded past length
    pads: tuple[int, ...] = (0,)  # per row: padding positions in its cache
    tokens: int = 1  # new tokens per row
    binding: ort.IOBinding | None = None  # in place (one row): its request's binding, inputs bound

    @property
    def padded(self) -> bool:
        """Several rows, or one with padding: caches go in stacked and come out sliced."""
        return len(self.rows) > 1 or self.pads != (0,)

    @property
    def rid(self) -> int:
        return self.rows[0][0]

    @property
    def step(self) -> int:
        return self.rows[0][1]


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
        self.right = m.batch_padding == "right"  # GroupQueryAttention: shorter caches padded after
        self.in_place = m.kv_in_place and bool(self.kv_inputs)
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
        presents = {i.present for i in self.kv_inputs}
        self.computed = [n for n in self.output_names if n not in presents]  # in place: what onnxruntime allocates
        self.dtypes = {i.name: np.dtype(i.dtype) for i in m.inputs}
        self.requests: dict[int, Request] = {}
        self.units: dict[tuple[Row, ...], Unit] = {}  # not the head: batches whose inputs are arriving
        self.ended: deque[int] = deque(maxlen=ENDED_KEPT)
        self.ready: deque = deque()  # the head: request ids; a later stage: unit keys
        self.waiting = False  # the head holds ready decode steps back for the rest of their group
        self.assembling: tuple[int, ...] = ()  # requests of the step next_job is putting together
        self.compute_ms = {"prefill": 0.0, "decode": 0.0}
        self.steps = {"prefill": 0, "decode": 0}  # onnxruntime runs
        self.rows = {"prefill": 0, "decode": 0}  # request steps in them (more than runs when batched)
        self.events: deque = deque(maxlen=EVENTS_KEPT)  # (rid, step, start, end, slot, rows), wall clock
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
            rids = msg.get("rids")
            rid = msg.get("rid", rids[0] if isinstance(rids, list) and len(rids) == 1 else None)
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
            rss, peak = memory_bytes()
            poll = {"poll": True} if msg.get("poll") else {}  # counters only, tagged so
            return protocol.pack(STATS, device=self.name, stage=m.stage, compute_ms=self.compute_ms,
                                 steps=self.steps, rows=self.rows, bytes_sent=self.bytes_sent,
                                 active=len(self.requests), events=[] if poll else [list(e) for e in self.events],
                                 rss_bytes=rss, peak_rss_bytes=peak, **poll)
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
        self._queue_head(req)

    def _on_tensors(self, msg: Message) -> None:
        if self.m.is_head:
            raise protocol.ProtocolError("tensors sent to the head, which takes none")
        rows = self._rows(msg)
        params = SamplingParams.parse(msg["params"]) if "params" in msg.fields else None
        if params is not None and len(rows) != 1:
            raise protocol.ProtocolError("params come with a prefill, which is one request")
        unknown = set(msg.tensors) - self.awaited
        if unknown:
            raise RequestError(f"tensors this stage does not take: {sorted(unknown)[:3]}")
        for name, a in msg.tensors.items():
            if a.dtype != self.dtypes[name]:
                raise RequestError(f"input {name}: got {a.dtype.name}, the segment takes {self.dtypes[name].name}")
        live = [(rid, step) for rid, step in rows if rid not in self.ended]
        if not live:
            return  # every request ended (or was cancelled) while these were on their way
        unit = self.units.get(rows)
        if unit is None:
            if len(self.units) >= self.m.max_requests + self.m.num_stages:
                raise RequestError(f"more than {self.m.max_requests} steps waiting for their inputs")
            for rid, step in live:
                req = self.requests.get(rid) or self._new_request(rid, step)
                if not req.step <= step <= req.step + MAX_STEPS_AHEAD:
                    raise RequestError(f"tensors for step {step} while request {rid} is at step {req.step}")
            unit = self.units[rows] = Unit(rows, msg["width"], msg["tokens"])
        elif (unit.width, unit.tokens) != (msg["width"], msg["tokens"]):
            raise RequestError(f"width {msg['width']} and {msg['tokens']} tokens for a batch sent with "
                               f"width {unit.width} and {unit.tokens} tokens")
        for rid, _ in live:
            req = self.requests[rid]
            req.params = req.params or params
            req.touched = self.clock()
        unit.tensors.update(msg.tensors)
        self._queue_units()

    def _rows(self, msg: Message) -> tuple[Row, ...]:
        """The (rid, step) rows a tensors message is for, checked."""
        rids, steps, width, tokens = msg["rids"], msg["steps"], msg["width"], msg["tokens"]
        ints = all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**63 for x in rids + steps)
        if not ints or len(rids) != len(steps) or not 1 <= len(rids) <= self.m.max_batch:
            raise protocol.ProtocolError(f"rids and steps must be 1..{self.m.max_batch} request ids and steps")
        if len(set(rids)) != len(rids):
            raise protocol.ProtocolError("a request twice in one batch")
        if len(rids) > 1 and 0 in steps:
            raise protocol.ProtocolError("a prefill is never batched")
        if width < 0 or width > self.m.max_context:
            raise protocol.ProtocolError(f"width {width} outside 0..{self.m.max_context}")
        if not 1 <= tokens <= self.m.max_context - width:
            raise protocol.ProtocolError(f"{tokens} new tokens on a width of {width} "
                                         f"(max context {self.m.max_context})")
        return tuple(zip(rids, steps))

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
        self._queue_head(req)

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
        if not self.m.is_head:
            self._queue_units()

    def _drop(self, rid: int) -> None:
        self.requests.pop(rid, None)
        self.ended.append(rid)

    def expire(self) -> list[int]:
        """Free requests idle for longer than IDLE_EXPIRY_S; their ids."""
        now = self.clock()
        old = [r.rid for r in self.requests.values() if not r.busy and now - r.touched > IDLE_EXPIRY_S]
        for rid in old:
            self._drop(rid)
        self._queue_units()
        return old

    # -- scheduling -------------------------------------------------------------------------

    def _queue_head(self, req: Request) -> None:
        if not (req.busy or req.queued or req.next_ids is None):
            req.queued = True
            self.ready.append(req.rid)

    def _queue_units(self) -> None:
        """Queue every batch whose inputs are all here and whose live requests are at its step."""
        for key, unit in list(self.units.items()):
            if unit.queued:
                continue
            live = [(self.requests.get(rid), step) for rid, step in unit.rows]
            if all(r is None for r, _ in live):
                del self.units[key]  # every request of it ended
            elif self.awaited <= unit.tensors.keys() and all(
                    r is None or (not r.busy and r.step == step) for r, step in live):
                unit.queued = True
                self.ready.append(key)

    def next_job(self) -> Job | None:
        """The next step to run, inputs gathered; None when nothing is ready (or the head waits).

        Inputs that cannot be put together (a peer sent tensors of the wrong
        shape) fail that step's requests, never the device.
        """
        try:
            if self.m.is_head:
                return self._head_job()
            while self.ready:
                job = self._unit_job(self.ready.popleft())
                if job is not None:
                    return job
            return None
        except Exception as e:
            for rid in self.assembling:
                self._error(f"{type(e).__name__}: {e}", rid)
                self._drop(rid)
            return None
        finally:
            self.assembling = ()

    def _head_job(self) -> Job | None:
        """The oldest ready step: a prefill alone, or a batch of the ready decode steps.

        Requests in flight form groups that travel the pipeline together. A
        group of ceil(decoding / stages) requests keeps every stage busy and
        still batches, so decode steps wait for that many of them to be ready
        while tokens of the others are on their way back (never for longer:
        if none are, whatever is ready runs). A prefill never waits.
        """
        ready = [self.requests[rid] for rid in self.ready if rid in self.requests]
        self.waiting = False
        if not ready:
            self.ready.clear()
            return None
        decodes = [r for r in ready if r.step > 0]
        coming = sum(1 for r in self.requests.values() if r.step > 0 and not r.queued and not r.busy)
        group = -(-(len(decodes) + coming) // self.m.num_stages)
        if ready[0].step == 0 or (len(decodes) < min(group, self.m.max_batch) and coming):
            prefills = [r for r in ready if r.step == 0]
            if not prefills:
                self.waiting = True
                return None
            batch = prefills[:1]
        else:
            batch = decodes[:self.m.max_batch]
        taken = {r.rid for r in batch}
        self.ready = deque(r.rid for r in ready if r.rid not in taken)
        self.assembling = tuple(taken)
        width = max(r.past for r in batch)
        built: dict[str, np.ndarray] = {}
        ids = [r.next_ids or [] for r in batch]
        n = len(ids[0])
        for name, role, dtype in self.graph_inputs:
            if role == "input_ids":
                built[name] = np.array(ids, dtype=dtype)
            elif role == "attention_mask":
                built[name] = np.stack([mask_row(r.past, width, n, dtype, self.right)
                                        for r in batch])
            else:
                built[name] = np.stack([np.arange(r.past, r.past + n, dtype=dtype) for r in batch])
        for r in batch:
            r.queued, r.busy, r.next_ids = False, True, None
        job = Job(tuple((r.rid, r.step) for r in batch), {}, built, width, tuple(width - r.past for r in batch), n)
        for i in self.m.inputs:
            if i.source == "graph":
                job.feeds[i.name] = built[i.name]
        self._caches(batch, job)
        return job

    def _unit_job(self, key: tuple[Row, ...]) -> Job | None:
        """A later stage's batch as it came: a row whose request ended meanwhile runs on an empty
        cache and is thrown away (rows never mix), so every stage runs the same rows."""
        unit = self.units.pop(key, None)
        if unit is None:
            return None
        batch = [self.requests.get(rid) for rid, _ in unit.rows]
        if all(r is None for r in batch):
            return None
        if any(r is not None and (r.busy or r.step != step) for r, (_, step) in zip(batch, unit.rows)):
            self._error(f"a batch for steps {[s for _, s in unit.rows]} its requests are not at; dropped")
            return None
        pads = tuple(unit.width - (r.past if r else 0) for r in batch)
        if self.kv_inputs and min(pads) < 0:
            for r in batch:
                if r is not None:
                    self._drop(r.rid)
            self._error(f"a batch of width {unit.width} is shorter than a cache it pads; dropped its requests")
            return None
        self.assembling = tuple(r.rid for r in batch if r is not None)
        for r in batch:
            if r is not None:
                r.busy = True
        job = Job(unit.rows, dict(unit.tensors), {}, unit.width, pads, unit.tokens)
        self._caches(batch, job)
        return job

    def _caches(self, batch: list[Request | None], job: Job) -> None:
        """Each KV input into the job: one row in place is bound (with the job's other inputs);
        otherwise the requests' caches, padded to the batch's width and stacked."""
        if self.in_place and not job.padded:
            job.binding = self._bind(batch[0], job.feeds)
            return
        for i in self.kv_inputs:
            if job.step == 0:
                job.feeds[i.name] = empty_cache(i)
                continue
            caches = [(along(r.kv[i.name], i.seq_axis, 0, r.past) if self.in_place else r.kv[i.name])
                      if r else empty_cache(i) for r in batch]
            job.feeds[i.name] = pad_stack(caches, i.seq_axis, job.width, job.pads, self.right) if job.padded \
                else caches[0]

    def _bind(self, req: Request, feeds: dict[str, np.ndarray]) -> ort.IOBinding:
        """The request's binding, made (with its buffers) at its first step, and this step's inputs bound."""
        b = req.binding
        if b is None:
            b = req.binding = self.session.io_binding()
            for name in self.computed:  # first, so that get_outputs() lists them in this order
                b.bind_output(name)
            for i in self.kv_inputs:
                shape = [self.m.max_context if a == i.seq_axis else d for a, d in enumerate(empty_cache(i).shape)]
                buffer = req.kv[i.name] = np.zeros(shape, np.dtype(i.dtype))  # pages come as tokens fill them
                value = ort.OrtValue.ortvalue_from_numpy(buffer)  # shares the buffer's memory
                b.bind_ortvalue_input(i.name, value)
                b.bind_ortvalue_output(i.present, value)
        for name, value in feeds.items():
            b.bind_cpu_input(name, value)
        for name in self.computed:  # fresh outputs: the last step's arrays may still be in use
            b.bind_output(name)
        return b

    def run(self, job: Job) -> StepResult:
        """Run the segment (onnxruntime releases the GIL: safe in a worker thread)."""
        t0 = time.perf_counter()
        try:
            if job.binding is None:
                outputs = dict(zip(self.output_names, self.session.run(self.output_names, job.feeds)))
            else:
                self.session.run_with_iobinding(job.binding)
                values = job.binding.get_outputs_as_ortvaluevector()  # (get_outputs wraps the caches too: slow)
                outputs = {n: values[k].numpy() for k, n in enumerate(self.computed)}
            error = None
            n = len(job.rows)  # a peer's tensors of another batch size or no tokens must not get further
            logits = outputs[self.m.logits] if self.m.is_tail else None
            if (logits is not None and (logits.ndim < 2 or logits.shape[0] != n or logits.shape[1] < 1)) or (
                    n > 1 and any(outputs[i.present].shape[:1] != (n,) for i in self.kv_inputs)):
                outputs, error = None, f"step {job.step}: outputs are not one row per request of the batch"
        except Exception as e:  # onnxruntime's own errors: the request fails, the device stays
            outputs, error = None, f"step {job.step}: {type(e).__name__}: {e}"
        return StepResult(job, outputs, error, (time.perf_counter() - t0) * 1000.0)

    def complete(self, result: StepResult) -> None:
        """Keep each row's cache, send the outputs later stages need, sample on the tail."""
        job = result.job
        rows = [(i, self.requests.get(rid)) for i, (rid, _) in enumerate(job.rows)]
        for _, req in rows:
            if req is not None:
                req.busy = False
        rows = [(i, req) for i, req in rows if req is not None]  # ended or cancelled while it ran: gone
        if result.error is not None:
            for _, req in rows:
                self._error(result.error, req.rid)
                self._drop(req.rid)
            self._queue_units()
            return
        if not rows:
            return  # every request of it ended while it ran: later stages got their ends
        outputs = result.outputs
        if self.on_outputs is not None:
            if job.binding is not None:  # each present as a copying op returns it (a view of the buffer)
                kv = rows[0][1].kv
                outputs.update({i.present: along(kv[i.name], i.seq_axis, 0, job.width + job.tokens)
                                for i in self.kv_inputs})
            self.on_outputs(job, outputs)
        kind = "prefill" if job.step == 0 else "decode"
        self.compute_ms[kind] += result.ms
        self.steps[kind] += 1
        self.rows[kind] += len(job.rows)
        end = time.time()
        for slot, (rid, step) in enumerate(job.rows):
            self.events.append((rid, step, end - result.ms / 1000.0, end, slot, len(job.rows)))
        for i, req in rows:
            for k in self.kv_inputs if job.binding is None else ():  # (bound: written in place already)
                present = outputs[k.present]
                row = unpad(present, i, k.seq_axis, job.pads[i], self.right) if job.padded else present
                if self.in_place:  # the row's new entries into its buffer
                    new = along_index(row.ndim, k.seq_axis, slice(req.past, req.past + job.tokens))
                    req.kv[k.name][new] = row[new]
                else:
                    req.kv[k.name] = row
            req.past += job.tokens
        produced = {**job.feeds, **job.built, **outputs}
        first = rows[0][1]
        extra = {"params": first.params.to_dict()} if job.step == 0 and first.params else {}
        for s in self.m.sends:
            self._send(s.to, protocol.pack(TENSORS, [(t, produced[t]) for t in s.tensors],
                                           rids=[r for r, _ in job.rows], steps=[k for _, k in job.rows],
                                           width=job.width, tokens=job.tokens, **{"from": self.name}, **extra))
        for i, req in rows:
            req.step += 1
            req.touched = self.clock()
            if self.m.is_tail:
                self._sample(req, outputs[self.m.logits][i], job.rows[i][1])
            if self.m.is_head and req.rid in self.requests:
                self._queue_head(req)
        if not self.m.is_head:
            self._queue_units()

    def _sample(self, req: Request, logits: np.ndarray, step: int) -> None:
        params = req.params or SamplingParams()
        if req.rng is None:
            req.rng = np.random.default_rng(params.seed)
        token = sample(logits[-1], params, req.rng)
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


def memory_bytes() -> tuple[int, int]:
    """(resident now, peak) of this process from /proc (Linux, Android); (0, 0) where there is none."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024
    except (OSError, KeyError, ValueError, IndexError):
        return 0, 0


def empty_cache(i: Input) -> np.ndarray:
    """Zeros of the empty-cache shape; symbolic dims other than the sequence are 1 (batch)."""
    shape = [0 if a == i.seq_axis else (d if isinstance(d, int) else 1) for a, d in enumerate(i.shape)]
    return np.zeros(shape, dtype=np.dtype(i.dtype))


def mask_row(past: int, width: int, n: int, dtype: np.dtype, right: bool) -> np.ndarray:
    """One row of a batch's attention mask: ones on its own tokens, zeros on the padding."""
    mask = np.ones(width + n, dtype=dtype)
    if width > past:
        if right:
            mask[past + n:] = 0
        else:
            mask[:width - past] = 0
    return mask


def pad_stack(caches: list[np.ndarray], axis: int, width: int, pads: tuple[int, ...], right: bool) -> np.ndarray:
    """Caches of one row each ([1, ..., past_i, ...]) as one [B, ..., width, ...] batch, zero-padded.

    The padding's values never count: the attention mask (or seqlens_k) hides them.
    """
    first = caches[0]
    shape = list(first.shape)
    shape[0], shape[axis] = len(caches), width
    out = np.zeros(shape, dtype=first.dtype)
    for b, (c, pad) in enumerate(zip(caches, pads)):
        index = [b] + [slice(None)] * (first.ndim - 1)
        past = width - pad
        index[axis] = slice(0, past) if right else slice(pad, width)
        out[tuple(index)] = c[0]
    return out


def unpad(present: np.ndarray, row: int, axis: int, pad: int, right: bool) -> np.ndarray:
    """Row ``row`` of a batch's present, without its padding (a view: no copy)."""
    index = [slice(row, row + 1)] + [slice(None)] * (present.ndim - 1)
    length = present.shape[axis]
    index[axis] = slice(0, length - pad) if right else slice(pad, length)
    return present[tuple(index)]


def along_index(ndim: int, axis: int, index: slice) -> tuple:
    """``index`` on ``axis``, everything on the other axes."""
    return tuple(index if a == axis else slice(None) for a in range(ndim))


def along(a: np.ndarray, axis: int, start: int, stop: int) -> np.ndarray:
    """Positions start..stop of ``a`` on ``axis`` (a view)."""
    return a[along_index(a.ndim, axis, slice(start, stop))]
