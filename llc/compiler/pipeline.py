"""A small pass manager: run passes in order, time them, dump state after any.

A pass is a frozen dataclass with ``name: ClassVar[str]`` and one method
``run(state) -> state``; options are its fields. An unexpected exception is
re-raised as ``error in pass X after [a, b]`` so a bug report says where;
:class:`LlcError` (bad user input) passes through unchanged.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Callable, ClassVar, Protocol

from llc.errors import LlcError
from llc.compiler.state import CompileState


class Pass(Protocol):
    name: ClassVar[str]

    def run(self, state: CompileState) -> CompileState: ...


class PassError(RuntimeError):
    """A bug inside a pass (not the user's input): names the pass and the passes before it."""

    def __init__(self, pass_name: str, done: list[str], error: BaseException):
        self.pass_name = pass_name
        self.done = list(done)
        super().__init__(f"error in pass {pass_name} after {done}: {type(error).__name__}: {error}")


@dataclass
class PassTiming:
    name: str
    seconds: float


@dataclass
class PassManager:
    passes: list[Pass]
    dump_after: set[str] = field(default_factory=set)
    dump_dir: Path | None = None
    progress: Callable[[str], None] | None = None
    timings: list[PassTiming] = field(default_factory=list)

    def run(self, state: CompileState, start_after: str | None = None, stop_after: str | None = None
            ) -> CompileState:
        """Run the passes in order (those after ``start_after``, up to and including ``stop_after``)."""
        names = [p.name for p in self.passes]
        first = names.index(start_after) + 1 if start_after else 0
        last = names.index(stop_after) + 1 if stop_after else len(names)
        done: list[str] = names[:first]
        for i, p in list(enumerate(self.passes))[first:last]:
            if self.progress:
                self.progress(f"[{i + 1}/{len(self.passes)}] {p.name} ...")
            t0 = time.perf_counter()
            try:
                state = p.run(state)
            except (LlcError, KeyboardInterrupt):
                raise
            except Exception as e:  # a bug, not bad input: say where it happened
                raise PassError(p.name, done, e) from e
            dt = time.perf_counter() - t0
            self.timings.append(PassTiming(p.name, dt))
            if self.progress:
                self.progress(f"[{i + 1}/{len(self.passes)}] {p.name} done in {dt:.2f}s")
            if p.name in self.dump_after or "all" in self.dump_after:
                self._dump(p.name, state)
            done.append(p.name)
        return state

    def _dump(self, name: str, state: CompileState) -> None:
        """Write the analysis fields of the state as JSON (the graph itself is not dumped)."""
        target = (self.dump_dir or Path(".")) / f"state-after-{name}.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        data = {k: _plain(getattr(state, k)) for k in ("signature", "blocks", "plan", "comm", "notes")}
        data["nodes"] = len(state.model.graph.node)
        target.write_text(json.dumps(data, indent=1, default=str))
        print(f"llc: state after {name} -> {target}", file=sys.stderr)


def _plain(x):
    if is_dataclass(x):
        return asdict(x)
    if isinstance(x, list):
        return [_plain(v) for v in x]
    return x
