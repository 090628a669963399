"""Every code block of README.md runs as pasted, in README order, in one scratch directory.

A reader of a fresh clone runs ``make demo`` (or ``make test``), activates ``.venv`` and then
pastes the examples one after another into the same directory: later examples read the traces
earlier ones wrote. This test does exactly that:

- ``python`` blocks run in a subprocess of the venv's interpreter; the exit status must be 0;
- ``sh`` blocks run in bash with ``set -e`` and the venv's ``bin/`` first on ``PATH`` (what
  ``source .venv/bin/activate`` does; the scratch directory has ``.venv`` linked to the venv so
  that line itself runs too). A block holding a command that runs until Ctrl-C (``lrwatch
  stack``, a demo with ``--linger``) must hold only that command: it is started, must say it is
  up, and then gets the Ctrl-C (SIGINT) a reader would type;
- ``yaml`` blocks are files: their first line names them (``# my-rules.yml``) and they are
  written into the directory, where the sh blocks after them use them;
- ``text`` blocks are synopses, not examples (``[...]`` marks options), and are not run.

What the README says an example prints is checked too: a ``print(...)`` whose comment shows
its output (``# BestEval(step=..., ...)``, ``...`` standing for any value) must print a line of
that form, and a command's comment or the paragraph after it that says what it shows
(``EXPECTED_OUTPUT``) must be in its output.

Any other fence (or none) fails the test, so no example escapes it. The set-up block is the one
exception: its two commands (``make demo``, ``make test``) are the set-up this test runs in.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
_FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.S | re.M)
SETUP_COMMANDS = ["make demo", "make test"]
#: Commands that run until interrupted -> what they print once they are up.
LONG_RUNNING = {"lrwatch stack": "Ctrl-C stops them", "--linger": "trace:"}
STACK_PORTS = (9090, 9091, 9093)
#: What the README says a command shows -> a piece of its output that says so.
EXPECTED_OUTPUT = {
    # "no snapshot has proved healthy by the fault at step 36, so the rollback is a restart
    # from step 0 at a tenth of the rate"
    "lrwatch demo --steps 60 --inject nan-burst": "restart from step 0 at lr x0.1",
    "lrwatch replay lrwatch-demo.trace.jsonl --json --fail-on critical": "a critical rule fired",
    "lrwatch rules check my-rules.yml": "my-rules.yml: ok",
}
_PRINTS = re.compile(r"^\s*print\(.*\)\s+# ([A-Za-z_]\w*\(.*\))\s*$", re.M)


def _check_output(block: "Block", out: str) -> None:
    """What the README says the block prints is in its output."""
    for shown in _PRINTS.findall(block.code):
        pattern = ".+?".join(re.escape(part) for part in shown.split("..."))
        assert any(re.fullmatch(pattern, ln.strip()) for ln in out.splitlines()), \
            f"{block}: README says it prints {shown!r}; it printed:\n{out[-2000:]}"
    for cmd in _commands(block.code):
        for start, piece in EXPECTED_OUTPUT.items():
            if cmd.startswith(start):
                assert piece in out, f"{block}: `{cmd}` did not show {piece!r}:\n{out[-3000:]}"


@dataclass
class Block:
    lang: str
    code: str
    line: int

    def __str__(self) -> str:
        return f"README.md:{self.line} ({self.lang})"


def readme_blocks(text: str) -> list[Block]:
    return [Block(m.group(1).strip(), m.group(2), text.count("\n", 0, m.start()) + 1)
            for m in _FENCE.finditer(text)]


def _commands(code: str) -> list[str]:
    out = []
    for raw in code.splitlines():
        line = raw.split(" #", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if line:
            out.append(line)
    return out


def _env(scratch: Path) -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
            "VIRTUAL_ENV": str(Path(sys.executable).parent.parent),
            # One thread: the machine is shared, and OpenMP spinning makes small models crawl.
            "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg"}


def _port_taken(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME-WAIT is not taken
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _cannot_run(cmd: str) -> str | None:
    """Why this machine cannot run ``cmd`` as pasted (a missing binary, a taken port)."""
    if not cmd.startswith("lrwatch stack"):
        return None
    from lrwatch.errors import ConfigError
    from lrwatch.stack import BINARIES, find_binary

    for service in BINARIES:
        try:
            find_binary(service)
        except ConfigError as exc:
            return str(exc)
    taken = [p for p in STACK_PORTS if _port_taken(p)]
    return f"it needs ports {taken}, which something else holds" if taken else None


def _run_long(block: Block, cmd: str, marker: str, scratch: Path) -> None:
    # Ctrl-C as in the reader's terminal: a test run started in the background of a
    # non-interactive shell inherits SIGINT ignored, and the command would never see it.
    proc = subprocess.Popen(["bash", "-c", block.code], cwd=scratch, env=_env(scratch),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen: list[str] = []
    deadline = time.monotonic() + 120
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            if marker in line or time.monotonic() > deadline:
                break
        up = any(marker in s for s in seen)
        os.killpg(proc.pid, signal.SIGINT)   # the reader's Ctrl-C
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out = "".join(seen) + (rest or "")
    assert up, f"{block}: `{cmd}` never said {marker!r}:\n{out}"
    # Ctrl-C is a clean end: 0, or 130 (the shell's status for SIGINT), and no traceback.
    assert proc.returncode in (0, 130) and "Traceback" not in out, \
        f"{block}: `{cmd}` ended with {proc.returncode} on Ctrl-C:\n{out}"


def _run(block: Block, scratch: Path) -> str | None:
    """Run one block; returns why it could not run here, if it could not."""
    env = _env(scratch)
    if block.lang == "python":
        proc = subprocess.run([sys.executable, "-c", block.code], cwd=scratch, env=env,
                              capture_output=True, text=True, timeout=300)
    elif block.lang == "sh":
        cmds = _commands(block.code)
        long = [(c, m) for c in cmds for k, m in LONG_RUNNING.items() if k in c]
        if long:
            assert len(cmds) == 1, (f"{block}: a command that runs until Ctrl-C must be alone "
                                    f"in its block, got {cmds}")
            why = _cannot_run(long[0][0])
            if why is not None:
                return f"{block}: `{long[0][0]}`: {why}"
            _run_long(block, *long[0], scratch)
            return None
        proc = subprocess.run(["bash", "-e", "-c", block.code], cwd=scratch, env=env,
                              capture_output=True, text=True, timeout=300)
    elif block.lang == "yaml":
        first = block.code.splitlines()[0]
        m = re.fullmatch(r"#\s*(\S+\.ya?ml)\s*", first)
        assert m, f"{block}: a yaml block's first line names its file, e.g. '# my-rules.yml'"
        (scratch / m.group(1)).write_text(block.code, encoding="utf-8")
        return None
    else:
        raise AssertionError(f"{block}: fence {block.lang!r} is neither python, sh, yaml nor "
                             f"text; tag every block so that this test knows how to run it")
    assert proc.returncode == 0, (f"{block} exited {proc.returncode}:\n{block.code}\n"
                                  f"--- stdout\n{proc.stdout[-3000:]}\n"
                                  f"--- stderr\n{proc.stderr[-3000:]}")
    _check_output(block, proc.stdout + proc.stderr)
    return None


def test_readme_blocks_are_tagged_and_setup_is_two_commands() -> None:
    blocks = readme_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) >= 8
    for b in blocks:
        assert b.lang in ("python", "sh", "yaml", "text"), f"{b}: untagged or unknown fence"
    setup = [b for b in blocks if any(c.startswith("make ") for c in _commands(b.code))]
    assert len(setup) == 1, [str(b) for b in setup]
    assert [c.split(" #")[0].strip() for c in _commands(setup[0].code)] == SETUP_COMMANDS
    text = README.read_text(encoding="utf-8")
    assert ".venv/bin/lrwatch" in text and "source .venv/bin/activate" in text
    # Links inside the repository point at files that exist in it.
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).exists(), f"README links to {target}, which is not in the repo"


@pytest.mark.slow
def test_every_readme_example_runs_as_pasted(tmp_path: Path) -> None:
    scratch = tmp_path / "clone"
    scratch.mkdir()
    # What `make demo` leaves in a fresh clone: the environment in .venv/.
    (scratch / ".venv").symlink_to(Path(sys.executable).parent.parent)
    ran = 0
    could_not: list[str] = []
    for block in readme_blocks(README.read_text(encoding="utf-8")):
        if block.lang == "text":
            continue
        if block.lang == "sh" and any(c.startswith("make ") for c in _commands(block.code)):
            continue  # the set-up this test runs in
        t0 = time.monotonic()
        why = _run(block, scratch)
        if why is not None:
            could_not.append(why)   # the others still run; the test says so at the end
            continue
        print(f"{block}: {time.monotonic() - t0:.1f} s")
        ran += 1
    assert ran >= 8
    shown = {c for b in readme_blocks(README.read_text(encoding="utf-8"))
             for c in _commands(b.code) for start in EXPECTED_OUTPUT if c.startswith(start)}
    assert len(shown) == len(EXPECTED_OUTPUT), "an EXPECTED_OUTPUT command left the README"
    # What the examples said they would write is there.
    for name in ("run.trace.jsonl", "run.png", "runs.html"):
        assert (scratch / name).stat().st_size > 0, name
    if could_not:
        pytest.skip(f"ran {ran} blocks; could not run here: {'; '.join(could_not)}")
