"""simplify: constant subgraphs folded, graph input/output names kept, same numbers; the cache."""

from __future__ import annotations

import shutil

import numpy as np

from llc.compiler import new_state
from llc.compiler.passes.load import Load
from llc.compiler.passes.simplify import Simplify
from llc.profile import Workload
from models import tiny_llama
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
    entries = list((tmp_path / "cache" / "simplify").iterdir())
    assert len(entries) == 1 and [f.name for f in entries[0].iterdir()] == ["model.onnx"]
    second = Simplify().run(Load().run(new_state(path, None, WL)))
    assert second.data_dir == first.data_dir == tmp_path
    assert second.model.SerializeToString() == first.model.SerializeToString()
    feeds = decoder_feeds(3, 2)
    np.testing.assert_allclose(run(second.model, feeds)["logits"], run(path, feeds)["logits"], rtol=1e-5, atol=1e-6)


def test_simplify_never_reads_or_copies_the_weights(tmp_path, monkeypatch):
    """The weights stay references into the model's own data file; the cache holds the graph alone."""
    import onnx

    from llc.compiler.state import external_location

    monkeypatch.setenv("LLC_CACHE", str(tmp_path / "cache"))
    shutil.copytree(tiny_llama(external_data=True).parent, tmp_path / "m")
    path = tmp_path / "m" / "model.onnx"
    loaded = Load().run(new_state(path, None, WL))
    before = {t.name: external_location(t) for t in loaded.model.graph.initializer if external_location(t)}
    state = Simplify().run(loaded)
    after = {t.name: external_location(t) for t in state.model.graph.initializer if external_location(t)}
    assert after and after.items() <= before.items() and state.data_dir == path.parent
    (entry,) = (tmp_path / "cache" / "simplify").iterdir()
    assert [f.name for f in entry.iterdir()] == ["model.onnx"]
    assert (entry / "model.onnx").stat().st_size < 0.2 * sum(v[2] for v in after.values())
    assert not any(t.HasField("raw_data") and len(t.raw_data) > 4096 for t in
                   onnx.load(str(entry / "model.onnx")).graph.initializer)
    onnx.save(state.model, str(path.with_name("simplified.onnx")))  # beside the data file it points into
    rng = np.random.default_rng(0)
    for past, seq in ((0, 4), (5, 1)):
        feeds = {"input_ids": rng.integers(0, 256, (1, seq)), "attention_mask": np.ones((1, past + seq), np.int64),
                 "position_ids": np.arange(past, past + seq)[None]}
        feeds.update({f"past_key_values.{i}.{kv}": rng.standard_normal((1, 2, past, 16)).astype(np.float32)
                      for i in range(4) for kv in ("key", "value")})
        assert_same_outputs(run(path.with_name("simplified.onnx"), feeds), run(path, feeds))
