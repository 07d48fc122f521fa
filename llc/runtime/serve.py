"""llc serve: an OpenAI-compatible HTTP API in front of a build's devices.

    GET  /v1/models             the one model this server runs
    POST /v1/completions        a prompt            (stream: server-sent events, or one JSON)
    POST /v1/chat/completions   messages, laid out with the model's chat template
    GET  /metrics               Prometheus text: requests, tokens, time to first token, per-stage compute

Starlette on uvicorn serves HTTP; one engine thread owns the coordinator's
sockets. Each HTTP request becomes a request in flight on the pipeline, up to
the KV cache the build reserved (``--requests`` at compile time); beyond that
requests wait in a queue, and beyond the queue the server answers 429. Tokens
come back to the request's handler through an asyncio queue; a client that goes
away (or hits a stop sequence) cancels its request on every device, so no KV
cache is left behind. Bad requests get OpenAI's error object with a 4xx status,
and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import click
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from llc.bundle import schema
from llc.errors import LlcError, one_line_errors
from llc.runtime.chat import ChatTemplate
from llc.runtime.coordinator import Coordinator, DeviceFailure, TextStream, load_tokenizer
from llc.runtime.device.protocol import ERROR, REQUEST, STATS, TOKEN
from llc.runtime.device.sampling import SamplingParams

STATS_EVERY_S = 5.0


class ApiError(Exception):
    """An OpenAI-style error: HTTP status, type, message, the parameter at fault."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": str(self), "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


@dataclass
class Job:
    """One HTTP request's tokens on their way from the engine thread to its handler."""

    rid: int
    prompt: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    tokens: asyncio.Queue = field(default_factory=asyncio.Queue)  # (token, done) or an Exception
    submitted: float = field(default_factory=time.monotonic)

    def put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.tokens.put_nowait, item)


class Engine:
    """The thread that owns the coordinator: submits requests as room allows, routes tokens, cancels."""

    def __init__(self, coordinator: Coordinator, max_active: int, max_queued: int):
        self.c = coordinator
        self.max_active, self.max_queued = max_active, max_queued
        self.incoming: queue.Queue[Job] = queue.Queue()
        self.cancels: queue.Queue[int] = queue.Queue()
        self.waiting: list[Job] = []
        self.active: dict[int, Job] = {}
        self.stats: dict[str, dict] = {}  # device -> its last stats reply
        self.failure: DeviceFailure | None = None
        self.lock = threading.Lock()
        self.running = True
        self.next_rid = int(uuid.uuid4().int % (1 << 40)) << 20  # unique across servers on long-lived devices
        self.thread = threading.Thread(target=self._loop, name="llc-engine", daemon=True)

    def submit(self, prompt: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop) -> Job:
        with self.lock:
            if self.failure is not None:
                raise ApiError(503, f"the pipeline is down: {self.failure}", "server_error")
            if self.incoming.qsize() + len(self.waiting) + len(self.active) >= self.max_active + self.max_queued:
                raise ApiError(429, f"{self.max_active} request(s) in flight and {self.max_queued} waiting "
                                    f"already; try again later", "rate_limit_error")
            self.next_rid += 1
            job = Job(self.next_rid, prompt, params, loop)
        self.incoming.put(job)
        return job

    def cancel(self, rid: int) -> None:
        self.cancels.put(rid)

    @property
    def queued(self) -> int:
        return self.incoming.qsize() + len(self.waiting)

    def _loop(self) -> None:
        last_progress = last_stats = time.monotonic()
        try:
            while self.running:
                while not self.incoming.empty():
                    self.waiting.append(self.incoming.get())
                while not self.cancels.empty():
                    rid = self.cancels.get()
                    self.waiting = [j for j in self.waiting if j.rid != rid]
                    if self.active.pop(rid, None) is not None:
                        self.c.cancel([rid])
                while self.waiting and len(self.active) < self.max_active:
                    job = self.waiting.pop(0)
                    self.active[job.rid] = job
                    self.c.send(self.c.head, REQUEST, rid=job.rid, prompt=job.prompt, params=job.params.to_dict())
                for device, msg in self.c.receive(0.02, errors=False):
                    if msg.type == STATS:
                        self.stats[device] = msg.fields
                    elif msg.type == ERROR:  # one request refused or failed: only that one ends
                        job = self.active.pop(msg.get("rid"), None)
                        if job is not None:
                            self.c.cancel([job.rid])
                            job.put(ApiError(500, f"device {msg['device']!r}: {msg['message']}", "server_error"))
                    elif msg.type == TOKEN and msg["rid"] in self.active:
                        last_progress = time.monotonic()
                        job = self.active[msg["rid"]]
                        if msg["done"]:
                            del self.active[msg["rid"]]
                        job.put((msg["token"], msg["done"]))
                now = time.monotonic()
                if now - last_stats > STATS_EVERY_S:
                    last_stats = now
                    for name in self.c.socks:
                        self.c.send(name, STATS)
                self.c._check_health()
                if self.active and now - last_progress > self.c.ping_after:
                    self.c._ping_all()
                self.c._check_pongs()
        except DeviceFailure as e:
            self.failure = e
            for job in list(self.active.values()) + self.waiting:
                job.put(e)
            self.active.clear()
            self.waiting.clear()


