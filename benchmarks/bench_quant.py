"""Quantized decode benchmark: llc's devices against plain onnxruntime and onnxruntime-genai, same precision.

For SmolLM2-135M at fp32 and int4, one onnxruntime thread everywhere, the same
prompt and greedy decoding of --new-tokens tokens, side by side in one run and
interleaved over --reps repetitions (medians):

- decode ms/token of the unsplit model in a plain onnxruntime loop
  (llc.runtime.verify.Unsplit), of onnxruntime-genai's own generator (int4 model
  from its builder), and of an llc build with 1 stage and with 3 stages on local
  processes (the launchers' own ms per decode step, summed over stages, and the
  ms/token a user sees);
- the ratios the issue asks for: 1-stage llc / genai, 3-stage llc / unsplit;
- bundle bytes of each build against the fp32 one.

Two int4 models: the one onnxruntime-genai's builder writes (fused
GroupQueryAttention), and llc's own quantization of the torch export
(`llc compile --weights int4`).

    python benchmarks/bench_quant.py [--reps 3] [--new-tokens 48]   (table, .json, .md and .svg)
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from llc.bundle import schema
from llc.compiler import compile_model
from llc.profile import load_profile
from llc.runtime.coordinator import Coordinator, load_tokenizer
from llc.runtime.device.sampling import SamplingParams
from llc.runtime.verify import Unsplit
from llc.targets.local import LocalTarget

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import grouped_bars, logger, markdown, write  # noqa: E402

log = logger("quant")

PROMPT = "The capital of France is"


def profile(path: Path, n: int) -> Path:
    doc = {"devices": [{"name": f"dev{i}", "target": "local", "memory_mb": 2000, "gflops": 8.0, "threads": 1}
                       for i in range(n)],
           "network": {"bandwidth_mbps": 10000, "latency_ms": 0.05, "base_port": 5700 + 10 * n},
           "workload": {"prompt_tokens": 16, "max_context": 256, "requests_in_flight": 1, "objective": "throughput",
                        "stages": n}}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def unsplit_ms(model: Path, doc: schema.ModelDoc | None, prompt: list[int], n: int) -> float:
    """Decode ms/token of a greedy loop in one onnxruntime session (1 thread)."""
    u = Unsplit(model, doc, threads=1)
    ids, past, n_past, times = list(prompt), {}, 0, []
    for _ in range(n):
        t0 = time.perf_counter()
        res, past = u.step(np.array([ids], np.int64), past, n_past)
        times.append(time.perf_counter() - t0)
        n_past += len(ids)
        ids = [int(np.argmax(res[u.model.logits][0, -1]))]
    return statistics.median(times[1:]) * 1000


def genai_ms(folder: Path, prompt: list[int], n: int) -> float:
    """Decode ms/token of onnxruntime-genai's generator (1 thread), in a subprocess."""
    code = f"""
import json, time, onnxruntime_genai as og
cfg = og.Config({str(folder)!r})
cfg.overlay(json.dumps({{"model": {{"decoder": {{"session_options": {{"intra_op_num_threads": 1,
                                                                     "inter_op_num_threads": 1}}}}}}}}))
model = og.Model(cfg)
params = og.GeneratorParams(model)
params.set_search_options(max_length={len(prompt) + n}, do_sample=False)
gen = og.Generator(model, params)
gen.append_tokens({prompt})
times = []
while not gen.is_done():
    t = time.perf_counter(); gen.generate_next_token(); times.append(time.perf_counter() - t)
times = sorted(times[1:])
print(json.dumps(times[len(times) // 2] * 1000))
"""
    env = {"OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env={**__import__("os").environ, **env})
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-1500:])
    return float(out.stdout.strip().splitlines()[-1])


def llc_ms(build: Path, prompt: list[int], n: int) -> tuple[float, float, list[tuple[float, float]]]:
    """(ms/token a user sees, summed launcher ms per decode step, [(peak RSS MB, planned MB)] per stage)
    of a build on local processes."""
    target = LocalTarget(ready_timeout=60)
    target.start(build, schema.open_build(build).devices)
    try:
        with Coordinator(build, health=target.health) as c:
            c.connect()
            (r,) = c.generate([prompt], SamplingParams(max_new_tokens=n))
            stats = c.stats()
    finally:
        target.stop()
    planned = {s.device: s.memory_bytes for s in schema.read(build, schema.PLAN).stages}
    memory = [(s.peak_rss_bytes / 1e6, planned[s.device] / 1e6) for s in stats]
    return r.ms_per_token, sum(s.ms_per_decode_step for s in stats), memory


