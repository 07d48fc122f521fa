"""Serving benchmark: requests/s and tokens/s of `llc serve` with 1, 4 and 8 concurrent clients.

Compiles SmolLM2-135M int4 for 3 local devices with KV cache for 4 requests in
flight, starts `llc serve` on a free port, and has N threads each send
--requests chat completions (streamed, greedy, --new-tokens each) with the
official openai client; clients beyond the 4 in flight wait in the server's
queue. Prints a table (requests/s, generated tokens/s, mean time to first
token, mean latency) and writes JSON.

    python benchmarks/bench_serve.py [--model models/smollm2/model.onnx] [--requests 4] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import yaml

from llc.compiler import compile_model
from llc.profile import load_profile

QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "What is 12 times 12?",
             "Give me a synonym for happy.", "What is the boiling point of water?", "Who wrote Hamlet?",
             "What is the largest planet?", "Translate 'thank you' to French."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("models/smollm2/model.onnx"))
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--json", type=Path, default=Path("bench-results/serve.json"))
    args = ap.parse_args()
    from openai import OpenAI

    logging.getLogger("httpx2").setLevel(logging.WARNING)  # a line per request otherwise
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        profile = tmp / "p.yaml"
        profile.write_text(yaml.safe_dump({
            "devices": [{"name": f"dev{i}", "target": "local", "memory_mb": 2000, "gflops": 8.0, "threads": 1}
                        for i in range(3)],
            "network": {"bandwidth_mbps": 10000, "latency_ms": 0.05, "base_port": free_port()},
            "workload": {"prompt_tokens": 32, "max_context": 256, "requests_in_flight": 4,
                         "objective": "throughput", "stages": 3}}))
        build = tmp / "build"
        print("[bench] compiling SmolLM2 int4 for 3 devices", file=sys.stderr, flush=True)
        compile_model(args.model, load_profile(profile), build, quiet=True, weights="int4", eos_token_ids=())
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "llc.cli", "serve", str(build), "--port", str(port),
                                   "--queue", "16"], stderr=subprocess.PIPE)
        try:
            url = f"http://127.0.0.1:{port}"
            for _ in range(300):
                try:
                    httpx.get(url + "/metrics", timeout=1)
                    break
                except httpx.HTTPError:
                    time.sleep(0.2)
            client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
            model = client.models.list().data[0].id
            for clients in (1, 4, 8):
                ttfts, latencies, tokens = [], [], []

                def ask(k: int) -> None:
                    for i in range(args.requests):
                        t0 = time.perf_counter()
                        first, n = None, 0
                        for chunk in client.chat.completions.create(
                                model=model, temperature=0, max_tokens=args.new_tokens, stream=True,
                                messages=[{"role": "user", "content": QUESTIONS[(k + i) % len(QUESTIONS)]}]):
                            if chunk.choices and chunk.choices[0].delta.content and first is None:
                                first = time.perf_counter() - t0
                            if chunk.usage:
                                n = chunk.usage.completion_tokens
                        ttfts.append(first or 0.0)
                        latencies.append(time.perf_counter() - t0)
                        tokens.append(n)

                print(f"[bench] {clients} client(s)", file=sys.stderr, flush=True)
                t0 = time.perf_counter()
                threads = [threading.Thread(target=ask, args=(k,)) for k in range(clients)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                wall = time.perf_counter() - t0
                rows.append({"clients": clients, "requests": len(latencies), "wall_s": wall,
                             "requests_per_s": len(latencies) / wall, "tokens_per_s": sum(tokens) / wall,
                             "ttft_ms_mean": statistics.mean(ttfts) * 1000,
                             "latency_s_mean": statistics.mean(latencies)})
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(f"llc serve, SmolLM2-135M int4 over 3 local devices (1 thread each, KV for 4 in flight), "
          f"{args.new_tokens} tokens per answer")
    print(f"{'clients':>8}{'requests':>10}{'req/s':>8}{'tok/s':>8}{'TTFT ms':>9}{'latency s':>11}")
    for r in rows:
        print(f"{r['clients']:>8}{r['requests']:>10}{r['requests_per_s']:>8.2f}{r['tokens_per_s']:>8.1f}"
              f"{r['ttft_ms_mean']:>9.0f}{r['latency_s_mean']:>11.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
