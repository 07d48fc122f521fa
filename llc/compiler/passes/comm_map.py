"""comm-map: every tensor that crosses devices, from its producer to its readers.

before: a plan (stages of consecutive blocks)
after:  ``state.comm``: one edge per tensor read on a stage other than the one
        that makes it, with dtype, shape and bytes per token for decode and
        for the whole prompt in prefill.

Tensors go directly from the stage that makes them to every stage that reads
them (a rotary table made on stage 0 and read on stage 3 is sent 0 -> 3, not
relayed). Graph inputs other than the KV cache are made by the head. KV-cache
inputs and present outputs never appear here: coarsen only cuts where a layer's
cache stays on one side, and this pass checks it. Constants are never sent;
emit copies them into each stage that reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from llc.compiler.state import CommEdge, CompileState, node_inputs, tensor_nbytes

KIND = {"stream": "activation", "side": "side", "shape": "shape"}


def stage_of_nodes(state: CompileState) -> list[int]:
    """Stage index of every node, from the plan's block ranges."""
    out = [0] * len(state.model.graph.node)
    for s in state.plan.stages:
        for b in range(s.first_block, s.last_block + 1):
            for i in state.blocks[b].nodes:
                out[i] = s.index
    return out


@dataclass(frozen=True)
class CommMap:
    name: ClassVar[str] = "comm-map"

    def run(self, state: CompileState) -> CompileState:
        g = state.model.graph
        sig = state.signature
        stage = stage_of_nodes(state)
        producer: dict[str, int] = {}
        for inp in g.input:
            if inp.name in sig.input_roles and inp.name not in sig.kv_inputs:
                producer[inp.name] = 0
        for i, n in enumerate(g.node):
            for o in n.output:
                if o:
                    producer[o] = stage[i]
        readers: dict[str, set[int]] = {}
        for i, n in enumerate(g.node):
            for t in node_inputs(n):
                readers.setdefault(t, set()).add(stage[i])
        for name in sig.kv_inputs:
            if len(readers.get(name, ())) > 1:
                raise AssertionError(f"KV input {name} read on stages {sorted(readers[name])}")
        pre, dec = state.shapes["prefill"], state.shapes["decode"]
        edges = []
        for t, p in producer.items():
            cls = state.classes.get(t, "const")
            others = sorted(readers.get(t, set()) - {p})
            if not others or cls == "const":
                continue
            info = state.tensors.get(t) or dec.get(t)
            edges.append(CommEdge(
                tensor=t,
                kind="graph_input" if t in sig.input_roles else KIND[cls],
                dtype=(info or dec[t]).dtype,
                shape=info.shape if info else None,
                producer_stage=p,
                consumer_stages=tuple(others),
                bytes_decode=tensor_nbytes(dec.get(t)),
                bytes_prefill=tensor_nbytes(pre.get(t)),
            ))
        state.comm = sorted(edges, key=lambda e: (e.producer_stage, e.consumer_stages, e.tensor))
        return state


def link_bytes(state: CompileState) -> dict[tuple[int, int], tuple[int, int]]:
    """(from stage, to stage) -> (decode bytes per token, prefill bytes), for reports."""
    out: dict[tuple[int, int], tuple[int, int]] = {}
    for e in state.comm:
        for c in e.consumer_stages:
            d, p = out.get((e.producer_stage, c), (0, 0))
            out[(e.producer_stage, c)] = (d + e.bytes_decode, p + e.bytes_prefill)
    return out