def bundle_bytes(build: Path) -> int:
    return sum(p.stat().st_size for p in (build / "devices").rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("models/smollm2/model.onnx"), help="the fp32 torch export")
    ap.add_argument("--genai", type=Path, default=Path("models/smollm2-int4"), help="onnxruntime-genai's int4 model")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--json", type=Path, default=Path("bench-results/quant.json"))
    args = ap.parse_args()
    for need in (args.model, args.genai / "model.onnx"):
        if not need.is_file():
            sys.exit(f"{need}: not found; run: python examples/smollm2/export.py (and --format genai-int4)")
    prompt = load_tokenizer(args.model.parent).encode(PROMPT).ids
    rows: dict[str, dict[str, list]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        builds = {}
        for name, model, weights in (("fp32 (torch export)", args.model, "fp32"),
                                     ("int4 (llc --weights int4)", args.model, "int4"),
                                     ("int4 (onnxruntime-genai builder)", args.genai / "model.onnx", "fp32")):
            for stages in (1, 3):
                out = tmp / f"{weights}-{stages}-{model.parent.name}"
                log(f"compiling {name} for {stages} stage(s)")
                compile_model(model, load_profile(profile(tmp / f"p{stages}.yaml", stages)), out, quiet=True,
                              weights=weights, eos_token_ids=())
                builds[(name, stages)] = out
        for rep in range(args.reps):
            log(f"repetition {rep + 1}/{args.reps}")
            for name in dict.fromkeys(n for n, _ in builds):
                row = rows.setdefault(name, {})
                one, three = builds[(name, 1)], builds[(name, 3)]
                plan = schema.read(one, schema.PLAN)
                row.setdefault("unsplit", []).append(unsplit_ms(Path(plan.model.unsplit), plan.model, prompt,
                                                                args.new_tokens))
                if "genai" in name:
                    row.setdefault("genai", []).append(genai_ms(args.genai, prompt, args.new_tokens))
                for label, build in (("llc 1 stage", one), ("llc 3 stages", three)):
                    user, steps, memory = llc_ms(build, prompt, args.new_tokens)
                    row.setdefault(label, []).append(user)
                    for i, (rss, planned) in enumerate(memory):
                        row.setdefault(f"{label}: stage {i} peak RSS MB", []).append(rss)
                        row[f"{label}: stage {i} planned MB"] = [planned]
                    row.setdefault(label + " (device steps)", []).append(steps)
                row["bundle MB"] = [bundle_bytes(one) / 1e6]
    med = {n: {k: statistics.median(v) for k, v in r.items()} for n, r in rows.items()}
    doc = {"new_tokens": args.new_tokens, "reps": args.reps, "rows": rows, "medians": med}
    write(args.json, doc, tables(med, args.new_tokens, args.reps), picture(med, args.new_tokens))


SPEED = ["unsplit", "genai", "llc 1 stage", "llc 1 stage (device steps)", "llc 3 stages", "llc 3 stages (device steps)"]


def tables(med: dict[str, dict[str, float]], new_tokens: int, reps: int) -> str:
    """Decode ms/token with the issue's ratios and bundle sizes; then each stage's peak RSS against the plan."""
    fp32_mb = med["fp32 (torch export)"]["bundle MB"]
    speed = [[name, *(f"{m[c]:.2f}" if c in m else "-" for c in SPEED),
              f"{m['llc 1 stage'] / m['genai']:.2f}x" if "genai" in m else "-",
              f"{m['llc 3 stages'] / m['unsplit']:.2f}x", f"{m['bundle MB']:.0f}", f"{m['bundle MB'] / fp32_mb:.2f}x"]
             for name, m in med.items()]
    memory = [[name, key.replace(" peak RSS MB", ""), f"{m[key]:.0f}", f"{planned:.0f}", f"{m[key] / planned:.2f}x"]
              for name, m in med.items() for key in sorted(k for k in m if k.endswith("peak RSS MB"))
              for planned in [m[key.replace("peak RSS MB", "planned MB")]]]
    return "\n\n".join([
        f"SmolLM2-135M decode ms/token, 1 onnxruntime thread, {new_tokens} tokens, median of {reps}",
        markdown(["model", *SPEED, "1 stage / genai", "3 stages / unsplit", "bundle MB", "x fp32"], speed),
        "Resident memory per stage: the launcher's peak RSS against the plan's memory",
        markdown(["model", "stage", "peak RSS MB", "planned MB", "measured / planned"], memory)])


def picture(med: dict[str, dict[str, float]], new_tokens: int) -> str:
    """ms/token per model: the unsplit loop, genai's generator, llc on 1 and 3 stages (0: not measured)."""
    series = [("unsplit onnxruntime", "#888", "unsplit"), ("onnxruntime-genai", "#e08020", "genai"),
              ("llc 1 stage", "#3070c0", "llc 1 stage"), ("llc 3 stages", "#40a040", "llc 3 stages")]
    return grouped_bars(f"ms/token, {new_tokens} tokens, 1 thread", [n.replace(" (", "\n(") for n in med],
                        [(label, colour, [m.get(key, 0.0) for m in med.values()]) for label, colour, key in series],
                        width=720, digits=1)


if __name__ == "__main__":
    main()
