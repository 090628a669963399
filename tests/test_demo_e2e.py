"""A real Prometheus scrapes a running ``lrwatch demo``; what it stored matches the trace."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from typing import Any, Callable

import click
import pytest
from click.testing import CliRunner

from lrwatch.cli import cli
from lrwatch.exporters.trace import read_trace
from services import PrometheusServer, free_port


def _series_by_time(result: list[dict[str, Any]]) -> dict[float, float]:
    assert len(result) == 1, result
    return {float(t): float(v) for t, v in result[0]["values"]}


@pytest.mark.prometheus
@pytest.mark.slow
def test_prometheus_scrapes_demo_and_values_match_trace(
        prometheus_factory: Callable[..., PrometheusServer], tmp_path: Any) -> None:
    port = free_port()
    prom = prometheus_factory([f"127.0.0.1:{port}"], scrape_interval="1s")
    trace = tmp_path / "demo.jsonl"
    start = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "lrwatch", "demo", "--steps", "160", "--port", str(port),
         "--trace", str(trace), "--flush-every", "5", "--linger", "3"],
        capture_output=True, text=True, timeout=480,
        # One thread: on a busy 2-core machine OpenMP spinning makes the GRU crawl.
        env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert f"metrics: http://127.0.0.1:{port}/metrics" in proc.stdout
    assert "done: 160 steps" in proc.stdout
    end = time.time()
    by_step = {s.step: s for s in read_trace(trace)}
    assert sorted(by_step) == list(range(1, 161))

    def series(q: str) -> dict[float, float]:
        return _series_by_time(prom.query_range(q, start=start, end=end, step=0.5))

    steps = series('lrwatch_step{job="lrwatch"}')
    loss = series("lrwatch_loss")
    gnorm = series("lrwatch_grad_norm")
    lr = series('lrwatch_learning_rate{param_group="0"}')
    matched = set()
    for t, step in steps.items():
        sample = by_step[int(step)]
        # One scrape is one consistent flush: the step and its values come from the same sample.
        assert loss[t] == pytest.approx(sample.values["loss"], rel=1e-9)
        assert gnorm[t] == pytest.approx(sample.values["grad_norm"], rel=1e-9)
        assert lr[t] == pytest.approx(sample.lr_groups[0], rel=1e-9)
        matched.add(int(step))
    assert len(matched) >= 3, f"Prometheus saw too few distinct steps: {sorted(matched)}"
    # The last flushed step is what Prometheus kept at the end.
    assert max(matched) == 160
    # Counters keep what a 15 s scrape would miss. (Over a range: once the demo has exited,
    # the failed scrape marks the series stale, and on a loaded machine an instant query a
    # second before `end` can already fall after that marker.)
    total = prom.query(f'max_over_time(lrwatch_training_steps_total[2m] @ {end:.3f})')
    assert float(total[0]["value"][1]) == 160


def test_demo_cli_runs_in_process_and_writes_trace(tmp_path: Any) -> None:
    trace = tmp_path / "t.jsonl"
    result = CliRunner().invoke(cli, ["demo", "--steps", "20", "--port", "0", "--trace",
                                      str(trace), "--flush-every", "5"])
    assert result.exit_code == 0, result.output
    assert "done: 20 steps" in result.output and "metrics: http://127.0.0.1:" in result.output
    samples = read_trace(trace)
    assert [s.step for s in samples] == list(range(1, 21))
    last = samples[-1].values
    for key in ("loss", "accuracy", "grad_norm", "update_ratio", "eval_loss", "eval_accuracy",
                "lr", "samples_per_second"):
        assert key in last, key


def test_cli_help_lists_commands() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0 and "demo" in result.output
    assert CliRunner().invoke(cli, ["demo", "--help"]).output.count("--steps") == 1


def test_demo_help_describes_every_option() -> None:
    from lrwatch.cli import demo

    for param in demo.params:
        if isinstance(param, click.Option):
            assert param.help and len(param.help) > 10, f"demo {param.opts[0]} has no description"
    out = CliRunner().invoke(cli, ["demo", "--help"]).output
    for param in demo.params:
        assert param.opts[0] in out


_PROGRESS = re.compile(r"^step\s+(\d+)\s+schedule\s+(\d+)/(\d+)\s+loss")


@pytest.mark.slow
def test_demo_console_says_each_event_once_in_step_order(tmp_path: Any) -> None:
    """A fault rolled back: one line per event, no echo of the Watcher's own log lines, no
    "resolved: resolved", and the schedule never past its total while the step count goes on."""
    result = CliRunner().invoke(cli, ["demo", "--steps", "40", "--inject", "nan-burst",
                                      "--port", "0", "--trace", str(tmp_path / "t.jsonl")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    events = [line for line in lines if line.lstrip().startswith(("!!", ">>", "ok "))]
    assert len(events) == len(set(events)), events
    firings = [line for line in events if "!!" in line]
    # the burst: its first step is not applied, the repeat rolls back
    dropped = [line for line in events if ">>" in line and "not applied" in line]
    rollbacks = [line for line in events if ">>" in line and "step 0" in line]
    assert firings and dropped and rollbacks, result.output
    assert lines.index(firings[0]) < lines.index(dropped[0]) < lines.index(rollbacks[0])
    text = result.output
    assert "resolved: resolved" not in text
    assert "rolled back to" not in text and " firing: " not in text  # the Watcher's own lines
    progress = [tuple(map(int, m.groups())) for m in map(_PROGRESS.match, lines) if m]
    assert progress, text
    steps = [p[0] for p in progress]
    assert steps == sorted(steps) and steps[-1] > 40  # the rolled-back steps ran again
    assert all(at <= total == 40 for _, at, total in progress), progress
    assert progress[-1][1] == 40
    # Every step a line names, in order (the firing's step, then the action's flush step).
    named = [int(m.group(1)) for m in (re.search(r"step (\d+):", e) for e in events) if m]
    assert named == sorted(named), events
    # The trace holds the same events the console printed.
    trace_events = [e for s in read_trace(tmp_path / "t.jsonl") for e in s.events]
    shown = [e for e in trace_events if e["type"] == "firing"
             and e["severity"] in ("critical", "warning")]
    assert len(shown) == len(firings)
