#!/usr/bin/env python3
"""Device side of `llc profile`: pushed to each phone and run there with its python3.

Self-contained on purpose (like the launcher): the compute probe needs only
numpy + onnxruntime, the network probe only the standard library, so it runs
wherever the launcher can.

    python3 probe.py compute bench.onnx --threads 4 --seconds 2 --modes '[{"name": "decode", ...}]'
        One JSON line: per mode the GFLOP/s of the median run over at least
        --seconds of wall time (after a warm-up run), plus MemAvailable from
        /proc/meminfo. A mode with ``idle_ms`` pauses that long after every run,
        as a pipeline stage waits for its neighbours between steps: a phone that
        clocks down when idle, or a quota that only bites on long runs, shows
        here what a launcher's steps really get.
        Weights are graph inputs filled here with numpy, so the pushed model is
        a few KB however big the layers are.
    python3 probe.py serve PORT
        Accept one connection: echo single-byte pings until 'B', then count
        bytes until EOF and answer {"bytes", "seconds"}; exit (or after 30 s idle).
    python3 probe.py client HOST PORT --seconds 1.5
        Ping the server (round-trip time), then stream to it; one JSON line with
        rtt_ms (median) and mbps as the receiver measured it.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import time


def mem_available_kb() -> int | None:
    """MemAvailable, or less when this process's memory cgroup (v1) has a lower limit: Android
    limits apps with cgroups, and so does the phone lab."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1])
    except OSError:
        pass
    try:
        with open("/proc/self/cgroup") as f:
            path = next(line.strip().split(":", 2)[2] for line in f if line.split(":")[1] == "memory")
        group = f"/sys/fs/cgroup/memory{path}"
        with open(f"{group}/memory.limit_in_bytes") as f:
            limit = int(f.read())
        with open(f"{group}/memory.usage_in_bytes") as f:
            free = (limit - int(f.read())) // 1024
        if limit < 1 << 60 and (available is None or free < available):
            available = max(free, 0)
    except (OSError, StopIteration, ValueError, IndexError):
        pass
    return available


def compute(model: str, threads: int, seconds: float, modes: list[dict]) -> dict:
    available = mem_available_kb()  # before this probe takes any: what a launcher would find
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    weights = {}
    for i in session.get_inputs():
        if i.name.startswith("w."):  # fixed-shape weights, generated here once
            weights[i.name] = (rng.standard_normal(i.shape, dtype=np.float32) * 0.02).astype(np.float32)
    out = {"threads": threads, "mem_available_kb": available, "modes": {}}
    for mode in modes:
        feeds = dict(weights)
        for i in session.get_inputs():
            if i.name.startswith("w."):
                continue
            shape = [mode["dims"].get(d, 1) if isinstance(d, str) or d is None else d for d in i.shape]
            feeds[i.name] = (rng.standard_normal(shape, dtype=np.float32) * 0.5).astype(np.float32)
        session.run(None, feeds)  # warm-up: allocations, kernel selection
        idle = mode.get("idle_ms", 0) / 1000.0
        times, cpu0, t0 = [], time.process_time(), time.perf_counter()
        while time.perf_counter() - t0 < seconds or len(times) < 3:
            start = time.perf_counter()
            session.run(None, feeds)
            times.append(time.perf_counter() - start)
            if idle:
                time.sleep(idle)
        median = statistics.median(times)
        out["modes"][mode["name"]] = {
            "runs": len(times), "wall_s": sum(times), "cpu_s": time.process_time() - cpu0,
            "ms_per_run": median * 1000, "gflops": mode["flops"] / median / 1e9, "idle_ms": idle * 1000,
        }
    return out


def serve(port: int, idle_timeout: float = 30.0) -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(1)
    srv.settimeout(idle_timeout)
    conn, _ = srv.accept()
    conn.settimeout(idle_timeout)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        b = conn.recv(1)
        if not b or b == b"B":
            break
        conn.sendall(b)
    n, first, last = 0, None, None
    while True:
        chunk = conn.recv(1 << 16)
        if not chunk:
            break
        now = time.perf_counter()
        first = first or now
        last = now
        n += len(chunk)
    conn.sendall((json.dumps({"bytes": n, "seconds": (last - first) if first else 0.0}) + "\n").encode())
    conn.close()
    srv.close()


def client(host: str, port: int, seconds: float, pings: int = 20, connect_timeout: float = 15.0) -> dict:
    deadline = time.monotonic() + connect_timeout
    while True:  # the server may still be starting
        try:
            sock = socket.create_connection((host, port), timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(30)
    rtts = []
    for _ in range(pings):
        t = time.perf_counter()
        sock.sendall(b"P")
        if sock.recv(1) != b"P":
            raise RuntimeError("bad echo")
        rtts.append((time.perf_counter() - t) * 1000)
    sock.sendall(b"B")
    buf = b"\0" * (1 << 16)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        sock.sendall(buf)
    sock.shutdown(socket.SHUT_WR)
    reply = b""
    while not reply.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        reply += chunk
    sock.close()
    got = json.loads(reply)
    return {"rtt_ms": statistics.median(rtts), "rtt_ms_min": min(rtts), "bytes": got["bytes"],
            "seconds": got["seconds"], "mbps": got["bytes"] * 8 / got["seconds"] / 1e6 if got["seconds"] else 0.0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compute")
    c.add_argument("model")
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("--seconds", type=float, default=2.0)
    c.add_argument("--modes", required=True, help="JSON list of {name, dims, flops}")
    s = sub.add_parser("serve")
    s.add_argument("port", type=int)
    k = sub.add_parser("client")
    k.add_argument("host")
    k.add_argument("port", type=int)
    k.add_argument("--seconds", type=float, default=1.5)
    a = ap.parse_args(argv)
    if a.cmd == "compute":
        result = compute(a.model, a.threads, a.seconds, json.loads(a.modes))
    elif a.cmd == "serve":
        serve(a.port)
        return 0
    else:
        result = client(a.host, a.port, a.seconds)
    print("llc-probe " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
