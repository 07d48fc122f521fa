"""partition: a split file gives exactly its ranges; bad split files name the file; even/memory cover all."""

from __future__ import annotations

import pytest
import yaml

from conftest import write_profile
from llc.compiler import analysis_passes, new_state
from llc.compiler.passes.partition import Partition
from llc.compiler.pipeline import PassManager
from llc.errors import LlcError
from llc.profile import load_profile
from test_pass_graphs import tiny_decoder


@pytest.fixture
def analysed(tmp_path):
    """The tiny decoder after the analysis passes (simplify off: nothing here depends on it)."""
    def make(n_devices=4, shape_read="full", **workload):
        profile = load_profile(write_profile(tmp_path / "p.yaml", n_devices, **workload))
        state = new_state(tiny_decoder(tmp_path, shape_read=shape_read), profile, profile.workload)
        return PassManager(analysis_passes(simplify=False)).run(state)
    return make


def split_file(path, stages) -> str:
    path.write_text(yaml.safe_dump({"stages": [{"device": d, "blocks": b} for d, b in stages]}))
    return str(path)


def ranges(plan):
    return [(s.device, s.first_block, s.last_block) for s in plan.stages]


def test_split_file_gives_exactly_its_ranges(tmp_path, analysed):
    state = analysed()
    assert [b.label for b in state.blocks] == ["embed", "layer 0", "layer 1", "head"]
    path = split_file(tmp_path / "split.yaml", [("dev2", ["embed", "layer 0"]), ("dev0", [2, 2]), ("dev3", "head")])
    plan = Partition(split=path).run(state).plan
    assert ranges(plan) == [("dev2", 0, 1), ("dev0", 2, 2), ("dev3", 3, 3)]
    assert [s.index for s in plan.stages] == [0, 1, 2]
    assert plan.split == path
    assert all(s.compute_ms_decode > 0 for s in plan.stages)
    assert plan.decode_ms >= sum(s.compute_ms_decode for s in plan.stages)


@pytest.mark.parametrize("stages,problem", [
    ([("dev0", ["embed", "embed"]), ("dev1", ["layer 1", "head"])], "should start at layer 0"),  # a gap
    ([("dev0", ["embed", "layer 0"]), ("dev1", ["layer 0", "head"])], "should start at layer 1"),  # overlap
    ([("dev0", ["embed", "layer 1"])], "stages end at block 2"),  # the head left out
    ([("dev0", ["embed", "layer 0"]), ("phone9", ["layer 1", "head"])], "'phone9' is not in the profile"),
    ([("dev0", ["embed", "layer 0"]), ("dev0", ["layer 1", "head"])], "more than one stage"),
    ([("dev0", ["embed", "layer 7"])], "expected [first, last]"),
])
def test_bad_split_file_names_the_file(tmp_path, analysed, stages, problem):
    state = analysed()
    path = split_file(tmp_path / "split.yaml", stages)
    with pytest.raises(LlcError) as e:
        Partition(split=path).run(state)
    assert e.value.where == path
    assert problem in e.value.message
    assert state.plan is None


def test_split_file_that_is_not_yaml(tmp_path, analysed):
    state = analysed()
    path = tmp_path / "split.yaml"
    path.write_text("stages: [\n")
    with pytest.raises(LlcError, match="YAML") as e:
        Partition(split=str(path)).run(state)
    assert e.value.where == str(path)


@pytest.mark.parametrize("how", ["even", "memory"])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_even_and_memory_splits_cover_every_block(analysed, how, n):
    state = analysed(n_devices=n)
    plan = Partition(split=how).run(state).plan
    assert len(plan.stages) == n
    assert plan.stages[0].first_block == 0 and plan.stages[-1].last_block == len(state.blocks) - 1
    for a, b in zip(plan.stages, plan.stages[1:]):
        assert b.first_block == a.last_block + 1
    assert all(s.first_block <= s.last_block for s in plan.stages)
    assert [s.device for s in plan.stages] == [f"dev{i}" for i in range(n)]
    assert plan.split == how


def test_mip_with_a_fixed_stage_count(analysed):
    plan = Partition().run(analysed(n_devices=4, stages=4)).plan
    assert plan.split == "mip"
    assert [(s.first_block, s.last_block) for s in plan.stages] == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert len({s.device for s in plan.stages}) == 4
