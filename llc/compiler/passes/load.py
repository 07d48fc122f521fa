"""load: read the ONNX model lazily and find what its inputs and outputs are for.

before: a path to ``model.onnx`` (+ external data beside it)
after:  ``state.model`` with model-local functions inlined, Constant nodes in
        their tensor form, and without weight bytes loaded; ``state.digests`` (external tensors stay
        references into ``state.data_dir``), ``state.signature`` (token input,
        KV-cache bindings, logits), ``state.tensors`` (symbolic types).

Roles are found from the graph's structure and types, not from one exporter's
naming: a float input of rank >= 3 is a KV-cache input and its present output is
the first graph output reachable from it; the token input is the integer input
read by a Gather on a float table.
"""

from __future__ import annotations

import functools
import os
import re
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import onnx
from google.protobuf.message import DecodeError

from llc.errors import LlcError
from llc.runtime.device.manifest import sha256_file
from llc.compiler.state import CompileState, Digests, KVBinding, Signature, consumers, external_location, value_infos

MAX_PRESENT_DEPTH = 8  # a present output is at most a few ops after its past input


def read_model(path: Path) -> onnx.ModelProto:
    """Parse an ONNX file without loading external data; LlcError on anything wrong."""
    if not path.is_file():
        raise LlcError(path, "model file not found")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError) as e:
        raise LlcError(path, f"not a valid ONNX file ({type(e).__name__}: {str(e).strip()[:80]})") from None
    except Exception as e:  # onnx raises a variety of parse errors
        raise LlcError(path, f"not a valid ONNX file ({str(e).strip()[:80]})") from None
    if model.ir_version <= 0 or not model.graph.node or not model.graph.output:
        raise LlcError(path, "not an ONNX model (no graph, nodes or outputs)")
    check_external_data(model, path.parent, path)
    check_onnx(path)
    return model


def check_onnx(path: Path) -> None:
    """ONNX's checker, by path (it resolves external data beside the file); LlcError if invalid.

    onnxruntime's own ops (the contrib ops of onnxruntime-genai's builder or Olive) are
    unknown to ONNX's checker: a model is let through on those, as onnxruntime checks
    the graph itself when a session loads it.
    """
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "invalid"
        unknown = re.search(r"No Op registered for (\w+) with domain_version", first)
        if not (unknown and unknown.group(1) in onnxruntime_ops()):
            raise LlcError(path, f"invalid ONNX model: {first[:160]}") from None


@functools.lru_cache(maxsize=1)
def onnxruntime_ops() -> frozenset[str]:
    """Every op onnxruntime has a CPU kernel for, in any domain (contrib ops included)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as C

    return frozenset(d.op_name for d in C.get_all_opkernel_def())


def digests(model: onnx.ModelProto, path: Path) -> Digests:
    """The model file's and its external data files' sha256: what the build is made from."""
    data = sorted({loc[0] for t in model.graph.initializer if (loc := external_location(t))})
    return Digests(sha256_file(path), {name: sha256_file(path.parent / name) for name in data})


def inline_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """Expand calls of model-local functions (onnxscript writes a layer as one call node).

    Cuts fall between nodes, so a layer hidden in a function would be one uncuttable
    node; after inlining it is ordinary nodes. Weights are not touched (external
    tensors stay references).
    """
    if not model.functions:
        return model
    import onnx.inliner

    return onnx.inliner.inline_local_functions(model)


_CONSTANT_KINDS = {"value_float": (onnx.TensorProto.FLOAT, False), "value_floats": (onnx.TensorProto.FLOAT, True),
                   "value_int": (onnx.TensorProto.INT64, False), "value_ints": (onnx.TensorProto.INT64, True)}


def constants_as_tensors(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant nodes with ``value_float(s)``/``value_int(s)`` rewritten to the ``value`` tensor form.

    onnxscript writes the short forms; onnxruntime's symbolic shape inference
    (annotate-cost) only reads ``value``. Same values, same dtype.
    """
    for node in model.graph.node:
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
            continue
        for attr in list(node.attribute):
            kind = _CONSTANT_KINDS.get(attr.name)
            if kind is None:
                continue
            value = onnx.helper.get_attribute_value(attr)
            dims = [len(value)] if kind[1] else []
            tensor = onnx.helper.make_tensor(node.output[0], kind[0], dims, value if kind[1] else [value])
            node.attribute.remove(attr)
            node.attribute.append(onnx.helper.make_attribute("value", tensor))
    return model


