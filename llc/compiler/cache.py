"""Results of the slow graph passes (simplify, quantize), kept on disk under a key of their inputs.

Why: onnxsim and weight quantization take seconds to minutes on a real model,
and a re-compile for another profile or option should not pay them again.
A cached model is written to a temporary folder and renamed into place, so a
crash never leaves half an entry, and it is read back lazily: its weights stay
on disk as external data until emit streams them into the segments.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

import onnx


def cache_root() -> Path:
    return Path(os.environ.get("LLC_CACHE", Path.home() / ".cache" / "llc"))


def key_of(*parts: object) -> str:
    return hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:32]


def loaded_full(model: onnx.ModelProto, data_dir: Path) -> onnx.ModelProto:
    """A copy of ``model`` with its external weights read into memory (what onnxsim and quantizers need)."""
    full = onnx.ModelProto()
    full.CopyFrom(model)
    onnx.load_external_data_for_model(full, str(data_dir))
    return full


def cached_model(kind: str, key: str, make: Callable[[], onnx.ModelProto | None]
                 ) -> tuple[onnx.ModelProto, Path] | None:
    """The model cached as ``kind/key`` (lazily loaded) and its folder, made by ``make`` if missing.

    ``make`` returning None means "no result" (nothing is cached, None is returned).
    """
    path = cache_root() / kind / key / "model.onnx"
    if not path.is_file():
        made = make()
        if made is None:
            return None
        save(made, path)
    return onnx.load(str(path), load_external_data=False), path.parent


def save(model: onnx.ModelProto, target: Path) -> None:
    """Write to a temporary folder and rename (another compile may fill the entry first)."""
    tmp = target.parent.with_name(target.parent.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(tmp / target.name), save_as_external_data=True, all_tensors_to_one_file=True,
              location=target.name + ".data", size_threshold=1024)
    try:
        tmp.rename(target.parent)
    except OSError:
        pass
