"""Hand-made build directories for the runtime tests (test scaffolding, not the compiler).

The real bundles come from the compiler's emit pass; these are written by a
deliberately simple splitter so the runtime can be tested on its own, exactly
per docs/BUNDLE.md:

- nodes are assigned to stages by name: ``/layers.N/`` by layer, ``norm`` and
  ``lm_head`` to the tail, the rest (embedding, mask, rotary) to the head;
  constant subgraphs (and, with ``recompute_rotary``, the rotary embedding) are
  copied into every stage that needs them instead of being sent;
- every tensor a stage reads from an earlier stage becomes a ``source: stage``
  input (skip tensors go straight from their producer), every original graph
  input a later stage reads is built by the head and sent (``source: graph``);
- segments are cut with ``onnx.utils.extract_model`` and saved with external data.

Also here: a word-level tokenizer for the tiny vocabulary, and the reference
greedy loop over the unsplit model in one onnxruntime session.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import numpy as np
import onnx
import onnxruntime as ort
import zmq
from onnx import helper

import llc

TEMPLATES = Path(__file__).resolve().parent.parent / "llc" / "templates"
ROLES = ("input_ids", "attention_mask", "position_ids")
LAYER = re.compile(r"/layers\.(\d+)/")


@dataclass
class StageCut:
    index: int
    layers: range
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    needs_from: dict[str, int] = field(default_factory=dict)  # boundary tensor -> producer stage


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_range(n: int) -> int:
    """A base port with n free ports after it (the profile numbers devices base_port + i)."""
    for _ in range(50):
        base = free_port()
        if base + n > 65535:
            continue
        try:
            for i in range(n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
    raise RuntimeError("no free port range")


def cut_model(model: onnx.ModelProto, num_stages: int, recompute_rotary: bool = False) -> list[StageCut]:
    """Which tensors each stage takes in and gives out, for contiguous layer ranges."""
    g = model.graph
    layers = sorted({int(m.group(1)) for n in g.node if (m := LAYER.search(n.name))})
    chunks = np.array_split(np.array(layers), num_stages)
    stage_of_layer = {int(layer): i for i, c in enumerate(chunks) for layer in c}
    graph_inputs = {i.name for i in g.input}
    initializers = {i.name for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}

    replicable: set[str] = set()  # node names computed wherever needed
    for n in g.node:  # graph nodes are topologically sorted
        ins = [i for i in n.input if i]
        if n.op_type == "Constant" or all(i in initializers or producer.get(i) is not None
                                          and producer[i].name in replicable for i in ins):
            replicable.add(n.name)
        elif recompute_rotary and "rotary_emb" in n.name:
            replicable.add(n.name)

    def stage_of(n: onnx.NodeProto) -> int:
        if m := LAYER.search(n.name):
            return stage_of_layer[int(m.group(1))]
        if "/norm/" in n.name or "lm_head" in n.name:
            return num_stages - 1
        return 0

    cuts = [StageCut(i, range(int(c[0]), int(c[-1]) + 1)) for i, c in enumerate(chunks)]
    requested: dict[int, set[str]] = {i: set() for i in range(num_stages)}
    for j in reversed(range(num_stages)):
        cut = cuts[j]
        outs = [o.name for o in g.output if stage_of(producer[o.name]) == j]
        cut.outputs = outs + sorted(requested[j] - set(outs))
        seen, stack, ins = set(), list(cut.outputs), []
        while stack:
            t = stack.pop()
            if t in seen or not t:
                continue
            seen.add(t)
            if t in graph_inputs:
                ins.append(t)
                continue
            if t in initializers:
                continue
            node = producer[t]
            k = stage_of(node)
            if node.name in replicable or k == j:
                stack.extend(node.input)
            elif k < j:
                ins.append(t)
                cut.needs_from[t] = k
                requested[k].add(t)
            else:
                raise ValueError(f"stage {j} needs {t} from later stage {k}")
        order = [i.name for i in g.input]
        cut.inputs = [n for n in order if n in ins] + sorted(t for t in ins if t not in graph_inputs)
    return cuts


def _dtype(elem_type: int) -> str:
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).name


def _shape(vi: onnx.ValueInfoProto) -> list:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in vi.type.tensor_type.shape.dim]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def render(template: str) -> str:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), keep_trailing_newline=True,
                             undefined=jinja2.StrictUndefined)
    return env.get_template(template).render(version=llc.__version__)


def write_build(model_path: Path, build_dir: Path, num_stages: int, *, eos_token_ids: list[int] = (2,),
                threads: int = 1, recompute_rotary: bool = False, devices: list[str] | None = None) -> Path:
    """Write build_dir (plan.json, coordinator.json, tokenizer.json, devices/*) per docs/BUNDLE.md."""
    build_dir = Path(build_dir)
    model = onnx.load(str(model_path))
    cuts = cut_model(model, num_stages, recompute_rotary)
    names = devices or [f"dev{i}" for i in range(num_stages)]
    keys = {n: [k.decode() for k in zmq.curve_keypair()] for n in names}
    coord_pub, coord_sec = (k.decode() for k in zmq.curve_keypair())
    ports = {n: free_port() for n in names}
    endpoint = {n: f"tcp://127.0.0.1:{ports[n]}" for n in names}
    allowed = sorted([keys[n][0] for n in names] + [coord_pub])
    launcher, run_sh = render("launcher.py.j2"), render("run.sh.j2")

    # What each stage sends where: boundary tensors from their producer, graph inputs from the head.
    sends: dict[int, dict[int, list[str]]] = {i: {} for i in range(num_stages)}
    for cut in cuts:
        for t in cut.inputs:
            if t in cut.needs_from:
                sends[cut.needs_from[t]].setdefault(cut.index, []).append(t)
            elif t.split(".")[0] in ROLES and cut.index > 0:
                sends[0].setdefault(cut.index, []).append(t)
    graph_roles = sorted({t for c in cuts for t in c.inputs if t in ROLES}, key=ROLES.index)
    in_types = {i.name: i for i in model.graph.input}

    manifests = {}
    for cut in cuts:
        name = names[cut.index]
        folder = build_dir / "devices" / name
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            whole = Path(tmp) / "seg.onnx"
            onnx.utils.extract_model(str(model_path), str(whole), cut.inputs, cut.outputs)
            seg = onnx.load(str(whole))
        onnx.save(seg, str(folder / "segment.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                  location="segment.onnx.data", size_threshold=0)
        (folder / "launcher.py").write_text(launcher)
        (folder / "run.sh").write_text(run_sh)
        seg_inputs = {i.name: i for i in seg.graph.input}
        inputs = []
        for t in cut.inputs:
            vi = seg_inputs[t]
            entry = {"name": t, "dtype": _dtype(vi.type.tensor_type.elem_type), "shape": _shape(vi)}
            if t.startswith("past_key_values."):
                shape = entry["shape"]
                entry.update(source="kv", present=t.replace("past_key_values.", "present."), seq_axis=2,
                             shape=[1 if i == 0 else 0 if i == 2 else d for i, d in enumerate(shape)])
            elif t in ROLES:
                entry.update(source="graph", role=t)
                if cut.index > 0:
                    entry.update({"from": names[0], "from_stage": 0})
            else:
                k = cut.needs_from[t]
                entry.update(source="stage", **{"from": names[k], "from_stage": k})
            inputs.append(entry)
        my_sends = [{"to": names[j], "stage": j, "tensors": ts} for j, ts in sorted(sends[cut.index].items())]
        peers = {s["to"] for s in my_sends}
        tail = cut.index == num_stages - 1
        if tail and cut.index > 0:
            peers.add(names[0])
        m = {
            "format": 1, "build_id": "", "device": name, "stage": cut.index, "num_stages": num_stages,
            "threads": threads, "bind": endpoint[name],
            "keys": {"public": keys[name][0], "secret": keys[name][1]},
            "allowed_publics": allowed,
            "peers": {p: {"endpoint": endpoint[p], "public": keys[p][0]} for p in sorted(peers)},
            "segment": "segment.onnx",
            "files": {f: _sha(folder / f) for f in ("segment.onnx", "segment.onnx.data", "launcher.py")},
            "inputs": inputs,
            "sends": my_sends,
        }
        if cut.index == 0:
            m["graph_inputs"] = [{"name": r, "role": r, "dtype": _dtype(in_types[r].type.tensor_type.elem_type)}
                                 for r in graph_roles]
        if tail:
            m.update(logits="logits", eos_token_ids=list(eos_token_ids))
            if cut.index > 0:
                m["head"] = names[0]
        manifests[name] = m
    build_id = hashlib.sha256(json.dumps(manifests, sort_keys=True).encode()).hexdigest()[:16]
    for name, m in manifests.items():
        m["build_id"] = build_id
        (build_dir / "devices" / name / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")
    plan = {"format": 1, "build_id": build_id,
            "stages": [{"index": c.index, "device": names[c.index], "layers": [c.layers.start, c.layers.stop - 1],
                        "segment": f"devices/{names[c.index]}/segment.onnx"} for c in cuts],
            "devices": {n: {"target": "local"} for n in names}}
    (build_dir / "plan.json").write_text(json.dumps(plan, indent=2) + "\n")
    coord = {"public": coord_pub, "secret": coord_sec,
             "devices": {n: {"endpoint": endpoint[n], "public": keys[n][0]} for n in names}}
    (build_dir / "coordinator.json").write_text(json.dumps(coord, indent=2) + "\n")
    write_tokenizer(build_dir / "tokenizer.json", vocab_size=model_vocab(model))
    return build_dir


def model_vocab(model: onnx.ModelProto) -> int:
    logits = next(o for o in model.graph.output if o.name == "logits")
    return logits.type.tensor_type.shape.dim[-1].dim_value


def write_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer: ids 0-2 special (<pad> <s> </s>), then w3, w4, ...; adds <s> in front."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<pad>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(path))


class Reference:
    """Greedy decoding of the unsplit model in one onnxruntime session: the ground truth."""

    def __init__(self, model_path: Path, threads: int = 1):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        self.kv = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]

    def greedy(self, prompt: list[int], max_new_tokens: int, eos: set[int] = frozenset()) -> list[int]:
        past = {i.name: np.zeros([1, i.shape[1], 0, i.shape[3]], np.float32) for i in self.kv}
        ids, n_past, out = list(prompt), 0, []
        outputs = [o.name for o in self.session.get_outputs()]
        while len(out) < max_new_tokens:
            feeds = {"input_ids": np.array([ids], np.int64),
                     "attention_mask": np.ones((1, n_past + len(ids)), np.int64),
                     "position_ids": np.arange(n_past, n_past + len(ids), dtype=np.int64)[None], **past}
            res = dict(zip(outputs, self.session.run(outputs, feeds)))
            n_past += len(ids)
            past = {i.name: res[i.name.replace("past_key_values.", "present.")] for i in self.kv}
            token = int(np.argmax(res["logits"][0, -1]))
            out.append(token)
            if token in eos:
                break
            ids = [token]
        return out
