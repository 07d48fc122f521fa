"""The compiler: the pass registry and the compile pipeline (which passes run, in which order).

    load -> simplify -> quantize -> past-length -> annotate-cost -> coarsen   (analysis_passes: the model)
         -> partition -> comm-map -> layout -> split -> emit         (for a device profile)

A compile whose inputs (the model's and its data's hashes, the profile's, the
options, the llc version) equal those recorded in an intact build is a no-op:
only load runs, to hash the model, and the build is left as it is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import onnx

from llc.bundle import schema
from llc.compiler.passes.annotate_cost import AnnotateCost
from llc.compiler.passes.coarsen import Coarsen
from llc.compiler.passes.comm_map import CommMap
from llc.compiler.passes.emit import Emit
from llc.compiler.passes.layout import LayoutPass, build_inputs
from llc.compiler.passes.load import Load
from llc.compiler.passes.partition import Partition
from llc.compiler.passes.past_length import PastLength
from llc.compiler.passes.quantize import Quantize
from llc.compiler.passes.simplify import Simplify
from llc.compiler.passes.split import Split
from llc.compiler.pipeline import PassManager
from llc.compiler.segment import sha256_file
from llc.compiler.state import CompileState
from llc.errors import LlcError
from llc.progress import to_stderr
from llc.profile import Profile, Workload

# one explicit registry: name -> pass class (a test checks each key is the pass's own name)
PASSES = {p.name: p for p in (Load, Simplify, Quantize, PastLength, AnnotateCost, Coarsen, Partition, CommMap, LayoutPass,
                              Split, Emit)}


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


def analysis_passes(simplify: bool = True, granularity: str = "layer", weights: str = "fp32") -> list:
    return [Load(), Simplify(enabled=simplify), Quantize(weights=weights), PastLength(), AnnotateCost(),
            Coarsen(granularity=granularity)]


def new_state(model: Path, profile: Profile | None, workload: Workload) -> CompileState:
    return CompileState(source=Path(model), model=onnx.ModelProto(), data_dir=Path(model).parent,
                        profile=profile, workload=workload)


def build_options(workload: Workload, simplify: bool, granularity: str, split: str | None,
                  eos: tuple[int, ...], weights: str = "fp32") -> dict[str, str]:
    """The compile options that shape a build, as text (a split file by its content's hash)."""
    how = split or "mip"
    if split not in (None, "even", "memory"):
        try:
            how = f"file {hashlib.sha256(Path(split).read_bytes()).hexdigest()}"
        except OSError as e:
            raise LlcError(split, f"cannot read split file ({e.strerror or e})") from None
    return {"workload": json.dumps(dataclasses.asdict(workload), sort_keys=True), "simplify": str(simplify),
            "granularity": granularity, "split": how, "eos_token_ids": json.dumps(list(eos)), "weights": weights}


def up_to_date(out_dir: Path, inputs: dict) -> str | None:
    """The build id if ``out_dir`` is an intact build of exactly these inputs, else None."""
    try:
        build = schema.open_build(out_dir)
        if dataclasses.asdict(build.plan.inputs) != inputs:
            return None
        for device in build.devices:
            m = build.manifest(device)
            folder = out_dir / "devices" / device
            if m.build_id != build.build_id or any(
                    not (folder / f).is_file() or sha256_file(folder / f) != h for f, h in m.files.items()):
                return None
    except LlcError:
        return None
    return build.build_id


def compile_model(model: Path, profile: Profile, out_dir: Path, *, workload: Workload | None = None,
                  simplify: bool = True, granularity: str = "layer", dump_after: set[str] = frozenset(),
                  quiet: bool = False, eos_token_ids: tuple[int, ...] | None = None,
                  split: str | None = None, force: bool = False, weights: str = "fp32"
                  ) -> tuple[CompileState, PassManager]:
    """Compile ``model`` for ``profile`` into ``out_dir``; ``state.up_to_date`` if nothing had to change."""
    workload = workload or profile.workload
    eos = eos_token_ids if eos_token_ids is not None else eos_ids_beside(Path(model))
    progress = None if quiet else to_stderr
    passes = analysis_passes(simplify, granularity, weights) + [
        Partition(split=split), CommMap(), LayoutPass(), Split(),
        Emit(out_dir=Path(out_dir), eos_token_ids=eos, progress=progress)]
    pm = PassManager(passes=passes, dump_after=set(dump_after), dump_dir=Path(out_dir).resolve().parent,
                     progress=progress)
    state = new_state(model, profile, workload)
    state.options = build_options(workload, simplify, granularity, split, eos, weights)
    state = pm.run(state, stop_after="load")
    if not force and up_to_date(Path(out_dir), build_inputs(state)):
        state.up_to_date = True
        return state, pm
    return pm.run(state, start_after="load"), pm


def with_overrides(w: Workload, **kw) -> Workload:
    return dataclasses.replace(w, **{k: v for k, v in kw.items() if v is not None})
