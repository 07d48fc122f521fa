"""Load-balancing benchmark: tokens/s after one device slows down, with and without the balancer.

    python benchmarks/bench_balance.py [--model models/smollm2/model.onnx] [--devices 2] [--slow 4] [--reps 2]
    python benchmarks/bench_balance.py --lab [--weights int4]       (root: the phone lab, over adb)

4 requests are in flight. At the first token, the last device is slowed
``--slow`` times, whichever process plays it (the balancer restarts them):

- local devices (one onnxruntime thread each; two by default, one per core of
  a 2-core machine, so that slowing one does not hand its core to the others):
  its process is stopped (SIGSTOP) (slow-1)/slow of every 4 ms (``llc.lab.throttle``);
- ``--lab``: a phone lab of ``--devices`` phones of one full core each, profiled
  by `llc profile` and deployed over adb; the phone's CPU quota is lowered to
  1/slow of its core (`llc lab cpu`), as a phone that heats up and throttles,
  and restored after the run.

The same run is made with the balancer and with ``--no-balance``, in alternating
order; tokens/s counts the tokens made after the slow-down over the time they
took (the restart a move costs included), and "once settled" the pace after
that restart (without a move: over the second half).
Writes JSON, a markdown table and a bar chart (.md, .svg) beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import yaml

from llc.compiler import compile_model, with_overrides
from llc.lab import throttle
from llc.profile import load_profile
from llc.runtime.balance import Balancer
from llc.runtime.coordinator import load_tokenizer
from llc.runtime.device.sampling import SamplingParams
from llc.runtime.run import generate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import grouped_bars, logger, markdown, write  # noqa: E402

PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):",
           "The three laws of robotics are"]


log = logger("balance")
WORKLOAD = {"prompt_tokens": 32, "max_context": 1024, "requests_in_flight": 4, "objective": "throughput"}
LAB_ADB_PORT = 5167


def once(build: Path, prompts: list[list[int]], tokens: int, slow_down: Callable[[], Callable[[], None]],
         balance: bool, target: str) -> dict:
    """One run; ``slow_down()`` is called at the first token and returns what undoes it."""
    t_slow, made, undo = [], [], []

    def on_token(r, token, done):
        made.append(time.monotonic())
        if not t_slow:
            t_slow.append(time.monotonic())
            undo.append(slow_down())

    balancer = Balancer(build, build) if balance else None
    try:
        out = generate(build, prompts, SamplingParams(max_new_tokens=tokens), len(prompts), on_token,
                       target_name=target, timeout=120, balancer=balancer)
    finally:
        for u in undo:
            u()
    after = [t for t in made if t > t_slow[0]]
    # the pace once the run settled: after the restart for a move (the longest pause), else the last half
    gap = max(range(1, len(after)), key=lambda i: after[i] - after[i - 1]) if out.moves else len(after) // 2
    settled = after[gap:]
    return {"balance": balance, "tok_s_after_slowdown": len(after) / (after[-1] - t_slow[0]),
            "tok_s_settled": (len(settled) - 1) / (settled[-1] - settled[0]),
            "moves": [m.line() for m in out.moves], "lost_s": [round(m.lost_s or 0, 2) for m in out.moves],
            "tokens": [r.tokens for r in out.results]}


def local_setup(args, tmp: Path) -> tuple[Path, Callable[[], Callable[[], None]]]:
    """A profile of local devices; the slow-down stops the last one's process part of the time."""
    profile = tmp / "devices.yaml"
    profile.write_text(yaml.safe_dump({
        "devices": [{"name": f"dev{i}", "target": "local", "memory_mb": 2000, "gflops": 8.0, "threads": 1}
                    for i in range(args.devices)],
        "network": {"bandwidth_mbps": 10000, "latency_ms": 0.05, "base_port": 6100},
        "workload": WORKLOAD}, sort_keys=False))
    build = tmp / "build"

    def slow_down() -> Callable[[], None]:
        proc = throttle.start(build, f"dev{args.devices - 1}", args.slow)
        return lambda: throttle.stop(proc)

    return profile, slow_down


