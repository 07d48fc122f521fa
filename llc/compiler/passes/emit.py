"""emit: write the build directory (llc.bundle.schema is the contract; docs/BUNDLE.md shows it).

before: segments, a layout, a plan and a comm map
after:  ``build/``: plan.json, coordinator.json, report.html, tokenizer.json,
        generation.json and the chat template (from beside the model, when there), and per
        device ``devices/<name>/``: segment.onnx and its weights (w-<hash>.bin),
        manifest.json, run.sh, the device runtime ``llc_runtime/``
        (llc.runtime.device, copied verbatim), and on phones ``spare/``: the
        weights of the neighbouring blocks, within the device's memory slack, so
        that a re-plan which moves them here (llc.runtime.balance, failover)
        pushes nothing.

Deterministic: the same model, profile and options give byte-identical files.
Everything is written to a temporary sibling folder and renamed into place only
when complete, so a failed compile leaves no half-written build and the old
build stays as it was.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path
from typing import Callable, ClassVar

import jinja2

import llc
from llc.bundle import schema
from llc.compiler.caches import batching, kv_in_place
from llc.compiler.costmodel import Split, batched_tokens_per_s, build_tables
from llc.compiler.passes.comm_map import link_bytes
from llc.compiler.passes.layout import build_inputs
from llc.compiler.report import render_report
from llc.compiler.segment import (group_bytes, groups_of, sha256_file, weight_groups, write_segment,
                                  write_weights)
from llc.compiler.state import Block, CompileState, TensorInfo, tensor_nbytes
from llc.progress import Progress
from llc.runtime import chat
from llc.runtime import device as device_package

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"
RUNTIME_DIR = Path(device_package.__file__).parent
MIB = 1 << 20


def templates_env() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), keep_trailing_newline=True,
                              undefined=jinja2.StrictUndefined, autoescape=False)


def runtime_files() -> list[Path]:
    """The device runtime's modules, in a stable order (they go into every bundle as they are)."""
    return sorted(RUNTIME_DIR.glob("*.py"))


def shown_shape(info: TensorInfo | None) -> tuple:
    if info is None or info.shape is None:
        return ()
    return tuple(d if isinstance(d, int) else ("?" if d.startswith("unk__") else d) for d in info.shape)


