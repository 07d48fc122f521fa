"""Load balancing: when a device turns slower than the plan assumed, move layers off it.

Phones throttle when hot and share their CPU with other apps, so a plan made
from `llc profile`'s numbers goes stale while it runs. Every ``every_s`` seconds
the coordinator asks each device for its counters (the ``stats`` message without
its event list: compute ms and decode steps so far). Over the last window of at
least ``window_steps`` decode steps, each stage's measured ms per step is divided
by the plan's prediction for it; the slowest stage, if its ratio is ``threshold``
times the median stage's, or any stage at a ``threshold``-th of it, in two
windows running, is slower (faster) than the plan thinks *relative to the
others*: a phone that throttles, or one that has cooled down again. A cost
model that is off for every stage alike moves nothing.
Then:

1. the profile is scaled by what was measured: a device k times slower than
   the median relative to the plan gets k times less compute rate and read
   bandwidth (k times more, if faster);
2. the same compiler (the MIP and the cost model) plans the model again with it;
3. if the new plan beats the current one under the measured speeds by ``min_gain``
   (in what the plan minimises: its slowest stage, or for the latency objective
   the sum of its stages), the devices restart with the new bundles and every request
   resumes where it was, as after a failover: its KV cache is rebuilt by one
   prefill of its prompt and tokens, so greedy output stays the same.

Hysteresis: a move waits ``min_interval_s`` after the start of the run or the
last move (or the last plan that would not have gained enough), so a blip does
not move anything and two moves never chase each other. Every move is logged
with its reason and the gain the plan expects; the re-planned builds live in
``BUILD/balance/<n>/``.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from llc.bundle import schema
from llc.runtime.failover import replan


class Rebalance(Exception):
    """Raised from the coordinator's watch: restart with ``build`` and resume."""

    def __init__(self, build: Path, move: "Move"):
        super().__init__(move.reason)
        self.build, self.move = build, move


@dataclass
class Move:
    """One re-plan the balancer made: why, and what it expected."""

    reason: str
    slow_ms_per_step: dict[str, float]  # measured, per device, in the window that decided
    expected_gain: float  # current plan / new plan, both under the measured speeds
    replan_s: float
    at_s: float = 0.0  # seconds into the run
    lost_s: float | None = None  # from the decision to the first token after the restart

    def line(self) -> str:
        return f"{self.reason}: re-planned in {self.replan_s:.1f} s, expecting {self.expected_gain:.2f}x"


@dataclass
class Balancer:
    """The coordinator's watch (called with every device's ``stats`` reply); raises Rebalance to move."""

    build: Path
    root: Path  # the build the user gave: re-plans go to root/balance/<n>
    moves: list[Move] = field(default_factory=list)
    threshold: float = 1.5
    min_gain: float = 1.2
    min_interval_s: float = 10.0
    window_steps: int = 16
    say: Callable[[str], None] | None = None
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self):
        self.restart(self.build)

    def restart(self, build: Path) -> None:
        """Watch ``build`` from now on (after a move or a failover): fresh counters, fresh interval."""
        plan = schema.read(build, schema.PLAN)
        self.build = build
        self.predicted = {s.device: s.compute_ms_decode for s in plan.stages}
        # what the plan minimises: one request's time through every stage, or the slowest stage
        self.cost = sum if plan.objective == "latency" else max
        self.since = time.monotonic()
        self.base: dict[str, tuple[float, int]] | None = None
        self.suspect: str | None = None

    def __call__(self, stats: dict[str, dict]) -> None:
        snap = {d: (float(m["compute_ms"]["decode"]), int(m["steps"]["decode"])) for d, m in stats.items()}
        if self.base is None or set(snap) != set(self.base):
            self.base = snap
            return
        steps = {d: snap[d][1] - self.base[d][1] for d in snap}
        if min(steps.values()) < self.window_steps:
            return
        ms = {d: (snap[d][0] - self.base[d][0]) / steps[d] for d in snap}
        self.base = snap
        if len(ms) < 2 or any(self.predicted.get(d, 0) <= 0 for d in ms):
            return
        ratio = {d: ms[d] / self.predicted[d] for d in ms}
        median = statistics.median(ratio.values())
        rel = {d: r / median for d, r in ratio.items()}
        # A slower device matters when it is the pipeline's slowest stage (a stage with little to do
        # measures its fixed per-step costs, which the plan does not predict); a faster one, anywhere.
        slowest, fastest = max(ms, key=ms.get), min(rel, key=rel.get)
        off = slowest if rel[slowest] >= self.threshold else fastest if 1 / rel[fastest] >= self.threshold else None
        if off is None:
            self.suspect = None
            return
        if self.suspect != off:  # once is a blip; twice running is a changed device
            self.suspect = off
            return
        if time.monotonic() - self.since < self.min_interval_s:
            return
        self.move(off, rel, ms)

    def move(self, off: str, rel: dict[str, float], ms: dict[str, float]) -> None:
        t0 = time.monotonic()
        current = self.cost(self.predicted[d] * rel[d] for d in rel)  # under the measured speeds, plan's units

        def scale(doc: dict) -> None:
            for d in doc["devices"]:
                k = rel.get(d["name"], 1.0)
                for key in ("gflops", "gflops_prefill", "memory_gbps"):
                    if d.get(key):
                        d[key] = round(float(d[key]) / k, 4)

        out = replan(self.build, self.root / "balance" / str(len(self.moves) + 1), scale)
        plan = schema.read(out, schema.PLAN)
        new = self.cost(s.compute_ms_decode for s in plan.stages)
        gain = current / new if new > 0 else 1.0
        how = f"{rel[off]:.1f}x slower" if rel[off] > 1 else f"{1 / rel[off]:.1f}x faster"
        reason = f"{off} ran {how} than the plan assumed, relative to the others ({ms[off]:.1f} ms/step)"
        if gain < self.min_gain:
            if self.say:
                self.say(f"balance: {reason}; a new plan would gain only {gain:.2f}x: staying")
            self.since, self.suspect = time.monotonic(), None
            return
        move = Move(reason, {d: round(v, 2) for d, v in ms.items()}, round(gain, 3), time.monotonic() - t0,
                    time.monotonic() - self.started)
        self.moves.append(move)
        raise Rebalance(out, move)