def lab_setup(args, tmp: Path, stack: contextlib.ExitStack) -> tuple[Path, Callable[[], Callable[[], None]]]:
    """A lab of full-core phones, measured by `llc profile`; the slow-down lowers the last one's CPU quota."""
    from llc.lab.phones import Lab, PhoneSpec

    lab = Lab(tmp / "lab", adb_port=LAB_ADB_PORT, name="llcb", subnet="10.81.0")
    lab.down()  # whatever a crashed earlier run left
    stack.callback(lab.down)
    lab.up([PhoneSpec(cpu=1.0, rate=args.rate, memory_mb=2000) for _ in range(args.devices)])
    os.environ["ADB_SERVER_SOCKET"] = f"tcp:localhost:{LAB_ADB_PORT}"
    doc = yaml.safe_load((lab.state_dir / "devices.yaml").read_text())
    doc["workload"] = WORKLOAD
    (tmp / "phones.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    log("llc profile of the lab's phones")
    proc = subprocess.run([sys.executable, "-m", "llc.cli", "profile", str(tmp / "phones.yaml"), "-o",
                           str(tmp / "devices.yaml"), "--adb-port", str(LAB_ADB_PORT)], capture_output=True,
                          text=True, timeout=600)
    if proc.returncode != 0:
        sys.exit(f"llc profile failed: {proc.stderr.strip()}")
    victim = lab.phones[-1].name

    def slow_down() -> Callable[[], None]:
        lab.set_cpu(victim, 1 / args.slow)
        return lambda: lab.set_cpu(victim, 1.0)

    return tmp / "devices.yaml", slow_down


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("models/smollm2/model.onnx"))
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--slow", type=float, default=4.0)
    ap.add_argument("--tokens", type=int, default=300)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--weights", default="fp32", choices=["fp32", "int8", "int4"])
    ap.add_argument("--lab", action="store_true", help="phones of the lab over adb (root), their CPU quota lowered")
    ap.add_argument("--rate", default="200mbit", help="--lab: each phone's link")
    ap.add_argument("--json", type=Path, default=None,
                    help="default bench-results/balance.json (balance-lab.json with --lab)")
    args = ap.parse_args()
    args.json = args.json or Path(f"bench-results/balance{'-lab' if args.lab else ''}.json")
    if not args.model.is_file():
        sys.exit(f"{args.model}: not found; run: python examples/smollm2/export.py --out {args.model.parent}")
    target = "adb" if args.lab else "local"
    with tempfile.TemporaryDirectory(prefix="llc-balance-") as tmp, contextlib.ExitStack() as stack:
        tmp = Path(tmp)
        profile, slow_down = lab_setup(args, tmp, stack) if args.lab else local_setup(args, tmp)
        build = tmp / "build"
        log(f"compiling {args.model} ({args.weights}) for {args.devices} {target} devices")
        workload = load_profile(profile).workload
        # Quantized rows batched together differ slightly from rows alone (README, Limitations), so which
        # requests meet in a batch would change the tokens from run to run: one request per step then.
        batch = workload.max_batch if args.weights == "fp32" else 1
        compile_model(args.model, load_profile(profile), build, quiet=True, weights=args.weights,
                      workload=with_overrides(workload, stages=args.devices, max_batch=batch))
        tok = load_tokenizer(build)
        prompts = [tok.encode(p).ids for p in PROMPTS]
        runs: dict[bool, list[dict]] = {True: [], False: []}
        for rep in range(args.reps):
            for balance in ((True, False) if rep % 2 == 0 else (False, True)):
                r = once(build, prompts, args.tokens, slow_down, balance, target)
                log(f"rep {rep} balance={balance}: {r['tok_s_after_slowdown']:.1f} tok/s after the slow-down, "
                    f"{r['tok_s_settled']:.1f} settled; moves {r['moves']}")
                runs[balance].append(r)
    with_b = statistics.median(r["tok_s_after_slowdown"] for r in runs[True])
    without = statistics.median(r["tok_s_after_slowdown"] for r in runs[False])
    settled_b = statistics.median(r["tok_s_settled"] for r in runs[True])
    settled = statistics.median(r["tok_s_settled"] for r in runs[False])
    same = all(r["tokens"] == runs[False][0]["tokens"] for r in runs[True] + runs[False])
    yes = "yes" if same else "NO"
    where = f"{args.devices} {target}"
    table = markdown(
        ["devices", "slow-down of the last", "balancer", "tok/s after the slow-down", "vs without",
         "tok/s once settled", "vs without", "moves (first run)", "same tokens"],
        [[where, f"{args.slow:g}x", "on", f"{with_b:.1f}", f"{with_b / without:.2f}x", f"{settled_b:.1f}",
          f"{settled_b / settled:.2f}x", len(runs[True][0]["moves"]), yes],
         [where, f"{args.slow:g}x", "off (`--no-balance`)", f"{without:.1f}", "1.00x", f"{settled:.1f}", "1.00x", 0,
          yes]])
    write(args.json, {"model": str(args.model), "weights": args.weights, "target": target, "slow": args.slow,
                      "tokens": args.tokens,
                      "with_balancer": with_b, "without": without, "ratio": with_b / without,
                      "settled_with": settled_b, "settled_without": settled, "same_tokens": same,
                      "moves": runs[True][0]["moves"],
                      "runs": {str(k): [{x: y for x, y in r.items() if x != "tokens"} for r in v]
                               for k, v in runs.items()}}, table,
          grouped_bars(f"tok/s, {where}, the last device {args.slow:g}x slower from the first token",
                       ["after the slow-down (restart included)", "once settled"],
                       [("balancer on", "#4e79a7", [with_b, settled_b]),
                        ("--no-balance", "#bab0ac", [without, settled])]))


if __name__ == "__main__":
    main()
