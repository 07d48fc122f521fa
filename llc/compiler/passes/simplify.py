"""simplify: onnxsim constant folding and dead-code removal, names kept.

before: the exported graph (shape arithmetic, Identity chains, constant subgraphs)
after:  an equivalent, smaller graph with the same graph input and output names;
        weights are loaded into memory here (onnxsim needs them) and written out
        once, by emit. ``llc verify`` checks the result against the original.

The result is cached (llc.compiler.cache) under a key of the model's hashes and
onnxsim's version, because simplifying a real model is the slowest compile step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import onnx
import onnx.defs

from llc.compiler.cache import cached_model, key_of, loaded_full
from llc.errors import LlcError
from llc.compiler.state import CompileState, value_infos
from llc.compiler.passes.load import detect_signature


CACHE_VERSION = 2  # bump when what load hands to simplify changes (inlining, constant forms)


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
        import onnxsim

        def simplified() -> onnx.ModelProto | None:
            try:
                model, ok = onnxsim.simplify(loaded_full(state.model, state.data_dir), check_n=0,
                                             mutable_initializer=False)
            except Exception as e:  # onnxsim fails on exotic ops: keep the original graph
                state.notes.append(f"simplify skipped: onnxsim failed ({str(e).splitlines()[0][:120]})")
                return None
            if not ok:
                state.notes.append("simplify skipped: onnxsim could not validate its result")
                return None
            _check_names(state.model, model, state.source)
            return model

        d = state.digests
        got = cached_model("simplify", key_of(d.model, sorted(d.data.items()), onnxsim.__version__, CACHE_VERSION),
                           simplified)
        if got is None:
            return state
        state.model, state.data_dir = got
        state.signature = detect_signature(state.model, state.source)
        state.tensors = value_infos(state.model)
        return state


def _check_names(before: onnx.ModelProto, after: onnx.ModelProto, where: Path) -> None:
    names = lambda m: ([i.name for i in m.graph.input], [o.name for o in m.graph.output])  # noqa: E731
    b_in, b_out = names(before)
    a_in, a_out = names(after)
    inits = {t.name for t in before.graph.initializer}
    if [i for i in b_in if i not in inits] != [i for i in a_in if i not in inits] or b_out != a_out:
        raise LlcError(where, "onnxsim changed the graph's input/output names; use --no-simplify")
