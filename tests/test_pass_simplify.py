"""simplify: constant subgraphs folded, graph input/output names kept, same numbers; the cache."""

from __future__ import annotations

import numpy as np

from llc.compiler import new_state
from llc.compiler.passes.load import Load
from llc.compiler.passes.simplify import Simplify
from llc.profile import Workload
from test_pass_graphs import assert_same_outputs, decoder_feeds, decoder_text, parse, run, save

WL = Workload(prompt_tokens=6, max_context=32)


def foldable(tmp_path):
    """The tiny decoder with a constant-only node (scale * 1) that simplify must fold away."""
    text = decoder_text(shape_read="full").replace(
        "ss0 = Mul(s0, scale)", "scale_c = Mul(scale, one)\n  ss0 = Mul(s0, scale_c)")
    assert "scale_c" in text
    return save(parse(text), tmp_path / "model.onnx")


def io(model):
    return [i.name for i in model.graph.input], [o.name for o in model.graph.output]


def test_simplify_folds_constants_and_keeps_names_and_numbers(tmp_path, monkeypatch):
    monkeypatch.setenv("LLC_CACHE", str(tmp_path / "cache"))
    path = foldable(tmp_path)
    before = Load().run(new_state(path, None, WL))
    n_before, io_before = len(before.model.graph.node), io(before.model)
    state = Simplify().run(before)
    assert state.notes == []
    assert "scale_c" not in {o for n in state.model.graph.node for o in n.output}
    assert len(state.model.graph.node) < n_before
    inputs, outputs = io(state.model)
    inits = {t.name for t in state.model.graph.initializer}
    assert ([i for i in inputs if i not in inits], outputs) == io_before
    assert state.signature.kv == before.signature.kv
    for past, seq in ((0, 4), (4, 1)):
        feeds = decoder_feeds(past, seq)
        assert_same_outputs(run(state.model, feeds), run(path, feeds))


def test_simplify_cache_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("LLC_CACHE", str(tmp_path / "cache"))
    path = foldable(tmp_path)
    first = Simplify().run(Load().run(new_state(path, None, WL)))
    assert first.data_dir.parent == tmp_path / "cache" / "simplify"
    second = Simplify().run(Load().run(new_state(path, None, WL)))
    assert second.data_dir == first.data_dir
    assert second.model.SerializeToString() == first.model.SerializeToString()
    feeds = decoder_feeds(3, 2)
    cached = second.data_dir / "model.onnx"
    np.testing.assert_allclose(run(cached, feeds)["logits"], run(path, feeds)["logits"], rtol=1e-5, atol=1e-6)
