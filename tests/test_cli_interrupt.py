"""Ctrl-C (SIGINT) on a command: exit status 130, the shell's for an interrupted command, and a
line saying so; not click's "Aborted!" with status 1, which ``lrwatch replay --fail-on`` uses for
"a rule fired" (fourteenth round's audit, docs/rules.md)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _wait_for_reader(fifo: Path, proc: subprocess.Popen[str]) -> int:
    """Open ``fifo`` for writing once the command has it open for reading (no sleeping: a
    non-blocking open without a reader fails with ENXIO)."""
    while True:
        assert proc.poll() is None, proc.communicate()
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            continue


def test_replay_interrupted_exits_130_not_1(tmp_path: Path) -> None:
    fifo = tmp_path / "run.jsonl"
    os.mkfifo(fifo)
    proc = subprocess.Popen(
        [sys.executable, "-m", "lrwatch", "replay", str(fifo), "--fail-on", "critical"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        # (a background job of a non-interactive shell inherits SIGINT ignored)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    fd = _wait_for_reader(fifo, proc)
    try:
        os.write(fd, b'{"step": 1, "loss": 2.0}\n')   # it is now reading, and waits for more
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        os.close(fd)
    assert proc.returncode == 130, (proc.returncode, out, err)
    assert "lrwatch replay: interrupted" in err and "Aborted" not in err + out
    assert "Traceback" not in err


def test_replay_into_a_closed_pipe_exits_141_not_1(tmp_path: Path) -> None:
    """`lrwatch replay --json ... | head -1`: the reader goes away. click's own handling exited
    1, the status `--fail-on` gives for "a rule fired"; now 141, a shell's status for a
    command ended by SIGPIPE, and no traceback."""
    trace = tmp_path / "flip.jsonl"
    loss = {0: "1.0", 1: '"nan"'}   # every other step a NaN: over 100 kB of firings
    trace.write_text("".join(f'{{"step": {i}, "loss": {loss[i % 2]}}}\n'
                             for i in range(1, 8001)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "lrwatch", "replay", "--json", "--no-progress", str(trace)],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().startswith(b'{"trace": ')   # many more follow (~130 kB)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