@dataclass
class Served:
    """What the handlers share."""

    build: schema.Build
    engine: Engine
    tokenizer: object
    template: ChatTemplate | None
    model_id: str
    max_context: int
    eos: set[int]
    api_key: str | None
    metrics: "Metrics"


class Metrics:
    """Prometheus counters, in a registry of this server's own."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("llc_requests", "HTTP requests", ["endpoint", "status"], registry=self.registry)
        self.prompt_tokens = Counter("llc_prompt_tokens", "Prompt tokens", registry=self.registry)
        self.generated = Counter("llc_generated_tokens", "Generated tokens", registry=self.registry)
        self.ttft = Histogram("llc_time_to_first_token_seconds", "Time to first token", registry=self.registry,
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.active = Gauge("llc_requests_in_flight", "Requests on the pipeline", registry=self.registry)
        self.queued = Gauge("llc_requests_queued", "Requests waiting for room", registry=self.registry)
        self.stage_ms = Gauge("llc_stage_decode_ms_per_step", "Decode compute per step", ["device", "stage"],
                              registry=self.registry)
        self.stage_active = Gauge("llc_stage_requests", "Requests a device holds", ["device"], registry=self.registry)


# -- request parsing -------------------------------------------------------------------------------


def _number(body: dict, key: str, default, kind=float, low=None, high=None):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise ApiError(400, f"{key} must be a {'whole ' if kind is int else ''}number", param=key)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ApiError(400, f"{key} must be between {low} and {high}", param=key)
    return kind(value)


def parse_common(body: dict, s: Served, default_max: int) -> tuple[SamplingParams, list[str], bool]:
    if body.get("model") not in (None, s.model_id):
        raise ApiError(404, f"the model {body.get('model')!r} does not exist; this server runs {s.model_id!r}",
                       param="model", code="model_not_found")
    if _number(body, "n", 1, int, 1, 1) != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    max_tokens = _number(body, "max_tokens", None, int, 1, None) or _number(
        body, "max_completion_tokens", default_max, int, 1, None)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(x, str) and x for x in stop) or len(stop) > 4:
        raise ApiError(400, "stop must be a string or a list of up to 4 strings", param="stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise ApiError(400, "seed must be a non-negative integer", param="seed")
    params = SamplingParams(max_new_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, float, 0, 2),
                            top_p=_number(body, "top_p", 1.0, float, 1e-9, 1), seed=seed)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false", param="stream")
    return params, stop, stream


def check_context(prompt: list[int], params: SamplingParams, s: Served) -> None:
    if not prompt:
        raise ApiError(400, "the prompt is empty", param="prompt")
    if len(prompt) + params.max_new_tokens > s.max_context:
        raise ApiError(400, f"this model's maximum context length is {s.max_context} tokens; the prompt has "
                            f"{len(prompt)} and max_tokens asks for {params.max_new_tokens} more",
                       param="max_tokens", code="context_length_exceeded")


async def json_body(request: Request) -> dict:
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


# -- generation ------------------------------------------------------------------------------------


async def generate(s: Served, prompt: list[int], params: SamplingParams, stop: list[str]):
    """Yield (text piece, finish_reason or None) until the request ends; cancels it if abandoned."""
    job = s.engine.submit(prompt, params, asyncio.get_running_loop())
    s.metrics.prompt_tokens.inc(len(prompt))
    stream, finish, emitted, n = TextStream(s.tokenizer), None, "", 0
    try:
        while finish is None:
            item = await job.tokens.get()
            if isinstance(item, ApiError):
                raise item
            if isinstance(item, Exception):
                raise ApiError(503, f"the pipeline failed: {item}", "server_error")
            token, done = item
            n += 1
            if n == 1:
                s.metrics.ttft.observe(time.monotonic() - job.submitted)
            s.metrics.generated.inc()
            if token in s.eos:
                finish = "stop"
            else:
                stream.push(token)
                cut = min((stream.text.find(x, max(0, len(emitted) - len(x))) for x in stop
                           if x in stream.text[max(0, len(emitted) - len(x)):]), default=-1)
                if cut >= 0:
                    finish = "stop"
                    piece, emitted = stream.text[len(emitted):cut], stream.text[:cut]
                    yield piece, finish, n
                    return
                if done:
                    finish = "length" if n >= params.max_new_tokens else "stop"
            piece, emitted = stream.text[len(emitted):], stream.text
            yield piece, finish, n
    finally:
        if finish is None or finish == "stop":
            s.engine.cancel(job.rid)  # a client gone, or a stop string: free it everywhere


def usage(prompt: list[int], completion: int) -> dict:
    return {"prompt_tokens": len(prompt), "completion_tokens": completion, "total_tokens": len(prompt) + completion}


def sse(obj) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


async def respond(s: Served, request: Request, chat: bool) -> Response:
    body = await json_body(request)
    params, stop, stream = parse_common(body, s, 16 if not chat else s.max_context)
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise ApiError(400, "messages must be a non-empty list of {role, content} strings", param="messages")
        if s.template is None:
            raise ApiError(400, "this model has no chat template; use /v1/completions", param="messages")
        try:
            text = s.template.render(messages)
        except LlcError as e:
            raise ApiError(400, str(e), param="messages") from None
        prompt = s.tokenizer.encode(text, add_special_tokens=False).ids
    else:
        text = body.get("prompt")
        if not isinstance(text, str):
            raise ApiError(400, "prompt must be a string", param="prompt")
        prompt = s.tokenizer.encode(text).ids
    params = SamplingParams(max_new_tokens=min(params.max_new_tokens, max(1, s.max_context - len(prompt)))
                            if chat and "max_tokens" not in body and "max_completion_tokens" not in body
                            else params.max_new_tokens, temperature=params.temperature, top_p=params.top_p,
                            seed=params.seed)
    check_context(prompt, params, s)
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    kind = "chat.completion" if chat else "text_completion"

    def choice(piece: str, finish: str | None, delta: bool) -> dict:
        if not chat:
            return {"index": 0, "text": piece, "logprobs": None, "finish_reason": finish}
        key = "delta" if delta else "message"
        return {"index": 0, key: {"role": "assistant", "content": piece} if not delta else
                ({"content": piece} if piece else {}), "finish_reason": finish}

    def envelope(choices: list, **extra) -> dict:
        return {"id": rid, "object": kind + (".chunk" if stream and chat else ""), "created": created,
                "model": s.model_id, "choices": choices, **extra}

    if not stream:
        text_out, finish, n = "", None, 0
        async for piece, finish, n in generate(s, prompt, params, stop):
            text_out += piece
        return JSONResponse(envelope([choice(text_out, finish, False)], usage=usage(prompt, n)))

    async def events():
        if chat:
            yield sse(envelope([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]))
        n = 0
        try:
            async for piece, finish, n in generate(s, prompt, params, stop):
                if piece or finish:
                    yield sse(envelope([choice(piece, finish, True)],
                                       **({"usage": usage(prompt, n)} if finish else {})))
        except ApiError as e:
            yield sse({"error": {"message": str(e), "type": e.kind, "param": e.param, "code": e.code}})
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


# -- the app ---------------------------------------------------------------------------------------


def make_app(s: Served) -> Starlette:
    def endpoint(name: str, fn):
        async def handler(request: Request) -> Response:
            try:
                if s.api_key is not None and request.headers.get("authorization") != f"Bearer {s.api_key}":
                    raise ApiError(401, "a valid API key is required (Authorization: Bearer ...)",
                                   "authentication_error", code="invalid_api_key")
                response = await fn(request)
            except ApiError as e:
                response = e.response()
            s.metrics.requests.labels(name, str(response.status_code)).inc()
            return response
        return handler

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": s.model_id, "object": "model", "created": 0,
                                                          "owned_by": "llc"}]})

    async def metrics(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        s.metrics.active.set(len(s.engine.active))
        s.metrics.queued.set(s.engine.queued)
        for device, st in list(s.engine.stats.items()):
            steps = st.get("steps", {}).get("decode", 0)
            if steps:
                s.metrics.stage_ms.labels(device, str(st.get("stage"))).set(st["compute_ms"]["decode"] / steps)
            s.metrics.stage_active.labels(device).set(st.get("active", 0))
        return Response(generate_latest(s.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    routes = [Route("/v1/models", endpoint("models", models)),
              Route("/v1/completions", endpoint("completions", lambda r: respond(s, r, False)), methods=["POST"]),
              Route("/v1/chat/completions", endpoint("chat", lambda r: respond(s, r, True)), methods=["POST"]),
              Route("/metrics", metrics)]
    return Starlette(routes=routes)


def served(build_dir: Path, coordinator: Coordinator, tokenizer, api_key: str | None, max_queued: int) -> Served:
    build = schema.open_build(build_dir)
    head, tail = build.manifest(build.devices[0]), build.manifest(build.devices[-1])
    engine = Engine(coordinator, max_active=head.max_requests, max_queued=max_queued)
    return Served(build=build, engine=engine, tokenizer=tokenizer,
                  template=ChatTemplate.of_build(build_dir, tokenizer),
                  model_id=Path(build.plan.model.path).parent.name or "model", max_context=head.max_context,
                  eos=set(tail.eos_token_ids), api_key=api_key, metrics=Metrics())


@click.command("serve")
@click.argument("build_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--api-key", default=None, help="Require `Authorization: Bearer KEY` on every request.")
@click.option("--queue", "max_queued", default=16, show_default=True, type=click.IntRange(0),
              help="Requests that may wait for room on the pipeline; more are answered 429.")
@click.option("--target", "target_name", default=None, help="How to start the devices (default: from the plan).")
@click.option("--attach", is_flag=True, help="Devices are already running (e.g. after `llc deploy`).")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait for the devices to start.")
@one_line_errors
def serve(build_dir: Path, host: str, port: int, api_key: str | None, max_queued: int, target_name: str | None,
          attach: bool, timeout: float) -> None:
    """Serve BUILD_DIR's model over an OpenAI-compatible HTTP API until stopped."""
    import uvicorn

    from llc.runtime.run import devices_running

    build = schema.open_build(build_dir)
    tokenizer = load_tokenizer(build_dir)
    with devices_running(build_dir, build, target_name, attach, timeout) as coordinator:
        s = served(build_dir, coordinator, tokenizer, api_key, max_queued)
        s.engine.thread.start()
        click.echo(f"serving {s.model_id!r} on http://{host}:{port}/v1 (OpenAI API; chat template: "
                   f"{'yes' if s.template else 'none'}; {s.engine.max_active} request(s) in flight)", err=True)
        try:
            uvicorn.run(make_app(s), host=host, port=port, log_level="warning")
        finally:
            s.engine.running = False
            s.engine.thread.join(timeout=5)
        if s.engine.failure is not None:
            raise s.engine.failure
