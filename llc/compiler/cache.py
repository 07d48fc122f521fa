"""Results of the slow graph passes (simplify, quantize), kept on disk under a key of their inputs.

Why: onnxsim and weight quantization take seconds to minutes on a real model,
and a re-compile for another profile or option should not pay them again.
An entry is written to a temporary folder and renamed into place, so a crash
never leaves half an entry, and it is read back lazily: weights stay on disk as
external data until emit streams them into the segments.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Callable

import onnx


def cache_root() -> Path:
    return Path(os.environ.get("LLC_CACHE", Path.home() / ".cache" / "llc"))


def key_of(*parts: object) -> str:
    return hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:32]


def cached_entry(kind: str, key: str, write: Callable[[Path], bool]) -> tuple[onnx.ModelProto, Path] | None:
    """The model cached as ``kind/key`` (lazily loaded) and its folder.

    If missing, ``write(folder)`` fills a fresh folder with ``model.onnx`` and
    whatever data it points to; it returns False for "no result" (nothing is cached, None is returned).
    """
    path = cache_root() / kind / key / "model.onnx"
    if not path.is_file():
        tmp = path.parent.with_name(path.parent.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            if not write(tmp):
                return None
            try:
                tmp.rename(path.parent)
            except OSError:  # another compile filled the entry first
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return onnx.load(str(path), load_external_data=False), path.parent
