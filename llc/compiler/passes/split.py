"""split: which nodes make up each stage's segment, and what goes in and out of it.

before: a plan and a comm map
after:  ``state.segments``: per stage the node indices of its segment (its own
        nodes, plus the constant-only nodes from elsewhere that they read:
        constants are copied, never sent) and the segment's inputs and outputs.

A segment's inputs are what its nodes read and do not make (graph inputs, the
stage's KV caches, tensors earlier stages send); its outputs are the graph
outputs it makes plus every tensor the comm map sends from it. Names stay the
original ones, so the pieces fit together by name. emit writes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from llc.compiler.passes.comm_map import stage_of_nodes
from llc.compiler.segment import const_closure, segment_io
from llc.compiler.state import CompileState, SegmentPlan


@dataclass(frozen=True)
class Split:
    name: ClassVar[str] = "split"

    def run(self, state: CompileState) -> CompileState:
        g = state.model.graph
        stage = stage_of_nodes(state)
        const = {t for t, c in state.classes.items() if c == "const"}
        segments = []
        for s in state.plan.stages:
            own = [i for i in range(len(g.node)) if stage[i] == s.index]
            nodes = tuple(sorted(set(own) | set(const_closure(state.model, own, const))))
            sent = {e.tensor for e in state.comm if e.producer_stage == s.index}
            io = segment_io(state.model, [g.node[i] for i in nodes], sent)
            segments.append(SegmentPlan(s.index, nodes, io.inputs, io.outputs))
        state.segments = segments
        return state
