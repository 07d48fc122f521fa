"""simplify: onnxsim constant folding and dead-code removal, names kept.

before: the exported graph (shape arithmetic, Identity chains, constant subgraphs)
after:  an equivalent, smaller graph with the same graph input and output names;
        weights are loaded into memory here (onnxsim needs them) and written out
        once, by emit. ``llc verify`` checks the result against the original.

The result is cached under ``~/.cache/llc/simplify`` keyed by the model bytes and
onnxsim version, because simplifying a real model is the slowest compile step.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import onnx
import onnx.defs

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


def cache_dir() -> Path:
    return Path(os.environ.get("LLC_CACHE", Path.home() / ".cache" / "llc")) / "simplify"


@dataclass(frozen=True)
class Simplify:
    name: ClassVar[str] = "simplify"
    enabled: bool = True
    use_cache: bool = True

    def run(self, state: CompileState) -> CompileState:
        if not self.enabled:
            return state
        foreign = sorted({n.op_type for n in state.model.graph.node if not onnx_knows(n)})
        if foreign:  # onnxsim cannot check what it does to these, and such graphs come optimized
            state.notes.append(f"simplify skipped: onnxruntime's own ops ({', '.join(foreign[:4])}) "
                               f"are not ONNX's, and their builder has optimized the graph")
            return state
        import onnxsim

        d = state.digests
        key = hashlib.sha256(f"{d.model}:{sorted(d.data.items())}:{onnxsim.__version__}:{CACHE_VERSION}".encode()
                             ).hexdigest()[:32]
        cached = cache_dir() / key / "model.onnx"
        if self.use_cache and cached.is_file():
            state.model = onnx.load(str(cached), load_external_data=False)
            state.data_dir = cached.parent
        else:
            full = onnx.ModelProto()
            full.CopyFrom(state.model)
            onnx.load_external_data_for_model(full, str(state.data_dir))
            try:
                simplified, ok = onnxsim.simplify(full, check_n=0, mutable_initializer=False)
            except Exception as e:  # onnxsim fails on exotic ops: keep the original graph
                state.notes.append(f"simplify skipped: onnxsim failed ({str(e).splitlines()[0][:120]})")
                return state
            if not ok:
                state.notes.append("simplify skipped: onnxsim could not validate its result")
                return state
            _check_names(state.model, simplified, state.source)
            state.model = simplified
            state.data_dir = state.source.parent  # no external data left; nothing resolves here
            if self.use_cache:  # reload lazily from the cache: weights leave memory
                _save_cache(simplified, cached)
                if cached.is_file():
                    state.model = onnx.load(str(cached), load_external_data=False)
                    state.data_dir = cached.parent
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


def _save_cache(model: onnx.ModelProto, target: Path) -> None:
    """Write to a temporary folder and rename, so a crash never leaves half a cache entry."""
    tmp = target.parent.with_name(target.parent.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save(copy, str(tmp / "model.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=1024)
    try:
        tmp.rename(target.parent)
    except OSError:  # another compile filled it first
        pass
