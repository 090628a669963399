"""Progress lines (``lrwatch.progress``): when a line is printed, and what it says."""

from __future__ import annotations

import io

from lrwatch.progress import Progress


def _clock(times):
    it = iter(times)
    return lambda: next(it)


def test_first_line_of_a_stage_then_at_most_one_per_interval_then_the_last():
    out = io.StringIO()
    p = Progress("work", interval=2.0, stream=out,
                 clock=_clock([0.0, 1.0, 1.9, 2.5, 3.0, 4.6, 5.0, 5.1, 5.2]))
    for k in range(6):
        p.update(k, 6, "items")  # times 0.0 .. 4.6: lines at 0.0 (first), 2.5, 4.6
    p.update(6, 6, "items")  # 5.0: the last always prints
    p.update(0, 3, "more")  # 5.1: a new stage prints at once
    p.update(1, 3, "more")  # 5.2: too soon
    assert out.getvalue().splitlines() == [
        "work: 0/6 items",
        "work: 3/6 items (2.5 s, about 2.5 s left)",
        "work: 5/6 items (4.6 s, about 0.9 s left)",
        "work: 6/6 items (5.0 s)",
        "work: 0/3 more",
    ]
    assert p.lines == 5


def test_a_detail_function_runs_only_when_a_line_is_printed():
    out = io.StringIO()
    calls = []

    def detail():
        calls.append(1)
        return "lr 0.1"

    p = Progress("x", interval=10.0, stream=out, clock=_clock([0.0, 1.0, 2.0, 3.0]))
    for k in range(3):
        p.update(k, 5, "steps", detail)
    assert len(calls) == 1 and out.getvalue() == "x: 0/5 steps, lr 0.1\n"


def test_disabled_prints_nothing_and_env_sets_the_interval(monkeypatch):
    out = io.StringIO()
    p = Progress("x", stream=out, enabled=False)
    p.update(0, 1, "a")
    p.message("hello")
    assert out.getvalue() == "" and p.lines == 0
    monkeypatch.setenv("LRWATCH_PROGRESS_INTERVAL", "0.25")
    assert Progress("x").interval == 0.25
    monkeypatch.setenv("LRWATCH_PROGRESS_INTERVAL", "soon")
    assert Progress("x").interval == 3.0
