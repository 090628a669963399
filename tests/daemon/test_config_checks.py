"""Settings that would make the daemon run in a way nobody asked for are refused at start,
with an error that says what to fix (and never a traceback)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lrwatch.daemon import DaemonConfig
from lrwatch.errors import ConfigError


def _daemon_cli(*args: str) -> subprocess.CompletedProcess:
    """``lrwatch daemon ARGS`` in a process of its own; one that starts serving instead of
    failing is stopped (a daemon that runs was the bug) and reported as such."""
    proc = subprocess.Popen([sys.executable, "-m", "lrwatch", "daemon", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the daemon started instead of refusing the settings: {err[-500:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("content", [b"", b"\n", b"  \t\n"])
def test_an_empty_token_file_is_refused_not_read_as_no_authentication(tmp_path, content,
                                                                      reference_path):
    token = tmp_path / "token"
    token.write_bytes(content)
    res = _daemon_cli("--reference", reference_path, "--port", "0",
                      "--token-file", str(token))
    assert res.returncode == 1 and "is empty" in res.stderr and "Traceback" not in res.stderr
    with pytest.raises(ConfigError, match="is empty"):
        DaemonConfig.from_mapping({"auth": {"token_file": "token"}}, base_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="token is empty"):
        DaemonConfig(token=content.decode())
