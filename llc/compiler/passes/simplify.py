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
node in the middle of a layer. Such results go to the cache entry's own data
file (the model's other weights stay where the model keeps them).

The simplified graph is cached (llc.compiler.cache) under a key of the model's
hashes and onnxsim's version, with the folded weights and none of the model's.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import onnx
import onnx.defs

from llc.compiler.cache import cached_entry, key_of
from llc.errors import LlcError
from llc.compiler.segment import HashingWriter, Sources, append_tensor
from llc.compiler.state import CompileState, inlined, is_weight, value_infos, weightless_copy, with_weights
from llc.compiler.passes.load import detect_signature


DATA = "model.onnx.data"  # the folded weights of a cache entry
CACHE_VERSION = 4  # bump when what load hands to simplify changes (inlining, constant forms)


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
        def write(folder: Path) -> bool:
            import onnxsim  # imports torch: 4 s, paid only when the cache misses

            try:
                model, ok = onnxsim.simplify(weightless_copy(state.model, state.data_dir), check_n=0,
                                             mutable_initializer=False)
            except Exception as e:  # onnxsim fails on exotic ops: keep the original graph
                state.notes.append(f"simplify skipped: onnxsim failed ({str(e).splitlines()[0][:120]})")
                return False
            if not ok:
                state.notes.append("simplify skipped: onnxsim could not validate its result")
                return False
            _check_names(state.model, model, state.source)
            fold_weight_nodes(model, state.model, state.data_dir, folder / DATA)
            onnx.save(model, str(folder / "model.onnx"))
            return True

        d = state.digests
        version = importlib.metadata.version("onnxsim")
        got = cached_entry("simplify", key_of(d.model, sorted(d.data.items()), version, CACHE_VERSION), write)
        if got is None:
            return state
        graph, entry = got
        for t in graph.graph.initializer:  # folded weights live in the entry: say where, absolutely
            for e in t.external_data:
                if e.key == "location":
                    e.value = str(entry / e.value)
        state.model = with_weights(graph, state.model)
        state.signature = detect_signature(state.model, state.source)
        state.tensors = value_infos(state.model)
        return state


def fold_weight_nodes(graph: onnx.ModelProto, source: onnx.ModelProto, data_dir: Path, data: Path) -> None:
    """Compute each node of ``graph`` whose inputs are all constants, at least one a weight of ``source``.

    ``graph`` is onnxsim's output on ``weightless_copy(source)`` (weights are its inputs).
    A node's inputs are read only when it is folded; each result goes straight to
    the ``data`` file and ``graph`` keeps a reference to it. Memory holds one node's
    inputs and output, never the model, and no folded tensor enters the protobuf.
    """
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    weights = {t.name: t for t in source.graph.initializer if is_weight(t)}
    small = {t.name: t for t in graph.graph.initializer}
    made: dict[str, onnx.TensorProto] = {}
    keep = []
    with open(data, "wb") as f, contextlib.ExitStack() as files:
        out, sources = HashingWriter(f), Sources(files)
        for node in graph.graph.node:
            ins = [i for i in node.input if i]
            if not ins or not any(i in weights or i in made for i in ins) or any(
                    i not in weights and i not in small and i not in made for i in ins) or any(
                    a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
                keep.append(node)
                continue
            f.flush()  # a result folded before may be read back as an input
            values = {i: numpy_helper.to_array(inlined(made[i], data.parent) if i in made else
                                               inlined(weights.get(i) or small[i], data_dir)) for i in ins}
            single = onnx.helper.make_model(onnx.helper.make_graph(
                [node], "fold", [onnx.helper.make_tensor_value_info(i, onnx.TensorProto.UNDEFINED, None) for i in ins],
                [onnx.helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node.output if o]),
                opset_imports=list(graph.opset_import))
            results = ReferenceEvaluator(single).run(None, values)
            del values
            for name, value in zip([o for o in node.output if o], results):
                made[name] = append_tensor(numpy_helper.from_array(value, name), data_dir, sources, out, data.name)
    if not out.offset:
        data.unlink()
    if made:
        del graph.graph.node[:]
        graph.graph.node.extend(keep)
        graph.graph.initializer.extend(made.values())


def _check_names(before: onnx.ModelProto, after: onnx.ModelProto, where: Path) -> None:
    names = lambda m: ([i.name for i in m.graph.input], [o.name for o in m.graph.output])  # noqa: E731
    b_in, b_out = names(before)
    a_in, a_out = names(after)
    inits = {t.name for t in before.graph.initializer}
    if [i for i in b_in if i not in inits] != [i for i in a_in if i not in inits] or b_out != a_out:
        raise LlcError(where, "onnxsim changed the graph's input/output names; use --no-simplify")
