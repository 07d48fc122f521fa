"""coarsen: group nodes into ordered blocks at legal cut points.

before: a topologically ordered node list with costs
after:  ``state.blocks``: consecutive node ranges, each a layer (or finer block),
        plus the embedding before the first layer and the head after the last.

A cut between node i-1 and node i is legal when the *stream* tensors that
cross it all come from one node (the residual stream in most exports; the
normed hidden state and the running sum of one fused SkipSimplifiedLayer-
Normalization in onnxruntime-genai's) and no KV-cache input is read on both sides.
Stream tensors are those computed from the token ids or the KV cache. Tensors
that only depend on the other inputs (attention mask, positions: rotary tables,
causal masks) or on shapes are cheap side tensors; they may cross any cut and
are routed by the comm map straight to the stages that read them. This finds
transformer layers from their data flow, whatever the exporter named the nodes.

Layers are then read off the blocks: a layer starts at each block that reads a
KV-cache input and takes the blocks after it (the MLP half); what follows the
last layer beyond the first layer's pattern is the head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx

from llc.errors import LlcError
from llc.compiler.passes.annotate_cost import LOOKUPS
from llc.compiler.state import Block, CompileState, TensorInfo, consumers, node_inputs, tensor_nbytes

SHAPE_OPS = {"Shape", "Size"}
RESHAPES = {"Reshape", "Identity", "Squeeze", "Unsqueeze", "Flatten"}  # change a view, not the values


def classify_tensors(model: onnx.ModelProto, roles: dict[str, str]) -> dict[str, str]:
    """stream | side | shape | const for every tensor (see module docstring)."""
    g = model.graph
    cls: dict[str, str] = {t.name: "const" for t in g.initializer}
    for inp in g.input:
        if inp.name in roles:
            cls[inp.name] = "stream" if roles[inp.name] in ("input_ids", "kv") else "side"
    rank = {"const": 0, "shape": 1, "side": 2, "stream": 3}
    for n in g.node:
        ins = [cls.get(i, "const") for i in node_inputs(n)]
        if n.op_type in SHAPE_OPS:
            c = "shape" if any(x != "const" for x in ins) else "const"
        else:
            c = max(ins, key=rank.__getitem__, default="const")
        for o in n.output:
            if o:
                cls[o] = c
    return cls


def legal_cuts(model: onnx.ModelProto, cls: dict[str, str], kv_inputs: set[str]) -> list[int]:
    """Positions i (cut before node i) where the stream tensors crossing all come from one node
    and no KV input straddles."""
    g = model.graph
    n = len(g.node)
    cons = consumers(g)
    producers = np.zeros(n + 2, dtype=np.int64)  # nodes with a stream output read after the cut
    kv_block = np.zeros(n + 2, dtype=np.int64)
    for i, node in enumerate(g.node):
        last = max((max(cons[o]) for o in node.output if o and cls.get(o) == "stream" and o in cons), default=i)
        if last > i:  # this node's stream outputs cross cuts i+1 .. last
            producers[i + 1] += 1
            producers[last + 1] -= 1
    for name in kv_inputs:  # past-length left only shape reads it could not rebuild: they count
        users = cons.get(name, [])
        if users and max(users) > min(users):
            kv_block[min(users) + 1] += 1
            kv_block[max(users) + 1] -= 1
    crossing = np.cumsum(producers)
    straddle = np.cumsum(kv_block)
    cuts = [i for i in range(1, n) if crossing[i] == 1 and straddle[i] == 0]
    # of a run of consecutive legal positions keep the first: side/shape nodes between
    # two layers go with the layer that reads them
    return [c for k, c in enumerate(cuts) if k == 0 or cuts[k - 1] != c - 1]


def _signature(model: onnx.ModelProto, nodes: list[int], cls: dict[str, str]) -> tuple[str, ...]:
    """The ops that compute the stream, in order. Layers then match even where simplification left
    a no-op Reshape in one and not another (onnxsim proves different ones at the last layer), or where
    the first layer also does shape arithmetic the others reuse (a Concat of sizes)."""
    g = model.graph
    return tuple(g.node[i].op_type for i in nodes if g.node[i].op_type not in RESHAPES
                 and any(cls.get(o) == "stream" for o in g.node[i].output))


def group_layers(model: onnx.ModelProto, spans: list[list[int]], kv_inputs: set[str], cls: dict[str, str]):
    """Merge fine spans into (label, kind, nodes): embed, layer 0..L-1, head."""
    g = model.graph
    reads_kv = [any(i in kv_inputs for k in s if g.node[k].op_type not in SHAPE_OPS
                    for i in g.node[k].input) for s in spans]
    starts = [k for k, r in enumerate(reads_kv) if r]
    if not starts:
        return [(f"block {k}", "block", s) for k, s in enumerate(spans)]
    groups = []
    if starts[0] > 0:
        groups.append(("embed", "embed", [i for s in spans[: starts[0]] for i in s]))
    trailing = (starts[1] - starts[0] - 1) if len(starts) > 1 else 0
    first_tail = [_signature(model, spans[starts[0] + 1 + j], cls) for j in range(trailing)]
    for li, k in enumerate(starts):
        end = starts[li + 1] if li + 1 < len(starts) else len(spans)
        if li + 1 == len(starts):  # last layer: take as many trailing spans as layer 0 has
            take = 0
            while (take < trailing and k + 1 + take < len(spans)
                   and _signature(model, spans[k + 1 + take], cls) == first_tail[take]):
                take += 1
            end = k + 1 + take
        groups.append((f"layer {li}", "layer", [i for s in spans[k:end] for i in s]))
    rest = [i for s in spans[end:] for i in s]
    if rest:
        groups.append(("head", "head", rest))
    return groups


@dataclass(frozen=True)
class Coarsen:
    name: ClassVar[str] = "coarsen"
    granularity: str = "layer"  # layer | block (every legal cut)

    def run(self, state: CompileState) -> CompileState:
        model, sig = state.model, state.signature
        g = model.graph
        cls = classify_tensors(model, sig.input_roles)
        cuts = legal_cuts(model, cls, sig.kv_inputs)
        bounds = [0] + cuts + [len(g.node)]
        spans = [list(range(a, b)) for a, b in zip(bounds, bounds[1:]) if b > a]
        if self.granularity == "layer":
            groups = group_layers(model, spans, sig.kv_inputs, cls)
        else:
            groups = [(f"block {k}", "block", s) for k, s in enumerate(spans)]
        if not groups:
            raise LlcError(state.source, "graph has no nodes to partition")
        state.blocks = build_blocks(state, groups, cls)
        state.classes = cls
        return state


PACKED = {"MatMul", "Gemm", "MatMulNBits", "FusedMatMul"}  # onnxruntime packs a constant B at load


def precision(nodes: list[onnx.NodeProto]) -> str:
    """int4 or int8 if the nodes' MatMul weights are (the widest of them), else fp32."""
    bits = {next((a.i for a in n.attribute if a.name == "bits"), 4) for n in nodes
            if n.op_type in ("MatMulNBits", "GatherBlockQuantized")}
    return "int8" if 8 in bits else "int4" if bits else "fp32"


