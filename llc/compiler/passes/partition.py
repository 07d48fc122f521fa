"""partition: choose devices, their order, and a contiguous block range for each (MIP).

before: ordered blocks with costs; the device profile
after:  ``state.plan``: stages in pipeline order, predicted per-stage compute,
        hops and memory.

Mixed-integer program solved with python-mip (CBC), in interval form: a
variable for each (device, run of consecutive blocks) that fits the device's
memory. The pipeline order of the devices is the order of their runs, so
choosing participants and order needs no permutation variables:

    v[d,i,j]  device d runs blocks i..j (only runs that fit d's memory exist,
        and with a fixed stage count k only runs that leave k-1 blocks)
    the runs form a path over the blocks: one starts at block 0, one ends at
        the last block, and one ends at b exactly when one starts at b+1
    every device at most once: sum_{i,j} v[d,i,j] <= 1
    fixed stage count k:       sum v = k
    hop after block b: a transport plan y[b,d,e] >= 0 from "d's run ends at b"
        to "e's run starts at b+1" (rows and columns sum to those indicators),
        costing lat[d,e] + cut[b] / bw[d,e]; no y[b,d,d], as a device never
        follows itself
    return: the same from the run ending at the last block to the one starting
        at block 0 (the tail sends the sampled token to the head), leaving out
        a single device that runs everything
    latency:    min sum v T(d,i,j) + hops + return   (one request, per token)
    throughput: min Z + eps * latency,  Z >= each device's T,  Z >= each hop;
        then, with several requests in flight, the plan among this one and
        each stage count's latency and bottleneck optima that the batched
        prediction gives the most tokens/s (``most_tokens``)

The path constraints are totally unimodular. Without y[b,d,d] (which let the
LP pair a device with itself for free), the latency LP bound is the optimum or
within 0.1% of it on SmolLM2's profiles, so CBC proves optimality at or near
the root (with per-link latencies the gap is a few %, still well under 1 s).

Min-max is weak in an LP (fractional runs spread the bottleneck), so throughput
is solved around the bottleneck, found first: the optimal bottleneck is the
cost of some run or forward hop, and forbidding (upper bound 0) every run and
hop dearer than a candidate z leaves a model that has a plan exactly when one
with bottleneck <= z exists. Bisection over the sorted candidates with LP
relaxations gives a lower bound (usually exact); MIPs stopped at their first
solution then find the least candidate z* with a plan. The last MIP minimizes
Z + eps * latency with Z >= z* and only the runs and hops a plan better than
the best seen can use (cost <= best - eps * least latency, the latency LP bound).

CBC settings: cuts, presolve and heuristics off (the LP is tight, they only
cost time); the cutoff increment is TIE, not CBC's default 1e-4 ms, which
prunes plans better by less than that. The costs are those of
``llc.compiler.costmodel``; tests check the result against exhaustive search.
"""

from __future__ import annotations

import bisect
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import mip
import mip.cbc
import yaml

from llc.compiler.caches import batching
from llc.compiler.costmodel import (EPS, MIB, TIE, TOKEN_BYTES, CostTables, Split, batched_tokens_per_s,
                                    build_tables, evaluate, even_split, memory_proportional_split)
from llc.errors import DoesNotFit, LlcError
from llc.compiler.state import CompileState, Plan, StagePlan


def check_fits(t: CostTables, where: str) -> None:
    """Fail fast, with the shortfall in MB, when no assignment can fit in memory."""
    total_need = sum(t.mem) + max(t.workspace)
    total_cap = sum(max(c, 0.0) for c in t.capacity)
    biggest = max(range(len(t.mem)), key=lambda b: t.mem[b] + t.workspace[b])
    block_need = t.mem[biggest] + t.workspace[biggest]
    if total_need > total_cap:
        short = (total_need - total_cap) * t.safety / MIB
        raise DoesNotFit(where, f"model does not fit: needs {total_need * t.safety / MIB:.0f} MB "
                                f"on the devices, they have {total_cap * t.safety / MIB:.0f} MB "
                                f"usable; short by {short:.0f} MB")
    if block_need > max(t.capacity):
        short = (block_need - max(t.capacity)) * t.safety / MIB
        raise DoesNotFit(where, f"model does not fit: {t.labels[biggest]} alone needs "
                                f"{block_need * t.safety / MIB:.0f} MB, the largest device has "
                                f"{max(t.capacity) * t.safety / MIB:.0f} MB usable; "
                                f"short by {short:.0f} MB")