@dataclass(frozen=True)
class Emit:
    name: ClassVar[str] = "emit"
    out_dir: Path = Path("build")
    eos_token_ids: tuple[int, ...] = ()
    progress: Callable[[str], None] | None = None  # a line now and then while weights are written

    def run(self, state: CompileState) -> CompileState:
        out = self.out_dir.resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        tmp.chmod(0o755)
        try:
            self._write(state, tmp)
            if out.exists():
                old = out.with_name(f".{out.name}.old-{os.getpid()}")
                out.rename(old)
                tmp.rename(out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return state

    def _write(self, state: CompileState, root: Path) -> None:
        g, sig, plan, layout = state.model.graph, state.signature, state.plan, state.layout
        run_sh = templates_env().get_template("run.sh.j2").render(version=llc.__version__,
                                                                   package=device_package.PACKAGE)
        devices = [s.device for s in plan.stages]
        allowed = tuple(sorted([n.public for n in layout.devices.values()] + [layout.coordinator_public]))
        kv_of = {b.past: b for b in sig.kv}
        producer = {e.tensor: e.producer_stage for e in state.comm}
        vocab = vocab_size(state)
        max_batch, padding = batching(state)
        in_place = kv_in_place(state)
        if max_batch == 1 and min(state.workload.max_batch or 2, state.workload.requests_in_flight) > 1:
            state.notes.append("decode steps run one request at a time: the model has no position_ids input, "
                               "or mixes GroupQueryAttention with other caches, or a fixed batch size")
        group_of = weight_group_of(state.blocks)
        groups = [weight_groups(state.model, [g.node[i] for i in seg.nodes], group_of) for seg in state.segments]
        spares = [spare_groups(state, s, mine, group_of) for s, mine in zip(plan.stages, groups)]
        written = Progress("emit: weights written", sum(group_bytes(state.data_dir, x) for x in groups + spares),
                           say=self.progress)
        for s, seg, extra in zip(plan.stages, state.segments, spares):
            folder = root / "devices" / s.device
            (folder / device_package.PACKAGE).mkdir(parents=True)
            files = write_segment(state.model, state.data_dir, [g.node[i] for i in seg.nodes], seg,
                                  state.tensors, state.shapes["decode"], folder / "segment.onnx",
                                  name=f"{g.name or 'model'}_stage{s.index}", group_of=group_of,
                                  progress=written.add)
            if extra:
                (folder / "spare").mkdir()
                write_weights(state.model, state.data_dir, extra, folder / "spare", written.add)
            (folder / "run.sh").write_text(run_sh)
            (folder / "run.sh").chmod(0o755)
            for src in runtime_files():
                shutil.copyfile(src, folder / device_package.PACKAGE / src.name)
            for f in ["run.sh"] + [f"{device_package.PACKAGE}/{p.name}" for p in runtime_files()]:
                files[f] = sha256_file(folder / f)
            inputs = []
            for t in seg.inputs:
                info = state.tensors.get(t) or state.shapes["decode"].get(t)
                shape = shown_shape(info)
                if t in kv_of:
                    b = kv_of[t]
                    inputs.append(schema.Input(t, info.dtype, state.kv_empty[t], "kv", present=b.present,
                                               seq_axis=b.seq_axis))
                elif s.index == 0 and t in sig.input_roles:
                    inputs.append(schema.Input(t, info.dtype, shape, "graph", role=sig.input_roles[t]))
                else:
                    inputs.append(schema.Input(t, info.dtype, shape, "stage", role=sig.input_roles.get(t),
                                               from_stage=producer[t]))
            sends = {}
            for e in state.comm:
                if e.producer_stage == s.index:
                    for c in e.consumer_stages:
                        sends.setdefault(c, []).append(e.tensor)
            send_list = tuple(schema.Send(devices[c], c, tuple(sorted(ts))) for c, ts in sorted(sends.items()))
            tail = s.index == len(plan.stages) - 1
            peers = {x.to for x in send_list} | ({devices[0]} if tail and s.index else set())
            net = layout.devices[s.device]
            manifest = schema.Manifest(
                format=schema.MANIFEST_FORMAT, llc_version=llc.__version__, build_id=layout.build_id,
                device=s.device, stage=s.index, num_stages=len(plan.stages),
                threads=state.profile.device(s.device).threads, bind=net.bind,
                keys=schema.KeyPair(net.public, net.secret), allowed_publics=allowed,
                peers={p: schema.Peer(layout.devices[p].endpoint, layout.devices[p].public) for p in sorted(peers)},
                segment="segment.onnx", files=dict(sorted(files.items())), inputs=tuple(inputs),
                outputs=seg.outputs, sends=send_list, max_context=state.workload.max_context,
                max_requests=state.workload.requests_in_flight,
                max_message_bytes=max_message_bytes(state, seg.inputs),
                graph_inputs=tuple(schema.GraphInput(n, r, state.tensors[n].dtype)
                                   for n, r in sig.input_roles.items()
                                   if s.index == 0 and r in schema.ROLES),
                vocab_size=vocab if s.index == 0 else None,
                logits=sig.logits if tail else None,
                eos_token_ids=tuple(self.eos_token_ids) if tail else (),
                head=devices[0] if tail and s.index else None,
                max_batch=max_batch, batch_padding=padding, kv_in_place=in_place,
            )
            schema.write_manifest(folder / "manifest.json", manifest.check(s.device))

        doc = plan_doc(state, vocab, max_batch)
        schema.write(root, schema.PLAN, doc)
        schema.write(root, schema.COORDINATOR, schema.CoordinatorDoc(
            format=schema.FORMAT, build_id=layout.build_id, public=layout.coordinator_public,
            secret=layout.coordinator_secret,
            devices={d: schema.DeviceEndpoint(layout.devices[d].endpoint, layout.devices[d].public,
                                              state.profile.device(d).target, state.profile.device(d).serial)
                     for d in devices}))
        (root / schema.COORDINATOR).chmod(0o600)
        for extra in ("tokenizer.json", "generation.json"):
            src = state.source.parent / extra
            if src.is_file():
                shutil.copyfile(src, root / extra)
        template = chat.find_template(state.source.parent)
        if template is not None:  # llc serve and llc run --chat lay conversations out with it
            (root / chat.FILE).write_text(template)
        (root / "report.html").write_text(render_report(doc, templates_env()))


def weight_group_of(blocks: list[Block]):
    """A weight's group: the blocks that read it (one no block reads is a group of its own).

    Plans of one model share their blocks, so a group, and its file, is the
    same in every plan (llc.compiler.segment).
    """
    readers: dict[str, list[int]] = {}
    for b in blocks:
        for t in b.weights:
            readers.setdefault(t, []).append(b.index)
    return lambda name: tuple(readers[name]) if name in readers else name


def spare_groups(state: CompileState, stage, mine: list, group_of) -> list:
    """The weight groups of the blocks next to a phone's stage, nearest first, within its memory slack.

    A re-plan moves the blocks at a stage's edges, so those are the ones kept
    at hand; they wait on the phone's storage, and only a move that brings
    them in loads them (within the memory the new plan checks). Local devices
    share one disk with the build: they need no spares.
    """
    if state.profile.device(stage.device).target == "local":
        return []
    budget = stage.memory_limit_bytes / state.workload.memory_safety - stage.memory_bytes  # as the plan counts
    have = {group_of(t.name) for members in mine for t in members}
    out = []
    below, above = range(stage.first_block - 1, -1, -1), range(stage.last_block + 1, len(state.blocks))
    for b in (x for pair in zip_longest(below, above) for x in pair if x is not None):
        wanted = {group_of(t) for t in state.blocks[b].weights} - have
        groups = groups_of(state.model, wanted, group_of)
        size = group_bytes(state.data_dir, groups)
        if size > budget:
            break
        budget -= size
        have |= wanted
        out += groups
    return out


def vocab_size(state: CompileState) -> int | None:
    """Rows of the table the token ids index (the embedding), else the logits' last dim."""
    ids = next(n for n, r in state.signature.input_roles.items() if r == "input_ids")
    inits = {t.name: t for t in state.model.graph.initializer}
    for node in state.model.graph.node:
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == ids and node.input[0] in inits:
            return int(inits[node.input[0]].dims[0])
    shape = (state.tensors.get(state.signature.logits) or TensorInfo("", 1, None)).shape
    return shape[-1] if shape and isinstance(shape[-1], int) else None


def batched(state: CompileState, max_batch: int) -> tuple[float | None, int]:
    """The plan's tokens/s with the workload's requests in flight, batched as the build batches."""
    if state.profile is None:
        return None, 1
    t = build_tables(state.blocks, state.profile, state.workload)
    index = {d.name: i for i, d in enumerate(t.devices)}
    split = Split(tuple((index[s.device], s.first_block, s.last_block) for s in state.plan.stages))
    tps, group = batched_tokens_per_s(t, split, state.workload.requests_in_flight, max_batch)
    return round(tps, 3), group


def max_message_bytes(state: CompileState, inputs: tuple[str, ...]) -> int:
    """The largest message a stage should take: its inputs for a whole max-context prompt, with room.

    Prefill sizes are known at the planned prompt length; masks grow with its
    square, so they are scaled by (max_context / prompt_tokens)^2, twice over.
    """
    wl = state.workload
    at_prompt = sum(tensor_nbytes(state.shapes["prefill"].get(t)) for t in inputs)
    scale = (wl.max_context / wl.prompt_tokens) ** 2
    return int(min(max(16 * MIB, 2 * at_prompt * scale + MIB), 2**31 - 1))


def plan_doc(state: CompileState, vocab: int | None, max_batch: int) -> schema.PlanDoc:
    """plan.json: what the build was made from, stages in order, the comm map, predicted costs."""
    plan, blocks, sig = state.plan, state.blocks, state.signature
    names = [s.device for s in plan.stages]
    wl = state.workload
    return schema.PlanDoc(
        format=schema.FORMAT, build_id=state.layout.build_id, llc_version=llc.__version__,
        inputs=schema.BuildInputs(**build_inputs(state)),
        model=schema.ModelDoc(str(state.source.resolve()), sig.logits,
                              tuple(schema.KVDoc(b.past, b.present, b.seq_axis, state.kv_empty[b.past])
                                    for b in sig.kv),
                              dict(sig.input_roles), vocab, weights=state.options.get("weights", "fp32"),
                              reference=str(state.reference) if state.reference else None),
        profile=str(Path(state.profile.path).resolve()),  # a failover re-plans with it, from any folder
        workload=schema.WorkloadDoc(wl.prompt_tokens, wl.max_context, wl.requests_in_flight, wl.objective,
                                    wl.memory_safety, wl.runtime_overhead_mb, wl.stages,
                                    max_batch),
        objective=plan.objective, split=plan.split,
        predicted=schema.Predicted(
            round(plan.decode_ms, 4), round(plan.prefill_ms, 4), round(plan.bottleneck_ms, 4),
            round(1000 / plan.decode_ms, 3) if plan.decode_ms else None,
            round(1000 / plan.bottleneck_ms, 3) if plan.bottleneck_ms else None,
            *batched(state, max_batch)),
        blocks=tuple(schema.BlockDoc(b.index, b.label, b.kind, len(b.nodes), round(b.flops_decode / 1e9, 6),
                                     round(b.flops_prefill / 1e9, 6), b.weight_bytes, b.kv_bytes) for b in blocks),
        stages=tuple(schema.StageDoc(
            index=s.index, device=s.device, target=state.profile.device(s.device).target,
            segment=f"devices/{s.device}/segment.onnx", manifest=f"devices/{s.device}/manifest.json",
            blocks=(s.first_block, s.last_block), labels=(blocks[s.first_block].label, blocks[s.last_block].label),
            inputs=seg.inputs, outputs=seg.outputs,
            compute_ms_decode=round(s.compute_ms_decode, 4), compute_ms_prefill=round(s.compute_ms_prefill, 4),
            hop_ms_decode=round(s.hop_ms_decode, 4), hop_ms_prefill=round(s.hop_ms_prefill, 4),
            memory_bytes=s.memory_bytes, memory_limit_bytes=s.memory_limit_bytes)
            for s, seg in zip(plan.stages, state.segments)),
        comm_map=tuple(schema.CommEdgeDoc(
            tensor=e.tensor, kind=e.kind, dtype=e.dtype,
            shape=None if e.shape is None else shown_shape(TensorInfo(e.tensor, 1, e.shape)),
            producer=names[e.producer_stage], producer_stage=e.producer_stage,
            consumers=tuple(names[c] for c in e.consumer_stages), consumer_stages=e.consumer_stages,
            skip=max(e.consumer_stages) > e.producer_stage + 1,
            bytes_per_token_decode=e.bytes_decode, bytes_prefill=e.bytes_prefill) for e in state.comm),
        links=tuple(schema.LinkDoc(names[a], names[b], d, p) for (a, b), (d, p) in sorted(link_bytes(state).items())),
        notes=tuple(state.notes),
    )
