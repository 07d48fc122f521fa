"""llc eval: what quantization costs in quality, on a fixed text, measured rather than assumed.

The build's stages run the text (split runner: the device code, the build's
precision) and the fp32 model the user gave runs it unsplit, each in one
prefill. From the logits at every position: the perplexity of the text under
each, and how often the build's most likely next token is the fp32 model's
(teacher-forced top-1 agreement). For an fp32 build the two are the same model
and agree on every token.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from llc.bundle import schema
from llc.errors import LlcError
from llc.runtime.coordinator import load_tokenizer
from llc.runtime.splitrun import SplitRunner
from llc.runtime.verify import Unsplit

# A fixed English text: the same figures for every build of a model.
TEXT = (
    "The history of the bicycle begins in the early nineteenth century, when inventors in Europe tried to "
    "build a machine that a person could ride without a horse. The first designs had no pedals: riders "
    "pushed themselves along with their feet. Pedals attached to the front wheel came later, and the large "
    "front wheels of the penny-farthing made each turn of the pedals carry the rider further. The safety "
    "bicycle, with two wheels of the same size and a chain that drove the rear wheel, made cycling easier "
    "and far less dangerous. Pneumatic tyres followed, and within a few years millions of people used "
    "bicycles to travel to work, to visit friends and to explore the countryside. Today the bicycle is one "
    "of the most efficient ways to move a person over land, and many cities build lanes and parking for it."
)


@dataclass(frozen=True)
class Quality:
    weights: str
    tokens: int  # positions scored (each predicts the next token of the text)
    perplexity: float  # the build's
    perplexity_fp32: float  # the fp32 model's
    top1_agreement: float  # share of positions where both pick the same next token
    max_abs_logit_diff: float

    def as_dict(self) -> dict:
        return asdict(self)


def perplexity(logits: np.ndarray, ids: np.ndarray) -> float:
    """exp of the mean negative log-likelihood of ids[1:] given the logits at positions 0..T-2."""
    x = logits[:-1].astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return float(np.exp(-logp[np.arange(len(ids) - 1), ids[1:]].mean()))


def evaluate(build: Path, text: str = TEXT, fp32: Path | None = None) -> Quality:
    """``fp32``: the model to compare with, when the build's was quantized before llc saw it."""
    plan = schema.read(build, schema.PLAN)
    ids = np.array(load_tokenizer(build).encode(text).ids, dtype=np.int64)
    limit = plan.workload.max_context - 1
    if len(ids) < 2:
        raise LlcError(None, "the text has fewer than 2 tokens")
    ids = ids[:limit]
    reference = Unsplit(Path(fp32), None) if fp32 else Unsplit(Path(plan.model.path), plan.model)  # raises if the file is gone
    got = SplitRunner(build, threads=1).teacher_force(ids.tolist(), []).steps[0][plan.model.logits][0]
    want = reference.step(ids[None, :], {}, 0)[0][reference.model.logits][0]
    return Quality(weights=plan.model.weights if not fp32 else f"{plan.model.weights} (as given)",
                   tokens=len(ids) - 1, perplexity=perplexity(got, ids),
                   perplexity_fp32=perplexity(want, ids),
                   top1_agreement=float((got[:-1].argmax(-1) == want[:-1].argmax(-1)).mean()),
                   max_abs_logit_diff=float(np.abs(got.astype(np.float64) - want).max()))
