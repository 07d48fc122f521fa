"""The MIP's plan against exhaustive search on small instances (same objective value)."""

from __future__ import annotations

import random

import pytest

from llc.compiler.costmodel import (CostTables, brute_force, evaluate, even_split,
                           memory_proportional_split)
from llc.compiler.passes.partition import solve
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


def assert_matches_brute_force(t: CostTables, objective: str, stages: int | None = None,
                               rel: float = 1e-5) -> None:
    """The MIP's plan is feasible and as good as the best of every contiguous split."""
    split, status, _ = solve(t)
    best, best_val = brute_force(t)
    if best is None:
        assert split is None, "MIP found a plan where none fits"
        return
    assert split is not None, status
    got = evaluate(t, split)
    assert got.feasible
    assert stages is None or len(split.stages) == stages
    assert got.objective(objective) == pytest.approx(best_val, rel=rel, abs=1e-6)


@pytest.mark.parametrize("objective", ["latency", "throughput"])
@pytest.mark.parametrize("seed", range(8))
def test_mip_matches_brute_force(objective, seed):
    rng = random.Random(seed * 7 + (objective == "throughput"))
    t = random_tables(rng, nb=rng.randint(3, 7), nd=rng.randint(1, 4), objective=objective)
    assert_matches_brute_force(t, objective)


def test_fixed_number_of_stages():
    rng = random.Random(3)
    t = random_tables(rng, nb=6, nd=4, objective="latency", stages=3)
    t = CostTables(**{**t.__dict__, "capacity": tuple(1e12 for _ in t.capacity)})
    split, _, _ = solve(t)
    best, best_val = brute_force(t)
    assert len(split.stages) == 3 == len(best.stages)
    assert evaluate(t, split).objective("latency") == pytest.approx(best_val, rel=1e-5)


def model_like_tables(rng: random.Random, nb: int, nd: int, objective: str, stages=None) -> CostTables:
    """Like a real decoder: an embedding (memory, no compute), nb - 2 identical layers
    (identical costs and cut bytes, the symmetric case), a heavy head; often uniform links."""
    t = random_tables(rng, nb, nd, objective, stages)
    layer, head = t.t_decode[1], tuple(3 * x for x in t.t_decode[-1])
    big, small = rng.randint(120, 300) * MB, rng.randint(20, 90) * MB
    fields = dict(
        t_decode=((0.0,) * nd,) + (layer,) * (nb - 2) + (head,),
        mem=(big,) + (small,) * (nb - 2) + (big,),
        workspace=(MB,) * (nb - 1) + (rng.randint(5, 40) * MB,),
        cut_decode=(6408,) + (4864,) * (nb - 3) + (2304, 0),
    )
    if rng.random() < 0.5:  # one network for every link, as most profiles have
        fields["latency_ms"] = tuple(tuple(0.0 if a == b else 6.0 for b in range(nd)) for a in range(nd))
        fields["ms_per_byte"] = tuple(tuple(0.0 if a == b else 1e-4 for b in range(nd)) for a in range(nd))
    return CostTables(**{**t.__dict__, **fields})


@pytest.mark.parametrize("objective", ["latency", "throughput"])
@pytest.mark.parametrize("stages", [None, "all", "some"])
@pytest.mark.parametrize("seed", range(6))
def test_model_like_instances_match_brute_force(objective, stages, seed):
    rng = random.Random(seed * 31 + len(objective) + 7 * len(stages or ""))
    nb, nd = rng.randint(5, 9), rng.randint(2, 4)
    k = {None: None, "all": nd, "some": rng.randint(1, nd)}[stages]
    t = model_like_tables(rng, nb, nd, objective, k)
    assert_matches_brute_force(t, objective, stages=k, rel=1e-6)


@pytest.mark.parametrize("objective", ["latency", "throughput"])
def test_more_stages_than_devices_or_blocks_is_infeasible(objective):
    rng = random.Random(11)
    t = random_tables(rng, nb=3, nd=4, objective=objective, stages=4)  # 4 stages, 3 blocks
    t = CostTables(**{**t.__dict__, "capacity": tuple(1e12 for _ in t.capacity)})
    assert solve(t)[0] is None
    t = CostTables(**{**t.__dict__, "stages": 5})  # 5 stages, 4 devices
    assert solve(t)[0] is None


