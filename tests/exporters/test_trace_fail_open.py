"""The trace never stops training: a full disk (a real tmpfs filled to the last byte) and a
read-only file system (a real read-only tmpfs). Each test trains to the end.

Mounting needs root; without it (or without tmpfs) the tests skip and say why.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import torch

import lrwatch
from lrwatch.exporters.trace import TraceWriter, read_trace
from lrwatch.samples import Sample
from services import fill_filesystem, tmpfs


def _train(watch: lrwatch.Watcher, model: torch.nn.Module, opt: torch.optim.Optimizer,
           steps: int, at_step: dict[int, object] | None = None, pace: float = 0.0) -> None:
    for step in range(1, steps + 1):
        time.sleep(pace)  # the trace is pushed to the OS at most once a second
        x = torch.randn(16, 8)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), x[:, :1])
        loss.backward()
        opt.step()
        watch.log(loss=loss)
        if at_step and step in at_step:
            at_step[step]()  # type: ignore[operator]


def _lrwatch_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "lrwatch" and r.levelno >= logging.WARNING]


def test_full_disk_logs_once_counts_and_trains_to_the_end(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    with tmpfs(tmp_path / "disk", "size=256k") as disk:
        trace = disk / "run.jsonl"
        filler = disk / "filler"
        model = torch.nn.Linear(8, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        caplog.set_level(logging.WARNING, logger="lrwatch")
        with lrwatch.Watcher(model, opt, trace=str(trace), flush_every=5, rules=None) as watch:
            # healthy for 50 steps, the disk full for 200, then space again
            _train(watch, model, opt, 300, {50: lambda: (watch.flush(), watch.trace.flush(),
                                                         fill_filesystem(filler)),
                                            250: lambda: filler.unlink()}, pace=0.02)
        assert watch.step == 300
        records = _lrwatch_records(caplog)
        assert len(records) == 1, [r.getMessage() for r in records]  # not one per flush
        assert "No space left" in records[0].getMessage() or (
            records[0].exc_info and "No space left" in str(records[0].exc_info[1]))
        errors = watch.registry.get_sample_value("lrwatch_internal_errors_total")
        assert errors is not None and errors >= 1
        assert watch.trace.failures >= 2   # every dropped flush is counted by the writer
        # Whole lines only: the strict reader takes the trace as it is, with a gap.
        steps = [s.step for s in read_trace(trace)]
        assert steps[:50] == list(range(1, 51))
        assert steps[-1] == 300 and len(steps) < 300


def test_writer_with_on_error_counts_every_failure_and_never_raises(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture
                                                                    ) -> None:
    calls: list[int] = []
    with tmpfs(tmp_path / "disk", "size=64k") as disk:
        fill_filesystem(disk / "filler")
        caplog.set_level(logging.WARNING, logger="lrwatch")
        w = TraceWriter(disk / "t.jsonl", on_error=lambda: calls.append(1))
        for step in range(1, 6):
            w.write(Sample(step=step, values={"loss": 1.0}))
            w.flush()
        w.close()
        assert len(calls) == w.failures == 5 and not w.ok
        assert len(_lrwatch_records(caplog)) == 1
        assert (disk / "t.jsonl").stat().st_size == 0


def test_read_only_trace_path_trains_to_the_end(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    with tmpfs(tmp_path / "ro", "size=64k,ro") as ro:
        model = torch.nn.Linear(8, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        caplog.set_level(logging.WARNING, logger="lrwatch")
        watch = lrwatch.Watcher(model, opt, trace=str(ro / "run.jsonl"), flush_every=5,
                                rules=None)  # no longer raises from the constructor
        _train(watch, model, opt, 60)
        watch.close()
        assert watch.step == 60
        assert not (ro / "run.jsonl").exists()
        assert len(_lrwatch_records(caplog)) == 1
        assert watch.registry.get_sample_value("lrwatch_internal_errors_total") >= 1


def test_a_resume_on_a_full_disk_leaves_no_half_line(tmp_path: Path) -> None:
    """The earlier run's lines are copied back line by line: the disk filling up in the middle
    of one left it half written, and the run's next lines followed it on the same line (a
    trace no strict reader gets past)."""
    with tmpfs(tmp_path / "disk", "size=64k") as disk:
        trace, filler = disk / "run.jsonl", disk / "filler"
        with TraceWriter(trace) as w:
            w.write_many(Sample(step=i, time=None, values={"loss": 1.0 / i, "pad": 123456.789})
                         for i in range(1, 301))
        errors: list[int] = []
        w = TraceWriter(trace, on_error=lambda: errors.append(1))
        fill_filesystem(filler)
        with open(filler, "r+b") as fh:   # one page left: the copy stops inside a line
            fh.truncate(filler.stat().st_size - 4096)
        kept = w.resume(250)
        filler.unlink()
        w.write(Sample(step=251, time=None, values={"loss": 0.5}))
        w.close()
        assert errors and 0 < kept < 250
        assert [s.step for s in read_trace(trace)] == list(range(1, kept + 1)) + [251]


def test_a_trace_that_cannot_be_opened_leaves_the_earlier_runs_lines(tmp_path: Path) -> None:
    """The earlier run's lines are moved aside (PATH.before) before the path is opened anew;
    when that open failed (no inode left), the close deleted them although this run wrote
    nothing."""
    with tmpfs(tmp_path / "disk", "size=1m,nr_inodes=4") as disk:
        trace = disk / "run.jsonl"
        with TraceWriter(trace) as w:
            w.write_many(Sample(step=i, time=None, values={"loss": 1.0}) for i in range(1, 6))
        filled = 0
        with pytest.raises(OSError):
            while True:   # every inode taken: a rename still works, a new file does not
                (disk / f"fill{filled}").touch()
                filled += 1
        errors: list[int] = []
        w = TraceWriter(trace, on_error=lambda: errors.append(1))
        w.write(Sample(step=1, time=None, values={"loss": 2.0}))
        w.close()
        assert errors and not w.ok
        assert [s.step for s in read_trace(trace)] == [1, 2, 3, 4, 5]
        assert not (disk / "run.jsonl.before").exists()
