"""Per-rank trace names: the Watcher under a real process group (gloo, two processes) and the
framework callbacks' ``export_kwargs`` name a rank's trace the same way, ``run.rank<r>.jsonl``,
so ``lrwatch replay DIR`` (a ``*.jsonl`` glob) finds every rank."""

from __future__ import annotations

from pathlib import Path

import pytest

import rank_trace_workers as rtw
from ranks import spawn_ranks
from lrwatch.integrations._common import export_kwargs
from lrwatch.rules.replay import expand_traces
from lrwatch.trace import read_trace
from lrwatch.watch import rank_trace_path


def test_watcher_export_all_names_rank_traces_so_replay_finds_them(tmp_path: Path) -> None:
    out = tmp_path / "traces"
    out.mkdir()
    spawn_ranks(rtw.export_all, args=(2, str(tmp_path / "store"), str(out)), nprocs=2)
    assert sorted(p.name for p in out.glob("run*")) == ["run.rank0.jsonl", "run.rank1.jsonl"]
    found = [Path(p).name for p in expand_traces([out])]
    assert found == ["run.rank0.jsonl", "run.rank1.jsonl"]
    for name in found:
        assert [s.step for s in read_trace(out / name)] == list(range(1, 7))


def test_callbacks_and_watcher_agree_on_the_name() -> None:
    for rank in (1, 3):
        per = export_kwargs({"trace": "out/run.jsonl"}, rank, "all")
        assert per["trace"] == rank_trace_path("out/run.jsonl", rank) == f"out/run.rank{rank}.jsonl"
    assert rank_trace_path(Path("t"), 2) == "t.rank2"


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__])
