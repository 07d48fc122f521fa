"""Cut one stage out of the model as a valid ONNX file, copying only its weights.

A segment keeps the original tensor names: its inputs are graph inputs or
tensors made by earlier stages, its outputs are the graph outputs it makes plus
what later stages read. Weights are streamed from the source (external data
file or in-memory bytes) straight into the segment's own data files, tensor by
tensor, so the model is never held twice in memory.

The data files are named by their content, ``w-<sha256 prefix>.bin``, one per
group of weights that the same blocks read (a layer's, the embedding's; a tied
embedding read by the first and the last block is a group of its own). A group
is written whole, whatever the plan, so two plans of one model share their
files byte for byte: a phone that already holds a layer's file, from an earlier
build or as a spare, needs nothing pushed when a re-plan moves that layer to it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable

import onnx
from onnx import TensorProto, helper

from llc.errors import LlcError
from llc.runtime.device.manifest import sha256_file  # noqa: F401  (one hash for every bundle file)
from llc.compiler.state import TensorInfo, external_location, node_inputs, read_external

ALIGN = 64  # bytes; keeps every tensor aligned for mmap-friendly loading
INLINE_LIMIT = 1024  # tensors smaller than this stay inside the .onnx file
CHUNK = 16 << 20  # bytes copied at a time


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
                  target: Path, name: str, group_of: Callable[[str], Hashable],
                  progress: Callable[[int], None] | None = None) -> dict[str, str]:
    """Write ``target`` and the data files of its weights beside it; return {file: sha256}.

    ``group_of`` names each weight's group: the weights of one group share a
    file. ``progress`` is told the bytes of each chunk of weights written.
    """
    graph = helper.make_graph(
        nodes=nodes,
        name=name,
        inputs=[_value_info(t, tensors.get(t), fallback.get(t)) for t in io.inputs],
        outputs=[_value_info(t, tensors.get(t), fallback.get(t)) for t in io.outputs],
    )
    files, refs = write_weights(model, data_dir, weight_groups(model, nodes, group_of), target.parent, progress)
    graph.initializer.extend(refs[t.name] for t in _initializers(model, nodes))
    seg = helper.make_model(graph, opset_imports=list(model.opset_import), producer_name="llc")
    seg.ir_version = model.ir_version
    seg.functions.extend(model.functions)
    target.write_bytes(seg.SerializeToString(deterministic=True))
    return {target.name: sha256_file(target), **files}


def weight_groups(model: onnx.ModelProto, nodes: list[onnx.NodeProto],
                  group_of: Callable[[str], Hashable]) -> list[list[TensorProto]]:
    """The groups of weights a segment of ``nodes`` needs, each whole (with weights only others read),
    in the model's order."""
    return groups_of(model, {group_of(t.name) for t in _initializers(model, nodes)}, group_of)


def groups_of(model: onnx.ModelProto, keys: set, group_of: Callable[[str], Hashable]) -> list[list[TensorProto]]:
    """Every weight of the groups named ``keys``, group by group, in the model's order."""
    groups: dict[Hashable, list[TensorProto]] = {}
    for t in model.graph.initializer:
        key = group_of(t.name)
        if key in keys:
            groups.setdefault(key, []).append(t)
    return list(groups.values())


def write_weights(model: onnx.ModelProto, data_dir: Path, groups: list[list[TensorProto]], folder: Path,
                  progress: Callable[[int], None] | None = None) -> tuple[dict[str, str], dict[str, TensorProto]]:
    """Each group's large tensors into ``folder/w-<sha256 prefix>.bin``; small ones stay in the proto.

    Returns ({file: sha256}, {tensor: its proto pointing into its file}).
    """
    files: dict[str, str] = {}
    refs: dict[str, TensorProto] = {}
    with contextlib.ExitStack() as stack:
        sources = Sources(stack)
        for members in groups:
            tmp = folder / ".w.tmp"
            with open(tmp, "wb") as f:
                out = HashingWriter(f)
                mine = [append_tensor(t, data_dir, sources, out, tmp.name, progress) for t in members]
            if not out.offset:
                tmp.unlink()
            else:
                sha = out.sha256.hexdigest()
                data_name = f"w-{sha[:32]}.bin"
                tmp.rename(folder / data_name)
                files[data_name] = sha
                for ref in mine:
                    for entry in ref.external_data:
                        if entry.key == "location":
                            entry.value = data_name
            refs.update((ref.name, ref) for ref in mine)
    return files, refs


