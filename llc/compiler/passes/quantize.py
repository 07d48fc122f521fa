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

import logging
from dataclasses import dataclass
from typing import ClassVar

import onnx

from llc.compiler.cache import cached_model, key_of, loaded_full
from llc.compiler.passes.load import detect_signature
from llc.compiler.passes.simplify import CACHE_VERSION as SIMPLIFY_VERSION
from llc.compiler.state import CompileState, value_infos

BITS = {"int8": 8, "int4": 4}
OPS = {"int8": ("MatMul",), "int4": ("MatMul", "Gather")}  # onnxruntime quantizes a Gather to 4 bits only
QUANTIZER_VERSION = 3  # bump when what this pass asks of the quantizer changes


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
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        def quantized() -> onnx.ModelProto:
            logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # a line per MatMul
            q = MatMulNBitsQuantizer(loaded_full(state.model, state.data_dir), bits=BITS[self.weights],
                                     block_size=self.block_size, is_symmetric=False,
                                     accuracy_level=self.accuracy_level, op_types_to_quantize=OPS[self.weights],
                                     quant_axes=(("MatMul", 0), ("Gather", 1)))
            q.process()
            return q.model.model

        d = state.digests  # with the simplify option, what the graph handed to this pass is made of
        key = key_of(d.model, sorted(d.data.items()), state.options.get("simplify"), SIMPLIFY_VERSION, self.weights,
                     self.block_size, self.accuracy_level, onnxruntime.__version__, QUANTIZER_VERSION)
        state.model, state.data_dir = cached_model("quantize", key, quantized)
        state.reference = state.data_dir / "model.onnx"
        state.signature = detect_signature(state.model, state.source)
        state.tensors = value_infos(state.model)
        return state
