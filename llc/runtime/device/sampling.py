"""Sampling parameters and the sampler: the tail turns logits into the next token.

One definition for both sides: the coordinator builds ``SamplingParams`` and
sends them as a dict; every device parses them with :meth:`SamplingParams.parse`,
which refuses anything out of range, so a bad request never reaches the sampler.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    """Per request; temperature 0 is greedy, top_k 0 and top_p 1 are off, seed None is random."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0 or self.temperature > 1e4:
            raise ValueError(f"temperature must be in 0..1e4, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in 0..2**63-1, got {self.seed}")

    @staticmethod
    def parse(params: object) -> "SamplingParams":
        """From a message's ``params``; ValueError on unknown keys, wrong types or values."""
        if not isinstance(params, dict):
            raise ValueError(f"params must be a mapping, got {type(params).__name__}")
        unknown = set(params) - set(SamplingParams.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown sampling params {sorted(unknown)}")
        ints = ("max_new_tokens", "top_k")
        for key, value in params.items():
            ok = (value is None and key == "seed") or (
                isinstance(value, int) and not isinstance(value, bool) if key in ints + ("seed",)
                else isinstance(value, (int, float)) and not isinstance(value, bool))
            if not ok:
                raise ValueError(f"sampling param {key} has a bad value {value!r:.40}")
        return SamplingParams(**params)

    def to_dict(self) -> dict:
        return asdict(self)


def sample(logits: np.ndarray, s: SamplingParams, rng: np.random.Generator) -> int:
    """Next token from one position's logits: greedy at temperature 0, else top-k/top-p."""
    if s.temperature == 0:
        return int(np.argmax(logits))  # same index as in float64 (exact widening), without the copy
    x = logits.astype(np.float64).ravel()
    x = x / s.temperature
    if 0 < s.top_k < x.size:
        kth = np.partition(x, -s.top_k)[-s.top_k]
        x = np.where(x < kth, -np.inf, x)
    p = np.exp(x - x.max())
    p /= p.sum()
    if s.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        before = np.cumsum(p[order]) - p[order]  # mass of strictly more likely tokens
        drop = order[before >= s.top_p]  # the most likely token always stays
        p[drop] = 0.0
    cdf = np.cumsum(p)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), x.size - 1))
