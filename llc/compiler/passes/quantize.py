"""quantize: int8 or int4 weights for an fp32 model's MatMuls (onnxruntime's MatMulNBits quantizer).

before: ``y = MatMul(x, W)`` with W a float initializer [K, N]; ``e = Gather(E, ids)``
after:  ``y = com.microsoft.MatMulNBits(x, W_q, scales)`` with W packed to 4 or 8 bits
        in blocks of ``block_size`` along K, a float scale and a zero point per block;
        ``e = com.microsoft.GatherBlockQuantized(E_q, ids, scales)`` likewise along the rows
        (int4 only: onnxruntime quantizes a Gather to 4 bits, not 8).

Why: a phone's decode step reads every weight once per token, so 4-bit weights
are read about 7x faster than fp32, and take 6-7x less memory. onnxruntime's
own quantizer writes the op its CPU kernels run fastest. Zero points (asymmetric
blocks) cost a few bytes a block and are worth them: on SmolLM2-135M int4 they
cut the perplexity increase from 45% to 25% (measured with `llc eval`). ``accuracy_level`` 4
lets MatMulNBits compute in int8 (the fast path on ARM's dot-product
instructions, and on x86 with AVX2/VNNI). The embedding table, often the
largest tensor of a small model, is quantized the same way.

Split and unsplit then share the quantized graph: ``llc verify`` compares the
split with this unsplit quantized model (the plan's ``model.reference``), and
``llc eval`` the quantized model with the fp32 one the user gave. The result is
cached like simplify's (llc.compiler.cache).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import onnx
from onnx import TensorProto

from llc.compiler.cache import cached_entry, key_of
from llc.compiler.passes.load import detect_signature
from llc.compiler.passes.simplify import CACHE_VERSION as SIMPLIFY_VERSION
from llc.compiler.segment import HashingWriter, Sources, append_tensor
from llc.compiler.state import CompileState, inlined, node_inputs, value_infos

BITS = {"int8": 8, "int4": 4}
OPS = {"int8": ("MatMul",), "int4": ("MatMul", "Gather")}  # onnxruntime quantizes a Gather to 4 bits only
WEIGHT_INPUT = {"MatMul": 1, "Gather": 0}
FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)
QUANTIZER_VERSION = 5  # bump when what this pass asks of the quantizer changes


@dataclass(frozen=True)
class Quantize:
    name: ClassVar[str] = "quantize"
    weights: str = "fp32"  # fp32 (nothing to do) | int8 | int4
    block_size: int = 32
    accuracy_level: int = 4

    def run(self, state: CompileState) -> CompileState:
        if self.weights == "fp32":
            return state
        if any(n.op_type == "MatMulNBits" for n in state.model.graph.node):
            state.notes.append("quantize skipped: the model's weights are quantized already")
            return state
        import onnxruntime

        d = state.digests  # with the simplify option, what the graph handed to this pass is made of
        key = key_of(d.model, sorted(d.data.items()), state.options.get("simplify"), SIMPLIFY_VERSION, self.weights,
                     self.block_size, self.accuracy_level, onnxruntime.__version__, QUANTIZER_VERSION)
        state.model, state.data_dir = cached_entry(
            "quantize", key, lambda folder: self.write(state.model, state.data_dir, folder))
        state.reference = state.data_dir / "model.onnx"
        state.signature = detect_signature(state.model, state.source)
        state.tensors = value_infos(state.model)
        return state

    def write(self, model: onnx.ModelProto, data_dir: Path, folder: Path) -> bool:
        """Quantize ``model`` into ``folder`` one weight at a time (model.onnx + model.onnx.data).

        onnxruntime's quantizer is handed each MatMul or Gather with only its own weight
        loaded; what it makes is appended to the data file at once and dropped. The
        weights it leaves (norms, biases) are copied in chunks. Memory holds one weight
        and its quantized form, never the model, so a 1B model quantizes in a few hundred MB.
        """
        from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                       DefaultWeightOnlyQuantizer)
        from onnxruntime.quantization.quant_utils import QuantFormat

        logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # a line per MatMul
        quantizer = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(
            block_size=self.block_size, is_symmetric=False, accuracy_level=self.accuracy_level,
            quant_format=QuantFormat.QOperator, op_types_to_quantize=OPS[self.weights],
            quant_axes=(("MatMul", 0), ("Gather", 1)), bits=BITS[self.weights]))
        g = model.graph
        weights = {t.name: t for t in g.initializer}
        out = _without_graph(model)
        data = folder / "model.onnx.data"
        written: dict[str, TensorProto] = {}
        with open(data, "wb") as f, contextlib.ExitStack() as files:
            writer = HashingWriter(f)
            sources = Sources(files)

            def put(t: TensorProto) -> None:
                if t.name not in written:  # a weight two nodes share is quantized the same, stored once
                    written[t.name] = append_tensor(t, data_dir, sources, writer, data.name)

            for node in g.node:
                w = weights.get(node.input[WEIGHT_INPUT[node.op_type]]) if (
                    node.op_type in OPS[self.weights] and len(node.input) > 1) else None
                if w is None or w.data_type not in FLOATS:
                    out.graph.node.append(node)
                    continue
                scratch = onnx.GraphProto()
                scratch.initializer.append(inlined(w, data_dir))
                made = quantizer.quantize(node, [scratch])
                out.graph.node.extend(made)
                if made == [node]:
                    continue
                for t in scratch.initializer[1:]:
                    put(t)
            used = {i for n in out.graph.node for i in node_inputs(n)}
            for t in g.initializer:  # the weights the nodes still read, as they were
                if t.name in used:
                    put(t)
        out.graph.initializer.extend(t for name, t in written.items() if name in used)
        gone = set(weights) - set(written)  # older IRs list initializers as inputs too
        out.graph.input.extend(i for i in g.input if i.name not in gone)
        _opsets(out)
        onnx.save(out, str(folder / "model.onnx"))
        return True


def _without_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model``'s header, opsets, functions, graph name, outputs and value types; no nodes, inputs or weights."""
    out = onnx.ModelProto()
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(out, field, getattr(model, field))
    out.opset_import.extend(model.opset_import)
    out.metadata_props.extend(model.metadata_props)
    out.functions.extend(model.functions)
    out.graph.name = model.graph.name
    out.graph.output.extend(model.graph.output)
    out.graph.value_info.extend(model.graph.value_info)
    return out


def _opsets(model: onnx.ModelProto) -> None:
    """What onnxruntime's quantizer sets on a model it writes: the contrib domain; for int4 lookups
    (GatherBlockQuantized, 4-bit tensors) opset 21 and IR version 10."""
    domains = {o.domain: o for o in model.opset_import}
    if "com.microsoft" not in domains:
        model.opset_import.add(domain="com.microsoft", version=1)
    if any(n.op_type == "GatherBlockQuantized" for n in model.graph.node):  # (a model with none keeps its opset)
        for o in model.opset_import:
            if o.domain in ("", "ai.onnx") and o.version < 21:
                o.version = 21
        model.ir_version = max(model.ir_version, 10)
