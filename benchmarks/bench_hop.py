"""Where a pipeline hop's time goes: the stages' Python, and ZeroMQ waking the receiver.

A 3-stage local pipeline decodes slower than one stage by about a millisecond
per hop (two forward, the token back). For one request of an onnxruntime-genai
int4 SmolLM2 (greedy, one onnxruntime thread), built for 1 and 3 local stages,
side by side over --reps repetitions (medians):

- in one process: ``llc verify``'s split runner (the device code, messages
  packed and unpacked, no sockets): ms/token, of which onnxruntime runs; the
  rest is the stages' Python;
- as local processes, from the stages' own timelines: ms/token (from one head
  step's start to the next's), the onnxruntime ms of every stage's decode steps,
  and the gap after each step until the next stage's (one stage: its own next
  step), with the processes on any core and all on core 0;
- ZeroMQ alone: the round trip of a decode step's message between two
  processes over the devices' sockets (CURVE, DEALER to ROUTER, TCP loopback),
  back to back and with 5 ms of work between messages, as a stage has.

    python benchmarks/bench_hop.py [--genai models/smollm2-int4] [--reps 3] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import zmq

from bench_quant import PROMPT, profile
from report import grouped_bars, logger, markdown, write
from llc.bundle import schema
from llc.compiler import compile_model
from llc.profile import load_profile
from llc.runtime.coordinator import Coordinator, load_tokenizer
from llc.runtime.device import protocol
from llc.runtime.device.sampling import SamplingParams
from llc.runtime.splitrun import SplitRunner
from llc.targets.local import LocalTarget

log = logger("hop")
HIDDEN = 576  # SmolLM2's: a decode step sends two [1, 1, 576] float32 tensors and two small ones


def in_process(build: Path, prompt: list[int], n: int) -> tuple[float, float]:
    """(ms/token, of it outside onnxruntime) of the stages run in this process."""
    runner = SplitRunner(build, threads=1)
    runner.generate([prompt], SamplingParams(max_new_tokens=4))  # warm-up
    before = sum(s.compute_ms["decode"] for s in runner.stages.values())
    t0 = time.perf_counter()
    runner.generate([prompt], SamplingParams(max_new_tokens=n))
    total = (time.perf_counter() - t0) * 1000
    prefill = sum(s.events[-n][3] - s.events[-n][2] for s in runner.stages.values()) * 1000
    ort = sum(s.compute_ms["decode"] for s in runner.stages.values()) - before
    return (total - prefill) / (n - 1), (total - prefill - ort) / (n - 1)


def processes(build: Path, prompt: list[int], n: int, cpus: str | None) -> tuple[float, float, float]:
    """(ms/token, of it outside onnxruntime, gap after a step in ms) on local processes pinned to ``cpus``,
    medians over the decode steps of the stages' timelines: a token takes from one head step's start to the
    next's."""
    target = LocalTarget(ready_timeout=60)
    target.start(build, schema.open_build(build).devices)
    try:
        if cpus is not None:
            for proc in target.procs.values():  # run.sh execs python: the pid is the device's
                subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(proc.pid)], check=True, capture_output=True)
        with Coordinator(build, health=target.health) as c:
            c.connect()
            c.generate([prompt], SamplingParams(max_new_tokens=4))
            c.generate([prompt], SamplingParams(max_new_tokens=n))
            stats = c.stats()
    finally:
        target.stop()
    counts = Counter(e[0] for s in stats for e in s.events)
    rid = counts.most_common(1)[0][0]  # the measured request (rids are random): the one of n steps
    runs = {}  # step -> stage -> (start, end)
    for s in stats:
        for e_rid, step, start, end, _, _ in s.events:
            if e_rid == rid and step > 0:
                runs.setdefault(step, {})[s.stage] = (start, end)
    order = sorted({s.stage for s in stats})
    cycles, rest, gaps = [], [], []
    for step in sorted(runs)[:-1]:
        span, head_next = runs[step], runs[step + 1][order[0]][0]
        cycles.append((head_next - span[order[0]][0]) * 1000)
        rest.append(cycles[-1] - sum(end - start for start, end in span.values()) * 1000)
        starts = [span[k][0] for k in order[1:]] + [head_next]
        gaps += [(b - span[k][1]) * 1000 for k, b in zip(order, starts)]
    return statistics.median(cycles), statistics.median(rest), statistics.median(gaps)


def _sockets(ctx: zmq.Context, bind: str, connect: str, server: tuple[bytes, bytes],
             client: tuple[bytes, bytes]) -> tuple[zmq.Socket, zmq.Socket]:
    """A device's pair: a CURVE server ROUTER bound at ``bind``, a CURVE client DEALER to ``connect``."""
    router = ctx.socket(zmq.ROUTER)
    router.curve_server, (router.curve_publickey, router.curve_secretkey) = True, server
    router.rcvtimeo = 10000  # a far end that died (its port taken) must not hang the benchmark
    router.bind(bind)
    dealer = ctx.socket(zmq.DEALER)
    dealer.curve_publickey, dealer.curve_secretkey = client
    dealer.curve_serverkey = server[0]
    dealer.sndtimeo = 10000
    dealer.connect(connect)
    return router, dealer