def solve(t: CostTables, time_limit: float = 60.0, threads: int = 1) -> tuple[Split | None, str, float]:
    """Solve the MIP; returns (split, solver status, seconds). ``None`` when infeasible."""
    t0 = time.perf_counter()
    nb, nd = len(t.mem), len(t.devices)
    B, D = range(nb), range(nd)
    m = mip.Model(sense=mip.MINIMIZE, solver_name=mip.CBC)
    m.verbose = 0
    m.threads = threads
    m.max_mip_gap = m.max_mip_gap_abs = 1e-9
    m.cuts = 0
    m.preprocess = 0
    # no python-mip property for these two (see the module docstring)
    mip.cbc.cbc_set_parameter(m.solver, "heur", "off")
    mip.cbc.cbc_set_parameter(m.solver, "increment", str(TIE))

    # prefix sums make every run's cost O(1)
    pre_t = [[0.0] * (nb + 1) for _ in D]
    pre_m = [0.0] * (nb + 1)
    for b in B:
        pre_m[b + 1] = pre_m[b] + t.mem[b]
        for d in D:
            pre_t[d][b + 1] = pre_t[d][b] + t.t_decode[b][d]
    runs: dict[tuple[int, int, int], mip.Var] = {}
    longest = nb - (t.stages or 1) + 1  # leave a block for each other stage
    for d in D:
        for i in B:
            ws = 0
            for j in range(i, min(nb, i + longest)):
                ws = max(ws, t.workspace[j])
                if pre_m[j + 1] - pre_m[i] + ws > t.capacity[d] + 1e-6:
                    break  # longer runs from i only need more memory
                runs[(d, i, j)] = m.add_var(var_type=mip.BINARY)
    ends = [[[] for _ in D] for _ in B]  # ends[b][d]: runs of d ending at b
    starts = [[[] for _ in D] for _ in B]
    for (d, i, j), v in runs.items():
        ends[j][d].append(v)
        starts[i][d].append(v)
    if not any(starts[0]) or not any(ends[nb - 1]):
        return None, "INFEASIBLE", time.perf_counter() - t0
    m += mip.xsum(sum(starts[0], [])) == 1
    m += mip.xsum(sum(ends[nb - 1], [])) == 1
    for b in range(nb - 1):
        m += mip.xsum(sum(ends[b], [])) == mip.xsum(sum(starts[b + 1], []))
    for d in D:
        m += mip.xsum(v for (e, _, _), v in runs.items() if e == d) <= 1
    if t.stages is not None:
        m += mip.xsum(runs.values()) == t.stages

    price = {v: pre_t[d][j + 1] - pre_t[d][i] for (d, i, j), v in runs.items()}  # bottleneck terms

    def transport(src: list[list], dst: list[list], nbytes: float, forward: bool):
        """Cost of moving nbytes from the device whose run ends to the other whose run starts."""
        y = [[m.add_var(ub=0 if d == e else 1) for e in D] for d in D]
        for d in D:
            m.add_constr(mip.xsum(y[d]) == mip.xsum(src[d]))
            m.add_constr(mip.xsum(y[e][d] for e in D) == mip.xsum(dst[d]))
        if forward:
            price.update({y[d][e]: t.hop(d, e, nbytes) for d in D for e in D if d != e})
        return mip.xsum(t.hop(d, e, nbytes) * y[d][e] for d in D for e in D if d != e)

    H = [transport(ends[b], starts[b + 1], t.cut_decode[b], True) for b in range(nb - 1)]
    whole = {runs.get((d, 0, nb - 1)) for d in D}  # one device runs everything: no return
    back = transport([[v for v in ends[nb - 1][d] if v not in whole] for d in D],
                     [[v for v in starts[0][d] if v not in whole] for d in D], TOKEN_BYTES, False)
    T = [mip.xsum(price[v] * v for (e, _, _), v in runs.items() if e == d) for d in D]
    latency = mip.xsum(T) + mip.xsum(H) + back
    # among equal plans prefer earlier blocks on earlier devices (stable, readable plans)
    tie = TIE * mip.xsum(abs(d - i * nd / nb) * v for (d, i, _), v in runs.items())

    status = mip.OptimizationStatus.OTHER

    def run(objective, first: bool = False) -> Split | None:
        """Optimize (or stop at the first solution found); the plan, or None."""
        nonlocal status
        m.objective = objective
        # python-mip keeps the limits of an earlier call unless they are set again
        status = m.optimize(max_seconds=max(time_limit - (time.perf_counter() - t0), 0.01),
                            max_solutions=1 if first else mip.INT_MAX - 1)
        if status not in (mip.OptimizationStatus.OPTIMAL, mip.OptimizationStatus.FEASIBLE):
            return None
        chosen = sorted((i, j, d) for (d, i, j), v in runs.items() if v.x >= 0.5)
        return Split(tuple((d, i, j) for i, j, d in chosen))

    if t.objective != "throughput":
        split = run(latency + tie)
        return split, status.name, time.perf_counter() - t0

    Z = m.add_var()
    for x in T + H:
        m += Z >= x
    by_price = sorted(price, key=price.get)
    prices = [price[v] for v in by_price]
    cand = sorted(set(prices))  # the optimal bottleneck is one of these
    allowed = len(by_price)

    def allow(z: float) -> None:
        """Forbid (upper bound 0) every run and hop that costs more than z."""
        nonlocal allowed
        k = bisect.bisect_right(prices, z * (1 + 1e-9))
        for v in by_price[min(k, allowed):max(k, allowed)]:
            v.ub = 1 if k > allowed else 0
        allowed = k

    best, best_val, hi = None, math.inf, len(cand) - 1

    def probe() -> bool:
        """Is there a plan with the allowed runs and hops? Keeps the best plan seen."""
        nonlocal best, best_val, hi
        split = run(latency, first=True)
        if split is None:
            return False
        c = evaluate(t, split)
        hi = min(hi, bisect.bisect_left(cand, c.bottleneck_ms * (1 - 1e-9)))
        if c.objective(t.objective) < best_val:
            best, best_val = split, c.objective(t.objective)
        return True

    # any plan bounds the bottleneck from above (and quiets the LPs below: python-mip
    # prints CLP's log for an LP solved before any MIP, whatever m.verbose says)
    if not probe():
        return None, status.name, time.perf_counter() - t0
    least_latency = latency.x if m.optimize(relax=True) == mip.OptimizationStatus.OPTIMAL else 0.0
    # the least candidate whose LP relaxation is feasible bounds the bottleneck from below
    lo, top = 0, hi
    while lo < top:
        mid = (lo + top) // 2
        allow(cand[mid])
        if m.optimize(relax=True) == mip.OptimizationStatus.INFEASIBLE:
            lo = mid + 1
        else:
            top = mid
    # the least candidate with a plan, trying that bound first (it usually has one)
    mid = lo
    while lo < hi:
        allow(cand[mid])
        if not probe():
            if status != mip.OptimizationStatus.INFEASIBLE:
                break  # out of time; lo is still a lower bound
            lo = mid + 1
        mid = (lo + hi) // 2
    # a plan better than the best seen has bottleneck >= cand[lo] and
    # <= best - eps * its latency <= best - eps * least latency
    allow(best_val - EPS * least_latency + 1e-9 * best_val)
    Z.lb = cand[lo]
    split = run(Z + EPS * latency + tie)
    if split is None:
        return best, "FEASIBLE", time.perf_counter() - t0
    return split, status.name, time.perf_counter() - t0


