"""Shared fixtures: tiny exported decoders and device profiles written on the fly."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))  # tests/models.py and friends


@pytest.fixture(autouse=True)
def _isolated_llc_state(tmp_path_factory, monkeypatch):
    """Each test session gets its own build secret (and never touches ~/.config)."""
    root = tmp_path_factory.getbasetemp()
    monkeypatch.setenv("LLC_SECRET_FILE", str(root / "build-secret"))


def write_profile(path: Path, n: int, *, memory_mb=2000, gflops=8.0, target="local",
                  base_port=None, **workload) -> Path:
    """A profile of ``n`` local devices; per-device lists are allowed for memory and speed."""
    mem = memory_mb if isinstance(memory_mb, list) else [memory_mb] * n
    speed = gflops if isinstance(gflops, list) else [gflops] * n
    doc = {
        "devices": [{"name": f"dev{i}", "target": target, "memory_mb": mem[i], "gflops": speed[i],
                     "threads": 1} for i in range(n)],
        "network": {"bandwidth_mbps": 1000, "latency_ms": 0.1,
                    **({"base_port": base_port} if base_port else {})},
        "workload": {"prompt_tokens": 16, "max_context": 128, **workload},
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path
