"""The cost model shared by the MIP, the brute-force check, the baselines and the report.

One place computes what a split costs, so the MIP's objective, the exhaustive
search that checks it, and the even/memory-proportional baselines in the
benchmark are all measured with the same ruler.

Per token (decode) latency of one request is every stage's compute plus every
hop between consecutive stages plus the return of the sampled token from the
tail to the head. A hop costs the link latency plus the bytes crossing that cut
over the link bandwidth (skip tensors are charged to every cut they cross,
which over-estimates slightly and keeps the model linear). Throughput with many
requests in flight is bound by the slowest stage or hop (the bottleneck).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from llc.compiler.state import Block
from llc.profile import Device, Profile, Workload

MIB = 1 << 20
PAGE = 4096
TOKEN_BYTES = 8  # the sampled token id travelling back to the head
EPS = 1e-3  # weight of latency in the throughput objective (a tie-breaker)
TIE = 1e-7  # ms per device index: among equal plans prefer profile order


@dataclass(frozen=True)
class CostTables:
    devices: tuple[Device, ...]
    labels: tuple[str, ...]
    t_decode: tuple[tuple[float, ...], ...]  # [block][device] ms
    t_prefill: tuple[tuple[float, ...], ...]
    mem: tuple[int, ...]  # [block] bytes resident: weights + KV cache for all requests in flight
    workspace: tuple[int, ...]  # [block] bytes of transient activations
    cut_decode: tuple[int, ...]  # [block] bytes crossing the cut after the block
    cut_prefill: tuple[int, ...]
    capacity: tuple[float, ...]  # [device] bytes available for mem + workspace
    latency_ms: tuple[tuple[float, ...], ...]  # [device][device]
    ms_per_byte: tuple[tuple[float, ...], ...]
    overhead_bytes: float
    safety: float
    objective: str
    stages: int | None = None  # exactly this many stages, when set
    # [block] initializers -> bytes, and KV bytes for every request: what a stage of several blocks
    # holds (a constant shared by blocks, like GroupQueryAttention's rotary tables, is held once)
    weights: tuple[dict[str, int], ...] = ()
    kv_mem: tuple[int, ...] = ()
    t_decode_read: tuple[tuple[float, ...], ...] = ()  # [block][device] ms of t_decode spent reading

    def hop(self, a: int, b: int, nbytes: float) -> float:
        if a == b:
            return 0.0
        return self.latency_ms[a][b] + nbytes * self.ms_per_byte[a][b]


def decode_ms(b: Block, d: Device) -> float:
    """A block's decode step on a device: its FLOPs at the compute rate plus the bytes it reads
    (weights at their stored precision, the cache) at the read bandwidth, both as measured for
    layers of the block's precision (fp32's if not), when the profile has them; else its FLOPs
    at the decode rate, which folds fp32 weight reads in."""
    r = d.rates(b.precision)
    if r is not None:
        return b.flops_decode / (r.gflops_prefill * 1e6) + read_ms(b, d)
    return b.flops_decode / (d.gflops * 1e6)


def read_ms(b: Block, d: Device) -> float:
    """The part of a block's decode step spent reading its weights and cache (0 if the profile cannot say)."""
    r = d.rates(b.precision)
    return b.read_bytes_decode / (r.memory_gbps * 1e6) if r is not None else 0.0


def prefill_ms(b: Block, d: Device) -> float:
    r = d.rates(b.precision)
    return b.flops_prefill / ((r.gflops_prefill if r is not None else d.gflops_prefill or d.gflops) * 1e6)


