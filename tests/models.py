"""Tiny random decoder LLMs exported to ONNX, for the test suite.

Each builder returns the path to a ``model.onnx`` that follows the llc export
convention (inputs input_ids / attention_mask / position_ids /
past_key_values.N.key|value, outputs logits / present.N.key|value, dynamic
batch, seq and past), so tests exercise the graphs a real model gives in
milliseconds. The export code is the one examples/smollm2/export.py uses for
the real model, so both follow the same convention by construction.

Exporters (the compiler must cope with each): torch.onnx's legacy TorchScript
one (``/model/layers.0/self_attn/MatMul_output_0``-style names); the torch.export
based one, "dynamo", with every input axis its own symbol (``s10``, ``s43``...)
and the onnxscript optimizer, or "dynamo-plain" without it (``matmul_3``-style
names, layer path only in node metadata); and for LLaMA, "onnxscript": a model
written by hand with onnxscript functions (tests/onnxscript_llama.py).

Models are deterministic (fixed seeds) and cached under ``$LLC_TEST_MODELS``
(default ``~/.cache/llc/test-models``). A model is built once, into a temporary
folder renamed into place, so parallel test workers never see half a model;
``generation.json`` ({"eos_token_ids": [2], "bos_token_id": 1}) sits beside it.
Bump ``VERSION`` when the export changes so stale caches are not reused.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

VERSION = 2
EXPORTERS = ("legacy", "dynamo", "dynamo-plain", "onnxscript", "genai-int4", "genai-int8", "genai-fp32")
_EXPORT_PY = Path(__file__).resolve().parents[1] / "examples" / "smollm2" / "export.py"


def cache_dir() -> Path:
    """Where built models live; overridable so CI can cache or isolate them."""
    return Path(os.environ.get("LLC_TEST_MODELS", "~/.cache/llc/test-models")).expanduser()


def tiny_llama(exporter: str = "legacy", external_data: bool = False) -> Path:
    """Llama: RMSNorm, rotary positions, grouped-query attention (4 heads, 2 KV heads), SwiGLU MLP."""
    return _build("tiny-llama", exporter, external_data)


def tiny_llama_tied(exporter: str = "dynamo") -> Path:
    """Two LLaMA layers with the embedding tied to the LM head (shared by the first and last block)."""
    return _build("tiny-llama-tied", exporter, False)


def genai_llama(precision: str = "int4") -> Path:
    """tiny llama through onnxruntime-genai's model builder (int4, int8 or fp32): contrib ops
    (MatMulNBits, GroupQueryAttention, SkipSimplifiedLayerNormalization), no position_ids input."""
    return _build("tiny-llama", f"genai-{precision}", False)


def small_llama() -> Path:
    """A llama larger than this machine's L3 cache (32 layers of hidden 192; 71 MB): decode steps
    of about 10 ms a half that read their weights from DRAM, as a real model's stage does."""
    return _build("small-llama", "legacy", False)


def tiny_gpt2(exporter: str = "legacy", external_data: bool = False) -> Path:
    """GPT-2: LayerNorm, learned absolute positions (looked up from position_ids), MHA with fused QKV, GELU."""
    return _build("tiny-gpt2", exporter, external_data)


def torch_model(name: str):
    """The deterministic torch model behind a builder ("tiny-llama" or "tiny-gpt2"), as a reference.

    Every parameter is perturbed from its init: fresh norms are all ones and
    biases all zeros, and the exporters would merge such identical tensors
    into one initializer shared by every layer, which no real model has.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if name == "tiny-llama":
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False))
    elif name == "small-llama":
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=256, hidden_size=192, intermediate_size=768, num_hidden_layers=32,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False))
    elif name == "tiny-llama-tied":
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True))
    elif name == "tiny-gpt2":
        model = GPT2LMHeadModel(GPT2Config(
            vocab_size=256, n_embd=64, n_layer=4, n_head=4, n_positions=512,
            bos_token_id=1, eos_token_id=2))
    else:
        raise ValueError(f"unknown tiny model {name!r}")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def build_with_genai(model, out: Path, precision: str) -> None:
    """onnxruntime-genai's builder on the model saved as a Hugging Face folder (no hub involved)."""
    import subprocess
    import sys

    from helpers import write_tokenizer

    hf = out / "hf"
    model.save_pretrained(hf)
    write_tokenizer(hf / "tokenizer.json", model.config.vocab_size)  # the builder copies it
    proc = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
                           "-p", precision, "-e", "cpu"], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"onnxruntime-genai builder failed: {proc.stderr[-2000:]}")
    shutil.rmtree(hf)


@functools.lru_cache(maxsize=None)
def export_module():
    """examples/smollm2/export.py as a module (it is a script, not part of the llc package)."""
    spec = importlib.util.spec_from_file_location("llc_example_export", _EXPORT_PY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _build(name: str, exporter: str, external_data: bool) -> Path:
    """Build (once) <cache>/<name>-<exporter>[-ext]-v<VERSION>/model.onnx, checked against torch."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, not {exporter!r}")
    folder = cache_dir() / f"{name}-{exporter}{'-ext' if external_data else ''}-v{VERSION}"
    if (folder / "generation.json").exists():  # written last: present means complete
        return folder / "model.onnx"

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        if exporter.startswith("genai-"):
            model = torch_model(name)
            build_with_genai(model, tmp, exporter.removeprefix("genai-"))
            gen = {"eos_token_ids": [model.config.eos_token_id], "bos_token_id": model.config.bos_token_id}
        elif exporter == "onnxscript":
            if name != "tiny-llama" or external_data:
                raise ValueError("the onnxscript model is tiny-llama with its weights inside")
            import onnxscript_llama

            onnxscript_llama.build(tmp / "model.onnx")
            gen = {"eos_token_ids": [2], "bos_token_id": 1}
        else:
            ex = export_module()
            model = torch_model(name)
            ex.export_decoder(model, tmp / "model.onnx", exporter, external_data=external_data)
            diffs = ex.verify(model, tmp / "model.onnx")
            if max(diffs.values()) > ex.TOLERANCE:
                raise AssertionError(f"{name} ({exporter}) differs from torch: {diffs}")
            gen = {"eos_token_ids": [model.config.eos_token_id], "bos_token_id": model.config.bos_token_id}
        (tmp / "generation.json").write_text(json.dumps(gen, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it owner-only
        try:
            tmp.rename(folder)
        except OSError:  # another worker finished first; its copy is identical
            if not (folder / "generation.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder / "model.onnx"