def test_throughput_takes_a_slightly_bigger_bottleneck_for_much_less_latency():
    # one block per device; d0 -> d1 pays 40 ms for the cut bytes, d1 -> d0 pays none
    # but 1e-4 ms more latency: d1 first has the bigger bottleneck (by 1e-4) and 40 ms
    # less latency (the 8-byte return costs nothing per byte), and eps * 40 > 1e-4
    t = random_tables(random.Random(0), nb=2, nd=2, objective="throughput")
    cut = t.cut_decode[0]
    t = CostTables(**{**t.__dict__, "t_decode": ((1.0, 1.0), (1.0, 1.0)),
                      "mem": (100 * MB, 100 * MB), "workspace": (MB, MB),
                      "capacity": (150 * MB, 150 * MB), "latency_ms": ((0.0, 0.5), (40.5001, 0.0)),
                      "ms_per_byte": ((0.0, 40.0 / cut), (0.0, 0.0))})
    split, _, _ = solve(t)
    assert split.stages == ((1, 0, 0), (0, 1, 1))
    assert evaluate(t, split).objective("throughput") == pytest.approx(brute_force(t)[1], rel=1e-9)


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


def test_batching_is_predicted_from_what_a_step_reads():
    """A step of g rows reads the weights once: g x compute + reading. Groups of ceil(R / stages)
    go round the pipeline; one stage with 4 requests runs them as one batch."""
    from llc.compiler.costmodel import Split, batched_tokens_per_s

    t = random_tables(random.Random(1), nb=2, nd=2, objective="throughput")
    zero = ((0.0, 0.0), (0.0, 0.0))
    t = CostTables(**{**t.__dict__, "t_decode": ((10.0, 10.0), (10.0, 10.0)), "latency_ms": zero,
                      "ms_per_byte": zero, "t_decode_read": ((6.0, 6.0), (6.0, 6.0))})
    one = Split(((0, 0, 1),))
    assert batched_tokens_per_s(t, one, 1, 4) == (pytest.approx(1000 / 20), 1)
    assert batched_tokens_per_s(t, one, 4, 4) == (pytest.approx(1000 * 4 / (4 * 8 + 12)), 4)
    assert batched_tokens_per_s(t, one, 4, 1) == (pytest.approx(1000 * 4 / 80), 1)  # batching off
    two = Split(((0, 0, 0), (1, 1, 1)))  # groups of 2: each stage 2 x 4 + 6 = 14 ms, twice per cycle
    assert batched_tokens_per_s(t, two, 4, 4) == (pytest.approx(1000 * 4 / 28), 2)
    folded = CostTables(**{**t.__dict__, "t_decode_read": ()})  # no read bandwidth: no gain predicted
    assert batched_tokens_per_s(folded, one, 4, 4)[0] == pytest.approx(1000 * 4 / 80)


def test_throughput_with_few_requests_weighs_the_round_trip():
    """4 requests in flight on a fast device and a slow one: over slow links the fast one alone makes
    more tokens/s than the least-bottleneck split (every token waits the round trip); over fast links
    the split wins. Either way the plan is the candidate with the most predicted tokens/s."""
    from llc.compiler.costmodel import Split, batched_tokens_per_s
    from llc.compiler.passes.partition import most_tokens

    t = random_tables(random.Random(2), nb=4, nd=2, objective="throughput")
    big = (1e12, 1e12)
    t = CostTables(**{**t.__dict__, "capacity": big, "t_decode": ((4.0, 8.0),) * 4,
                      "t_decode_read": ((2.0, 4.0),) * 4, "ms_per_byte": ((0.0, 0.0), (0.0, 0.0))})
    first = solve(t)[0]
    assert len(first.stages) == 2  # the bottleneck alone splits
    for hop, stages in ((20.0, 1), (0.1, 2)):
        tt = CostTables(**{**t.__dict__, "latency_ms": ((0.0, hop), (hop, 0.0))})
        best = most_tokens(tt, solve(tt)[0], 4, 4, 10.0)
        assert len(best.stages) == stages
        alone = batched_tokens_per_s(tt, Split(((0, 0, 3),)), 4, 4)[0]
        assert batched_tokens_per_s(tt, best, 4, 4)[0] >= alone
