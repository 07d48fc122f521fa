"""simplify: onnxsim constant folding and dead-code removal, names kept.

before: the exported graph (shape arithmetic, Identity chains, constant subgraphs)
after:  an equivalent, smaller graph with the same graph input and output names
        and the same weights; ``llc verify`` checks the result against the original.

onnxsim sees the graph without its weights (they are typed graph inputs while
it runs, and go back in as the same initializer protos after), so simplifying
a 1B model takes seconds and a few MB instead of minutes and three times the
model: the weights are never read, and the 2 GB protobuf limit never applies.
A node whose inputs are all weights (the Transpose of a tied embedding that
torch.export leaves for the LM head) is folded after onnxsim, one node at a
time, reading only its own inputs: the result is a weight like any other, so
the quantizer sees a MatMul of a constant and the layer structure has no stray
node in the middle of a layer. Such results live in the cached graph itself.

The simplified graph is cached (llc.compiler.cache) under a key of the model's
hashes and onnxsim's version, without weights: they stay where the model keeps them.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import onnx
import onnx.defs

from llc.compiler.cache import cached_graph, key_of
from llc.errors import LlcError
from llc.compiler.state import CompileState, is_weight, value_infos, weightless_copy, with_weights
from llc.compiler.passes.load import detect_signature


CACHE_VERSION = 3  # bump when what load hands to simplify changes (inlining, constant forms)


def onnx_knows(node: onnx.NodeProto) -> bool:
    """An op of the ONNX standard (any opset), which onnxsim can fold and check."""
    try:
        onnx.defs.get_schema(node.op_type, domain=node.domain or "")
        return node.domain in ("", "ai.onnx")
    except onnx.defs.SchemaError:
        return False


@dataclass(frozen=True)
class Simplify:
    name: ClassVar[str] = "simplify"
    enabled: bool = True

    def run(self, state: CompileState) -> CompileState:
        if not self.enabled:
            return state
        foreign = sorted({n.op_type for n in state.model.graph.node if not onnx_knows(n)})
        if foreign:  # onnxsim cannot check what it does to these, and such graphs come optimized
            state.notes.append(f"simplify skipped: onnxruntime's own ops ({', '.join(foreign[:4])}) "
                               f"are not ONNX's, and their builder has optimized the graph")
            return state
        def simplified() -> onnx.ModelProto | None:
            import onnxsim  # imports torch: 4 s, paid only when the cache misses

            try:
                model, ok = onnxsim.simplify(weightless_copy(state.model), check_n=0, mutable_initializer=False)
            except Exception as e:  # onnxsim fails on exotic ops: keep the original graph
                state.notes.append(f"simplify skipped: onnxsim failed ({str(e).splitlines()[0][:120]})")
                return None
            if not ok:
                state.notes.append("simplify skipped: onnxsim could not validate its result")
                return None
            _check_names(state.model, model, state.source)
            return fold_weight_nodes(model, state.model, state.data_dir)

        d = state.digests
        version = importlib.metadata.version("onnxsim")
        got = cached_graph("simplify", key_of(d.model, sorted(d.data.items()), version, CACHE_VERSION), simplified)
        if got is None:
            return state
        state.model = with_weights(got, state.model)
        state.signature = detect_signature(state.model, state.source)
        state.tensors = value_infos(state.model)
        return state


def fold_weight_nodes(graph: onnx.ModelProto, source: onnx.ModelProto, data_dir: Path) -> onnx.ModelProto:
    """Compute each node of ``graph`` whose inputs are all constants, at least one a weight of ``source``.

    ``graph`` is onnxsim's output on ``weightless_copy(source)`` (weights are its inputs). A node's
    inputs are read from ``data_dir`` only when it is folded, and dropped after: memory holds one
    node's inputs and the folded results, never the model.
    """
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    weights = {t.name: t for t in source.graph.initializer if is_weight(t)}
    small = {t.name: t for t in graph.graph.initializer}
    made: dict[str, onnx.TensorProto] = {}
    keep = []
    for node in graph.graph.node:
        ins = [i for i in node.input if i]
        if not ins or not any(i in weights or i in made for i in ins) or any(
                i not in weights and i not in small and i not in made for i in ins) or any(
                a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            keep.append(node)
            continue
        values = {i: numpy_helper.to_array(made.get(i) or small.get(i) or weights[i], base_dir=str(data_dir))
                  for i in ins}
        single = onnx.helper.make_model(onnx.helper.make_graph(
            [node], "fold", [onnx.helper.make_tensor_value_info(i, onnx.TensorProto.UNDEFINED, None) for i in ins],
            [onnx.helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node.output if o]),
            opset_imports=list(graph.opset_import))
        results = ReferenceEvaluator(single).run(None, values)
        for name, value in zip([o for o in node.output if o], results):
            made[name] = numpy_helper.from_array(value, name)
    if not made:
        return graph
    del graph.graph.node[:]
    graph.graph.node.extend(keep)
    graph.graph.initializer.extend(made.values())
    return graph


def _check_names(before: onnx.ModelProto, after: onnx.ModelProto, where: Path) -> None:
    names = lambda m: ([i.name for i in m.graph.input], [o.name for o in m.graph.output])  # noqa: E731
    b_in, b_out = names(before)
    a_in, a_out = names(after)
    inits = {t.name for t in before.graph.initializer}
    if [i for i in b_in if i not in inits] != [i for i in a_in if i not in inits] or b_out != a_out:
        raise LlcError(where, "onnxsim changed the graph's input/output names; use --no-simplify")