def resident_weights(b: Block, workload: Workload) -> dict[str, int]:
    """The bytes of each weight a device keeps in memory while it runs.

    onnxruntime maps a weight file into memory rather than reading it, so a
    table only looked up by row (an embedding) takes a page for each row a run
    touches, not its size: at most max_context x requests rows. (On the lab
    SmolLM2's 113 MB fp32 embedding stayed out of the launcher's RSS.)
    """
    touched = workload.max_context * workload.requests_in_flight
    return {w: min(n, touched * -(-b.lookups[w] // PAGE) * PAGE) if w in b.lookups else n
            for w, n in b.weights.items()}


def build_tables(blocks: list[Block], profile: Profile, workload: Workload) -> CostTables:
    """The cost tables of these blocks on these devices.

    A block's transient memory is the larger of its prefill activations and the
    packed copy of its largest MatMul weight, which sits next to the original
    while the session loads (the LM head: 113 MB more at load for SmolLM2 fp32).
    """
    devs = profile.devices
    resident = [resident_weights(b, workload) for b in blocks]
    overhead = workload.runtime_overhead_mb * MIB
    lat = tuple(tuple(profile.network.link(a.name, b.name).latency_ms for b in devs) for a in devs)
    mpb = tuple(tuple(0.0 if a.name == b.name else
                      8e-3 / profile.network.link(a.name, b.name).bandwidth_mbps for b in devs)
                for a in devs)
    return CostTables(
        devices=devs,
        labels=tuple(b.label for b in blocks),
        t_decode=tuple(tuple(decode_ms(b, d) for d in devs) for b in blocks),
        t_prefill=tuple(tuple(prefill_ms(b, d) for d in devs) for b in blocks),
        mem=tuple(sum(r.values()) + b.kv_bytes * workload.requests_in_flight for b, r in zip(blocks, resident)),
        workspace=tuple(max(b.workspace_bytes, b.packed_bytes) for b in blocks),
        cut_decode=tuple(b.cut_bytes_decode for b in blocks),
        cut_prefill=tuple(b.cut_bytes_prefill for b in blocks),
        capacity=tuple(d.memory_mb * MIB / workload.memory_safety - overhead for d in devs),
        latency_ms=lat,
        ms_per_byte=mpb,
        overhead_bytes=overhead,
        safety=workload.memory_safety,
        objective=workload.objective,
        stages=workload.stages,
        weights=tuple(resident),
        kv_mem=tuple(b.kv_bytes * workload.requests_in_flight for b in blocks),
        t_decode_read=tuple(tuple(read_ms(b, d) for d in devs) for b in blocks),
    )


@dataclass(frozen=True)
class Split:
    """Stages as (device index, first block, last block), in pipeline order."""

    stages: tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class SplitCost:
    compute_decode: tuple[float, ...]
    compute_prefill: tuple[float, ...]
    hop_decode: tuple[float, ...]  # hop k: stage k -> k+1; the last: tail -> head
    hop_prefill: tuple[float, ...]
    need_bytes: tuple[float, ...]  # what the stage holds: weights + KV + workspace + runtime overhead
    decode_ms: float
    prefill_ms: float
    bottleneck_ms: float
    feasible: bool
    fits: tuple[bool, ...] = ()  # [stage] within its device's memory, as the MIP counts it

    def objective(self, kind: str) -> float:
        if kind == "throughput":
            return self.bottleneck_ms + EPS * self.decode_ms
        return self.decode_ms


def evaluate(t: CostTables, split: Split) -> SplitCost:
    cd, cp, hd, hp, need, fits = [], [], [], [], [], []
    st = split.stages
    for k, (d, first, last) in enumerate(st):
        blocks = range(first, last + 1)
        cd.append(sum(t.t_decode[b][d] for b in blocks))
        cp.append(sum(t.t_prefill[b][d] for b in blocks))
        resident = sum(t.mem[b] for b in blocks) + max(t.workspace[b] for b in blocks)
        fits.append(resident <= t.capacity[d] + 1e-6)  # per block, as the MIP counts (shared ones each time)
        if t.weights:
            held = {name: n for b in blocks for name, n in t.weights[b].items()}
            resident = sum(held.values()) + sum(t.kv_mem[b] for b in blocks) + max(t.workspace[b] for b in blocks)
        need.append(resident + t.overhead_bytes)
        if k + 1 < len(st):
            nxt = st[k + 1][0]
            hd.append(t.hop(d, nxt, t.cut_decode[last]))
            hp.append(t.hop(d, nxt, t.cut_prefill[last]))
        elif len(st) > 1:
            hd.append(t.hop(d, st[0][0], TOKEN_BYTES))
            hp.append(t.hop(d, st[0][0], TOKEN_BYTES))
        else:
            hd.append(0.0)
            hp.append(0.0)
    bottleneck = max(cd + hd[:-1] or [0.0])
    return SplitCost(tuple(cd), tuple(cp), tuple(hd), tuple(hp), tuple(need),
                     decode_ms=sum(cd) + sum(hd), prefill_ms=sum(cp) + sum(hp),
                     bottleneck_ms=bottleneck, feasible=all(fits), fits=tuple(fits))


def batched_tokens_per_s(t: CostTables, split: Split, requests: int, max_batch: int) -> tuple[float, int]:
    """Predicted tokens/s with ``requests`` in flight, decode steps batched in groups; and the group size.

    A stage's step for a group of g rows reads its weights once and computes g
    times: g x (compute) + (reading). Groups of ceil(requests / stages) follow
    each other round the pipeline; a cycle gives every request a token and
    lasts as long as one group's round trip, or the busiest stage (or link)
    serving every group, whichever is longer. Without a read bandwidth in the
    profile all of a step counts as compute, so batching is predicted to gain
    nothing.
    """
    n = len(split.stages)
    group = max(1, min(max_batch, -(-requests // n)))
    groups = -(-requests // group)
    steps, hops = [], []
    for k, (d, first, last) in enumerate(split.stages):
        blocks = range(first, last + 1)
        read = sum(t.t_decode_read[b][d] for b in blocks) if t.t_decode_read else 0.0
        steps.append(group * (sum(t.t_decode[b][d] for b in blocks) - read) + read)
        nxt, nbytes = (split.stages[k + 1][0], t.cut_decode[last]) if k + 1 < n else (split.stages[0][0], TOKEN_BYTES)
        hops.append(t.hop(d, nxt, group * nbytes))
    cycle = max(sum(steps) + sum(hops), groups * max(steps + hops))
    return 1000.0 * requests / cycle, group


def brute_force(t: CostTables, max_stages: int | None = None) -> tuple[Split | None, float]:
    """Every ordered choice of devices and every contiguous split: the exact optimum.

    Exponential; for checking the MIP on small instances only.
    """
    nb, nd = len(t.mem), len(t.devices)
    best, best_val = None, float("inf")
    for k in range(1, min(nd, nb, max_stages or nd) + 1):
        if t.stages is not None and k != t.stages:
            continue
        for order in itertools.permutations(range(nd), k):
            for cuts in itertools.combinations(range(1, nb), k - 1):
                bounds = (0,) + cuts + (nb,)
                split = Split(tuple((order[i], bounds[i], bounds[i + 1] - 1) for i in range(k)))
                cost = evaluate(t, split)
                if cost.feasible and cost.objective(t.objective) < best_val - 1e-12:
                    best, best_val = split, cost.objective(t.objective)
    return best, best_val


def even_split(t: CostTables, order: list[int]) -> Split:
    """Baseline other tools use: the same number of blocks on every device."""
    nb, k = len(t.mem), min(len(order), len(t.mem))
    bounds = [round(i * nb / k) for i in range(k + 1)]
    return Split(tuple((order[i], bounds[i], bounds[i + 1] - 1) for i in range(k)))


def memory_proportional_split(t: CostTables, order: list[int]) -> Split:
    """Baseline: blocks in proportion to each device's memory (greedy on cumulative bytes)."""
    nb = len(t.mem)
    k = min(len(order), nb)
    caps = [max(t.capacity[d], 1.0) for d in order[:k]]
    total_mem, total_cap = float(sum(t.mem)), sum(caps)
    bounds, acc, target = [0], 0.0, 0.0
    for i in range(k - 1):
        target += caps[i] / total_cap * total_mem
        b = bounds[-1]
        while b < nb - (k - 1 - i) and (acc + t.mem[b] <= target or b == bounds[-1]):
            acc += t.mem[b]
            b += 1
        bounds.append(b)
    bounds.append(nb)
    return Split(tuple((order[i], bounds[i], bounds[i + 1] - 1) for i in range(k)))