class Sources:
    """Data files open for reading, each opened once, closed with the ExitStack that owns them."""

    def __init__(self, stack: contextlib.ExitStack):
        self.stack, self.files = stack, {}

    def open(self, path: Path):
        if path not in self.files:
            self.files[path] = self.stack.enter_context(open(path, "rb"))
        return self.files[path]


class HashingWriter:
    """A file being written, its length so far and its sha256 (so a written file is never read back)."""

    def __init__(self, f):
        self.f, self.offset, self.sha256 = f, 0, hashlib.sha256()

    def write(self, data) -> None:
        self.f.write(data)
        self.sha256.update(data)
        self.offset += len(data)


def _initializers(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> list[TensorProto]:
    used = {t for n in nodes for t in node_inputs(n)}
    return [t for t in model.graph.initializer if t.name in used]


def group_bytes(data_dir: Path, groups: list[list[TensorProto]]) -> int:
    """Bytes of the weights these groups put in data files (what emit writes for them)."""
    sizes = (tensor_size(t, data_dir) or 0 for members in groups for t in members)
    return sum(n for n in sizes if n >= INLINE_LIMIT)


def append_tensor(t: TensorProto, data_dir: Path, sources: Sources, out: HashingWriter, location: str,
                  progress: Callable[[int], None] | None = None) -> TensorProto:
    """``t`` for a model whose data file ``location`` is being written to ``out``.

    Its bytes (read from ``data_dir`` or the proto) are appended, aligned, when
    at least INLINE_LIMIT; smaller ones go inside the proto; typed fields stay as they are.
    """
    size = tensor_size(t, data_dir)
    if size is None:
        return t
    ref = TensorProto()
    ref.name, ref.data_type = t.name, t.data_type
    ref.dims.extend(t.dims)
    if size < INLINE_LIMIT:
        ref.raw_data = t.raw_data if external_location(t) is None else read_small(t, data_dir)
        return ref
    out.write(b"\0" * ((-out.offset) % ALIGN))
    offset = out.offset
    copy_tensor(t, data_dir, sources, out, progress)
    ref.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(size))):
        entry = ref.external_data.add()
        entry.key, entry.value = k, v
    return ref


def tensor_size(t: TensorProto, data_dir: Path) -> int | None:
    """Bytes of the tensor's raw data; None for typed fields (float_data, int64_data...: small)."""
    loc = external_location(t)
    if loc is not None:
        name, offset, length = loc
        return length if length >= 0 else os.path.getsize(data_dir / name) - offset
    return len(t.raw_data) if t.HasField("raw_data") else None


def copy_tensor(t: TensorProto, data_dir: Path, sources: Sources, out: HashingWriter,
                 progress: Callable[[int], None] | None) -> None:
    """Stream the tensor's bytes into ``out`` a chunk at a time: a 400 MB embedding never sits in memory."""
    loc = external_location(t)
    if loc is None:
        out.write(t.raw_data)
        if progress:
            progress(len(t.raw_data))
        return
    name, offset, _ = loc
    f = sources.open(data_dir / name)
    f.seek(offset)
    left = tensor_size(t, data_dir)
    while left:
        chunk = f.read(min(left, CHUNK))
        if not chunk:
            raise LlcError(data_dir / name, f"the file ends inside tensor {t.name} (truncated?)")
        out.write(chunk)
        left -= len(chunk)
        if progress:
            progress(len(chunk))


def read_small(t: TensorProto, data_dir: Path) -> bytes:
    return t.raw_data if external_location(t) is None else read_external(t, data_dir)
