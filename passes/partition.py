"""partition: choose devices, their order, and a contiguous block range for each (MIP).

before: ordered blocks with costs; the device profile
after:  ``state.plan``: stages in pipeline order, predicted per-stage compute,
        hops and memory.

Mixed-integer program solved with python-mip (CBC), in interval form: a
variable for each (device, run of consecutive blocks) that fits the device's
memory. The pipeline order of the devices is the order of their runs, so
choosing participants and order needs no permutation variables:

    v[d,i,j]  device d runs blocks i..j (only runs that fit d's memory exist)
    every block covered once:  sum_{d, i<=b<=j} v[d,i,j] = 1
    every device at most once: sum_{i,j} v[d,i,j] <= 1
    hop after block b: a transport plan y[b,d,e] >= 0 from "d's run ends at b"
        to "e's run starts at b+1" (rows and columns sum to those indicators),
        costing lat[d,e] + cut[b] / bw[d,e]
    return: the same from the run ending at the last block to the one starting
        at block 0 (the tail sends the sampled token to the head)
    latency:    min sum v T(d,i,j) + hops + return   (one request, per token)
    throughput: min Z + eps * latency,  Z >= each device's T,  Z >= each hop

Interval covering is totally unimodular, so the LP relaxation is nearly
integral and CBC proves optimality fast. The costs are those of
``llc.costmodel``; tests check the result against exhaustive search.
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
    B, D = range(nb), range(nd)
    m = mip.Model(sense=mip.MINIMIZE, solver_name=mip.CBC)
    m.verbose = 0
    m.threads = threads
    m.max_mip_gap = 1e-9
    m.max_mip_gap_abs = 1e-9

    # prefix sums make every run's cost O(1)
    pre_t = [[0.0] * (nb + 1) for _ in D]
    pre_m = [0.0] * (nb + 1)
    for b in B:
        pre_m[b + 1] = pre_m[b] + t.mem[b]
        for d in D:
            pre_t[d][b + 1] = pre_t[d][b] + t.t_decode[b][d]
    runs: dict[tuple[int, int, int], mip.Var] = {}
    for d in D:
        for i in B:
            ws = 0
            for j in range(i, nb):
                ws = max(ws, t.workspace[j])
                if pre_m[j + 1] - pre_m[i] + ws > t.capacity[d]:
                    break  # longer runs from i only need more memory
                runs[(d, i, j)] = m.add_var(var_type=mip.BINARY)
    if not runs:
        return None, "INFEASIBLE", 0.0
    cover = [[] for _ in B]
    ends = [[[] for _ in D] for _ in B]  # ends[b][d]: runs of d ending at b
    starts = [[[] for _ in D] for _ in B]
    for (d, i, j), v in runs.items():
        for b in range(i, j + 1):
            cover[b].append(v)
        ends[j][d].append(v)
        starts[i][d].append(v)
    for b in B:
        if not cover[b]:
            return None, "INFEASIBLE", 0.0
        m += mip.xsum(cover[b]) == 1
    for d in D:
        m += mip.xsum(v for (dd, _, _), v in runs.items() if dd == d) <= 1
    if t.stages is not None:
        m += mip.xsum(runs.values()) == t.stages

    def transport(src: list[list], dst: list[list], nbytes: float):
        """Cost of moving nbytes from the device whose run ends to the one whose run starts."""
        y = [[m.add_var(lb=0) for _ in D] for _ in D]
        for d in D:
            m.add_constr(mip.xsum(y[d][e] for e in D) == mip.xsum(src[d]))
            m.add_constr(mip.xsum(y[e][d] for e in D) == mip.xsum(dst[d]))
        return mip.xsum((t.latency_ms[d][e] + nbytes * t.ms_per_byte[d][e]) * y[d][e]
                        for d in D for e in D if d != e)

    # inside the pipeline a run ending at b is always followed by one starting at b+1
    H = [transport(ends[b], starts[b + 1], t.cut_decode[b]) for b in range(nb - 1)]
    back = transport(ends[nb - 1], starts[0], TOKEN_BYTES)
    T = {d: mip.xsum((pre_t[d][j + 1] - pre_t[d][i]) * v for (dd, i, j), v in runs.items() if dd == d)
         for d in D}
    latency = mip.xsum(T.values()) + mip.xsum(H) + back
    if t.objective == "throughput":
        Z = m.add_var(lb=0)
        for d in D:
            m += Z >= T[d]
        for h in H:
            m += Z >= h
        m.objective = Z + EPS * latency
    else:
        m.objective = latency
    # among equal plans prefer earlier blocks on earlier devices (stable, readable plans)
    m.objective += TIE * mip.xsum(abs(d - i * nd / nb) * v for (d, i, _), v in runs.items())

    t0 = time.perf_counter()
    status = m.optimize(max_seconds=time_limit)
    seconds = time.perf_counter() - t0
    if status not in (mip.OptimizationStatus.OPTIMAL, mip.OptimizationStatus.FEASIBLE):
        return None, status.name, seconds
    chosen = sorted((i, j, d) for (d, i, j), v in runs.items() if v.x >= 0.5)
    return Split(tuple((d, i, j) for i, j, d in chosen)), status.name, seconds


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
