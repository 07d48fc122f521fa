"""Scale benchmark: what compiling, verifying and running costs as the model grows from 135M to 1B.

    python benchmarks/bench_scale.py [--sizes 135m,0.5b,1b] [--weights fp32,int4] [--genai 3b]
                                     [--json bench-results/scale.json]

Models: random weights in real models' shapes (benchmarks/scale_models.py; built
once, nothing downloaded), exported with torch.onnx's legacy exporter.

For every size and precision it runs, each as its own process:
- ``llc compile`` for 4 local devices of 1.6 GB each (4 stages), cold: an empty
  llc cache and, when root, the page cache dropped, so the model is read from disk;
- the same compile for a changed profile (warm: simplify and quantize come from the cache);
- ``llc verify`` (split against unsplit on random tokens);
- ``llc run`` over the 4 devices, 16 new tokens.
Compile and verify report wall time and the process's peak RSS (its own ru_maxrss,
from wait4), next to the model's weight bytes; compile also the time of simplify,
quantize, the MIP (partition) and emit, and the bundles' bytes.

Writes the JSON, a markdown table (``.md``) and a chart of peak RSS against the
model's bytes (``.svg``) beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scale_models  # noqa: E402
from report import grouped_bars, logger, markdown, write  # noqa: E402

log = logger("scale")

DEVICES, DEVICE_MB = 4, 1600
PROMPT = "The history of the printing press begins"
MB = 1e6


def profile(path: Path, memory_mb: int, port: int) -> Path:
    doc = {"devices": [{"name": f"d{i}", "target": "local", "memory_mb": memory_mb, "gflops": 8.0, "threads": 1}
                       for i in range(DEVICES)],
           "network": {"bandwidth_mbps": 10000, "latency_ms": 0.05, "base_port": port},
           "workload": {"prompt_tokens": 32, "max_context": 256, "requests_in_flight": 1,
                        "objective": "latency", "stages": DEVICES}}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def measured(cmd: list[str], env: dict) -> tuple[float, float, str, str]:
    """(wall s, peak RSS MB, stdout, stderr) of one process; exits on failure."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"[scale] failed: {' '.join(cmd)}\n{stderr[-2000:]}")
    return wall, usage.ru_maxrss / 1024 * 1.048576, stdout, stderr


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def pass_seconds(stderr: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"\] (\S+) done in ([\d.]+)s", stderr)}


def bundle_bytes(build: Path) -> int:
    return sum(f.stat().st_size for f in (build / "devices").rglob("*") if f.is_file())


