"""annotate-cost: FLOPs, weight, activation and KV-cache bytes for every node.

before: a graph with symbolic dims (batch, sequence, past)
after:  ``state.costs[i]`` for node i, for two scenarios the partitioner needs:
        prefill (P prompt tokens, empty cache) and decode (1 token, context C).

Shapes come from onnxruntime's symbolic shape inference (ONNX's own, with data
propagation, as a fallback) on a weight-free
copy of the graph whose inputs are pinned to each scenario's sizes; the graph
itself is not modified. FLOPs: 2*M*N*K for MatMul/Gemm, a few per element for
everything else (it is the matmuls that matter).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import onnx
from onnx import TensorProto

from llc.errors import LlcError
from llc.compiler.state import (CompileState, NodeCost, Signature, TensorInfo, tensor_nbytes, value_infos,
                               weightless_copy)

ELEMENTWISE_FLOPS = {"Softmax": 5, "Erf": 8, "Tanh": 6, "Sigmoid": 4, "Pow": 2, "Sqrt": 2,
                     "ReduceMean": 1, "LayerNormalization": 8, "SimplifiedLayerNormalization": 6,
                     "Gelu": 8, "FastGelu": 8, "Exp": 4, "Div": 1, "Cos": 4, "Sin": 4}
MOVEMENT_OPS = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Shape", "Concat",
                "Slice", "Gather", "Expand", "Cast", "Constant", "ConstantOfShape", "Split",
                "Flatten", "Range", "Size"}


def pinned_shapes(model: onnx.ModelProto, data_dir: Path | None, sig: Signature, seq: int, past: int,
                  kv_empty: dict[str, tuple[int, ...]] | None = None) -> dict[str, TensorInfo]:
    """Concrete shapes of every tensor for batch 1, ``seq`` new tokens and ``past`` cached ones.

    ``kv_empty`` gives the caches' other axes (heads, head size) when their type leaves them symbolic.
    """
    m = weightless_copy(model, data_dir)
    kv_axis = {b.past: b.seq_axis for b in sig.kv}
    kv_empty = kv_empty or {}
    for inp in m.graph.input:
        role = sig.input_roles.get(inp.name)
        if role is None:
            continue
        dims = inp.type.tensor_type.shape.dim
        for axis, d in enumerate(dims):
            if role in ("input_ids", "position_ids"):
                value = 1 if axis == 0 else seq
            elif role == "attention_mask":
                value = 1 if axis == 0 else past + seq
            elif role == "kv":
                value = past if axis == kv_axis[inp.name] else (
                    1 if axis == 0 else (kv_empty[inp.name][axis] if inp.name in kv_empty else None))
            else:
                value = 1
            if value is not None and not d.HasField("dim_value"):
                d.Clear()
                d.dim_value = value
    return value_infos(infer(m))


def kv_empty_shapes(model: onnx.ModelProto, sig: Signature, tensors: dict[str, TensorInfo],
                    shapes: dict[str, TensorInfo], where) -> dict[str, tuple[int, ...]]:
    """Each cache's empty shape: batch 1, 0 along its sequence axis, every other axis a number.

    An axis its type leaves symbolic (onnxruntime-genai writes ``kv_cache_dim``) is read off
    the present's inferred shape, or else off the GroupQueryAttention that reads the cache
    (the query's width over the heads).
    """
    readers = {}
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            readers.setdefault(name, (node, k))
    out = {}
    for b in sig.kv:
        dims = []
        for axis, d in enumerate((tensors.get(b.past) or TensorInfo(b.past, 1, ())).shape or ()):
            if axis == 0 or axis == b.seq_axis or isinstance(d, int):
                dims.append(1 if axis == 0 else 0 if axis == b.seq_axis else d)
                continue
            present = (shapes.get(b.present) or TensorInfo("", 1, None)).shape
            if present and isinstance(present[axis], int):
                dims.append(present[axis])
                continue
            size = _gqa_dim(readers.get(b.past), shapes, axis)
            if size is None:
                raise LlcError(where, f"cannot tell the size of axis {axis} ({d}) of the cache {b.past}")
            dims.append(size)
        out[b.past] = tuple(dims)
    return out


def _gqa_dim(reader, shapes: dict[str, TensorInfo], axis: int) -> int | None:
    """Axis 1 (KV heads) or 3 (head size) of a cache that a GroupQueryAttention reads."""
    if reader is None or reader[0].op_type != "GroupQueryAttention" or reader[1] not in (3, 4):
        return None
    node = reader[0]
    attrs = {a.name: a.i for a in node.attribute}
    heads, kv_heads = attrs.get("num_heads", 0), attrs.get("kv_num_heads", 0)
    if axis == 1:
        return kv_heads or None
    query = (shapes.get(node.input[0]) or TensorInfo("", 1, None)).shape
    key = (shapes.get(node.input[1]) or TensorInfo("", 1, None)).shape if len(node.input) > 1 and node.input[1] else None
    if key and isinstance(key[-1], int) and kv_heads:
        return key[-1] // kv_heads
    if query and isinstance(query[-1], int) and heads + 2 * kv_heads:  # packed q, k and v
        return query[-1] // (heads + 2 * kv_heads)
    return None


@functools.lru_cache(maxsize=1)
def symbolic_shape_infer():
    """onnxruntime's ``tools/symbolic_shape_infer.py``, loaded from its file.

    Importing it the usual way runs ``onnxruntime.tools``' ``__init__``, which imports
    torch whenever torch is installed (for an export helper llc never uses): 2-3 s
    and 190 MB on every compile. The module itself needs only onnx, numpy and sympy.
    """
    import onnxruntime

    path = Path(onnxruntime.__file__).parent / "tools" / "symbolic_shape_infer.py"
    if not path.is_file():  # laid out otherwise: the usual import
        return importlib.import_module("onnxruntime.tools.symbolic_shape_infer")
    spec = importlib.util.spec_from_file_location("llc_symbolic_shape_infer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def infer(m: onnx.ModelProto) -> onnx.ModelProto:
    """onnxruntime's symbolic shape inference (it knows the contrib ops and follows shape
    arithmetic), else ONNX's own with data propagation."""
    tool = symbolic_shape_infer()
    try:
        class Inference(tool.SymbolicShapeInference):
            """Also knows GatherBlockQuantized (a tied, quantized embedding), which the tool lacks."""

            def __init__(self):
                super().__init__(2**31 - 1, True, True, 0)
                self.dispatcher_["GatherBlockQuantized"] = self._gather_block_quantized

            def _gather_block_quantized(self, node):
                data, ids = self._get_shape(node, 0), self._get_shape(node, 1)
                packed = self.known_vi_[node.input[0]].type.tensor_type.elem_type in (TensorProto.UINT8,
                                                                                    TensorProto.INT8)
                # bytes hold 8 // bits values each (onnxruntime-genai); a (u)int4 tensor has its own shape
                width = data[-1] * (8 // tool.get_attribute(node, "bits", 4)) if packed else data[-1]
                vi = self.known_vi_[node.output[0]]
                vi.CopyFrom(onnx.helper.make_tensor_value_info(
                    node.output[0], self.known_vi_[node.input[2]].type.tensor_type.elem_type,
                    ids + data[1:-1] + [width]))

        s = Inference()  # what SymbolicShapeInference.infer_shapes does, with the subclass
        s._preprocess(m)
        done = False
        while s.run_:
            done = s._infer_impl()
        s._update_output_from_vi()
        inferred = s.out_mp_ if done else None
    except Exception:  # it gives up on some ops
        inferred = None
    return inferred if inferred is not None else onnx.shape_inference.infer_shapes(m, data_prop=True)


def symbolic_types(model: onnx.ModelProto, data_dir: Path | None = None) -> dict[str, TensorInfo]:
    """Every tensor's type with its dims symbolic where they vary: what segment inputs and outputs declare."""
    return {name: t for name, t in value_infos(infer(weightless_copy(model, data_dir))).items()
            if t.shape is not None}


def node_flops(node: onnx.NodeProto, shapes: dict[str, TensorInfo]) -> float:
    out = shapes.get(node.output[0]) if node.output else None
    numel = 0
    if out is not None and out.shape is not None and all(isinstance(d, int) for d in out.shape):
        numel = 1
        for d in out.shape:
            numel *= d
    if node.op_type == "MatMulNBits":  # weights packed to 4 or 8 bits; K is an attribute
        return 2.0 * numel * next((a.i for a in node.attribute if a.name == "K"), 0)
    if node.op_type == "GroupQueryAttention":  # scores and mix: 2 x 2 x S x T x heads x head size
        present = shapes.get(node.output[1]) if len(node.output) > 1 else None
        if present is not None and present.shape and all(isinstance(d, int) for d in present.shape):
            total = present.shape[2]
            return 2.0 * 2.0 * numel * total  # numel = S x heads x head size of the output
        return 0.0
    if node.op_type in ("MatMul", "Gemm", "MatMulInteger", "FusedMatMul"):
        a = shapes.get(node.input[0])
        k = a.shape[-1] if a is not None and a.shape and isinstance(a.shape[-1], int) else 0
        if node.op_type == "Gemm" and any(at.name == "transA" and at.i for at in node.attribute):
            k = a.shape[0] if a is not None and a.shape and isinstance(a.shape[0], int) else k
        return 2.0 * numel * k
    if node.op_type in MOVEMENT_OPS:
        return 0.0
    return float(ELEMENTWISE_FLOPS.get(node.op_type, 1) * numel)


LOOKUPS = {"Gather", "GatherBlockQuantized", "GatherElements", "GatherND"}


@dataclass(frozen=True)
class AnnotateCost:
    name: ClassVar[str] = "annotate-cost"

    def run(self, state: CompileState) -> CompileState:
        wl = state.workload
        sig = state.signature
        first = pinned_shapes(state.model, state.data_dir, sig, seq=wl.prompt_tokens, past=0)
        state.kv_empty = kv_empty_shapes(state.model, sig, state.tensors, first, state.source)
        typed = all(isinstance(d, int) for b in sig.kv for axis, d in enumerate(state.tensors[b.past].shape or ())
                    if axis not in (0, b.seq_axis))  # the caches' types pinned them already: same shapes again
        prefill = first if typed else pinned_shapes(state.model, state.data_dir, sig, seq=wl.prompt_tokens, past=0,
                                                    kv_empty=state.kv_empty)
        decode = pinned_shapes(state.model, state.data_dir, sig, seq=1, past=wl.max_context - 1,
                               kv_empty=state.kv_empty)
        init_bytes = {t.name: tensor_nbytes(TensorInfo(t.name, t.data_type, tuple(t.dims)))
                      for t in state.model.graph.initializer}
        kv_outputs = sig.kv_outputs
        seen_weights: set[str] = set()
        costs = []
        unknown = 0
        for node in state.model.graph.node:
            weights = list(dict.fromkeys(i for i in node.input if i in init_bytes and i not in seen_weights))
            seen_weights.update(weights)
            outs = [o for o in node.output if o]
            if any(prefill.get(o) is None or prefill[o].shape is None for o in outs):
                unknown += 1
            kv = sum(tensor_nbytes(decode.get(o)) for o in outs if o in kv_outputs)
            lookup = node.op_type in LOOKUPS  # an embedding reads one row per token, not its table
            costs.append(NodeCost(
                flops_prefill=node_flops(node, prefill),
                flops_decode=node_flops(node, decode),
                weight_bytes=sum(init_bytes[w] for w in weights),
                act_bytes_prefill=sum(tensor_nbytes(prefill.get(o)) for o in outs),
                kv_bytes=kv,
                read_bytes_decode=kv + (0 if lookup else sum(init_bytes[w] for w in weights)),
            ))
        if unknown:
            state.notes.append(f"annotate-cost: {unknown} nodes without inferred shapes (costed as 0)")
        state.costs = costs
        state.tensors = {**state.tensors, **symbolic_types(state.model, state.data_dir)}
        state.shapes = {"prefill": prefill, "decode": decode}
        return state
