"""Defects found by the fifteenth round's audit (6 December) in how the daemon process starts,
stops and follows its files: each reproduced with a real ``lrwatch daemon`` process (or a
real daemon serving HTTP on a loopback port the test picks)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from typing import Any

from daemon_helpers import WINDOW, assert_balanced, make_record
from services import free_port, http_request, wait_until


# --- records glued together on one line are counted one by one --------------------------------
def test_records_glued_on_one_line_are_each_counted_as_refused(run_daemon: Any) -> None:
    """``curl -d @predictions.ndjson`` drops the newlines: N records arrive glued together on
    one line. They were refused (NDJSON is one record per line) but counted as one rejected
    record, so ``lrwatch_ingest_received_total`` said one record came where N were sent."""
    r = run_daemon()
    rng = random.Random(154)
    recs = [json.dumps(make_record(rng, i)) for i in range(5)]
    status, out = r.post("/v1/predictions", "".join(recs))
    assert status == 400 and out["reasons"] == {"invalid_json": 5}, out
    assert "5 records glued together on one line" in out["error"], out
    # glued with spaces between, after a good line, and ending in a cut record: 1 + 3 + 1
    body = recs[0] + "\n" + recs[1] + " " + recs[2] + "  " + recs[3][:20] + "\n" + recs[4]
    status, out = r.post("/v1/predictions", body)
    assert status == 200 and out["accepted"] == 2 and out["reasons"] == {"invalid_json": 3}, out
    # junk after one record is one rejected record, as before
    status, out = r.post("/v1/predictions", recs[0] + " x")
    assert status == 400 and out["reasons"] == {"invalid_json": 1}, out
    assert r.metric("lrwatch_ingest_errors_total", {"reason": "invalid_json"}) == 9
    assert r.metric("lrwatch_ingest_received_total") == 11
    assert_balanced(r.daemon)


# --- SIGHUP -------------------------------------------------------------------------------------
def _start(reference: str, state: str, port: int, log: str,
           *extra: str) -> "subprocess.Popen[bytes]":
    with open(log, "ab") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lrwatch", "daemon", "--reference", reference, "--state-dir",
             state, "--port", str(port), "--window-size", str(WINDOW), "-v", *extra],
            stdout=subprocess.DEVNULL, stderr=err)
    wait_until(lambda: _get(port, "/healthz") == 200 or proc.poll() is not None, timeout=60,
               message="daemon up")
    assert proc.poll() is None, open(log).read()[-3000:]
    return proc


def _get(port: int, path: str) -> int:
    try:
        return http_request(f"http://127.0.0.1:{port}{path}", timeout=1)[0]
    except OSError:
        return 0


def _post(port: int, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
    status, out = http_request(f"http://127.0.0.1:{port}{path}", method="POST", data=body)
    return status, json.loads(out)


def test_sighup_stops_the_daemon_cleanly_with_a_last_snapshot(reference_path: str,
                                                              tmp_path: Any) -> None:
    """``SIGHUP`` (its terminal closed, a ``kill -HUP`` meant as a reload) ended the daemon by
    Python's default: no drain, no last snapshot, killed by the signal. It stops as on
    ``SIGTERM`` now (nothing is promised to be reloaded, so nothing is)."""
    state, log, port = str(tmp_path / "state"), str(tmp_path / "daemon.log"), free_port()
    proc = _start(reference_path, state, port, log)
    try:
        rng = random.Random(155)
        body = "\n".join(json.dumps(make_record(rng, i)) for i in range(WINDOW + 7)).encode()
        assert _post(port, "/v1/predictions", body)[0] == 200
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(30) == 0, open(log).read()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert "stopping (SIGHUP): draining the queue" in open(log).read()
    with open(os.path.join(state, "state.json"), "rb") as fh:
        saved = json.load(fh)
    assert saved["counters"]["predictions"] == WINDOW + 7 and saved["counters"]["windows"] == 1
    # the journal was applied up to its end: a restart replays nothing
    proc = _start(reference_path, state, port, log)
    try:
        assert json.loads(http_request(f"http://127.0.0.1:{port}/v1/status")[1])[
            "counters"]["predictions"] == WINDOW + 7
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert "replayed" not in open(log).read()


# --- a tailed path that turns into a directory ---------------------------------------------------
def _metric(port: int, name: str) -> float | None:
    text = http_request(f"http://127.0.0.1:{port}/metrics")[1].decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return None


def _predictions(port: int) -> int:
    return json.loads(http_request(f"http://127.0.0.1:{port}/v1/status")[1])[
        "counters"]["predictions"]


def test_a_tailed_path_that_becomes_a_directory_is_said_once_and_counted_once(
        reference_path: str, tmp_path: Any) -> None:
    """A tailed path turned into a directory (a deploy that ``mkdir``-s the log path, a
    volume mounted over it) logged ``tailing ... failed`` with a full traceback and counted
    an internal error every second until a file was back. It is one warning saying what to do
    and one ``lrwatch_daemon_problems_total{reason="tail_not_a_file"}`` per episode now; the
    file is followed again once it is back, and the count survives a restart."""
    rng = random.Random(156)
    data = tmp_path / "preds.jsonl"
    data.write_text("".join(json.dumps(make_record(rng, i)) + "\n" for i in range(30)))
    state, log, port = str(tmp_path / "state"), str(tmp_path / "daemon.log"), free_port()
    problem = 'lrwatch_daemon_problems_total{reason="tail_not_a_file"}'
    proc = _start(reference_path, state, port, log, "--tail", str(data))
    try:
        wait_until(lambda: _predictions(port) == 30, timeout=30, message="the file read")
        data.unlink()
        data.mkdir()
        wait_until(lambda: _metric(port, problem) == 1.0, timeout=30, message="counted")
        time.sleep(2.5)  # the old code logged a traceback (and counted) every second
        assert _metric(port, problem) == 1.0
        assert _metric(port, "lrwatch_internal_errors_total") == 0.0
        text = open(log).read()
        assert "Traceback" not in text and "tailing" not in text, text[-3000:]
        assert text.count("is not a file") == 1, text[-3000:]
        assert f"tailed path {data} is not a file" in text and "put the JSONL file there" in text
        # the file is back: followed again from its start
        data.rmdir()
        data.write_text("".join(json.dumps(make_record(rng, i)) + "\n" for i in range(12)))
        wait_until(lambda: _predictions(port) == 42, timeout=30, message="the file back")
        assert f"{data} can be read again" in open(log).read()
        # a second episode is counted again
        data.unlink()
        data.mkdir()
        wait_until(lambda: _metric(port, problem) == 2.0, timeout=30, message="again")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        proc = _start(reference_path, state, port, log)  # the count survives a restart
        assert _metric(port, problem) == 2.0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
