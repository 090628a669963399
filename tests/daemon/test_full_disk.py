"""A full or failing disk: every record is either acknowledged (and then never lost) or
answered 503 (and then never counted), across kill -9 and restarts.

The end-to-end test puts the state directory on a tiny tmpfs (it needs root to mount one);
the journal test makes writes fail with a file-size limit (``RLIMIT_FSIZE``, no root needed).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest

from daemon_helpers import WINDOW, make_record
from services import fill_filesystem, free_port, http_request, tmpfs, wait_until

pytestmark = pytest.mark.slow


def test_a_journal_write_that_fails_leaves_no_partial_entry(tmp_path) -> None:
    """In a child process whose file-size limit is hit mid-entry: the failed appends raise,
    leave the file at the last whole entry, and replay gives exactly the acknowledged ones."""
    script = textwrap.dedent(f"""
        import json, os, resource, signal, sys
        from lrwatch.daemon.state import Journal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal
        j = Journal({str(tmp_path)!r}); j.open()
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.RLIM_INFINITY))
        acked, failed = [], 0
        for i in range(100):
            payload = json.dumps({{"i": i, "pad": "x" * (300 + 37 * (i % 11))}}).encode()
            try:
                j.append(b"P", float(i), payload)
                acked.append(i)
            except OSError:
                failed += 1
                assert j.error is not None
                assert os.path.getsize(j.path(j.segment)) == j.size  # cut at once
        print(json.dumps({{"acked": acked, "failed": failed, "size": j.size}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["failed"] > 0 and len(res["acked"]) > 10
    from lrwatch.daemon.state import Journal

    j = Journal(str(tmp_path))
    got = [json.loads(p)["i"] for _, _, _, _, p in j.replay(1, 0)]
    assert got == res["acked"]
    assert os.path.getsize(j.path(1)) == res["size"]


# --- end to end on a tiny tmpfs ------------------------------------------------------------------
def _start(reference: str, state: str, port: int, log: str) -> subprocess.Popen[bytes]:
    with open(log, "ab") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lrwatch", "daemon", "--reference", reference, "--state-dir",
             state, "--port", str(port), "--window-size", str(WINDOW), "-v"],
            stdout=subprocess.DEVNULL, stderr=err)
    wait_until(lambda: _get(port, "/healthz")[0] in (200, 503) or proc.poll() is not None,
               timeout=60, message="daemon up")
    assert proc.poll() is None, open(log).read()[-3000:]
    return proc


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        return http_request(f"http://127.0.0.1:{port}{path}", timeout=5)
    except OSError:
        return 0, b""


def test_full_disk_kill_9_and_restart_lose_no_acknowledged_record(reference_path,
                                                                   tmp_path) -> None:
    state = str(tmp_path / "state")
    mounted = contextlib.ExitStack()
    mounted.enter_context(tmpfs(state, "size=4m"))
    filler = os.path.join(state, "filler")
    log = str(tmp_path / "daemon.log")
    port = free_port()
    rng = random.Random(11)
    acked = {"predictions": 0, "invalid_json": 0}
    refused = 0
    i = 0

    def post() -> int:
        nonlocal i, refused
        lines = [json.dumps(make_record(rng, i + k, id=None)) for k in range(49)] + ["{bad"]
        i += 49
        status, body = http_request(f"http://127.0.0.1:{port}/v1/predictions", method="POST",
                                    data="\n".join(lines).encode())
        if status == 200:
            acked["predictions"] += 49
            acked["invalid_json"] += 1
        else:
            assert status == 503, body
            out = json.loads(body)
            assert out["reason"] == "storage" and out["rejected"] == 50
            refused += 1
        return status

    proc = _start(reference_path, state, port, log)
    try:
        _full_disk_then_kill(proc, post, filler, port)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if os.path.exists(filler):
            os.unlink(filler)
    try:
        proc = _start(reference_path, state, port, log)
        for _ in range(10):
            assert post() == 200

        def settled() -> dict | None:
            s = json.loads(_get(port, "/v1/status")[1])
            c = s["counters"]
            return s if c["predictions"] >= acked["predictions"] and \
                s["queue_records"] == 0 else None

        c = wait_until(settled, timeout=60, message="totals")["counters"]
        assert c["predictions"] == acked["predictions"]  # none lost, none unacknowledged
        assert c["errors"]["invalid_json"] == acked["invalid_json"]
        assert c["windows"] == acked["predictions"] // WINDOW
        assert c["predictions"] + c["labels"] + sum(c["errors"].values()) == c["received"]
        # 503s are counted only in memory (never journaled): at most all of them survive
        assert 0 <= c["errors"]["storage"] <= 50 * refused
        # a clean restart keeps exactly these totals
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        proc = _start(reference_path, state, port, log)
        time.sleep(0.5)
        assert json.loads(_get(port, "/v1/status")[1])["counters"] == c
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        mounted.close()


def _full_disk_then_kill(proc: subprocess.Popen[bytes], post: Any, filler: str,
                         port: int) -> None:
    for _ in range(30):
        assert post() == 200
    fill_filesystem(filler)
    statuses = [post() for _ in range(20)]
    assert statuses.count(503) >= 19, statuses  # at most one fit in what was left
    assert _get(port, "/healthz")[0] == 503
    metrics = _get(port, "/metrics")[1].decode()
    assert 'lrwatch_ingest_errors_total{reason="storage"}' in metrics
    assert "lrwatch_internal_errors_total 0.0" not in metrics

    # space returns: ingest resumes by itself, health too
    os.unlink(filler)
    assert post() == 200
    wait_until(lambda: _get(port, "/healthz")[0] == 200, timeout=10, message="healthy")
    for _ in range(10):
        assert post() == 200

    # full again, and killed while full
    fill_filesystem(filler)
    statuses = [post() for _ in range(10)]
    assert statuses.count(503) >= 9, statuses
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
