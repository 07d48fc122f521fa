"""Cut one stage out of the model as a valid ONNX file, copying only its weights.

A segment keeps the original tensor names: its inputs are graph inputs or
tensors made by earlier stages, its outputs are the graph outputs it makes plus
what later stages read. Weights are streamed from the source (external data
file or in-memory bytes) straight into the segment's own data file, tensor by
tensor, so the model is never held twice in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from llc.runtime.device.manifest import sha256_file  # noqa: F401  (one hash for every bundle file)
from llc.compiler.state import TensorInfo, external_location, node_inputs

ALIGN = 64  # bytes; keeps every tensor aligned for mmap-friendly loading
INLINE_LIMIT = 1024  # tensors smaller than this stay inside the .onnx file


@dataclass(frozen=True)
class SegmentIO:
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def const_closure(model: onnx.ModelProto, nodes: list[int], const: set[str]) -> list[int]:
    """Constant-only nodes from elsewhere in the graph that ``nodes`` read (copied, not sent)."""
    g = model.graph
    produced_by = {o: i for i, n in enumerate(g.node) for o in n.output if o}
    mine = set(nodes)
    need: set[int] = set()
    stack = [t for i in nodes for t in node_inputs(g.node[i])]
    while stack:
        t = stack.pop()
        j = produced_by.get(t)
        if j is None or j in mine or j in need or t not in const:
            continue
        need.add(j)
        stack.extend(node_inputs(g.node[j]))
    return sorted(need)


def segment_io(model: onnx.ModelProto, nodes: list[onnx.NodeProto], exported: set[str]) -> SegmentIO:
    """Inputs: read but not made here (and not weights). Outputs: graph outputs + ``exported``."""
    g = model.graph
    inits = {t.name for t in g.initializer}
    made: list[str] = []
    read: list[str] = []
    for n in nodes:
        read += [t for t in node_inputs(n) if t not in made and t not in inits]
        made += [o for o in n.output if o]
    graph_outputs = [o.name for o in g.output]
    made_set = set(made)
    inputs = list(dict.fromkeys(t for t in read if t not in made_set))
    outputs = [o for o in graph_outputs if o in made_set]
    outputs += sorted(t for t in exported if t in made_set and t not in outputs)
    return SegmentIO(tuple(inputs), tuple(outputs))


def _value_info(name: str, info: TensorInfo | None, fallback: TensorInfo | None) -> onnx.ValueInfoProto:
    src = info if info is not None else fallback
    if src is None:
        raise ValueError(f"no type known for tensor {name}")
    shape = None
    if src.shape is not None:
        shape = [d if isinstance(d, int) else (None if d.startswith("unk__") or d == "?" else d)
                 for d in src.shape]
    return helper.make_tensor_value_info(name, src.elem_type, shape)


def write_segment(model: onnx.ModelProto, data_dir: Path, nodes: list[onnx.NodeProto], io: SegmentIO,
                  tensors: dict[str, TensorInfo], fallback: dict[str, TensorInfo],
                  target: Path, name: str) -> dict[str, str]:
    """Write ``target`` (+ ``target.data`` if it has large weights); return {file: sha256}."""
    g = model.graph
    used = {t for n in nodes for t in node_inputs(n)}
    inits = [t for t in g.initializer if t.name in used]
    graph = helper.make_graph(
        nodes=nodes,
        name=name,
        inputs=[_value_info(t, tensors.get(t), fallback.get(t)) for t in io.inputs],
        outputs=[_value_info(t, tensors.get(t), fallback.get(t)) for t in io.outputs],
    )
    data_name = target.name + ".data"
    data_path = target.with_name(data_name)
    offset = 0
    sources: dict[str, object] = {}
    with open(data_path, "wb") as out:
        for t in inits:
            copy = TensorProto()
            copy.CopyFrom(t)
            raw = _tensor_bytes(t, data_dir, sources)
            if raw is not None and len(raw) >= INLINE_LIMIT:
                pad = (-offset) % ALIGN
                out.write(b"\0" * pad)
                offset += pad
                out.write(raw)
                copy.ClearField("raw_data")
                copy.ClearField("external_data")
                copy.data_location = TensorProto.EXTERNAL
                for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                    entry = copy.external_data.add()
                    entry.key, entry.value = k, v
                offset += len(raw)
            elif raw is not None:
                copy.ClearField("external_data")
                copy.data_location = TensorProto.DEFAULT
                copy.raw_data = raw
            graph.initializer.append(copy)
    for f in sources.values():
        f.close()
    seg = helper.make_model(graph, opset_imports=list(model.opset_import), producer_name="llc")
    seg.ir_version = model.ir_version
    seg.functions.extend(model.functions)
    target.write_bytes(seg.SerializeToString(deterministic=True))
    files = {target.name: sha256_file(target)}
    if offset:
        files[data_name] = sha256_file(data_path)
    else:
        data_path.unlink()
    return files


def _tensor_bytes(t: TensorProto, data_dir: Path, sources: dict) -> bytes | None:
    """The tensor's raw little-endian bytes, from the external file or the proto."""
    loc = external_location(t)
    if loc is not None:
        name, offset, length = loc
        f = sources.get(name)
        if f is None:
            f = sources[name] = open(data_dir / name, "rb")
        f.seek(offset)
        return f.read(length) if length >= 0 else f.read()
    if t.HasField("raw_data"):
        return t.raw_data
    return None  # typed fields (float_data, int64_data...): small, kept in the proto
