"""quantize and simplify in bounded memory: the same result as the whole-model tools, weight by weight."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from llc.compiler import analysis_passes, new_state
from llc.compiler.pipeline import PassManager
from llc.compiler.state import inlined, is_weight
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
    inits = [inlined(t, simplified.data_dir) for t in full.graph.initializer]  # folded ones live in the cache
    del full.graph.initializer[:]
    full.graph.initializer.extend(inits)
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
    lm = numpy_helper.to_array(inlined(inits[head.input[1]], state.data_dir))
    np.testing.assert_array_equal(lm.T, numpy_helper.to_array(
        {t.name: t for t in before.graph.initializer}["lm_head.weight"]))


def test_initializers_also_listed_as_inputs_leave_no_dangling_input(tmp_path, monkeypatch):
    """Older IRs list every initializer as a graph input too: a weight folded or quantized away
    must take its input entry with it, or onnxruntime would ask for it as an input."""
    import onnxruntime as ort

    monkeypatch.setenv("LLC_CACHE", str(tmp_path / "cache"))
    model = onnx.load(str(tiny_llama_tied("dynamo")))
    declared = {i.name for i in model.graph.input}
    model.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                             for t in model.graph.initializer if t.name not in declared)
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    state = PassManager(analysis_passes(weights="int4")[:3]).run(new_state(path, None, WL))
    for m in (state.model, onnx.load(str(state.data_dir / "model.onnx"))):
        inits = {t.name for t in m.graph.initializer}
        assert {i.name for i in m.graph.input} - inits == declared
    session = ort.InferenceSession(str(state.data_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    assert {i.name for i in session.get_inputs()} == declared
