"""Every stage of a build in this process, talking the real protocol through in-memory queues.

The device code (llc.runtime.device.stage) runs unchanged: each stage reads its
own manifest, checks its files, builds its inputs, keeps its KV caches, and
sends exactly what its manifest's ``sends`` say, as packed frames that the
receiving stage unpacks and checks. Only the transport differs from phones, so
``llc verify``, the benchmarks and the tests see what the devices would do,
including a comm map that forgets or garbles a tensor.

Scheduling is deterministic and drains the pipeline before the head starts new
work, so requests sent together run their decode steps as one batch at every
step (the most a device could ever batch): ``teacher_force_many`` is how
``llc verify`` checks that batched rows equal the rows run alone.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llc.bundle import schema
from llc.errors import LlcError
from llc.runtime.device import document, protocol
from llc.runtime.device.manifest import verify_files
from llc.runtime.device.protocol import COORDINATOR, ERROR, REQUEST, TOKEN
from llc.runtime.device.sampling import SamplingParams
from llc.runtime.device.stage import Job, Stage, session_for


class SplitRunError(LlcError):
    """The stages did not produce what they should (an error reply, or a step that never ran)."""


@dataclass
class Trace:
    """What every stage produced at every step of one request: step -> output name -> value.

    From a batch, a request's row of each output (a batch's presents keep their padding).
    """

    steps: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)


@dataclass
class Recorder:
    traces: dict[int, Trace] = field(default_factory=dict)  # rid -> its trace

    def record(self, job: Job, outputs: dict[str, np.ndarray]) -> None:
        n = len(job.rows)
        for i, (rid, step) in enumerate(job.rows):
            if rid in self.traces:
                self.traces[rid].steps.setdefault(step, {}).update(
                    {k: v if n == 1 else v[i:i + 1] for k, v in outputs.items() if n == 1 or v.shape[:1] == (n,)})


class SplitRunner:
    def __init__(self, build_dir: Path, threads: int | None = None):
        self.build = schema.open_build(Path(build_dir))
        self.queue: deque[tuple[str, list[bytes]]] = deque()
        self.stages: dict[str, Stage] = {}
        for name in self.build.devices:
            folder = self.build.dir / "devices" / name
            m = self.build.manifest(name)
            try:
                verify_files(folder, m.files)
            except document.DocumentError as e:
                raise LlcError(folder, str(e)) from None
            if threads is not None:
                m = schema.Manifest(**{**m.__dict__, "threads": threads})
            self.stages[name] = Stage(folder, m, lambda dest, frames: self.queue.append((dest, frames)),
                                      session=session_for(folder, m))
        self.head = self.stages[self.build.devices[0]]
        self.inbox: list[protocol.Message] = []  # what the devices sent the coordinator
        self.next_rid = 1

    def _pump(self) -> None:
        """Deliver messages and run ready steps until nothing moves: always the last stage that can."""
        order = list(reversed(self.stages.values()))
        while True:
            while self.queue:
                dest, frames = self.queue.popleft()
                if dest == COORDINATOR:
                    self.inbox.append(protocol.unpack(frames))
                else:
                    self.stages[dest].handle(frames)
            for stage in order:
                job = stage.next_job()
                if job is not None:
                    stage.complete(stage.run(job))
                    break
            else:
                if not self.queue:
                    return

    def _errors(self) -> None:
        errors = [m for m in self.inbox if m.type == ERROR]
        if errors:
            raise SplitRunError(None, f"device {errors[0]['device']!r}: {errors[0]['message']}")

    def _stuck(self, rid: int) -> None:
        """A request that stopped moving: name the stage and the inputs it never got."""
        for name, stage in self.stages.items():
            for unit in stage.units.values():
                missing = sorted(stage.awaited - set(unit.tensors))
                step = dict(unit.rows).get(rid)
                if missing and step is not None:
                    raise SplitRunError(None, f"stage {stage.m.stage} ({name}) never received "
                                              f"{', '.join(missing[:3])} for step {step}: the comm map "
                                              f"does not deliver {'it' if len(missing) == 1 else 'them'}")
        raise SplitRunError(None, f"request {rid} stopped before its last token")

    def teacher_force(self, prompt: list[int], continuation: list[int]) -> Trace:
        """Prefill ``prompt``, then feed ``continuation`` one token per step, whatever was sampled.

        Returns every output of every stage at every step (0 = prefill).
        """
        return self.teacher_force_many([prompt], [continuation])[0]

    def teacher_force_many(self, prompts: list[list[int]], continuations: list[list[int]]) -> list[Trace]:
        """Several requests at once: decode steps the head finds ready together run as one batch."""
        rids = list(range(self.next_rid, self.next_rid + len(prompts)))
        self.next_rid += len(prompts)
        recorder = Recorder({rid: Trace() for rid in rids})
        for stage in self.stages.values():
            stage.on_outputs = recorder.record
        for rid, prompt, continuation in zip(rids, prompts, continuations):
            self.head.forced[rid] = deque(continuation)
            self.queue.append((self.head.name, protocol.pack(
                REQUEST, rid=rid, prompt=list(prompt),
                params=SamplingParams(max_new_tokens=len(continuation) + 1).to_dict())))
        self._pump()
        self._errors()
        for rid, continuation in zip(rids, continuations):
            if len(recorder.traces[rid].steps) != len(continuation) + 1:
                self._stuck(rid)
        return [recorder.traces[rid] for rid in rids]

    def batched_steps(self) -> int:
        """Decode runs at the head that held more than one request."""
        return sum(1 for rid, step, start, end, slot, rows in self.head.events if step > 0 and rows > 1 and slot == 0)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        """Every prompt at once through the pipeline; the tokens each one generated."""
        rids = list(range(self.next_rid, self.next_rid + len(prompts)))
        self.next_rid += len(prompts)
        for rid, prompt in zip(rids, prompts):
            self.queue.append((self.head.name, protocol.pack(REQUEST, rid=rid, prompt=list(prompt),
                                                             params=params.to_dict())))
        self._pump()
        self._errors()
        tokens: dict[int, list[int]] = {rid: [] for rid in rids}
        done = set()
        for m in self.inbox:
            if m.type == TOKEN and m["rid"] in tokens:
                tokens[m["rid"]].append(m["token"])
                if m["done"]:
                    done.add(m["rid"])
        for rid in rids:
            if rid not in done:
                self._stuck(rid)
        return [tokens[rid] for rid in rids]
