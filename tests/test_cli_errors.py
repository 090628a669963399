"""Bad paths and arguments on the CLI's drawing and stack commands: an error that says what to
fix and a non-zero exit, never a traceback (each was one before)."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from lrwatch.cli import cli
from lrwatch.exporters.trace import TraceWriter
from lrwatch.samples import Sample


def _invoke(*args: str) -> object:
    res = CliRunner().invoke(cli, list(args))
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    return res


def test_report_says_why_it_cannot_write_or_draw(tmp_path: Path) -> None:
    steps_only = tmp_path / "t.jsonl"
    with TraceWriter(steps_only) as w:   # valid lines that carry nothing to draw
        for i in range(1, 6):
            w.write(Sample(step=i, values={}))
    res = _invoke("report", str(steps_only), "-o", str(tmp_path / "no" / "r.png"))
    assert res.exit_code == 1 and "does not exist" in res.output
    res = _invoke("report", str(steps_only), "-o", str(tmp_path / "r.png"))
    assert res.exit_code == 1 and "nothing to draw" in res.output


def test_demo_refuses_a_fault_it_would_never_inject() -> None:
    res = _invoke("demo", "--steps", "20", "--port", "0", "--trace", "", "--inject", "nan",
                  "--inject-at", "50")
    assert res.exit_code == 2 and "would never be injected" in res.output


def test_stack_and_dashboards_name_a_path_they_cannot_use(tmp_path: Path) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("")
    res = _invoke("dashboards", "generate", "--out", str(blocker / "sub"))
    assert res.exit_code == 1 and "cannot write the dashboards" in res.output
    res = _invoke("stack", "--data-dir", str(blocker / "sub"))
    assert res.exit_code == 1 and "cannot use --data-dir" in res.output


def test_demo_refuses_an_injection_step_without_a_fault() -> None:
    """``--inject-at 40`` without ``--inject`` trained the whole run with no fault and said
    nothing (twelfth round's audit, docs/rules.md): the option a user gave was dropped."""
    res = _invoke("demo", "--steps", "20", "--port", "0", "--trace", "", "--inject-at", "10")
    assert res.exit_code == 2 and "--inject-at needs --inject" in res.output
    assert "done:" not in res.output


def test_demo_refuses_a_nan_burst_that_would_not_fit_in_the_run() -> None:
    """``--inject nan-burst --inject-at`` the last step poisoned one step and never the repeat
    that rolls back (fourteenth round's audit, docs/design.md): the run showed a plain `nan`
    and said it injected a burst."""
    res = _invoke("demo", "--steps", "5", "--batch-size", "4", "--port", "0", "--trace", "",
                  "--inject", "nan-burst", "--inject-at", "4")
    assert res.exit_code == 2 and "poisons steps 4-6, past the run's 5 steps" in res.output
    assert "--inject-at 3 or less" in res.output and "done:" not in res.output
    res = _invoke("demo", "--steps", "2", "--port", "0", "--trace", "", "--inject", "nan-burst")
    assert res.exit_code == 2 and "--steps 3 or more" in res.output


def test_daemon_on_a_taken_port_names_the_port_and_the_fix(tmp_path: Path) -> None:
    """`lrwatch daemon --port P` with P taken said only `[Errno 98] Address already in use`."""
    import socket

    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(1)
        port = blocker.getsockname()[1]
        res = _invoke("daemon", "--port", str(port), "--live-reference", "100",
                      "--state-dir", str(tmp_path / "state"))
    assert res.exit_code == 1, res.output
    assert f"cannot listen on 127.0.0.1:{port} (Address already in use)" in res.output
    assert "give another --port (0 picks a free one)" in res.output