def plan_from_split(t: CostTables, split: Split, how: str, seconds: float) -> Plan:
    c = evaluate(t, split)
    stages = tuple(
        StagePlan(
            index=k, device=t.devices[d].name, first_block=first, last_block=last,
            compute_ms_decode=c.compute_decode[k], compute_ms_prefill=c.compute_prefill[k],
            hop_ms_decode=c.hop_decode[k], hop_ms_prefill=c.hop_prefill[k],
            memory_bytes=int(c.need_bytes[k]),
            memory_limit_bytes=int(t.devices[d].memory_mb * MIB),
        )
        for k, (d, first, last) in enumerate(split.stages)
    )
    return Plan(stages=stages, objective=t.objective, split=how,
                decode_ms=c.decode_ms, prefill_ms=c.prefill_ms, bottleneck_ms=c.bottleneck_ms,
                solve_seconds=seconds)


def fixed_split(t: CostTables, how: str, where: str) -> Split:
    """A split the user fixes: ``even`` or ``memory`` (the baselines other tools use, over the
    profile's devices in order, or its first ``stages``), or a YAML file naming each stage's
    device and blocks::

        stages:
          - {device: phone1, blocks: [embed, layer 9]}   # first and last block, by label or index
          - {device: phone2, blocks: [layer 10, head]}
    """
    k = min(t.stages or len(t.devices), len(t.mem))
    if how == "even":
        return even_split(t, list(range(k)))
    if how == "memory":
        return memory_proportional_split(t, list(range(k)))
    return read_split_file(Path(how), t)


