"""Runtime benchmark: the local pipeline against unsplit onnxruntime, on SmolLM2.

Side by side from one run (configurations interleaved, repetitions, medians):

- ms/token for one request (decode pace after the first token, as `llc run`
  reports it) of unsplit onnxruntime in this process and of the local pipeline
  with 1 (one launcher: runtime overhead without a hop), 2, 3 and 4 stages, and
  the ratio to unsplit (the median of the ratios of each repetition, so slow
  drifts of this noisy machine cancel). Every device and the unsplit session
  use 1 intra-op thread. A second baseline runs the 1-stage build's segment
  in-process: the same model after llc's simplify pass, which the stages are
  cut from and which runs faster than the export as is; the ratio to it is the
  runtime's own cost (hops, ZeroMQ, Python).
- bytes per generated token on every hop: measured (the devices' `stats`
  counters, i.e. what `llc run --json` reports under summary.hops: header +
  buffers of every message sent, prefill included, over one request) and the
  plan's comm map (tensor payload of one decode step, no header).
- tokens/s of a fixed batch of requests (--requests prompts x --new-tokens)
  with 1, 2 and 4 requests in flight, and the 4-vs-1 ratio.

This machine has few cores (2 in CI). The throughput aim (>= 1.8x with 4 in
flight) is for stages that have a core each, so the 2-stage pipeline is also
measured with each stage pinned to its own core: after the devices start, every
thread of each launcher process (/proc/PID/task/*) gets
os.sched_setaffinity(tid, {core}), and is unpinned again afterwards (the
launcher creates no threads after it answers hello with 1 intra-op thread). 3
and 4 stages on 2 cores are oversubscribed; their throughput is reported as is.
Two cores also share memory bandwidth (and, on a VM, the host), so the bench
measures the machine's own ceiling next to it: two unsplit onnxruntime
processes, one pinned per core, decoding at once, against one alone.

The unsplit baselines are llc.runtime.verify.Unsplit (inputs built from the
model's detected signature), timed over a greedy loop of its steps. The inputs
of the bare segments are those of a real decode step: the split runner
(llc.runtime.splitrun) teacher-forces the unsplit greedy tokens through the
2-stage build, and each manifest input is taken from its trace (kv caches,
tensors from the other stage) or from the unsplit model's own inputs (ids, mask,
positions).

Builds are compiled into --builds with llc.compiler.compile_model, from a
profile of 4 local devices (threads: 1, objective throughput, so the stages are
balanced; requests_in_flight 4, as devices refuse more requests in flight than
the build reserved KV cache for) and no EOS token, so every request generates
exactly --new-tokens tokens. A compile whose inputs (model, profile, options,
llc version) match an intact build leaves it as it is; --rebuild forces one
(needed after changing llc's passes or launcher without a version bump).

    python benchmarks/bench_run.py [--model models/smollm2/model.onnx] [--json bench-results/run.json]
                                   [--reps 5] [--tput-reps 5] [--new-tokens 64] [--stages 1,2,3,4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import yaml

from llc.bundle import schema
from llc.compiler import compile_model, with_overrides
from llc.profile import load_profile
from llc.runtime.coordinator import Coordinator
from llc.runtime.device.sampling import SamplingParams
from llc.runtime.splitrun import SplitRunner
from llc.runtime.verify import Unsplit
from llc.targets.local import LocalTarget

PROMPT = "The capital of France is"
PROMPTS = [PROMPT, "Once upon a time, in a small village by the sea,", "def fibonacci(n):",
           "The three primary colors are"]
CONCURRENCY = (1, 2, 4)
REQUESTS_IN_FLIGHT = max(CONCURRENCY)  # devices refuse more requests than the build reserved KV cache for


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# --- builds -------------------------------------------------------------------------------------


def profile_yaml(path: Path, base_port: int) -> Path:
    doc = {"devices": [{"name": f"dev{i}", "target": "local", "memory_mb": 2000, "gflops": 8.0, "threads": 1}
                       for i in range(4)],
           "network": {"bandwidth_mbps": 1000, "latency_ms": 0.1, "base_port": base_port},
           "workload": {"prompt_tokens": 16, "max_context": 256, "requests_in_flight": REQUESTS_IN_FLIGHT,
                        "objective": "throughput"}}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def build_for(model: Path, stages: int, root: Path, base_port: int, rebuild: bool) -> Path:
    """Compile (a no-op when the build in root/stagesN has the same inputs, unless rebuild)."""
    out = root / f"stages{stages}"
    profile = load_profile(profile_yaml(root / f"profile{stages}.yaml", base_port))
    t0 = time.monotonic()
    state, _ = compile_model(model, profile, out, workload=with_overrides(profile.workload, stages=stages),
                             quiet=True, eos_token_ids=(), force=rebuild)
    log(f"{stages} stage(s): {out} " + ("up to date" if state.up_to_date
                                        else f"compiled in {time.monotonic() - t0:.0f} s"))
    return out


# --- unsplit reference --------------------------------------------------------------------------


def timed_greedy(u: Unsplit, prompt: list[int], new_tokens: int) -> tuple[list[int], float, float]:
    """Unsplit.greedy's loop with a clock: tokens, ms/token after the first token, and seconds in all."""
    ids, past, n_past, out, stamps = list(prompt), {}, 0, [], []
    t0 = time.perf_counter()
    while len(out) < new_tokens:
        res, past = u.step(np.array([ids], np.int64), past, n_past)
        n_past += len(ids)
        ids = [int(np.argmax(res[u.model.logits][0, -1]))]
        out.append(ids[0])
        stamps.append(time.perf_counter())
    return out, (stamps[-1] - stamps[0]) * 1000 / max(1, len(out) - 1), stamps[-1] - t0


