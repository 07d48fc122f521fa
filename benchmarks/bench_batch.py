"""Batched decode: tokens/s with 1, 2 and 4 requests in flight, batched or one at a time.

On local processes with 1 intra-op thread each, SmolLM2 quantized to int4 by llc
(and fp32, with --fp32), built twice from the same model and profile: once with
``--max-batch 4`` (decode steps of the requests waiting at the head run as one
onnxruntime call on every stage) and once with ``--max-batch 1`` (the stage
interleaves requests one step at a time, as llc did before). For each build,
1-stage and 3-stage, and each number of requests in flight, a fixed batch of
prompts (--prompts x --new-tokens, no EOS) is generated with greedy sampling;
tokens/s is tokens over wall time. Configurations are interleaved over
--reps repetitions (the two builds in alternating order) and the median is reported, with each ratio taken per
repetition (this machine is noisy) and its median shown.

The tokens of every request are compared between the batched and the
one-at-a-time build (the same greedy decode). With fp32 weights they are the
same. With int4 they may part after a few tokens: onnxruntime's int8-activation
MatMulNBits kernels sum one row and several rows in a different order, and
re-quantizing activations at every layer turns those last-bit differences into
different logits (``llc verify`` reports the size; the batched rows equal the
unsplit model run on the same batch). The devices' own counters give the mean batch a
decode step ran and its ms per step, which is how a step's cost grows with the
batch: the bench prints it next to the plan's prediction of one step.

    python benchmarks/bench_batch.py [--model models/smollm2/model.onnx] [--reps 3] [--json bench-results/batch.json]

Writes the JSON, a markdown table (``.md`` beside it) and a bar chart (``.svg``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

from llc.bundle import schema
from llc.compiler import compile_model
from llc.profile import load_profile
from llc.runtime.coordinator import Coordinator, load_tokenizer
from llc.runtime.device.sampling import SamplingParams
from llc.targets.local import LocalTarget

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import grouped_bars, logger, markdown, write  # noqa: E402

log = logger("batch")

PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):",
           "The three primary colours are", "Water boils at", "My favourite book is",
           "The quick brown fox", "In 1969, the first"]
IN_FLIGHT = (1, 2, 4)


def profile(path: Path, stages: int, port: int, max_batch: int) -> Path:
    path.write_text(yaml.safe_dump({
        "devices": [{"name": f"dev{i}", "target": "local", "memory_mb": 4000, "gflops": 10.0, "threads": 1}
                    for i in range(stages)],
        "network": {"bandwidth_mbps": 1000, "latency_ms": 0.1, "base_port": port},
        "workload": {"prompt_tokens": 16, "max_context": 256, "requests_in_flight": 4, "stages": stages,
                     "objective": "throughput", "max_batch": max_batch}}, sort_keys=False))
    return path


def measure(build: Path, prompts: list[list[int]], new_tokens: int, in_flight: int) -> dict:
    target = LocalTarget(ready_timeout=90)
    target.start(build, schema.open_build(build).devices)
    try:
        with Coordinator(build, health=target.health) as c:
            c.connect()
            c.generate(prompts[:1], SamplingParams(max_new_tokens=4))  # warm up every session
            t0 = time.monotonic()
            results = c.generate(prompts, SamplingParams(max_new_tokens=new_tokens), concurrency=in_flight)
            wall = time.monotonic() - t0
            stats = c.stats()
    finally:
        target.stop()
    tokens = sum(len(r.tokens) for r in results)
    head = stats[0]
    return {"tokens_per_s": tokens / wall, "tokens": [r.tokens for r in results],
            "mean_batch": head.mean_batch, "ms_per_decode_step": head.ms_per_decode_step}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("models/smollm2/model.onnx"))
    ap.add_argument("--weights", default="int4", choices=["fp32", "int8", "int4"])
    ap.add_argument("--stages", default="1,3")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--port", type=int, default=6420)
    ap.add_argument("--json", type=Path, default=Path("bench-results/batch.json"))
    args = ap.parse_args()
    if not args.model.is_file():
        sys.exit(f"{args.model}: not found; run: python examples/smollm2/export.py")
    tok = load_tokenizer(args.model.parent)
    prompts = [tok.encode(p).ids for p in (PROMPTS * 4)[:args.prompts]]
    stage_counts = [int(s) for s in args.stages.split(",")]
    runs: dict[tuple, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        builds = {}
        for stages in stage_counts:
            for batch in (4, 1):
                out = builds[stages, batch] = tmp / f"s{stages}-b{batch}"
                log(f"compiling {args.weights}, {stages} stage(s), max batch {batch}")
                p = profile(tmp / f"p{stages}-{batch}.yaml", stages, args.port, batch)
                compile_model(args.model, load_profile(p), out, quiet=True, weights=args.weights, eos_token_ids=[])
        for rep in range(args.reps):
            for stages in stage_counts:
                for n in IN_FLIGHT:
                    for batch in ((4, 1) if rep % 2 == 0 else (1, 4)):  # alternate: no order bias
                        r = measure(builds[stages, batch], prompts, args.new_tokens, n)
                        runs.setdefault((stages, batch, n), []).append(r)
                        log(f"rep {rep + 1}/{args.reps} stages {stages} max batch {batch} in flight {n}: "
                            f"{r['tokens_per_s']:.1f} tok/s, mean batch {r['mean_batch'] or 0:.2f}")
    report(args, stage_counts, runs)


def report(args, stage_counts: list[int], runs: dict[tuple, list[dict]]) -> None:
    med = lambda xs: statistics.median(xs)  # noqa: E731
    rows = []
    for stages in stage_counts:
        base = runs[stages, 4, 1]  # batched build, 1 in flight: the reference for "x of 1 request"
        for n in IN_FLIGHT:
            b, o = runs[stages, 4, n], runs[stages, 1, n]
            same = all(x["tokens"] == y["tokens"] for x, y in zip(b, o))
            rows.append({
                "stages": stages, "in_flight": n,
                "batched_tok_s": med([x["tokens_per_s"] for x in b]),
                "one_at_a_time_tok_s": med([x["tokens_per_s"] for x in o]),
                "batched_vs_1": med([x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(b, base)]),
                "one_at_a_time_vs_1": med([x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(o, base)]),
                "batched_vs_one_at_a_time": med([x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(b, o)]),
                "mean_batch": med([x["mean_batch"] or 0 for x in b]),
                "head_ms_per_step": med([x["ms_per_decode_step"] or 0 for x in b]),
                "identical_tokens": same,
            })
    head = ["stages", "in flight", "batched tok/s", "one at a time tok/s", "batched / 1 in flight",
            "one at a time / 1 in flight", "batched / one at a time", "mean batch", "head ms/step", "same tokens"]
    table = markdown(head, [
        [r["stages"], r["in_flight"], f"{r['batched_tok_s']:.1f}", f"{r['one_at_a_time_tok_s']:.1f}",
         f"{r['batched_vs_1']:.2f}x", f"{r['one_at_a_time_vs_1']:.2f}x", f"{r['batched_vs_one_at_a_time']:.2f}x",
         f"{r['mean_batch']:.2f}", f"{r['head_ms_per_step']:.1f}", "yes" if r["identical_tokens"] else "NO"]
        for r in rows])
    write(args.json, {"model": str(args.model), "weights": args.weights, "reps": args.reps,
                      "new_tokens": args.new_tokens, "prompts": args.prompts, "rows": rows}, table, chart(rows))


def chart(rows: list[dict]) -> str:
    """Grouped bars: tokens/s per (stages, in flight), batched next to one at a time."""
    return grouped_bars("tokens/s (higher is better)", [f"{r['stages']} st, {r['in_flight']} req" for r in rows], [
        ("batched", "#4e79a7", [r["batched_tok_s"] for r in rows]),
        ("one at a time", "#bab0ac", [r["one_at_a_time_tok_s"] for r in rows])])


if __name__ == "__main__":
    main()