def check_external_data(model: onnx.ModelProto, data_dir: Path, path: Path) -> None:
    """Every external tensor's file exists and is long enough (catches missing/truncated data)."""
    sizes: dict[str, int] = {}
    for t in model.graph.initializer:
        loc = external_location(t)
        if loc is None:
            continue
        name, offset, length = loc
        f = data_dir / name
        if name not in sizes:
            if not f.is_file():
                raise LlcError(path, f"external data file {name} not found in {data_dir}")
            sizes[name] = os.path.getsize(f)
        if length >= 0 and offset + length > sizes[name]:
            raise LlcError(path, f"external data file {name} is truncated "
                                 f"({sizes[name]} bytes, tensor {t.name} needs {offset + length})")


def detect_signature(model: onnx.ModelProto, where: Path) -> Signature:
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    info = value_infos(model)
    cons = consumers(g)
    outputs = [o.name for o in g.output]
    roles: dict[str, str] = {}
    for inp in g.input:
        if inp.name in inits:
            continue
        t = info.get(inp.name)
        lname = inp.name.lower()
        is_float = t is not None and t.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                                     onnx.TensorProto.BFLOAT16)
        rank = len(t.shape) if t is not None and t.shape is not None else 0
        if is_float and rank >= 3:
            roles[inp.name] = "kv"
        elif "input_ids" in lname or lname in ("tokens", "input"):
            roles[inp.name] = "input_ids"
        elif "attention_mask" in lname or lname == "mask":
            roles[inp.name] = "attention_mask"
        elif "position" in lname:
            roles[inp.name] = "position_ids"
        else:
            roles[inp.name] = "other"
    if "input_ids" not in roles.values():  # fall back to structure: int input -> Gather(table)
        for name, role in roles.items():
            if role != "other":
                continue
            for i in cons.get(name, []):
                n = g.node[i]
                if n.op_type == "Gather" and n.input[1] == name and n.input[0] in inits:
                    roles[name] = "input_ids"
    if list(roles.values()).count("input_ids") != 1:
        raise LlcError(where, "cannot find the token input (an int64 input such as input_ids)")

    producers_of = {o: n for n in g.node for o in n.output}
    taken: set[str] = set()
    kv: list[KVBinding] = []
    for name, role in roles.items():
        if role != "kv":
            continue
        present = _first_output_after(name, g, cons, set(outputs) - taken)
        if present is None:
            raise LlcError(where, f"KV-cache input {name} has no present output")
        taken.add(present)
        kv.append(KVBinding(past=name, present=present, seq_axis=_seq_axis(name, g, cons, info)))
    rest = [o for o in outputs if o not in taken]
    logits = "logits" if "logits" in rest else (rest[0] if rest else None)
    if logits is None or logits not in producers_of:
        raise LlcError(where, "cannot find the logits output")
    return Signature(input_roles=roles, kv=tuple(kv), logits=logits)


def _seq_axis(past: str, g: onnx.GraphProto, cons: dict[str, list[int]], info) -> int:
    """The axis the cache grows along: the Concat that appends this step's keys says it.

    Without one (a fused attention op), the first symbolic axis after the batch,
    else the second to last ([batch, heads, seq, dim] as every exporter here writes it).
    """
    shape = info[past].shape or ()
    for i in cons.get(past, []):
        node = g.node[i]
        if node.op_type == "Concat":
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            return axis + len(shape) if axis < 0 and shape else axis
    axes = [i for i, d in enumerate(shape) if isinstance(d, str) and i > 0]
    return axes[0] if axes else len(shape) - 2


def _first_output_after(start: str, g: onnx.GraphProto, cons: dict[str, list[int]],
                        candidates: set[str]) -> str | None:
    """Breadth-first from a KV input to the nearest graph output (its present)."""
    seen = {start}
    frontier = deque([(start, 0)])
    while frontier:
        t, depth = frontier.popleft()
        if t in candidates and t != start:
            return t
        if depth >= MAX_PRESENT_DEPTH:
            continue
        for i in cons.get(t, []):
            for o in g.node[i].output:
                if o and o not in seen:
                    seen.add(o)
                    frontier.append((o, depth + 1))
    return None


@dataclass(frozen=True)
class Load:
    name: ClassVar[str] = "load"

    def run(self, state: CompileState) -> CompileState:
        state.model = constants_as_tensors(inline_functions(read_model(state.source)))
        state.data_dir = state.source.parent
        state.digests = digests(state.model, state.source)
        state.signature = detect_signature(state.model, state.source)
        state.tensors = value_infos(state.model)
        return state