def looked_up(node: onnx.NodeProto) -> set[str]:
    """The inputs a lookup reads rows of, by the token (an embedding table, its scales and zero points)."""
    axis = next((a.i for a in node.attribute if a.name in ("axis", "gather_axis")), 0)
    if node.op_type not in LOOKUPS or axis != 0 or node.op_type in ("GatherElements", "GatherND"):
        return set()
    return {node.input[0]} | ({*node.input[2:4]} - {""} if node.op_type == "GatherBlockQuantized" else set())


def build_blocks(state: CompileState, groups, cls: dict[str, str]) -> list[Block]:
    """Sum node costs per block and measure what crosses the cut after each block."""
    g = state.model.graph
    sig = state.signature
    init_bytes = {t.name: tensor_nbytes(TensorInfo(t.name, t.data_type, tuple(t.dims)))
                  for t in g.initializer}
    block_of = {}
    for b, (_, _, nodes) in enumerate(groups):
        for i in nodes:
            block_of[i] = b
    first_use: dict[str, int] = {}
    last_use: dict[str, int] = {}
    for i, node in enumerate(g.node):
        for t in node_inputs(node):
            b = block_of[i]
            first_use.setdefault(t, b)
            last_use[t] = max(last_use.get(t, b), b)
    produced_in = {o: block_of[i] for i, n in enumerate(g.node) for o in n.output if o}
    for inp in g.input:  # graph inputs come from the head; KV inputs stay where they are read
        if inp.name in sig.input_roles and inp.name not in sig.kv_inputs:
            produced_in[inp.name] = 0
    pre, dec = state.shapes["prefill"], state.shapes["decode"]
    blocks = []
    rows = {t.name: t.dims[0] for t in g.initializer if len(t.dims) > 1 and t.dims[0]}
    for b, (label, kind, nodes) in enumerate(groups):
        weights = {i for k in nodes for i in g.node[k].input if i in init_bytes}
        looked = {k: looked_up(g.node[k]) for k in nodes}
        tables = set().union(*looked.values()) & rows.keys()
        tables -= {i for k in nodes for i in g.node[k].input if i not in looked[k]}  # read some other way too
        crossing = sorted(t for t, p in produced_in.items()
                          if p <= b < last_use.get(t, -1) and cls.get(t) != "const")
        costs = [state.costs[k] for k in nodes]
        blocks.append(Block(
            index=b, label=label, kind=kind, nodes=list(nodes),
            flops_prefill=sum(c.flops_prefill for c in costs),
            flops_decode=sum(c.flops_decode for c in costs),
            weight_bytes=sum(init_bytes[w] for w in weights),
            weights={w: init_bytes[w] for w in sorted(weights)},
            lookups={w: init_bytes[w] // rows[w] for w in sorted(tables)},
            packed_bytes=max((init_bytes.get(g.node[k].input[1], 0) for k in nodes
                              if g.node[k].op_type in PACKED and len(g.node[k].input) > 1), default=0),
            precision=precision([g.node[k] for k in nodes]),
            kv_bytes=sum(c.kv_bytes for c in costs),
            read_bytes_decode=sum(c.read_bytes_decode for c in costs),
            workspace_bytes=2 * max((c.act_bytes_prefill for c in costs), default=0),
            cut_bytes_prefill=sum(tensor_nbytes(pre.get(t)) for t in crossing),
            cut_bytes_decode=sum(tensor_nbytes(dec.get(t)) for t in crossing),
        ))
    return blocks
