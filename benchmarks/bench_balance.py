"""Load-balancing benchmark: tokens/s after one device slows down, with and without the balancer.

    python benchmarks/bench_balance.py [--model models/smollm2/model.onnx] [--devices 2] [--slow 4] [--reps 2]

Local devices (one onnxruntime thread each; two by default, one per core of a
2-core machine, so that slowing one does not hand its core to the others) run 4
requests in flight. At the first token, dev1's process is slowed ``--slow`` times: stopped
(SIGSTOP) for (slow-1) ms of every ``slow`` ms, whichever process plays that
device (the balancer restarts them). That stands in for a phone that throttles
or that another app loads; the phone lab's CPU quotas are not used here. The
same run is made with the balancer and with ``--no-balance``, in alternating
order; tokens/s counts the tokens made after the slow-down over the time they
took (the restart a move costs included), and "once settled" the pace after
that restart (without a move: over the second half).
Writes JSON and a markdown table beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from llc.compiler import compile_model
from llc.profile import load_profile
from llc.runtime.balance import Balancer
from llc.runtime.coordinator import load_tokenizer
from llc.runtime.device.sampling import SamplingParams
from llc.runtime.run import generate

PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):",
           "The three laws of robotics are"]


def log(msg: str) -> None:
    print(f"[balance] {msg}", file=sys.stderr, flush=True)


def throttle(build: Path, device: str, slow: float, stop: threading.Event) -> None:
    """Keep ``device``'s current process stopped (slow-1)/slow of the time, 4 ms periods."""
    period = 0.004
    while not stop.is_set():
        try:  # a pid file may go between the glob and the read: a restart under way
            pid = int(sorted(build.glob(f"**/run/{device}.pid"), key=lambda p: p.stat().st_mtime)[-1].read_text())
            os.kill(pid, signal.SIGSTOP)
            time.sleep(period * (slow - 1) / slow)
            os.kill(pid, signal.SIGCONT)
        except (IndexError, ValueError, OSError):
            pass
        time.sleep(period / slow)


def once(build: Path, prompts: list[list[int]], tokens: int, slow: float, balance: bool) -> dict:
    stop, t_slow, made = threading.Event(), [], []

    def on_token(r, token, done):
        made.append(time.monotonic())
        if not t_slow:
            t_slow.append(time.monotonic())
            threading.Thread(target=throttle, args=(build, "dev1", slow, stop), daemon=True).start()

    balancer = Balancer(build, build) if balance else None
    try:
        out = generate(build, prompts, SamplingParams(max_new_tokens=tokens), len(prompts), on_token,
                       target_name="local", timeout=60, balancer=balancer)
    finally:
        stop.set()
    after = [t for t in made if t > t_slow[0]]
    # the pace once the run settled: after the restart for a move (the longest pause), else the last half
    gap = max(range(1, len(after)), key=lambda i: after[i] - after[i - 1]) if out.moves else len(after) // 2
    settled = after[gap:]
    return {"balance": balance, "tok_s_after_slowdown": len(after) / (after[-1] - t_slow[0]),
            "tok_s_settled": (len(settled) - 1) / (settled[-1] - settled[0]),
            "moves": [m.line() for m in out.moves], "tokens": [r.tokens for r in out.results]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("models/smollm2/model.onnx"))
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--slow", type=float, default=4.0)
    ap.add_argument("--tokens", type=int, default=300)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--json", type=Path, default=Path("bench-results/balance.json"))
    args = ap.parse_args()
    if not args.model.is_file():
        sys.exit(f"{args.model}: not found; run: python examples/smollm2/export.py --out {args.model.parent}")
    with tempfile.TemporaryDirectory(prefix="llc-balance-") as tmp:
        tmp = Path(tmp)
        profile = tmp / "devices.yaml"
        profile.write_text(yaml.safe_dump({
            "devices": [{"name": f"dev{i}", "target": "local", "memory_mb": 2000, "gflops": 8.0, "threads": 1}
                        for i in range(args.devices)],
            "network": {"bandwidth_mbps": 10000, "latency_ms": 0.05, "base_port": 6100},
            "workload": {"prompt_tokens": 32, "max_context": 512, "requests_in_flight": 4,
                         "objective": "throughput", "stages": args.devices}}, sort_keys=False))
        build = tmp / "build"
        compile_model(args.model, load_profile(profile), build, quiet=True)
        tok = load_tokenizer(build)
        prompts = [tok.encode(p).ids for p in PROMPTS]
        runs: dict[bool, list[dict]] = {True: [], False: []}
        for rep in range(args.reps):
            for balance in ((True, False) if rep % 2 == 0 else (False, True)):
                r = once(build, prompts, args.tokens, args.slow, balance)
                log(f"rep {rep} balance={balance}: {r['tok_s_after_slowdown']:.1f} tok/s after the slow-down, "
                    f"{r['tok_s_settled']:.1f} settled; moves {r['moves']}")
                runs[balance].append(r)
    with_b = statistics.median(r["tok_s_after_slowdown"] for r in runs[True])
    without = statistics.median(r["tok_s_after_slowdown"] for r in runs[False])
    settled_b = statistics.median(r["tok_s_settled"] for r in runs[True])
    settled = statistics.median(r["tok_s_settled"] for r in runs[False])
    same = all(r["tokens"] == runs[False][0]["tokens"] for r in runs[True] + runs[False])
    table = "\n".join([
        "| devices | slow-down of dev1 | balancer | tok/s after the slow-down | vs without | tok/s once settled "
        "| vs without | moves (first run) | same tokens |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {args.devices} | {args.slow:g}x | on | {with_b:.1f} | {with_b / without:.2f}x | {settled_b:.1f} "
        f"| {settled_b / settled:.2f}x | {len(runs[True][0]['moves'])} | {'yes' if same else 'NO'} |",
        f"| {args.devices} | {args.slow:g}x | off (`--no-balance`) | {without:.1f} | 1.00x | {settled:.1f} | 1.00x | 0 "
        f"| {'yes' if same else 'NO'} |"])
    print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"model": str(args.model), "slow": args.slow, "tokens": args.tokens,
                                     "with_balancer": with_b, "without": without, "ratio": with_b / without,
                                     "settled_with": settled_b, "settled_without": settled,
                                     "same_tokens": same, "moves": runs[True][0]["moves"],
                                     "runs": {str(k): [{x: y for x, y in r.items() if x != "tokens"} for r in v]
                                              for k, v in runs.items()}}, indent=1) + "\n")
    args.json.with_suffix(".md").write_text(table + "\n")
    log(f"wrote {args.json} and .md")


if __name__ == "__main__":
    main()
