"""past-length: read the cache length from the attention mask, not from the caches.

before: ``s = Shape(past_key_values.19.value)``   (anywhere in the graph, often
        in the first layer or the embedding, where torch.export builds the
        causal mask and the rotary positions)
after:  ``s = Concat(batch, 3, past, 64)`` with
        ``batch = Shape(input_ids)[0:1]`` and
        ``past = Shape(attention_mask)[1:2] - Shape(input_ids)[1:2]``,
        the axes of a KV input that are not its batch or sequence axis being
        the constants of its type (sliced by the Shape's own start/end).

Why: a stage must be able to know the past length without owning any cache.
Exporters read the shape of whichever cache they like (torch.export reads a
later layer's cache in layer 0), and a stage holding only the embedding or only
the head owns none. The attention mask always spans past + new tokens and the
head builds it for every step, so every stage can get it (it is a few bytes a
step, routed by the comm map like any other side input). The rewrite is the
same for every exporter; ``llc verify`` checks it against the original model.

A model without an attention mask keeps its Shape reads; coarsen then never
cuts between a cache's shape read and its layer (fewer legal cuts, still right).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import onnx
from onnx import TensorProto, helper

from llc.compiler.state import CompileState

_INT64_MAX = 2**63 - 1


def _shape_range(node: onnx.NodeProto, rank: int) -> range:
    """The axes a Shape node returns (its start/end attributes, negative ones counted from the end)."""
    attrs = {a.name: a.i for a in node.attribute}
    start, end = attrs.get("start", 0), attrs.get("end", _INT64_MAX)
    start = max(0, start + rank if start < 0 else min(start, rank))
    end = max(0, end + rank if end < 0 else min(end, rank))
    return range(start, end)


def past_length_nodes(node: onnx.NodeProto, axes: list, batch_axis: int, seq_axis: int,
                      input_ids: str, mask: str) -> list[onnx.NodeProto] | None:
    """Nodes computing what ``node`` (a Shape of a KV input with ``axes``) returns; None if not static."""
    out = node.output[0]
    p = f"{node.name or out}/llc_past_length"
    nodes: list[onnx.NodeProto] = []

    def shape_slice(tensor: str, start: int, tag: str) -> str:
        name = f"{out}__llc_{tag}"
        nodes.append(helper.make_node("Shape", [tensor], [name], name=f"{p}/{tag}", start=start, end=start + 1))
        return name

    parts = []
    for axis in _shape_range(node, len(axes)):
        if axis == batch_axis:
            parts.append(shape_slice(input_ids, 0, "batch"))
        elif axis == seq_axis:
            total = shape_slice(mask, 1, "total")
            new = shape_slice(input_ids, 1, "new")
            past = f"{out}__llc_past"
            nodes.append(helper.make_node("Sub", [total, new], [past], name=f"{p}/past"))
            parts.append(past)
        elif isinstance(axes[axis], int):
            const = f"{out}__llc_dim{axis}"
            nodes.append(helper.make_node("Constant", [], [const], name=f"{p}/dim{axis}",
                                          value=helper.make_tensor(const, TensorProto.INT64, [1], [axes[axis]])))
            parts.append(const)
        else:
            return None  # a symbolic head or width axis: nothing to rebuild it from
    if not parts:
        nodes.append(helper.make_node("Constant", [], [out], name=f"{p}/empty",
                                      value=helper.make_tensor(out, TensorProto.INT64, [0], [])))
    else:
        nodes.append(helper.make_node("Concat", parts, [out], name=f"{p}/concat", axis=0))
    return nodes


@dataclass(frozen=True)
class PastLength:
    name: ClassVar[str] = "past-length"

    def run(self, state: CompileState) -> CompileState:
        sig = state.signature
        roles = {role: name for name, role in sig.input_roles.items()}
        if "attention_mask" not in roles:
            state.notes.append("past-length: no attention_mask input; caches' shape reads stay "
                               "(fewer legal cuts)")
            return state
        seq_axis = {b.past: b.seq_axis for b in sig.kv}
        g = state.model.graph
        rewritten, kept = 0, []
        new_nodes: list[onnx.NodeProto] = []
        for node in g.node:
            kv = node.input[0] if node.op_type == "Shape" and node.input[0] in seq_axis else None
            info = state.tensors.get(kv) if kv else None
            repl = None
            if info is not None and info.shape is not None:
                repl = past_length_nodes(node, list(info.shape), 0, seq_axis[kv], roles["input_ids"],
                                         roles["attention_mask"])
            if repl is None:
                if kv:
                    kept.append(kv)
                new_nodes.append(node)
            else:
                new_nodes.extend(repl)
                rewritten += 1
        if rewritten:
            del g.node[:]
            g.node.extend(new_nodes)
        if kept:
            state.notes.append(f"past-length: {len(kept)} shape read(s) of caches with symbolic "
                               f"head/width axes kept (e.g. {kept[0]})")
        return state
