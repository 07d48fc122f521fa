"""partition: choose devices, their order, and a contiguous block range for each (MIP).

before: ordered blocks with costs; the device profile
after:  ``state.plan``: stages in pipeline order, predicted per-stage compute,
        hops and memory.

Mixed-integer program solved with python-mip (CBC). Slots k = 0..K-1 are
pipeline positions; the solver decides which device sits in each slot (or
leaves it empty) and which blocks each slot runs:

    a[b,k]  block b runs in slot k          z[k,d]  slot k is device d
    sum_k a[b,k] = 1; slot(b) <= slot(b+1) <= slot(b) + 1; block 0 in slot 0;
    the last block in the last used slot; used slots form a prefix.
    memory:   sum_b a[b,k] mem[b] + ws[k] <= sum_d z[k,d] cap[d]
    compute:  T[k] >= sum_b a[b,k] t[b,d] - M (1 - z[k,d])
    hop:      H[k] >= lat[d,e] + X[k] s[d,e] - M (2 - z[k,d] - z[k+1,e])
              X[k] = bytes crossing the boundary between slot k and k+1
    return:   R >= lat[d,h] - M (3 - z[k,d] - z[0,h] - last[k])
    latency:    min sum T + sum H + R          (one request, per token)
    throughput: min Z + eps (sum T + sum H + R),  Z >= T[k], Z >= H[k]

The costs are those of ``llc.costmodel`` so the result can be checked against
exhaustive search (tests do, on small instances).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import mip

from llc.costmodel import EPS, TIE, MIB, TOKEN_BYTES, CostTables, Split, build_tables, evaluate
from llc.errors import DoesNotFit
from llc.ir import CompileState, Plan, StagePlan


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
    nb, nd = len(t.mem), len(t.devices)
    K = min(nb, nd)
    B, D, S = range(nb), range(nd), range(K)
    m = mip.Model(sense=mip.MINIMIZE, solver_name=mip.CBC)
    m.verbose = 0
    m.threads = threads
    m.max_mip_gap = 1e-7
    m.max_mip_gap_abs = 1e-7

    a = [[m.add_var(var_type=mip.BINARY) for _ in S] for _ in B]
    z = [[m.add_var(var_type=mip.BINARY) for _ in D] for _ in S]
    used = [mip.xsum(z[k][d] for d in D) for k in S]
    slot = [mip.xsum(k * a[b][k] for k in S) for b in B]
    for b in B:
        m += mip.xsum(a[b][k] for k in S) == 1
        for k in S:
            m += a[b][k] <= used[k]
    for b in range(nb - 1):
        m += slot[b + 1] >= slot[b]
        m += slot[b + 1] <= slot[b] + 1
    m += a[0][0] == 1
    m += slot[nb - 1] == mip.xsum(used) - 1
    for k in S:
        m += used[k] <= 1
        if k + 1 < K:
            m += used[k + 1] <= used[k]
    for d in D:
        m += mip.xsum(z[k][d] for k in S) <= 1
    if t.stages is not None:
        if t.stages > K:
            return None, "INFEASIBLE", 0.0
        m += mip.xsum(used) == t.stages

    # memory: resident blocks + the largest workspace on the slot
    ws = [m.add_var(lb=0) for _ in S]
    for k in S:
        for b in B:
            m += ws[k] >= t.workspace[b] * a[b][k]
        m += (mip.xsum(t.mem[b] * a[b][k] for b in B) + ws[k]
              <= mip.xsum(max(t.capacity[d], 0.0) * z[k][d] for d in D))

    # compute time of each slot on whichever device holds it
    T = [m.add_var(lb=0) for _ in S]
    for k in S:
        for d in D:
            big = sum(t.t_decode[b][d] for b in B)
            m += T[k] >= mip.xsum(t.t_decode[b][d] * a[b][k] for b in B) - big * (1 - z[k][d])

    # hops between consecutive slots: bytes at the boundary over the pair's link
    H = [m.add_var(lb=0) for _ in range(K - 1)]
    max_cut = max(t.cut_decode) if t.cut_decode else 0
    for k in range(K - 1):
        e = [m.add_var(lb=0) for _ in range(nb - 1)]
        for b in range(nb - 1):
            m += e[b] >= a[b][k] + a[b + 1][k + 1] - 1
        X = mip.xsum(t.cut_decode[b] * e[b] for b in range(nb - 1))
        for d in D:
            for f in D:
                if d == f:
                    continue
                big = t.latency_ms[d][f] + max_cut * t.ms_per_byte[d][f]
                m += H[k] >= (t.latency_ms[d][f] + t.ms_per_byte[d][f] * X
                              - big * (2 - z[k][d] - z[k + 1][f]))

    # the sampled token returns from the tail (last used slot) to the head
    R = m.add_var(lb=0)
    for k in range(1, K):
        last = used[k] - (used[k + 1] if k + 1 < K else 0)
        for d in D:
            for h in D:
                if d == h:
                    continue
                back = t.latency_ms[d][h] + TOKEN_BYTES * t.ms_per_byte[d][h]
                m += R >= back - back * (3 - z[k][d] - z[0][h] - last)

    latency = mip.xsum(T) + mip.xsum(H) + R
    if t.objective == "throughput":
        Z = m.add_var(lb=0)
        for k in S:
            m += Z >= T[k]
        for k in range(K - 1):
            m += Z >= H[k]
        m.objective = Z + EPS * latency
    else:
        m.objective = latency
    # among equal plans prefer device i in slot i (stable, readable plans)
    m.objective += TIE * mip.xsum((d - k) ** 2 * z[k][d] for k in S for d in D)

    t0 = time.perf_counter()
    status = m.optimize(max_seconds=time_limit)
    seconds = time.perf_counter() - t0
    if status not in (mip.OptimizationStatus.OPTIMAL, mip.OptimizationStatus.FEASIBLE):
        return None, status.name, seconds
    stages = []
    for k in S:
        dev = [d for d in D if z[k][d].x >= 0.5]
        blocks = [b for b in B if a[b][k].x >= 0.5]
        if dev and blocks:
            stages.append((dev[0], blocks[0], blocks[-1]))
    return Split(tuple(stages)), status.name, seconds


def plan_from_split(t: CostTables, split: Split, status: str, seconds: float) -> Plan:
    c = evaluate(t, split)
    stages = tuple(
        StagePlan(
            index=k, device=t.devices[d].name, first_block=first, last_block=last,
            compute_ms_decode=c.compute_decode[k], compute_ms_prefill=c.compute_prefill[k],
            hop_ms_decode=c.hop_decode[k], hop_ms_prefill=c.hop_prefill[k],
            memory_bytes=int(c.need_bytes[k] * t.safety),
            memory_limit_bytes=int(t.devices[d].memory_mb * MIB),
        )
        for k, (d, first, last) in enumerate(split.stages)
    )
    return Plan(stages=stages, objective=t.objective, objective_ms=c.objective(t.objective),
                decode_ms=c.decode_ms, prefill_ms=c.prefill_ms, bottleneck_ms=c.bottleneck_ms,
                solve_seconds=seconds, solver_status=status)


@dataclass(frozen=True)
class Partition:
    name: ClassVar[str] = "partition"
    time_limit: float = 60.0

    def run(self, state: CompileState) -> CompileState:
        t = build_tables(state.blocks, state.profile, state.workload)
        where = str(state.profile.path)
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
        state.plan = plan_from_split(t, split, status, seconds)
        return state
