"""The compile state that flows through the passes, and small ONNX graph helpers.

The ONNX ModelProto is the IR. Passes that only analyse (annotate-cost, coarsen,
partition, comm-map) leave the graph untouched and fill typed fields of
:class:`CompileState`; node-level analysis is indexed by the node's position in
``model.graph.node``, which no pass changes after ``simplify``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from llc.profile import Profile, Workload

Dim = int | str  # a concrete size or a symbolic name


def np_dtype(elem_type: int) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


def dtype_name(elem_type: int) -> str:
    return np_dtype(elem_type).name


@dataclass(frozen=True)
class TensorInfo:
    name: str
    elem_type: int
    shape: tuple[Dim, ...] | None  # None when unknown

    @property
    def dtype(self) -> str:
        return dtype_name(self.elem_type)


@dataclass(frozen=True)
class KVBinding:
    """A KV-cache input and the output that returns it grown by this step's tokens.

    Both live on the device that runs the layer; neither is ever sent.
    """

    past: str
    present: str
    seq_axis: int


@dataclass(frozen=True)
class Signature:
    """What each graph input and output is for, found from the graph, not its exporter."""

    input_roles: dict[str, str]  # name -> input_ids | attention_mask | position_ids | kv | other
    kv: tuple[KVBinding, ...]
    logits: str

    @property
    def kv_inputs(self) -> set[str]:
        return {b.past for b in self.kv}

    @property
    def kv_outputs(self) -> set[str]:
        return {b.present for b in self.kv}


@dataclass(frozen=True)
class NodeCost:
    """Per-node cost for prefill (P tokens, empty cache) and decode (1 token, context C)."""

    flops_prefill: float = 0.0
    flops_decode: float = 0.0
    weight_bytes: int = 0  # initializers first used by this node
    act_bytes_prefill: int = 0  # outputs of this node
    kv_bytes: int = 0  # KV cache this node produces, at max context, one request
    read_bytes_decode: int = 0  # what a decode step reads: its weights (a lookup: one row) and its cache


@dataclass
class Block:
    """Consecutive nodes between two legal cut points: the unit the partitioner moves."""

    index: int
    label: str  # "embed", "layer 3", "head", ...
    kind: str  # embed | layer | head | block
    nodes: list[int]
    flops_prefill: float = 0.0
    flops_decode: float = 0.0
    weight_bytes: int = 0
    weights: dict[str, int] = field(default_factory=dict)  # initializers it reads -> bytes (some shared)
    lookups: dict[str, int] = field(default_factory=dict)  # those it only looks rows up in -> bytes per row
    packed_bytes: int = 0  # its largest MatMul weight: onnxruntime packs a copy at load, then drops the original
    precision: str = "fp32"  # its MatMul weights': int8 or int4 (MatMulNBits), else fp32
    kv_bytes: int = 0  # one request, max context
    read_bytes_decode: int = 0  # weights and cache a decode step reads
    workspace_bytes: int = 0  # largest prefill activation, twice (in and out)
    cut_bytes_prefill: int = 0  # bytes crossing the cut after this block
    cut_bytes_decode: int = 0


@dataclass(frozen=True)
class StagePlan:
    index: int
    device: str
    first_block: int
    last_block: int  # inclusive
    compute_ms_decode: float
    compute_ms_prefill: float
    hop_ms_decode: float  # to the next stage (or back to the head from the tail)
    hop_ms_prefill: float
    memory_bytes: int
    memory_limit_bytes: int


@dataclass(frozen=True)
class Plan:
    stages: tuple[StagePlan, ...]
    objective: str
    split: str  # "mip", or the fixed split given (even, memory, a file)
    decode_ms: float  # one request: every stage and every hop, per token
    prefill_ms: float
    bottleneck_ms: float  # slowest stage or hop: the pipeline's beat
    solve_seconds: float


@dataclass(frozen=True)
class CommEdge:
    """One tensor that crosses devices: from its producer stage to each consumer stage."""

    tensor: str
    kind: str  # activation | skip | graph_input | shape
    dtype: str
    shape: tuple[Dim, ...] | None
    producer_stage: int
    consumer_stages: tuple[int, ...]
    bytes_decode: int  # one decode token
    bytes_prefill: int  # the whole prompt


@dataclass(frozen=True)
class Digests:
    """sha256 of the model file and of each external data file it uses (the build's identity)."""

    model: str
    data: dict[str, str]


@dataclass(frozen=True)
class DeviceNetwork:
    """Where a device listens (bind), how others reach it (endpoint), and its CURVE key pair."""

    bind: str
    endpoint: str
    public: str
    secret: str


@dataclass(frozen=True)
class Layout:
    build_id: str
    devices: dict[str, DeviceNetwork]
    coordinator_public: str
    coordinator_secret: str


@dataclass(frozen=True)
class SegmentPlan:
    """The nodes of one stage's segment (its own and the constants it reads) and its inputs and outputs."""

    stage: int
    nodes: tuple[int, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass
class CompileState:
    source: Path  # the model file the user gave
    model: onnx.ModelProto
    data_dir: Path  # where external data locations are resolved
    profile: Profile
    workload: Workload
    reference: Path | None = None  # the unsplit model at the build's precision, when not the user's
    signature: Signature | None = None
    tensors: dict[str, TensorInfo] = field(default_factory=dict)  # symbolic shapes
    costs: list[NodeCost] = field(default_factory=list)
    shapes: dict[str, dict[str, TensorInfo]] = field(default_factory=dict)  # scenario -> tensors
    classes: dict[str, str] = field(default_factory=dict)  # tensor -> stream|side|shape|const
    blocks: list[Block] = field(default_factory=list)
    plan: Plan | None = None
    comm: list[CommEdge] = field(default_factory=list)
    kv_empty: dict[str, tuple[int, ...]] = field(default_factory=dict)  # cache -> its empty shape (batch 1)
    digests: Digests | None = None
    options: dict[str, str] = field(default_factory=dict)  # compile options that shape the build
    layout: Layout | None = None
    segments: list[SegmentPlan] = field(default_factory=list)
    up_to_date: bool = False  # compile found an intact build of the same inputs and left it
    notes: list[str] = field(default_factory=list)  # things the user should know


# ---------------------------------------------------------------- graph helpers


def consumers(graph: onnx.GraphProto) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, n in enumerate(graph.node):
        for name in set(node_inputs(n)):
            out.setdefault(name, []).append(i)
    return out


def node_inputs(node: onnx.NodeProto) -> list[str]:
    """Inputs of a node including those its subgraphs (If/Loop/Scan bodies) read from outside."""
    names = [i for i in node.input if i]
    for attr in node.attribute:
        graphs = list(attr.graphs) + ([attr.g] if attr.HasField("g") else [])
        for g in graphs:
            inner = {o for n in g.node for o in n.output} | {i.name for i in g.input} | {
                t.name for t in g.initializer}
            for n in g.node:
                names += [i for i in node_inputs(n) if i not in inner]
    return names


def tensor_nbytes(info: TensorInfo | None, dims: dict[str, int] | None = None) -> int:
    """Bytes of a tensor with concrete shape; symbolic dims resolved from ``dims``, else 1."""
    if info is None or info.shape is None:
        return 0
    n = 1
    for d in info.shape:
        n *= d if isinstance(d, int) else (dims or {}).get(d, 1)
    return n * np_dtype(info.elem_type).itemsize


def value_infos(model: onnx.ModelProto) -> dict[str, TensorInfo]:
    """Types of every named tensor (inputs, outputs, value_info, initializers)."""
    out: dict[str, TensorInfo] = {}
    g = model.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        t = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            continue
        shape = None
        if t.HasField("shape"):
            shape = tuple(
                d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim
            )
        out[vi.name] = TensorInfo(vi.name, t.elem_type, shape)
    for init in g.initializer:
        out[init.name] = TensorInfo(init.name, init.data_type, tuple(init.dims))
    return out


def external_location(t: TensorProto) -> tuple[str, int, int] | None:
    """(location, offset, length) of an initializer stored as external data."""
    if t.data_location != TensorProto.EXTERNAL:
        return None
    kv = {e.key: e.value for e in t.external_data}
    return kv["location"], int(kv.get("offset", 0)), int(kv.get("length", -1))


BIG_INITIALIZER = 4096  # bytes; smaller initializers may be shape constants that inference and folding need


def is_weight(t: TensorProto) -> bool:
    """A weight: more than a few KB, inside the file or outside it (an unknown length counts as big)."""
    loc = external_location(t)
    if loc is not None:
        return loc[2] < 0 or loc[2] > BIG_INITIALIZER
    return t.HasField("raw_data") and len(t.raw_data) > BIG_INITIALIZER


def read_external(t: TensorProto, data_dir: Path) -> bytes:
    """The bytes of an external tensor (its location is relative to ``data_dir``, or absolute)."""
    name, offset, length = external_location(t)
    with open(data_dir / name, "rb") as f:
        f.seek(offset)
        return f.read() if length < 0 else f.read(length)


def inlined(t: TensorProto, data_dir: Path) -> TensorProto:
    """A copy of ``t`` with its bytes inside the proto."""
    out = TensorProto()
    out.CopyFrom(t)
    if external_location(t) is not None:
        out.raw_data = read_external(t, data_dir)
        del out.external_data[:]
        out.data_location = TensorProto.DEFAULT
    return out


def weightless_copy(model: onnx.ModelProto, data_dir: Path | None = None) -> onnx.ModelProto:
    """The graph with its weights as typed graph inputs of the same names (no weight bytes copied).

    Why: shape inference and onnxsim need the graph and its shape constants,
    not gigabytes of weights; the protobuf of a model with its weights cannot
    pass 2 GB, and holding them would make a compile's memory grow with the model.
    Small initializers stay, read into the proto from ``data_dir`` if stored outside.
    """
    out = onnx.ModelProto()
    out.ir_version = model.ir_version
    out.opset_import.extend(model.opset_import)
    out.functions.extend(model.functions)
    g, src = out.graph, model.graph
    g.name = src.name
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    declared = {i.name for i in src.input}
    for t in src.initializer:
        if not is_weight(t):
            g.initializer.append(inlined(t, data_dir) if data_dir is not None else t)
        elif t.name not in declared:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return out


def with_weights(graph: onnx.ModelProto, source: onnx.ModelProto) -> onnx.ModelProto:
    """``graph`` (made from ``weightless_copy(source)``) with ``source``'s weights back as initializers.

    Weights keep their protos: an external one still points into the source's
    data file, so nothing is read or copied. Weights the graph no longer uses
    are dropped, and so are their graph-input entries (older IRs list initializers as inputs).
    """
    weights = [t for t in source.graph.initializer if is_weight(t)]
    names = {t.name for t in weights}
    declared = {i.name for i in source.graph.input}
    used = {name for node in graph.graph.node for name in node_inputs(node)} | {o.name for o in graph.graph.output}
    inputs = [i for i in graph.graph.input if i.name not in names or (i.name in declared and i.name in used)]
    del graph.graph.input[:]
    graph.graph.input.extend(inputs)
    graph.graph.initializer.extend(t for t in weights if t.name in used)
    return graph
