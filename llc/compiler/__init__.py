"""The compile pipeline: which passes run, in which order, with which options."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import onnx

from llc.errors import LlcError
from llc.compiler.state import CompileState
from llc.compiler.passes.annotate_cost import AnnotateCost
from llc.compiler.passes.coarsen import Coarsen
from llc.compiler.passes.comm_map import CommMap
from llc.compiler.passes.emit import Emit
from llc.compiler.passes.load import Load
from llc.compiler.passes.partition import Partition
from llc.compiler.passes.past_length import PastLength
from llc.compiler.passes.simplify import Simplify
from llc.compiler.pipeline import PassManager
from llc.profile import Profile, Workload

# one explicit registry: name -> pass class (a test checks each key is the pass's own name)
PASSES = {p.name: p for p in (Load, Simplify, PastLength, AnnotateCost, Coarsen, Partition, CommMap, Emit)}


def eos_ids_beside(model: Path) -> tuple[int, ...]:
    """EOS token ids from generation.json next to the model (written by the export scripts)."""
    gen = model.parent / "generation.json"
    if not gen.is_file():
        return ()
    try:
        ids = json.loads(gen.read_text()).get("eos_token_ids", [])
    except json.JSONDecodeError as e:
        raise LlcError(gen, f"invalid JSON ({e.msg})") from None
    return tuple(int(i) for i in (ids if isinstance(ids, list) else [ids]))


def analysis_passes(simplify: bool = True, granularity: str = "layer") -> list:
    return [Load(), Simplify(enabled=simplify), PastLength(), AnnotateCost(), Coarsen(granularity=granularity)]


def new_state(model: Path, profile: Profile, workload: Workload) -> CompileState:
    return CompileState(source=Path(model), model=onnx.ModelProto(), data_dir=Path(model).parent,
                        profile=profile, workload=workload)


def compile_model(model: Path, profile: Profile, out_dir: Path, *, workload: Workload | None = None,
                  simplify: bool = True, granularity: str = "layer", dump_after: set[str] = frozenset(),
                  quiet: bool = False, eos_token_ids: tuple[int, ...] | None = None,
                  split: str | None = None) -> tuple[CompileState, PassManager]:
    workload = workload or profile.workload
    eos = eos_token_ids if eos_token_ids is not None else eos_ids_beside(Path(model))
    pm = PassManager(
        passes=analysis_passes(simplify, granularity) + [
            Partition(split=split), CommMap(), Emit(out_dir=Path(out_dir), eos_token_ids=eos)],
        dump_after=set(dump_after),
        dump_dir=Path(out_dir).resolve().parent,
        progress=None if quiet else (lambda m: print(f"llc: {m}", file=sys.stderr, flush=True)),
    )
    state = pm.run(new_state(model, profile, workload))
    return state, pm


def with_overrides(w: Workload, **kw) -> Workload:
    return dataclasses.replace(w, **{k: v for k, v in kw.items() if v is not None})
