"""quantize and simplify in bounded memory: the same result as the whole-model tools, weight by weight."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from llc.compiler import analysis_passes, new_state
from llc.compiler.pipeline import PassManager
from llc.compiler.state import is_weight
from llc.profile import Workload
from models import tiny_gpt2, tiny_llama, tiny_llama_tied

WL = Workload(16, 128)


def tensors(model: onnx.ModelProto, base: str) -> dict[str, bytes]:
    out = {}
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            onnx.external_data_helper.load_external_data_for_tensor(t, base)
        out[t.name] = t.raw_data if t.HasField("raw_data") else numpy_helper.to_array(t).tobytes()
    return out


@pytest.mark.parametrize("weights", ["int4", "int8"])
@pytest.mark.parametrize("make", [lambda: tiny_llama("legacy", external_data=True),
                                  lambda: tiny_llama_tied("dynamo")], ids=["llama-legacy", "tied-dynamo"])
def test_quantize_weight_by_weight_equals_onnxruntimes_whole_model_quantizer(make, weights, tmp_path, monkeypatch):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    monkeypatch.setenv("LLC_CACHE", str(tmp_path / "cache"))
    model = make()
    ours = PassManager(analysis_passes(weights=weights)[:3]).run(new_state(model, None, WL))
    simplified = PassManager(analysis_passes()[:2]).run(new_state(model, None, WL))
    full = onnx.ModelProto()
    full.CopyFrom(simplified.model)
    onnx.load_external_data_for_model(full, str(simplified.data_dir))
    q = MatMulNBitsQuantizer(full, bits={"int4": 4, "int8": 8}[weights], block_size=32, is_symmetric=False,
                             accuracy_level=4, op_types_to_quantize=("MatMul", "Gather") if weights == "int4" else
                             ("MatMul",), quant_axes=(("MatMul", 0), ("Gather", 1)))
    q.process()
    theirs = q.model.model
    got = onnx.load(str(ours.data_dir / "model.onnx"))
    assert [(n.op_type, list(n.input)) for n in got.graph.node] == [(n.op_type, list(n.input)) for n in theirs.graph.node]
    assert tensors(got, str(ours.data_dir)) == tensors(theirs, "")
    assert (got.ir_version, sorted((o.domain, o.version) for o in got.opset_import)) == (
        theirs.ir_version, sorted((o.domain, o.version) for o in theirs.opset_import))
    assert sum(n.op_type == "MatMulNBits" for n in got.graph.node) >= 4


def test_simplify_folds_a_node_of_weights_alone(tmp_path, monkeypatch):
    """torch.export leaves the LM head as MatMul(x, Transpose(lm_head.weight)): onnxsim, which sees the
    graph without weights, cannot fold it, so simplify does; the quantizer then finds a constant B."""
    monkeypatch.setenv("LLC_CACHE", str(tmp_path / "cache"))
    model = tiny_gpt2("dynamo")
    before = PassManager(analysis_passes()[:1]).run(new_state(model, None, WL)).model
    weights = {t.name for t in before.graph.initializer if is_weight(t)}
    assert any(n.input and all(i in weights for i in n.input) for n in before.graph.node)
    state = PassManager(analysis_passes()[:2]).run(new_state(model, None, WL))
    inits = {t.name: t for t in state.model.graph.initializer}
    assert not any(n.input and all(i in inits for i in n.input if i) for n in state.model.graph.node)
    head = next(n for n in reversed(state.model.graph.node) if n.op_type == "MatMul")
    lm = numpy_helper.to_array(inits[head.input[1]])
    np.testing.assert_array_equal(lm.T, numpy_helper.to_array(
        {t.name: t for t in before.graph.initializer}["lm_head.weight"]))
