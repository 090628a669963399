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

from daemon_helpers import (WINDOW, assert_balanced, edited_state, http_status, make_record,
                            start_daemon_process)
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
def _post(port: int, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
    status, out = http_request(f"http://127.0.0.1:{port}{path}", method="POST", data=body)
    return status, json.loads(out)


def test_sighup_stops_the_daemon_cleanly_with_a_last_snapshot(reference_path: str,
                                                              tmp_path: Any) -> None:
    """``SIGHUP`` (its terminal closed, a ``kill -HUP`` meant as a reload) ended the daemon by
    Python's default: no drain, no last snapshot, killed by the signal. It stops as on
    ``SIGTERM`` now (nothing is promised to be reloaded, so nothing is)."""
    state, log, port = str(tmp_path / "state"), str(tmp_path / "daemon.log"), free_port()
    proc = start_daemon_process(reference_path, state, port, log)
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
    proc = start_daemon_process(reference_path, state, port, log)
    try:
        assert json.loads(http_request(f"http://127.0.0.1:{port}/v1/status")[1])[
            "counters"]["predictions"] == WINDOW + 7
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert "replayed" not in open(log).read()
    # under nohup (SIGHUP ignored when the process starts) it stays ignored
    nohup_log = str(tmp_path / "nohup.log")
    with open(nohup_log, "ab") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lrwatch", "daemon", "--reference", reference_path,
             "--state-dir", state, "--port", str(port), "--window-size", str(WINDOW)],
            stdout=subprocess.DEVNULL, stderr=err,
            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    try:
        wait_until(lambda: http_status(port, "/healthz") == 200 or proc.poll() is not None,
                   timeout=60, message="daemon up")
        proc.send_signal(signal.SIGHUP)
        proc.send_signal(signal.SIGTERM)   # delivered after the SIGHUP (a lower number)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert "stopping (SIGTERM)" in open(nohup_log).read()


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
    proc = start_daemon_process(reference_path, state, port, log, extra=("--tail", str(data)))
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
        proc = start_daemon_process(reference_path, state, port, log)  # the count survives a restart
        assert _metric(port, problem) == 2.0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


# --- a hand-edited or damaged state.json ---------------------------------------------------------
def _damaged(good: dict[str, Any], edit: str) -> Any:
    """``good`` with one hand edit (a path of keys, then the new value as JSON)."""
    if not edit.startswith("."):
        return json.loads(edit)
    return edited_state(good, edit[1:])


_EDITS = ["{}", '{"counters": {"predictions": "x"}}', '{"version": "1"}',
          '.counters.predictions="x"', '.counters.errors.invalid_json=null', ".counters=[]",
          '.files={"/x": [1, 2]}', ".journal=[1]", '.window.index="3"', ".window.feats=5",
          '.window.preds=[]', '.window.start="now"', '.window.joined=1.5',
          '.pending.items=[["a", 1, "t"]]', ".pending.early.items=[[1]]",
          '.detector.history=[["x", [1]]]', '.coverage.buckets=[[1, 2]]',
          '.estimates={"open": [[1, 2]]}', '.last.values={"drift_score": "high"}',
          ".engine=null", ".ref_rows=[1]", ".version=0", '.engine.rules.data_drift.pending="x"',
          '.engine.rules.data_drift.clear_since="x"', ".engine.rules.data_drift.detectors=[]"]


def test_a_state_file_that_is_no_state_is_set_aside_and_rebuilt(run_daemon: Any,
                                                                  tmp_path: Any) -> None:
    """A ``state.json`` that was JSON but no state stopped the start: ``{}`` with "state
    version None is not 1; move ... away" (while ``[]`` or a truncated file was rebuilt from
    the journal), a counter ``"x"`` with a traceback, and some wrong types (the window's
    records, say) were restored and broke the worker later. Every field the loader reads is
    checked first now; a file that fails is renamed aside (kept), said once in the log,
    counted, and the state rebuilt from the journal with the same counts."""
    import pytest

    from lrwatch.daemon import Daemon, DaemonConfig
    from lrwatch.errors import ConfigError

    state = tmp_path / "state"
    r = run_daemon(state_dir=str(state))
    rng = random.Random(157)
    body = "\n".join(json.dumps(make_record(rng, i, id=f"r{i}")) for i in range(WINDOW + 30))
    assert r.post("/v1/predictions", body + "\n{broken")[0] == 200
    r.post("/v1/labels", [{"id": f"r{i}", "label": 1} for i in range(10)])
    r.daemon.drain()
    r.server.stop()
    r.daemon.stop()
    good = json.loads((state / "state.json").read_text())
    expected = {k: v for k, v in good["counters"].items() if k not in ("internal_errors",
                                                                       "problems")}
    cfg = DaemonConfig(reference=r.daemon.config.reference, window_size=WINDOW,
                       state_dir=str(state), log_alerts=False)
    for edit in _EDITS:
        for old in state.glob("state.json.bad-*"):
            old.unlink()
        damaged = _damaged(good, edit)
        (state / "state.json").write_text(json.dumps(damaged))
        d = Daemon(cfg)
        try:
            got = {k: v for k, v in d.counters.items() if k in expected}
            assert got == expected, edit
            assert len(d.window) == 30 and len(d.pending) == WINDOW + 20, edit
            assert d.registry.get_sample_value("lrwatch_daemon_problems_total",
                                               {"reason": "snapshot_set_aside"}) == 1, edit
            aside = list(state.glob("state.json.bad-*"))
            assert len(aside) == 1 and json.loads(aside[0].read_text()) == damaged, edit
        finally:
            d.stop()
    # a state of a newer lrwatch is refused, not rebuilt (no silent downgrade), and kept
    newer = dict(good, version=2)
    (state / "state.json").write_text(json.dumps(newer))
    with pytest.raises(ConfigError, match="written by a newer lrwatch .state version 2, this "
                                          "one reads 1.: run that version"):
        Daemon(cfg)
    assert json.loads((state / "state.json").read_text()) == newer


def test_a_daemon_process_starts_on_a_hand_edited_state_file(reference_path: str,
                                                             tmp_path: Any) -> None:
    """The audit's reproduction with a real process: ``echo '{}' > STATE/state.json``, and a
    saved state with a counter edited to ``"x"``, then a start."""
    state, log, port = str(tmp_path / "state"), str(tmp_path / "daemon.log"), free_port()
    proc = start_daemon_process(reference_path, state, port, log)
    try:
        rng = random.Random(158)
        body = "\n".join(json.dumps(make_record(rng, i)) for i in range(WINDOW + 3)).encode()
        assert _post(port, "/v1/predictions", body)[0] == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    with open(os.path.join(state, "state.json")) as fh:
        edited = json.load(fh)
    edited["counters"]["predictions"] = "x"
    for text in ("{}", json.dumps(edited)):
        with open(os.path.join(state, "state.json"), "w") as fh:
            fh.write(text)
        proc = start_daemon_process(reference_path, state, port, log)
        try:
            assert _predictions(port) == WINDOW + 3
            assert _metric(port, 'lrwatch_daemon_problems_total{reason="snapshot_set_aside"}') \
                == 1.0
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
    out = open(log).read()
    assert "Traceback" not in out and out.count("cannot be restored") == 2, out[-3000:]
    assert "no state of version 1: 'version' is missing" in out
    assert "'counters'.'predictions' is not a whole number" in out
    assert len([n for n in os.listdir(state) if n.startswith("state.json.bad-")]) == 2
