"""Load balancing: when a device turns slower than the plan assumed, move layers off it.

Phones throttle when hot and share their CPU with other apps, so a plan made
from `llc profile`'s numbers goes stale while it runs. Every ``every_s`` seconds
the coordinator asks each device for its counters (the ``stats`` message without
its event list: compute ms and decode steps so far). Over the last window of at
least ``window_steps`` decode steps, each stage's measured ms per step is divided
by the plan's prediction for it; the slowest stage, if its ratio is ``threshold``
times the median of the other stages', or any stage at a ``threshold``-th of
the median of all, in two windows running, is slower (faster) than the plan
thinks *relative to the others*: a phone that throttles, or one that has
cooled down again. A cost model that is off for every stage alike moves nothing.
Then:

1. the profile is scaled by what was measured: a device k times slower than
   the others' median relative to the plan gets k times less compute rate and
   read bandwidth (k times more, if faster); the others stay near as they were;
2. the same compiler (the MIP and the cost model) plans the model again with it,
   in a thread, while the devices go on with the old plan;
3. if the new plan beats the current one under the measured speeds by ``min_gain``
   (in what the plan minimises: its slowest stage, or for the latency objective
   the sum of its stages), the devices restart with the new bundles and every request
   resumes where it was, as after a failover: its KV cache is rebuilt by one
   prefill of its prompt and tokens, so greedy output stays the same.

Hysteresis: a move waits ``min_interval_s`` after the start of the run or the
last move (or the last plan that would not have gained enough), so a blip does
not move anything; and a move that hinges on the device the last move
relieved (layers back onto it, or more off it) needs ``reversal_gain``, so two
moves do not chase each other. Every move is
logged with its reason and the gain the plan expects; the re-planned builds
live in ``BUILD/balance/<n>/``.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from llc.bundle import schema
from llc.errors import LlcError
from llc.profile import QUANTIZED
from llc.runtime.failover import replan


def relative(ratio: dict[str, float], off: str) -> dict[str, float]:
    """Each device's measured/predicted pace against the median of the devices other than ``off``.

    The others are the yardstick: what they share is the cost model's own bias,
    and dividing it out leaves them near 1 and ``off`` at how much it changed.
    (Against the median of all, two devices would show a 4x slow-down as 1.6x,
    and the other device as 2.5x *faster*: the re-plan would then expect too
    much of it, and the next window would move the layers back.)
    """
    base = statistics.median(r for d, r in ratio.items() if d != off)
    return {d: r / base for d, r in ratio.items()}


def blocks_of(plan: schema.PlanDoc, device: str) -> int:
    """How many blocks ``device`` runs in ``plan`` (0 if none)."""
    return sum(s.blocks[1] - s.blocks[0] + 1 for s in plan.stages if s.device == device)


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
    reversal_gain: float = 2.0  # for a move that hinges on the device the last move relieved
    min_interval_s: float = 10.0
    window_steps: int = 16
    say: Callable[[str], None] | None = None
    started: float = field(default_factory=time.monotonic)
    windows: list[dict] = field(default_factory=list)  # what each window measured: `llc run --json` shows it

    def __post_init__(self):
        self.pending: Replan | None = None
        self.relieved: str | None = None  # the device the last move took layers off, for being slow
        self.restart(self.build)

    def restart(self, build: Path) -> None:
        """Watch ``build`` from now on (after a move or a failover): fresh counters, fresh interval."""
        self.finish()  # a re-plan still compiling (a failover came first) must not race the next one's folder
        plan = schema.read(build, schema.PLAN)
        self.build = build
        self.predicted = {s.device: s.compute_ms_decode for s in plan.stages}
        # what the plan minimises: one request's time through every stage, or the slowest stage
        self.cost = sum if plan.objective == "latency" else max
        self.since = time.monotonic()
        self.base: dict[str, tuple[float, int]] | None = None
        self.suspect: str | None = None
        self.pending: Replan | None = None

    def __call__(self, stats: dict[str, dict]) -> None:
        if self.pending is not None:  # a re-plan compiles beside the run: its verdict when it is done
            if self.pending.thread.is_alive():
                return
            self.decide(self.pending)
            return
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
        self.windows.append({"at_s": round(time.monotonic() - self.started, 2), "build": str(self.build),
                             "ms_per_step": {d: round(v, 3) for d, v in ms.items()},
                             "predicted_ms_per_step": {d: round(self.predicted[d], 3) for d in ms}})
        if min(ratio.values()) <= 0:  # a stage that measured no time: nothing to go by
            return
        # A slower device matters when it is the pipeline's slowest stage (a stage with little to do
        # measures its fixed per-step costs, which the plan does not predict); a faster one, anywhere.
        # A faster one is measured against the median of all: against the others', a slow device among
        # them would make a normal one look fast, and the two suspects would take turns, moving nothing.
        slowest, fastest = max(ms, key=ms.get), min(ratio, key=ratio.get)
        off = (slowest if relative(ratio, slowest)[slowest] >= self.threshold
               else fastest if statistics.median(ratio.values()) / ratio[fastest] >= self.threshold else None)
        if off is None:
            self.suspect = None
            return
        if self.suspect != off:  # once is a blip; twice running is a changed device
            self.suspect = off
            return
        if time.monotonic() - self.since < self.min_interval_s:
            return
        self.move(off, relative(ratio, off), ms)

    def finish(self) -> None:
        """The run is over: let a re-plan under way complete (emit never leaves half a build)."""
        if self.pending is not None and self.pending.thread is not None:
            self.pending.thread.join()
        self.pending = None

    def move(self, off: str, rel: dict[str, float], ms: dict[str, float]) -> None:
        """Plan again with the measured speeds, in a thread: the devices go on meanwhile."""

        def scale(doc: dict) -> None:
            for d in doc["devices"]:
                k = rel.get(d["name"], 1.0)
                for rates in [d] + [d[p] for p in QUANTIZED if isinstance(d.get(p), dict)]:
                    for key in ("gflops", "gflops_prefill", "memory_gbps"):
                        if rates.get(key):
                            rates[key] = round(float(rates[key]) / k, 4)

        how = f"{rel[off]:.1f}x slower" if rel[off] > 1 else f"{1 / rel[off]:.1f}x faster"
        job = Replan(f"{off} ran {how} than the plan assumed, relative to the others ({ms[off]:.1f} ms/step)",
                     rel, ms, self.root / "balance" / str(len(self.moves) + 1), off, rel[off] > 1)

        # As many stages as now: the move shifts layers between the devices that run; the judgement below
        # (the slowest stage, or every stage added up) is the one the plan made with that many stages.
        stages = len(self.predicted)

        def work() -> None:
            try:
                job.out = replan(self.build, job.out, scale, stages)
            except LlcError as e:
                job.error = e.message
            job.seconds = time.monotonic() - job.t0

        job.thread = threading.Thread(target=work, name="llc-replan", daemon=True)
        job.thread.start()
        self.pending = job

    def decide(self, job: "Replan") -> None:
        """Move (raise Rebalance) if the new plan gains ``min_gain`` under the measured speeds, else stay."""
        self.pending = None
        current = self.cost(self.predicted[d] * job.rel[d] for d in job.rel)  # measured speeds, plan's units
        gain, need, why = 1.0, self.min_gain, ""
        if job.error is None:
            plan = schema.read(job.out, schema.PLAN)
            new = self.cost(s.compute_ms_decode for s in plan.stages)
            gain = current / new if new > 0 else 1.0
            # A move that hinges on the device the last move relieved needs a clearly better plan: it was
            # found slow on a big stage, and the small one it keeps runs short steps, which fixed costs
            # (the plan predicts none) and bursts (a throttled CPU runs a short one at full speed)
            # dominate, so it looks slower or faster than it is. Without this, layers went back onto
            # it on the lab, or all came off it.
            r = self.relieved
            if r is not None and (job.off == r or blocks_of(plan, r) > blocks_of(schema.read(self.build,
                                                                                               schema.PLAN), r)):
                need, why = self.reversal_gain, f" for {r}, which the last move relieved,"
        if gain < need:
            if self.say:
                how = f"the re-plan failed ({job.error})" if job.error else \
                    f"a new plan{why} would gain only {gain:.2f}x"
                self.say(f"balance: {job.reason}; {how}: staying")
            self.since, self.suspect = time.monotonic(), None
            return
        move = Move(job.reason, {d: round(v, 2) for d, v in job.ms.items()}, round(gain, 3), job.seconds,
                    time.monotonic() - self.started)
        self.moves.append(move)
        self.relieved = job.off if job.slower else None
        raise Rebalance(job.out, move)


@dataclass
class Replan:
    """A re-plan under way in a thread, and what it found."""

    reason: str
    rel: dict[str, float]
    ms: dict[str, float]
    out: Path
    off: str  # the device found off the plan
    slower: bool  # than the plan (else faster)
    t0: float = field(default_factory=time.monotonic)
    seconds: float = 0.0
    error: str | None = None
    thread: threading.Thread | None = None
