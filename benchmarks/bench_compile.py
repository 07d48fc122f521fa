"""Compile benchmark: the MIP's plan against the splits other tools use, on SmolLM2.

For 2..6 phones of mixed speed and memory it prints, side by side from one run:
the MIP's predicted decode ms/token (solver free to choose devices, and forced
to use all of them), an even layer split and a memory-proportional split over
all devices in profile order (infeasible when they overflow a phone's memory),
the MIP solve time, and the time of every compile pass. The same goes to JSON.

Every compile is forced (force=True: a compile is otherwise a no-op when an
intact build of the same inputs is there) into a fresh temporary directory, with
an empty simplify cache for the first one; only the plans are kept.

    python benchmarks/bench_compile.py [--model models/smollm2/model.onnx] [--json bench-results/compile.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

from llc.compiler import compile_model, with_overrides
from llc.compiler.costmodel import build_tables, evaluate, even_split, memory_proportional_split
from llc.profile import load_profile

# (name, usable MB, sustained GFLOP/s): flagship, mid-range, budget, older mid, tablet, old budget
PHONES = [("flagship", 900, 28.0), ("midrange", 600, 11.0), ("budget", 380, 3.5),
          ("older-mid", 700, 7.0), ("tablet", 500, 15.0), ("old-budget", 330, 2.5)]


def profile_for(n: int, path: Path) -> Path:
    doc = {"devices": [{"name": f"{name}-{i}", "target": "local", "memory_mb": mb, "gflops": gf,
                        "threads": 4} for i, (name, mb, gf) in enumerate(PHONES[:n])],
           "network": {"bandwidth_mbps": 80, "latency_ms": 6},
           "workload": {"prompt_tokens": 64, "max_context": 512, "requests_in_flight": 1,
                        "objective": "latency"}}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("models/smollm2/model.onnx"))
    ap.add_argument("--json", type=Path, default=Path("bench-results/compile.json"))
    args = ap.parse_args()
    if not args.model.is_file():
        sys.exit(f"{args.model}: not found; run: python examples/smollm2/export.py --out {args.model.parent}")
    rows, passes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["LLC_CACHE"] = str(tmp / "cache")  # first compile pays the full simplify cost
        os.environ.setdefault("LLC_SECRET_FILE", str(tmp / "secret"))
        for n in range(2, 7):
            print(f"compiling for {n} phones ...", file=sys.stderr, flush=True)
            profile = load_profile(profile_for(n, tmp / f"p{n}.yaml"))
            t0 = time.perf_counter()
            state, pm = compile_model(args.model, profile, tmp / f"b{n}", quiet=True, force=True)
            total = time.perf_counter() - t0
            passes.append({"devices": n, "total_s": round(total, 3),
                           **{t.name: round(t.seconds, 3) for t in pm.timings}})
            t = build_tables(state.blocks, profile, state.workload)
            order = list(range(n))
            base = {}
            for name, split in (("even", even_split(t, order)),
                                ("memory_prop", memory_proportional_split(t, order))):
                c = evaluate(t, split)
                base[name] = (c.decode_ms, c.feasible, c.bottleneck_ms)
            s_all, _ = compile_model(args.model, profile, tmp / f"b{n}all", quiet=True, force=True,
                                     workload=with_overrides(state.workload, stages=n))
            s_tp, _ = compile_model(args.model, profile, tmp / f"b{n}tp", quiet=True, force=True,
                                    workload=with_overrides(state.workload, objective="throughput"))
            for b in ("", "all", "tp"):  # only the plans are needed: do not keep 15 copies of the weights
                shutil.rmtree(tmp / f"b{n}{b}")
            rows.append({
                "devices": n,
                "mip_ms": round(state.plan.decode_ms, 3), "mip_stages": len(state.plan.stages),
                "mip_all_ms": round(s_all.plan.decode_ms, 3),
                "even_ms": round(base["even"][0], 3), "even_feasible": base["even"][1],
                "memprop_ms": round(base["memory_prop"][0], 3), "memprop_feasible": base["memory_prop"][1],
                "mip_solve_s": round(state.plan.solve_seconds, 4),
                "tp_mip_bottleneck_ms": round(s_tp.plan.bottleneck_ms, 3),
                "tp_mip_stages": len(s_tp.plan.stages),
                "tp_even_bottleneck_ms": round(base["even"][2], 3),
                "tp_memprop_bottleneck_ms": round(base["memory_prop"][2], 3),
                "tp_mip_solve_s": round(s_tp.plan.solve_seconds, 4),
            })
    f = lambda v, ok=True: f"{v:9.2f}" + ("" if ok else "*")  # noqa: E731
    print("\nSmolLM2-135M decode ms/token, predicted (* = does not fit in memory)")
    print(f"{'phones':>6} {'MIP':>9} {'stages':>6} {'MIP all':>9} {'even':>10} {'mem-prop':>10} "
          f"{'even/MIP':>9} {'memp/MIP':>9} {'MIP solve s':>11}")
    for r in rows:
        print(f"{r['devices']:>6} {f(r['mip_ms'])} {r['mip_stages']:>6} {f(r['mip_all_ms'])} "
              f"{f(r['even_ms'], r['even_feasible']):>10} {f(r['memprop_ms'], r['memprop_feasible']):>10} "
              f"{r['even_ms'] / r['mip_ms']:>9.2f} {r['memprop_ms'] / r['mip_ms']:>9.2f} {r['mip_solve_s']:>11.3f}")
    print("\nobjective throughput: pipeline bottleneck ms (lower = more tokens/s with requests in flight)")
    print(f"{'phones':>6} {'MIP':>9} {'stages':>6} {'even':>10} {'mem-prop':>10} {'MIP solve s':>11}")
    for r in rows:
        print(f"{r['devices']:>6} {f(r['tp_mip_bottleneck_ms'])} {r['tp_mip_stages']:>6} "
              f"{f(r['tp_even_bottleneck_ms'], r['even_feasible']):>10} "
              f"{f(r['tp_memprop_bottleneck_ms'], r['memprop_feasible']):>10} {r['tp_mip_solve_s']:>11.3f}")
    names = [k for k in passes[0] if k not in ("devices",)]
    print("\ncompile pass times, seconds (first row: empty simplify cache)")
    print(f"{'phones':>6} " + " ".join(f"{k:>13}" for k in names))
    for p in passes:
        print(f"{p['devices']:>6} " + " ".join(f"{p[k]:>13.3f}" for k in names))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"model": str(args.model), "phones": PHONES, "plans": rows,
                                     "pass_seconds": passes}, indent=1) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