def read_split_file(path: Path, t: CostTables) -> Split:
    """Stages from a split file; every problem is one line naming the file."""
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as e:
        raise LlcError(path, f"cannot read split file ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise LlcError(path, f"YAML syntax error: {str(e).splitlines()[0]}") from None
    if not isinstance(doc, dict) or set(doc) != {"stages"} or not isinstance(doc["stages"], list) \
            or not doc["stages"]:
        raise LlcError(path, "expected one key, stages: a list of {device, blocks: [first, last]}")
    names = [d.name for d in t.devices]
    label_index = {label: i for i, label in enumerate(t.labels)}
    stages, expect = [], 0
    for n, st in enumerate(doc["stages"]):
        if not isinstance(st, dict) or set(st) != {"device", "blocks"}:
            raise LlcError(path, f"stages[{n}]: expected keys device and blocks")
        if st["device"] not in names:
            raise LlcError(path, f"stages[{n}].device: {st['device']!r} is not in the profile")
        ends = st["blocks"] if isinstance(st["blocks"], list) else [st["blocks"]] * 2
        try:
            first, last = (b if isinstance(b, int) else label_index[b] for b in ends)
        except (KeyError, ValueError, TypeError):
            raise LlcError(path, f"stages[{n}].blocks: expected [first, last] as indices or labels "
                                 f"({', '.join(t.labels)}), got {st['blocks']!r}") from None
        if first != expect or last < first or last >= len(t.labels):
            raise LlcError(path, f"stages[{n}].blocks: stages must cover blocks 0..{len(t.labels) - 1} "
                                 f"in order; this one should start at {t.labels[min(expect, len(t.labels) - 1)]}")
        stages.append((names.index(st["device"]), first, last))
        expect = last + 1
    if expect != len(t.labels):
        raise LlcError(path, f"stages end at block {expect - 1}; the model has {len(t.labels)} "
                             f"(last: {t.labels[-1]})")
    if len({d for d, _, _ in stages}) != len(stages):
        raise LlcError(path, "a device appears in more than one stage")
    return Split(tuple(stages))


@dataclass(frozen=True)
class Partition:
    name: ClassVar[str] = "partition"
    time_limit: float = 60.0
    split: str | None = None  # None: the MIP; else even | memory | a split file (see fixed_split)

    def run(self, state: CompileState) -> CompileState:
        t = build_tables(state.blocks, state.profile, state.workload)
        where = str(state.profile.path)
        if self.split is not None:
            split = fixed_split(t, self.split, where)
            cost = evaluate(t, split)
            if not cost.feasible:
                over = [t.devices[d].name for k, (d, _, _) in enumerate(split.stages) if not cost.fits[k]]
                raise DoesNotFit(where, f"the {self.split} split does not fit: stage(s) on "
                                        f"{', '.join(over)} need more memory than the device has")
            state.plan = plan_from_split(t, split, self.split, 0.0)
            return state
        check_fits(t, where)
        split, status, seconds = solve(t, self.time_limit)
        if split is None and t.stages is not None:
            raise DoesNotFit(where, f"no split into exactly {t.stages} stages fits the devices' memory "
                                    f"(or there are fewer than {t.stages} blocks)")
        if split is None:
            biggest = max(t.mem[b] + t.workspace[b] for b in range(len(t.mem)))
            raise DoesNotFit(where, f"model does not fit: no contiguous split fits the devices' "
                                    f"memory (largest block needs {biggest * t.safety / MIB:.0f} MB; "
                                    f"solver: {status})")
        if t.objective == "throughput" and t.stages is None and state.workload.requests_in_flight > 1:
            t0 = time.perf_counter()
            split = most_tokens(t, split, state.workload.requests_in_flight, batching(state)[0], self.time_limit)
            seconds += time.perf_counter() - t0
        state.plan = plan_from_split(t, split, "mip", seconds)
        return state


def most_tokens(t: CostTables, first: Split, requests: int, max_batch: int, time_limit: float) -> Split:
    """The plan that makes the most tokens/s with ``requests`` in flight, batched.

    The bottleneck is the throughput of a pipeline kept full; a few requests in
    flight do not keep it full. Each request's token then waits a whole round
    trip (every stage, every hop), and a stage's batched step reads its weights
    once for the whole group (costmodel.batched_tokens_per_s). So on fast
    phones with slow links one phone alone can beat any split, and more stages
    mean smaller groups. The MIP proposes, for every stage count, its least-latency
    and its least-bottleneck plan; the batched prediction picks among them and
    the unconstrained bottleneck plan (which wins ties).
    """
    candidates = [first]
    counts = range(1, min(len(t.devices), len(t.mem)) + 1)
    each = time_limit / (2 * len(counts))  # the whole search within the pass's time limit
    for k in counts:
        for objective in ("latency", "throughput") if k > 1 else ("latency",):  # one stage: the same plan
            split, _, _ = solve(replace(t, stages=k, objective=objective), each)
            if split is not None:
                candidates.append(split)
    return max(candidates, key=lambda s: batched_tokens_per_s(t, s, requests, max_batch)[0])
