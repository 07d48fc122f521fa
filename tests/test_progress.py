"""Progress lines: the last one always, at most one an interval before it, none for small work."""

from __future__ import annotations

from llc.progress import WORTH_SAYING, Progress


def test_progress_says_the_end_and_little_before_it():
    lines: list[str] = []
    p = Progress("emit: weights written", 10 * WORTH_SAYING, say=lines.append, interval=3600)
    for _ in range(10):
        p.add(WORTH_SAYING)
    p.add(0)
    assert lines == [f"emit: weights written: {10 * WORTH_SAYING / 1e6:,.0f} of {10 * WORTH_SAYING / 1e6:,.0f} MB "
                     + lines[0].rsplit(" MB ", 1)[1]]
    every: list[str] = []
    p = Progress("push", 4 * WORTH_SAYING, say=every.append, interval=0)
    for _ in range(4):
        p.add(WORTH_SAYING)
    assert [line.split(" MB")[0] for line in every] == [f"push: {k * WORTH_SAYING / 1e6:,.0f} of "
                                                        f"{4 * WORTH_SAYING / 1e6:,.0f}" for k in (1, 2, 3, 4)]


def test_progress_is_quiet_for_small_work():
    lines: list[str] = []
    p = Progress("push", WORTH_SAYING - 1, say=lines.append, interval=0)
    p.add(WORTH_SAYING - 1)
    assert lines == []