def one(size: str, weights: str, work: Path, port: int) -> dict:
    """``weights``: fp32 or int4 (quantized by llc compile), or genai-int4 (the builder's model as it is)."""
    model = scale_models.build_genai(size, "int4") if weights == "genai-int4" else scale_models.build(size)
    data = sum(f.stat().st_size for f in model.parent.glob("model.onnx*"))
    env = dict(os.environ, LLC_CACHE=str(work / "cache"), LLC_SECRET_FILE=str(work / "secret"))
    shutil.rmtree(work / "cache", ignore_errors=True)
    build = work / f"build-{size}-{weights}"
    compile_cmd = ["llc", "compile", str(model), "-o", str(build), "--weights",
                   "fp32" if weights == "genai-int4" else weights]
    cold = drop_page_cache()
    log(f"{size} {weights}: compile ({'cold' if cold else 'page cache kept: not root'})")
    wall, rss, _, err = measured(compile_cmd + ["--devices", str(profile(work / "p.yaml", DEVICE_MB, port))], env)
    passes = pass_seconds(err)
    log(f"{size} {weights}: compile again for another profile (warm cache)")
    warm, warm_rss, _, _ = measured(
        compile_cmd + ["--devices", str(profile(work / "p2.yaml", DEVICE_MB + 100, port))], env)
    log(f"{size} {weights}: verify")
    v_wall, v_rss, v_out, _ = measured(["llc", "verify", str(build)], env)
    worst = float(re.search(r"worst ([\d.e+-]+)", v_out).group(1))
    log(f"{size} {weights}: run over {DEVICES} devices")
    run_json = work / f"run-{size}-{weights}.json"
    measured(["llc", "run", str(build), "--prompt", PROMPT, "--max-new-tokens", "16", "--json", str(run_json)], env)
    summary = json.loads(run_json.read_text())["summary"]
    plan = json.loads((build / "plan.json").read_text())
    return {
        "size": size, "weights": weights, "params": scale_models.params(size), "model_bytes": data,
        "compile_s": round(wall, 1), "compile_peak_rss_mb": round(rss), "rss_over_model": round(rss * MB / data, 3),
        "simplify_s": passes.get("simplify"), "quantize_s": passes.get("quantize"),
        "mip_s": passes.get("partition"), "emit_s": passes.get("emit"), "cold_page_cache": cold,
        "recompile_s": round(warm, 1), "recompile_peak_rss_mb": round(warm_rss),
        "bundle_bytes": bundle_bytes(build), "stages": len(plan["stages"]),
        "verify_s": round(v_wall, 1), "verify_peak_rss_mb": round(v_rss), "verify_worst": worst,
        "tokens_per_s": round(summary["tokens_per_s"], 2),
        "predicted_tokens_per_s": summary.get("predicted_tokens_per_s"),
        "stage_peak_rss_mb": [round(s["peak_rss_mb"]) for s in summary["stages"]],
        "stage_planned_mb": [round(s["predicted_memory_mb"]) for s in summary["stages"]],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="135m,0.5b,1b")
    ap.add_argument("--rows-from", type=Path, default=None, help="keep these rows of an earlier JSON, add the new")
    ap.add_argument("--weights", default="fp32,int4")
    ap.add_argument("--json", type=Path, default=Path("bench-results/scale.json"))
    ap.add_argument("--genai", default="", help="sizes also built by onnxruntime-genai at int4 (e.g. 3b)")
    ap.add_argument("--port", type=int, default=5900)
    args = ap.parse_args()
    rows = json.loads(args.rows_from.read_text())["rows"] if args.rows_from else []
    with tempfile.TemporaryDirectory(prefix="llc-scale-") as tmp:
        for size in filter(None, args.sizes.split(",")):
            for weights in args.weights.split(","):
                rows.append(one(size, weights, Path(tmp), args.port))
                log(json.dumps(rows[-1]))
        for size in filter(None, args.genai.split(",")):
            rows.append(one(size, "genai-int4", Path(tmp), args.port))
            log(json.dumps(rows[-1]))
    report(args, rows)


def report(args, rows: list[dict]) -> None:
    head = ["model", "weights", "model MB", "compile s (cold)", "peak RSS MB", "RSS / model", "simplify s",
            "quantize s", "MIP s", "emit s", "re-compile s", "bundles MB", "verify s", "verify RSS MB",
            "verify worst", "tok/s (4 dev)"]
    table = markdown(head, [
        [f"{r['size']} ({r['params'] / 1e9:.2f}B)", r["weights"], f"{r['model_bytes'] / MB:,.0f}", r["compile_s"],
         f"{r['compile_peak_rss_mb']:,}", f"{r['rss_over_model']:.2f}", r["simplify_s"], r["quantize_s"], r["mip_s"],
         r["emit_s"], r["recompile_s"], f"{r['bundle_bytes'] / MB:,.0f}", r["verify_s"],
         f"{r['verify_peak_rss_mb']:,}", f"{r['verify_worst']:.1e}", r["tokens_per_s"]] for r in rows])
    write(args.json, {"devices": DEVICES, "device_mb": DEVICE_MB, "rows": rows}, table, chart(rows))


def chart(rows: list[dict]) -> str:
    """Bars per build: the model's bytes next to compile's and verify's peak RSS."""
    return grouped_bars("MB", [f"{r['size']} {r['weights']}" for r in rows], [
        ("model weights", "#bab0ac", [r["model_bytes"] / MB for r in rows]),
        ("peak RSS of llc compile", "#4e79a7", [r["compile_peak_rss_mb"] for r in rows]),
        ("peak RSS of llc verify", "#f28e2b", [r["verify_peak_rss_mb"] for r in rows])], width=760)


if __name__ == "__main__":
    main()
