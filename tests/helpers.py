"""Test helpers: free ports, a word-level tokenizer for the tiny vocabulary, compiled builds, ground truth.

Builds for the runtime tests come from the compiler (the real contract), with a
split file when a test wants a particular shape; the ground truth is the
unsplit model in one onnxruntime session (llc.runtime.verify.Unsplit).
"""

from __future__ import annotations

import socket
from pathlib import Path

import yaml

from conftest import write_profile
from llc.compiler import compile_model
from llc.profile import load_profile
from llc.runtime.verify import Unsplit as Reference  # noqa: F401  (the tests' name for the ground truth)


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


def write_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer: ids 0-2 special (<pad> <s> </s>), then w3, w4, ...; adds <s> in front."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<pad>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(path))


def compiled_build(model: Path, build: Path, stages: int, *, eos_token_ids=(2,), requests: int = 4,
                   split: list[tuple[str, str]] | None = None, vocab_size: int = 256, weights: str = "fp32",
                   **workload) -> Path:
    """``llc compile`` of ``model`` for ``stages`` local devices on free ports, with a tokenizer.

    ``split`` fixes the stages' block ranges by label (e.g. [("embed", "layer 1"), ("layer 2", "head")]).
    """
    build.parent.mkdir(parents=True, exist_ok=True)
    profile = write_profile(build.parent / f"{build.name}-devices.yaml", stages, base_port=free_port_range(stages),
                            stages=stages, requests_in_flight=requests, **workload)
    split_file = None
    if split:
        split_file = build.parent / f"{build.name}-split.yaml"
        split_file.write_text(yaml.safe_dump({"stages": [{"device": f"dev{i}", "blocks": list(r)}
                                                         for i, r in enumerate(split)]}))
    compile_model(model, load_profile(profile), build, quiet=True, eos_token_ids=tuple(eos_token_ids),
                  split=str(split_file) if split_file else None, weights=weights)
    write_tokenizer(build / "tokenizer.json", vocab_size)
    return build
