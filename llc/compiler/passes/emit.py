"""emit: write the build directory (docs/BUNDLE.md is the contract).

before: a plan and a comm map
after:  ``build/``: plan.json, report.html, coordinator.json, tokenizer.json and
        ``devices/<name>/{segment.onnx[.data], manifest.json, launcher.py, run.sh}``.

Deterministic: the same model, profile and options give byte-identical files.
The CURVE keys are therefore derived, not drawn: each key is an HMAC of the
build id under a secret kept outside the build (``~/.config/llc/build-secret``,
made once with os.urandom), so a new model or profile gets new keys, the same
inputs get the same bundle, and nobody without the secret can derive them.
Everything is written to a temporary sibling folder and renamed into place only
when complete, so a failed compile leaves no half-written build.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import jinja2
import zmq
from zmq.utils import z85

import llc
from llc.compiler.state import CompileState
from llc.compiler.passes.comm_map import link_bytes, stage_of_nodes
from llc.compiler.report import render_report
from llc.compiler.segment import const_closure, segment_io, sha256_file, write_segment

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"
FORMAT = 1


def templates_env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        keep_trailing_newline=True, undefined=jinja2.StrictUndefined, autoescape=False,
    )


def secret_file() -> Path:
    return Path(os.environ.get("LLC_SECRET_FILE", Path.home() / ".config" / "llc" / "build-secret"))


def build_secret() -> bytes:
    """The per-user secret keys are derived from; created on first use, mode 0600."""
    path = secret_file()
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(32))
    return path.read_bytes()


def curve_keypair(secret: bytes, build_id: str, who: str) -> dict[str, str]:
    """A CURVE key pair derived from (secret, build, who): Curve25519 takes any 32 bytes."""
    raw = hmac.new(secret, f"llc-curve:{build_id}:{who}".encode(), hashlib.sha256).digest()
    sk = z85.encode(raw)
    return {"public": zmq.curve_public(sk).decode(), "secret": sk.decode()}


def stage_dtype_shape(state: CompileState, name: str) -> tuple[str, list]:
    info = state.tensors.get(name) or state.shapes["decode"].get(name)
    shape = [] if info.shape is None else [
        d if isinstance(d, int) else ("?" if d.startswith("unk__") else d) for d in info.shape]
    return info.dtype, shape


@dataclass(frozen=True)
class Emit:
    name: ClassVar[str] = "emit"
    out_dir: Path = Path("build")
    eos_token_ids: tuple[int, ...] = ()

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
        g = state.model.graph
        sig, plan, profile = state.signature, state.plan, state.profile
        stage = stage_of_nodes(state)
        const = {t for t, c in state.classes.items() if c == "const"}
        sends: dict[int, dict[int, list[str]]] = {s.index: {} for s in plan.stages}
        for e in state.comm:
            for c in e.consumer_stages:
                sends[e.producer_stage].setdefault(c, []).append(e.tensor)
        received = {}  # tensor -> producing stage, per consumer
        for e in state.comm:
            received[e.tensor] = e.producer_stage

        env = templates_env()
        launcher = env.get_template("launcher.py.j2").render(version=llc.__version__)
        run_sh = env.get_template("run.sh.j2").render(version=llc.__version__)

        # 1. segments (their hashes define the build id)
        seg_files: dict[int, dict[str, str]] = {}
        seg_io = {}
        for s in plan.stages:
            ddir = root / "devices" / s.device
            ddir.mkdir(parents=True)
            own = [i for i in range(len(g.node)) if stage[i] == s.index]
            indices = sorted(set(own) | set(const_closure(state.model, own, const)))
            nodes = [g.node[i] for i in indices]
            exported = {t for dst in sends[s.index].values() for t in dst}
            io = segment_io(state.model, nodes, exported)
            seg_io[s.index] = io
            seg_files[s.index] = write_segment(
                state.model, state.data_dir, nodes, io, state.tensors, state.shapes["decode"],
                ddir / "segment.onnx", name=f"{g.name or 'model'}_stage{s.index}")
            (ddir / "launcher.py").write_text(launcher)
            (ddir / "run.sh").write_text(run_sh)
            (ddir / "run.sh").chmod(0o755)
            seg_files[s.index]["launcher.py"] = sha256_file(ddir / "launcher.py")
            seg_files[s.index]["run.sh"] = sha256_file(ddir / "run.sh")

        plan_doc = self._plan_doc(state, seg_io)
        build_id = hashlib.sha256(json.dumps([plan_doc, seg_files], sort_keys=True).encode()
                                  ).hexdigest()[:16]
        secret = build_secret()
        keys = {s.device: curve_keypair(secret, build_id, s.device) for s in plan.stages}
        coord = curve_keypair(secret, build_id, "coordinator")
        allowed = sorted([k["public"] for k in keys.values()] + [coord["public"]])

        endpoints = {}
        for s in plan.stages:
            dev = profile.device(s.device)
            port = profile.port(dev)
            host = "127.0.0.1" if dev.target == "local" else "0.0.0.0"
            endpoints[s.device] = {"bind": f"tcp://{host}:{port}",
                                   "endpoint": f"tcp://{dev.address}:{port}"}

        # 2. manifests
        by_index = {s.index: s for s in plan.stages}
        kv_of = {b.past: b for b in sig.kv}
        for s in plan.stages:
            io = seg_io[s.index]
            inputs = []
            for t in io.inputs:
                dtype, shape = stage_dtype_shape(state, t)
                item = {"name": t, "dtype": dtype, "shape": shape}
                if t in kv_of:
                    b = kv_of[t]
                    shape = [0 if i == b.seq_axis else (1 if i == 0 or not isinstance(d, int) else d)
                             for i, d in enumerate(shape)]
                    item.update(shape=shape, source="kv", present=b.present, seq_axis=b.seq_axis)
                elif s.index == 0 and t in sig.input_roles:
                    item.update(source="graph", role=sig.input_roles[t])
                else:
                    src = received[t]
                    item.update(source="stage", **{"from": by_index[src].device}, from_stage=src)
                    if t in sig.input_roles:
                        item["role"] = sig.input_roles[t]
                inputs.append(item)
            graph_inputs = []
            if s.index == 0:
                for name, role in sig.input_roles.items():
                    if role in ("input_ids", "attention_mask", "position_ids"):
                        dtype, _ = stage_dtype_shape(state, name)
                        graph_inputs.append({"name": name, "role": role, "dtype": dtype})
            peers = {}
            send_list = []
            for dst, tensors in sorted(sends[s.index].items()):
                dev = by_index[dst].device
                peers[dev] = {"endpoint": endpoints[dev]["endpoint"], "public": keys[dev]["public"]}
                send_list.append({"to": dev, "stage": dst, "tensors": sorted(tensors)})
            tail = s.index == len(plan.stages) - 1
            if tail and s.index != 0:  # the sampled token goes back to the head
                head = plan.stages[0].device
                peers[head] = {"endpoint": endpoints[head]["endpoint"], "public": keys[head]["public"]}
            manifest = {
                "format": FORMAT,
                "build_id": build_id,
                "device": s.device,
                "stage": s.index,
                "num_stages": len(plan.stages),
                "threads": profile.device(s.device).threads,
                "bind": endpoints[s.device]["bind"],
                "keys": keys[s.device],
                "allowed_publics": allowed,
                "peers": peers,
                "segment": "segment.onnx",
                "files": dict(sorted(seg_files[s.index].items())),
                "inputs": inputs,
                "outputs": list(io.outputs),
                "graph_inputs": graph_inputs,
                "sends": send_list,
            }
            if tail:
                manifest["logits"] = sig.logits
                manifest["eos_token_ids"] = list(self.eos_token_ids)
                if s.index != 0:
                    manifest["head"] = plan.stages[0].device
            _write_json(root / "devices" / s.device / "manifest.json", manifest)

        plan_doc["build_id"] = build_id
        _write_json(root / "plan.json", plan_doc)
        _write_json(root / "coordinator.json", {
            "build_id": build_id, **coord,
            "devices": {s.device: {"endpoint": endpoints[s.device]["endpoint"],
                                   "public": keys[s.device]["public"],
                                   "target": profile.device(s.device).target,
                                   "serial": profile.device(s.device).serial}
                        for s in plan.stages},
        })
        (root / "coordinator.json").chmod(0o600)
        for extra in ("tokenizer.json", "generation.json"):
            src = state.source.parent / extra
            if src.is_file():
                shutil.copyfile(src, root / extra)
        (root / "report.html").write_text(render_report(plan_doc, templates_env()))

    def _plan_doc(self, state: CompileState, seg_io) -> dict:
        """plan.json: stages in order with their files, the comm map and predicted costs."""
        plan, blocks = state.plan, state.blocks
        links = link_bytes(state)
        names = {s.index: s.device for s in plan.stages}
        return {
            "format": FORMAT,
            "llc_version": llc.__version__,
            "model": {"path": str(state.source.resolve()), "logits": state.signature.logits,
                      "kv": [asdict(b) for b in state.signature.kv],
                      "input_roles": state.signature.input_roles},
            "profile": str(state.profile.path),
            "workload": asdict(state.workload),
            "objective": plan.objective,
            "predicted": {"decode_ms_per_token": round(plan.decode_ms, 4),
                          "prefill_ms": round(plan.prefill_ms, 4),
                          "bottleneck_ms": round(plan.bottleneck_ms, 4),
                          "tokens_per_s_one_request": round(1000 / plan.decode_ms, 3)
                          if plan.decode_ms else None,
                          "tokens_per_s_pipelined": round(1000 / plan.bottleneck_ms, 3)
                          if plan.bottleneck_ms else None},
            "blocks": [{"index": b.index, "label": b.label, "kind": b.kind, "nodes": len(b.nodes),
                        "gflops_decode": round(b.flops_decode / 1e9, 6),
                        "gflops_prefill": round(b.flops_prefill / 1e9, 6),
                        "weight_bytes": b.weight_bytes, "kv_bytes": b.kv_bytes}
                       for b in blocks],
            "stages": [{
                "index": s.index, "device": s.device,
                "target": state.profile.device(s.device).target,
                "segment": f"devices/{s.device}/segment.onnx",
                "manifest": f"devices/{s.device}/manifest.json",
                "blocks": [s.first_block, s.last_block],
                "labels": [blocks[s.first_block].label, blocks[s.last_block].label],
                "inputs": list(seg_io[s.index].inputs),
                "outputs": list(seg_io[s.index].outputs),
                "compute_ms_decode": round(s.compute_ms_decode, 4),
                "compute_ms_prefill": round(s.compute_ms_prefill, 4),
                "hop_ms_decode": round(s.hop_ms_decode, 4),
                "hop_ms_prefill": round(s.hop_ms_prefill, 4),
                "memory_bytes": s.memory_bytes,
                "memory_limit_bytes": s.memory_limit_bytes,
            } for s in plan.stages],
            "comm_map": [{
                "tensor": e.tensor, "kind": e.kind, "dtype": e.dtype,
                "shape": None if e.shape is None else [
                    d if isinstance(d, int) else ("?" if d.startswith("unk__") else d) for d in e.shape],
                "producer": names[e.producer_stage], "producer_stage": e.producer_stage,
                "consumers": [names[c] for c in e.consumer_stages],
                "consumer_stages": list(e.consumer_stages),
                "skip": max(e.consumer_stages) > e.producer_stage + 1,
                "bytes_per_token_decode": e.bytes_decode, "bytes_prefill": e.bytes_prefill,
            } for e in state.comm],
            "links": [{"from": names[a], "to": names[b], "bytes_per_token_decode": d,
                       "bytes_prefill": p} for (a, b), (d, p) in sorted(links.items())],
            "notes": list(state.notes),
        }


def _write_json(path: Path, doc: dict) -> None:
    path.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
