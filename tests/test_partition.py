"""The MIP's plan against exhaustive search on small instances (same objective value)."""

from __future__ import annotations

import random

import pytest

from llc.costmodel import (CostTables, Split, brute_force, evaluate, even_split,
                           memory_proportional_split)
from llc.passes.partition import solve
from llc.profile import Device

MB = 1 << 20


def random_tables(rng: random.Random, nb: int, nd: int, objective: str, stages=None) -> CostTables:
    speeds = [rng.choice([2.0, 5.0, 10.0, 25.0]) for _ in range(nd)]
    flops = [rng.uniform(0.5, 3.0) for _ in range(nb)]
    devices = tuple(Device(name=f"d{i}", target="local", memory_mb=1000, gflops=speeds[i])
                    for i in range(nd))
    lat = [[0.0 if a == b else rng.uniform(0.5, 8.0) for b in range(nd)] for a in range(nd)]
    for a in range(nd):  # links are symmetric
        for b in range(a):
            lat[a][b] = lat[b][a]
    mpb = [[0.0 if a == b else 8e-3 / rng.choice([20, 100, 500]) for b in range(nd)] for a in range(nd)]
    mem = [rng.randint(50, 300) * MB for _ in range(nb)]
    return CostTables(
        devices=devices, labels=tuple(f"b{i}" for i in range(nb)),
        t_decode=tuple(tuple(f / s for s in speeds) for f in flops),
        t_prefill=tuple(tuple(30 * f / s for s in speeds) for f in flops),
        mem=tuple(mem), workspace=tuple(rng.randint(1, 20) * MB for _ in range(nb)),
        cut_decode=tuple(rng.choice([2304, 4096, 9000]) for _ in range(nb)),
        cut_prefill=tuple(rng.choice([2304, 4096, 9000]) * 64 for _ in range(nb)),
        capacity=tuple(float(rng.randint(300, 1200) * MB) for _ in range(nd)),
        latency_ms=tuple(map(tuple, lat)), ms_per_byte=tuple(map(tuple, mpb)),
        overhead_bytes=0.0, safety=1.0, objective=objective, stages=stages,
    )


@pytest.mark.parametrize("objective", ["latency", "throughput"])
@pytest.mark.parametrize("seed", range(8))
def test_mip_matches_brute_force(objective, seed):
    rng = random.Random(seed * 7 + (objective == "throughput"))
    t = random_tables(rng, nb=rng.randint(3, 7), nd=rng.randint(1, 4), objective=objective)
    split, status, _ = solve(t)
    best, best_val = brute_force(t)
    if best is None:
        assert split is None, "MIP found a plan where none fits"
        return
    assert split is not None, status
    got = evaluate(t, split)
    assert got.feasible
    assert got.objective(objective) == pytest.approx(best_val, rel=1e-5, abs=1e-6)


def test_fixed_number_of_stages():
    rng = random.Random(3)
    t = random_tables(rng, nb=6, nd=4, objective="latency", stages=3)
    t = CostTables(**{**t.__dict__, "capacity": tuple(1e12 for _ in t.capacity)})
    split, _, _ = solve(t)
    best, best_val = brute_force(t)
    assert len(split.stages) == 3 == len(best.stages)
    assert evaluate(t, split).objective("latency") == pytest.approx(best_val, rel=1e-5)


def test_mip_prefers_the_fast_device_and_skips_the_slow_one():
    rng = random.Random(0)
    t = random_tables(rng, nb=5, nd=3, objective="latency")
    fast = tuple(tuple(x if d == 1 else 100 * x for d, x in enumerate(row)) for row in t.t_decode)
    t = CostTables(**{**t.__dict__, "t_decode": fast, "capacity": (1e12, 1e12, 1e12)})
    split, _, _ = solve(t)
    assert split.stages == ((1, 0, 4),)


def test_baselines_are_valid_splits():
    rng = random.Random(5)
    t = random_tables(rng, nb=9, nd=4, objective="latency")
    for split in (even_split(t, [0, 1, 2, 3]), memory_proportional_split(t, [0, 1, 2, 3])):
        blocks = [b for _, f, l in split.stages for b in range(f, l + 1)]
        assert blocks == list(range(9))
        assert all(f <= l for _, f, l in split.stages)