def _echo(endpoint: str, back: str, server: tuple[bytes, bytes], client: tuple[bytes, bytes]) -> None:
    """The far end of the ping-pong: each message returned, until terminated."""
    router, dealer = _sockets(zmq.Context(), endpoint, back, server, client)
    router.rcvtimeo = -1  # waits for the next message as long as it takes
    while True:
        _, *frames = router.recv_multipart()
        dealer.send_multipart(frames)


def round_trips(work_ms: float, count: int = 400, port: int = 5791) -> list[float]:
    """µs per round trip of a decode step's tensors message, with ``work_ms`` of busy work between them."""
    server, client = zmq.curve_keypair(), zmq.curve_keypair()
    there, back = f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{port + 1}"
    hidden = np.zeros((1, 1, HIDDEN), np.float32)
    frames = protocol.pack(protocol.TENSORS, [("hidden", hidden), ("residual", hidden),
                                              ("seqlens_k", np.zeros(1, np.int32)),
                                              ("total_sequence_length", np.zeros((), np.int32))],
                           rids=[1], steps=[5], width=40, tokens=1, **{"from": "dev0"})
    echo = multiprocessing.get_context("spawn").Process(target=_echo, args=(there, back, server, client),
                                                        daemon=True)
    echo.start()
    ctx = zmq.Context()
    times = []
    try:
        router, dealer = _sockets(ctx, back, there, server, client)
        for _ in range(count):
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < work_ms / 1000:
                pass  # a stage's step: busy, not asleep
            t0 = time.perf_counter()
            dealer.send_multipart(frames)
            router.recv_multipart()
            times.append((time.perf_counter() - t0) * 1e6)
    finally:
        echo.terminate()
        echo.join(10)
        ctx.destroy(linger=0)
    return times[count // 10:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--genai", type=Path, default=Path("models/smollm2-int4"), help="onnxruntime-genai's int4 model")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--json", type=Path, default=Path("bench-results/hop.json"))
    args = ap.parse_args()
    model = args.genai / "model.onnx"
    if not model.is_file():
        raise SystemExit(f"{model}: not found; run: python examples/smollm2/export.py --builder int4 "
                         f"--out {args.genai}")
    prompt = load_tokenizer(args.genai).encode(PROMPT).ids
    rows: dict[str, list] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        builds = {}
        for n in (1, 3):
            log(f"compiling for {n} stage(s)")
            builds[n] = tmp / f"s{n}"
            compile_model(model, load_profile(profile(tmp / f"p{n}.yaml", n)), builds[n], quiet=True,
                          eos_token_ids=())
        for rep in range(args.reps):
            log(f"repetition {rep + 1}/{args.reps}")
            for n, build in builds.items():
                rows.setdefault(f"{n} in one process", []).append(in_process(build, prompt, args.new_tokens))
                for where, cpus in (("processes, any core", None), ("processes, core 0", "0")):
                    rows.setdefault(f"{n} {where}", []).append(processes(build, prompt, args.new_tokens, cpus))
            for work in (0.0, 5.0):
                rows.setdefault(f"zmq {work:g} ms", []).append(statistics.median(round_trips(work)))
    med = {k: tuple(statistics.median(x) for x in zip(*v)) if isinstance(v[0], tuple) else statistics.median(v)
           for k, v in rows.items()}
    table_rows, bars = [], []
    for key, m in med.items():
        if key.startswith("zmq"):
            continue
        stages, where = key.split(" ", 1)
        gap = f"{m[2]:.2f}" if len(m) > 2 else "-"
        table_rows.append([stages, where, f"{m[0]:.2f}", f"{m[0] - m[1]:.2f}", f"{m[1]:.2f}", gap])
        bars.append((f"{stages} st.\n{where.replace('processes, ', '')}", m[0] - m[1], m[1]))
    table = (f"SmolLM2-135M (onnxruntime-genai int4), 1 request, {args.new_tokens} tokens, 1 onnxruntime thread, "
             f"median of {args.reps}\n\n"
             + markdown(["stages", "where", "ms/token", "onnxruntime ms/token", "the rest ms/token",
                         "gap after a step ms"], table_rows)
             + "\n\nZeroMQ round trip of a decode step's message (CURVE, TCP loopback)\n\n"
             + markdown(["between messages", "round trip µs"],
                        [[f"{k.split()[1]} ms of work", f"{med[k]:.0f}"] for k in med if k.startswith("zmq")]))
    svg = grouped_bars("ms/token", [b[0] for b in bars],
                       [("onnxruntime", "#4a7", [b[1] for b in bars]), ("the rest", "#d74", [b[2] for b in bars])],
                       digits=1)
    write(args.json, {"new_tokens": args.new_tokens, "reps": args.reps, "rows": rows, "medians": med}, table, svg)


if __name__ == "__main__":
    main()