class ParallelUnsplit:
    """The machine's own ceiling: one unsplit process per core, all decoding at once.

    Each worker (this script with --unsplit-worker CORE) pins itself to its core, loads
    the model once, and on every `go` line decodes the throughput prompts one after
    another; the aggregate tokens/s over the first start and the last end, against one
    process alone, is the best any 2-way parallelism can do here (the cores share memory
    bandwidth, and on a VM the host's other tenants).
    """

    def __init__(self, model: Path, cores: list[int], prompts: list[list[int]], new_tokens: int):
        import subprocess

        self.procs = [subprocess.Popen(
            [sys.executable, __file__, "--unsplit-worker", str(c), "--model", str(model),
             "--new-tokens", str(new_tokens), "--worker-prompts", json.dumps(prompts)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for c in cores]
        for p in self.procs:
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError("an unsplit worker did not start")

    def run(self, n: int) -> float:
        """Aggregate tokens/s of the first n workers decoding at once."""
        for p in self.procs[:n]:
            p.stdin.write("go\n")
            p.stdin.flush()
        out = [json.loads(p.stdout.readline()) for p in self.procs[:n]]
        return sum(o["tokens"] for o in out) / (max(o["t1"] for o in out) - min(o["t0"] for o in out))

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.stdin.close()
                p.wait(timeout=30)


def unsplit_worker(core: int, model: Path, prompts: list[list[int]], new_tokens: int) -> None:
    os.sched_setaffinity(0, {core})
    u = Unsplit(model, threads=1)
    u.greedy(prompts[0], 4)  # warm-up
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "go":
            break
        t0 = time.time()
        tokens = sum(len(timed_greedy(u, p, new_tokens)[0]) for p in prompts)
        print(json.dumps({"t0": t0, "t1": time.time(), "tokens": tokens}), flush=True)


def segment_feeds(build: Path, reference: Unsplit, prompt: list[int], steps: int,
                  out_dir: Path) -> list[tuple[Path, Path]]:
    """Every stage's inputs at decode step ``steps`` of a real request, saved as .npz.

    The split runner teacher-forces the unsplit model's greedy tokens and traces every
    stage's outputs; each manifest input then comes from where the device gets it: a kv
    cache is its present of the step before, a tensor from an earlier stage that stage's
    output, a graph input (built by the head, maybe sent on) the unsplit model's own input
    of that name. Returns (segment.onnx, feeds.npz) per stage, in pipeline order.
    """
    b = schema.open_build(build)
    continuation = reference.greedy(prompt, steps)
    trace = SplitRunner(build, threads=1).teacher_force(prompt, continuation)
    graph = reference.feeds(np.array([continuation[-1:]], np.int64), [{}], [len(prompt) + steps - 1])
    out = []
    for k, device in enumerate(b.devices):
        m = b.manifest(device)
        feeds = {}
        for i in m.inputs:
            if i.source == "kv":
                v = trace.steps[steps - 1][i.present]
            elif i.source == "graph" or i.role is not None:
                v = graph[i.name]
            else:
                v = trace.steps[steps][i.name]
            feeds[i.name] = v.astype(np.dtype(i.dtype), copy=False)
        f = out_dir / f"feeds-stage{k}.npz"
        np.savez(f, **{f"x{j}": v for j, v in enumerate(feeds.values())}, names=np.array(list(feeds)))
        out.append((b.dir / "devices" / device / m.segment, f))
    return out


class ParallelSegments:
    """A 2-stage build's own ceiling: its segments in bare onnxruntime processes (no llc runtime),
    one pinned per core, each repeating one decode step (the inputs of a real step) flat out,
    alone and both at once. A perfect pipeline turns (a + b) ms per token with one request into
    max(a', b') with enough requests in flight, a' and b' being the times when both run at once."""

    def __init__(self, segments: list[tuple[Path, Path]], cores: list[int]):
        import subprocess

        self.procs = [subprocess.Popen(
            [sys.executable, __file__, "--segment-worker", str(c), "--worker-segment", str(seg), "--worker-feeds", str(f)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for (seg, f), c in zip(segments, cores)]
        for p in self.procs:
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError("a segment worker did not start")

    def run(self, which: list[int], seconds: float = 3.0) -> list[float]:
        for i in which:
            self.procs[i].stdin.write(f"{seconds}\n")
            self.procs[i].stdin.flush()
        return [json.loads(self.procs[i].stdout.readline())["ms"] for i in which]

    def ideal_scaling(self) -> dict:
        alone = [self.run([i])[0] for i in range(len(self.procs))]
        both = self.run(list(range(len(self.procs))))
        return {"alone_ms": alone, "together_ms": both, "ideal_4_vs_1": sum(alone) / max(both)}

    close = ParallelUnsplit.close


def segment_worker(core: int, segment: Path, feeds_file: Path) -> None:
    os.sched_setaffinity(0, {core})
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(segment), so, providers=["CPUExecutionProvider"])
    z = np.load(feeds_file)
    feeds = {str(n): z[f"x{j}"] for j, n in enumerate(z["names"])}
    outs = [o.name for o in sess.get_outputs()]
    sess.run(outs, feeds)
    print("ready", flush=True)
    for line in sys.stdin:
        end, t = time.perf_counter() + float(line), []
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            sess.run(outs, feeds)
            t.append((time.perf_counter() - t0) * 1000)
        print(json.dumps({"ms": statistics.median(t)}), flush=True)


# --- pipelines ----------------------------------------------------------------------------------


class Pipeline:
    def __init__(self, build: Path, stages: int):
        self.build, self.stages = build, stages
        plan = schema.read(build, schema.PLAN)
        self.devices = [s.device for s in plan.stages]
        self.layers = [f"{s.labels[0]}..{s.labels[-1]}" for s in plan.stages]
        self.plan_links = {f"{ln.src}->{ln.dst}": ln.bytes_per_token_decode for ln in plan.links}
        self.target = LocalTarget(ready_timeout=120)
        self.coord: Coordinator | None = None

    def start(self) -> None:
        self.target.start(self.build, self.devices)
        self.coord = Coordinator(self.build, health=self.target.health)
        self.coord.connect(60)

    def stop(self) -> None:
        if self.coord is not None:
            self.coord.stop_devices()
            self.coord.close()
        self.target.stop()

    def pids(self) -> list[int]:
        return [p.pid for p in self.target.procs.values()]

    def pin(self, cores: list[set[int]] | None) -> None:
        """Pin every thread of stage i's process to cores[i]; None: every core again."""
        every = os.sched_getaffinity(0)
        for i, pid in enumerate(self.pids()):
            for tid in os.listdir(f"/proc/{pid}/task"):
                try:
                    os.sched_setaffinity(int(tid), every if cores is None else cores[i])
                except ProcessLookupError:
                    pass

    def generate(self, prompts: list[list[int]], new_tokens: int, concurrency: int):
        t0 = time.monotonic()
        results = self.coord.generate(prompts, SamplingParams(max_new_tokens=new_tokens), concurrency)
        return results, time.monotonic() - t0


def hop_bytes(before, after) -> dict[str, int]:
    out = {}
    for b, a in zip(before, after):
        for peer, n in a.bytes_sent.items():
            out[f"{a.device}->{peer}"] = n - b.bytes_sent.get(peer, 0)
    return out


# --- the run ------------------------------------------------------------------------------------


def med(xs):
    return statistics.median(xs) if xs else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("models/smollm2/model.onnx"))
    ap.add_argument("--json", type=Path, default=Path("bench-results/run.json"))
    ap.add_argument("--builds", type=Path, default=Path("/tmp/llc-bench-run"),
                    help="where the 2/3/4-stage builds are compiled (reused across runs)")
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--stages", default="1,2,3,4", help="pipelines to run (1 = the whole model in one launcher)")
    ap.add_argument("--reps", type=int, default=5, help="repetitions of each latency measurement")
    ap.add_argument("--tput-reps", type=int, default=5, help="repetitions of each throughput measurement")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=4, help="requests per throughput measurement")
    ap.add_argument("--base-port", type=int, default=17600)
    ap.add_argument("--unsplit-worker", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-prompts", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--segment-worker", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-segment", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-feeds", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.segment_worker is not None:
        return segment_worker(args.segment_worker, args.worker_segment, args.worker_feeds)
    if args.unsplit_worker is not None:
        return unsplit_worker(args.unsplit_worker, args.model, json.loads(args.worker_prompts), args.new_tokens)
    if not args.model.is_file():
        sys.exit(f"{args.model}: not found; run: python examples/smollm2/export.py --out {args.model.parent}")
    stage_counts = [int(s) for s in args.stages.split(",")]
    cores = sorted(os.sched_getaffinity(0))
    args.builds.mkdir(parents=True, exist_ok=True)
    builds = {n: build_for(args.model, n, args.builds, args.base_port + 10 * n, args.rebuild) for n in stage_counts}
    os.sync()  # a fresh build's dirty pages being written back slow the first run down

    pipes = {n: Pipeline(b, n) for n, b in builds.items()}
    ceiling = seg_ceiling = None
    baselines = {"unsplit": Unsplit(args.model, threads=1)}
    if 1 in builds:  # the same model after llc's simplify pass (what the stages are cut from)
        plan1 = schema.read(builds[1], schema.PLAN)
        baselines["simplified"] = Unsplit(builds[1] / plan1.stages[0].segment, plan1.model, threads=1)
    unsplit = baselines["unsplit"]
    load_before = os.getloadavg()
    if load_before[0] > 0.5:
        log(f"warning: load average {load_before[0]:.2f} before the run: something else uses the CPU")
    try:
        for n, p in pipes.items():
            log(f"starting {n} stage(s): " + ", ".join(f"{d} [{l}]" for d, l in zip(p.devices, p.layers)))
            p.start()
        tok = next(iter(pipes.values())).coord.tokenizer()
        prompt = tok.encode(PROMPT).ids
        prompts = [tok.encode(PROMPTS[i % len(PROMPTS)]).ids for i in range(args.requests)]

        # Correctness first (and a warm-up): every pipeline gives the unsplit tokens.
        want = unsplit.greedy(prompt, args.new_tokens)
        for n, p in pipes.items():
            (r,), _ = p.generate([prompt], args.new_tokens, 1)
            if r.tokens != want:
                sys.exit(f"{n} stages: tokens differ from unsplit onnxruntime:\n{r.tokens}\n{want}")
        log(f"all pipelines give the unsplit tokens ({args.new_tokens} greedy tokens)")

        # Latency: one request, configurations interleaved, the order rotated every repetition.
        configs = list(baselines) + list(pipes)
        mspt: dict = {c: [] for c in configs}
        ratios: dict = {n: [] for n in configs}
        ratios_simplified: dict = {n: [] for n in configs}
        hops: dict = {}
        stage_ms: dict = {n: [] for n in pipes}
        for rep in range(args.reps):
            order = configs[rep % len(configs):] + configs[:rep % len(configs)]
            got = {}
            for c in order:
                if c in baselines:
                    _, got[c], _ = timed_greedy(baselines[c], prompt, args.new_tokens)
                else:
                    p = pipes[c]
                    before = p.coord.stats()
                    (r,), _ = p.generate([prompt], args.new_tokens, 1)
                    after = p.coord.stats()
                    got[c] = r.ms_per_token
                    hops[c] = {k: v / len(r.tokens) for k, v in hop_bytes(before, after).items()}
                    stage_ms[c].append([(a.decode_ms - b.decode_ms) / max(1, a.decode_steps - b.decode_steps)
                                        for a, b in zip(after, before)])
            for c, v in got.items():
                mspt[c].append(v)
            for n in configs:
                ratios[n].append(got[n] / got["unsplit"])
                if "simplified" in got:
                    ratios_simplified[n].append(got[n] / got["simplified"])
            log(f"latency rep {rep + 1}/{args.reps}: " + ", ".join(f"{c} {got[c]:.2f}" for c in configs) + " ms/token")

        # Throughput: --requests requests with 1, 2 and 4 in flight; 2 stages also pinned one core each.
        tput_cfgs = [("unsplit", False, None)]
        if len(cores) >= 2:
            ceiling = ParallelUnsplit(args.model, cores[:2], prompts, args.new_tokens)
            tput_cfgs.append(("2 x unsplit", True, None))
            if 2 in builds:
                feeds = segment_feeds(builds[2], unsplit, prompt, max(1, args.new_tokens // 2), args.builds)
                seg_ceiling = ParallelSegments(feeds, cores[:2])
                tput_cfgs.append(("2 bare segments", True, None))
        for n in pipes:
            if n == 1:
                continue  # one stage: nothing to overlap
            tput_cfgs.append((n, False, None))
            if n <= len(cores):
                tput_cfgs.append((n, True, [{cores[i]} for i in range(n)]))
        tps: dict = {}
        seg_runs: list[dict] = []
        for rep in range(args.tput_reps):
            k = rep % len(tput_cfgs)
            for name, pinned, where in tput_cfgs[k:] + tput_cfgs[:k]:
                if name == "unsplit":
                    t0 = time.perf_counter()
                    ntok = sum(len(timed_greedy(unsplit, pr, args.new_tokens)[0]) for pr in prompts)
                    tps.setdefault(("unsplit", False, 1), []).append(ntok / (time.perf_counter() - t0))
                    continue
                if name == "2 bare segments":
                    seg_runs.append(seg_ceiling.ideal_scaling())
                    continue
                if name == "2 x unsplit":
                    for n in (1, 2):
                        tps.setdefault(("2 x unsplit", True, n), []).append(ceiling.run(n))
                    continue
                p = pipes[name]
                p.pin(where)
                try:
                    for c in CONCURRENCY:
                        results, wall = p.generate(prompts, args.new_tokens, c)
                        tps.setdefault((name, pinned, c), []).append(sum(len(r.tokens) for r in results) / wall)
                finally:
                    p.pin(None)
            log(f"throughput rep {rep + 1}/{args.tput_reps} (tok/s): " + ", ".join(
                f"{n}{' pinned' if pin and n != '2 x unsplit' else ''} "
                + "/".join(f"{v[-1]:.1f}" for (n2, p2, _), v in tps.items() if (n2, p2) == (n, pin))
                for n, pin, _ in tput_cfgs if n != "2 bare segments")
                + (f", 2 bare segments ideal c4/c1 {seg_runs[-1]['ideal_4_vs_1']:.2f}" if seg_runs else ""))
    finally:
        for p in pipes.values():
            p.stop()
        for c in (ceiling, seg_ceiling):
            if c is not None:
                c.close()

    # --- report ---------------------------------------------------------------------------------
    load_after = os.getloadavg()
    has_simpl = "simplified" in baselines
    rows = [{"config": "unsplit onnxruntime (model.onnx), 1 thread", "stages": 0, "pinned": False,
             "ms_per_token": med(mspt["unsplit"]), "ratio_to_unsplit": 1.0,
             "ratio_to_simplified": med(ratios_simplified["unsplit"]) if has_simpl else None,
             "tokens_per_s": {1: med(tps[("unsplit", False, 1)])}}]
    if has_simpl:
        rows.append({"config": "unsplit, simplified graph (1-stage segment)", "stages": 0, "pinned": False,
                     "ms_per_token": med(mspt["simplified"]), "ratio_to_unsplit": med(ratios["simplified"]),
                     "ratio_to_simplified": 1.0, "tokens_per_s": {}})
    for n in pipes:
        over = n > len(cores)
        for pinned in (False, True):
            if pinned and (n, True, 1) not in tps:
                continue
            t = {c: med(tps[(n, pinned, c)]) for c in CONCURRENCY if (n, pinned, c) in tps}
            paired = [a / b for a, b in zip(tps.get((n, pinned, 4), []), tps.get((n, pinned, 1), []))]
            rows.append({
                "config": (f"{n} stage(s) (launchers, ZeroMQ)" if n == 1 else f"{n} stages")
                          + (", pinned 1 core each" if pinned else "")
                          + (f", oversubscribed ({n} on {len(cores)} cores)" if over and n > 1 else ""),
                "stages": n, "pinned": pinned, "oversubscribed": over,
                "ms_per_token": None if pinned else med(mspt[n]),
                "ratio_to_unsplit": None if pinned else med(ratios[n]),
                "ratio_to_simplified": None if pinned or not has_simpl else med(ratios_simplified[n]),
                "tokens_per_s": t, "scaling_4_vs_1": med(paired),
            })
    print()
    print(f"SmolLM2-135M fp32, {args.new_tokens} new tokens, 1 intra-op thread per device, {len(cores)} cores, "
          f"load average {load_before[0]:.2f} -> {load_after[0]:.2f}")
    print(f"medians of {args.reps} (latency, 1 request) / {args.tput_reps} (throughput, {args.requests} requests) "
          f"repetitions; x = median of per-repetition ratios")
    print(f"{'configuration':<46}{'ms/token':>9}{'x unsplit':>10}{'x simpl.':>9}"
          f"{'tok/s c=1':>10}{'c=2':>7}{'c=4':>7}{'c4/c1':>7}")

    def f(x, spec):
        return "-" if x is None else format(x, spec)

    for r in rows:
        t = r["tokens_per_s"]
        print(f"{r['config']:<46}{f(r['ms_per_token'], '.2f'):>9}{f(r['ratio_to_unsplit'], '.3f'):>10}"
              f"{f(r.get('ratio_to_simplified'), '.3f'):>9}{f(t.get(1), '.1f'):>10}{f(t.get(2), '.1f'):>7}"
              f"{f(t.get(4), '.1f'):>7}{f(r.get('scaling_4_vs_1'), '.2f'):>7}")
    if ("2 x unsplit", True, 2) in tps:
        both = tps[("2 x unsplit", True, 2)]
        alone = tps[("2 x unsplit", True, 1)]
        ceiling_ratio = med([a / b for a, b in zip(both, alone)])
        doc_ceiling = {"tokens_per_s_one": med(alone), "tokens_per_s_both": med(both), "ratio": ceiling_ratio}
        print(f"machine ceiling: 2 unsplit processes, one per core, decoding at once: {med(both):.1f} tok/s together,"
              f" one alone {med(alone):.1f}: {ceiling_ratio:.2f}x (the most 2-way overlap can give on this machine)")
        for r in rows:
            if r.get("pinned") and r["stages"] == 2 and r.get("scaling_4_vs_1"):
                print(f"  2 stages pinned: c4/c1 {r['scaling_4_vs_1']:.2f} = {r['scaling_4_vs_1'] / ceiling_ratio:.0%} "
                      f"of that ceiling")
    else:
        doc_ceiling = None
    if seg_runs:
        ideal = med([r["ideal_4_vs_1"] for r in seg_runs])
        a = [med([r["alone_ms"][i] for r in seg_runs]) for i in range(2)]
        b = [med([r["together_ms"][i] for r in seg_runs]) for i in range(2)]
        print(f"2-stage ceiling: its 2 segments in bare onnxruntime processes (no llc runtime), one per core: "
              f"{a[0]:.2f} + {a[1]:.2f} ms alone, {b[0]:.2f} / {b[1]:.2f} ms at once -> ideal c4/c1 {ideal:.2f}")
        for r in rows:
            if r.get("pinned") and r["stages"] == 2 and r.get("scaling_4_vs_1"):
                print(f"  2 stages pinned: c4/c1 {r['scaling_4_vs_1']:.2f} = {r['scaling_4_vs_1'] / ideal:.0%} of it")
        pinned2 = [b / a for a, b in zip(tps.get((2, True, 1), []), tps.get((2, True, 4), []))]
        if pinned2:
            print("  per repetition (this machine's speed when both cores work comes and goes): 2 stages pinned "
                  "c4/c1 " + " ".join(f"{x:.2f}" for x in pinned2) + "; ideal "
                  + " ".join(f"{r['ideal_4_vs_1']:.2f}" for r in seg_runs))
        doc_ceiling = {**(doc_ceiling or {}), "segments": {"alone_ms": a, "together_ms": b, "ideal_4_vs_1": ideal,
                                                          "runs": seg_runs}}
    print()
    print("per-stage decode compute (ms/step, median over the latency runs) and bytes per generated token per hop:")
    print("  measured = the devices' bytes_sent counters (as in `llc run --json` summary.hops) over one request,")
    print("  header + buffers, prefill included; plan = the comm map's tensor payload of one decode step")
    hop_rows = []
    for n, p in pipes.items():
        sm = [statistics.median(col) for col in zip(*stage_ms[n])]
        print(f"  {n} stage(s): " + ", ".join(f"{d} [{l}] {m:.2f}" for d, l, m in zip(p.devices, p.layers, sm))
              + f"  (sum {sum(sm):.2f} ms)")
        for hop, b in sorted(hops[n].items()):
            plan_b = p.plan_links.get(hop)
            print(f"    {hop:<22} measured {b:>7.0f} B/token   plan {'-' if plan_b is None else plan_b:>6}")
            hop_rows.append({"stages": n, "hop": hop, "measured_bytes_per_token": b, "plan_bytes_per_token": plan_b})
    doc = {
        "model": str(args.model), "new_tokens": args.new_tokens, "reps": args.reps, "tput_reps": args.tput_reps,
        "requests": args.requests, "cores": len(cores), "machine": platform.machine(),
        "python": platform.python_version(), "onnxruntime": ort.__version__,
        "load_average": {"before": load_before, "after": load_after},
        "pinning": "os.sched_setaffinity on every /proc/PID/task/TID of each launcher (stage i -> core i)",
        "rows": [{**r, "tokens_per_s": {str(k): v for k, v in r["tokens_per_s"].items()}} for r in rows],
        "hops": hop_rows,
        "ceilings": doc_ceiling,
        "stage_compute_ms": {str(n): [statistics.median(col) for col in zip(*stage_ms[n])] for n in pipes},
        "splits": {str(n): dict(zip(p.devices, p.layers)) for n, p in pipes.items()},
        "raw": {"ms_per_token": {str(k): v for k, v in mspt.items()},
                "ratios": {str(k): v for k, v in ratios.items()},
                "ratios_simplified": {str(k): v for k, v in ratios_simplified.items()},
                "tokens_per_s": {f"{k[0]}{'-pinned' if k[1] else ''}-c{k[2]}": v for k, v in tps.items()}},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
