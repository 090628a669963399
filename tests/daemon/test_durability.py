"""kill -9 in the middle of a stream, then a restart: the totals are exact."""

from __future__ import annotations

import json
import os
import random
import signal
import time

import pytest

from daemon_helpers import WINDOW, start_daemon_process, make_record
from services import free_port, http_request, wait_until

pytestmark = pytest.mark.slow


def _status(port: int) -> dict:
    return json.loads(http_request(f"http://127.0.0.1:{port}/v1/status")[1])


def test_kill_9_mid_stream_loses_nothing_and_counts_nothing_twice(reference_path, tmp_path):
    state = str(tmp_path / "state")
    port = free_port()
    rng = random.Random(5)
    expected = {"predictions": 0, "labels": 0, "invalid_json": 0, "missing_features": 0}
    i = 0

    def post_batch(p: int) -> None:
        nonlocal i
        recs = [json.dumps(make_record(rng, i + k)) for k in range(37)]
        i += 37
        recs.append("{broken")
        recs.append(json.dumps({"prediction": 1}))
        status, body = http_request(f"http://127.0.0.1:{p}/v1/predictions", method="POST",
                                    data="\n".join(recs).encode())
        assert status == 200, body
        expected["predictions"] += 37
        expected["invalid_json"] += 1
        expected["missing_features"] += 1
        labels = [{"id": f"r{i - 37 + k}", "label": 1} for k in range(10)]
        status, _ = http_request(f"http://127.0.0.1:{p}/v1/labels", method="POST",
                                 data=json.dumps(labels).encode())
        assert status == 200
        expected["labels"] += 10

    proc = start_daemon_process(reference_path, state, port)
    try:
        for _ in range(40):
            post_batch(port)
        time.sleep(2.5)  # let a snapshot happen, then keep streaming so some is only journaled
        for _ in range(40):
            post_batch(port)
        os.kill(proc.pid, signal.SIGKILL)  # mid-stream: the queue still holds entries
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert os.path.exists(os.path.join(state, "state.json"))

    log = str(tmp_path / "restart.log")
    proc = start_daemon_process(reference_path, state, port, log)
    assert "replayed" in open(log).read()  # the journal, not only the snapshot, was needed
    try:
        for _ in range(10):
            post_batch(port)

        def settled() -> dict | None:
            s = _status(port)
            c = s["counters"]
            return s if c["predictions"] == expected["predictions"] and \
                c["labels"] == expected["labels"] and s["queue_records"] == 0 else None

        s = wait_until(settled, timeout=30, message="totals")
        c = s["counters"]
        assert c["errors"]["invalid_json"] == expected["invalid_json"]
        assert c["errors"]["missing_features"] == expected["missing_features"]
        assert c["labels_joined"] == expected["labels"]
        assert c["labels_unmatched"] == 0
        assert c["windows"] == expected["predictions"] // WINDOW
        assert c["received"] == (expected["predictions"] + expected["labels"]
                                 + expected["invalid_json"] + expected["missing_features"])
        metrics = http_request(f"http://127.0.0.1:{port}/metrics")[1].decode()
        assert f"lrwatch_predictions_total {float(expected['predictions'])}" in metrics
        # one more clean restart (SIGTERM) keeps the same totals
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        proc = start_daemon_process(reference_path, state, port)
        assert _status(port)["counters"] == c
    finally:
        proc.kill()
        proc.wait(10)


def test_kill_9_while_tailing_a_file_resumes_at_the_exact_line(reference_path, tmp_path):
    """The tailed-file path (columns via the chunk decoder when installed, the general path
    for chunks with bad lines): after SIGKILL, the snapshot's offset and counters agree."""
    state = str(tmp_path / "state")
    data = tmp_path / "preds.jsonl"
    data.touch()
    port = free_port()
    rng = random.Random(9)
    expected = {"predictions": 0, "invalid_json": 0, "missing_features": 0}
    i = 0

    def append(n: int) -> None:
        nonlocal i
        with open(data, "a") as fh:
            for k in range(n):
                if k % 997 == 500:
                    fh.write("{broken\n")
                    expected["invalid_json"] += 1
                elif k % 1499 == 700:
                    fh.write(json.dumps({"prediction": 1}) + "\n")
                    expected["missing_features"] += 1
                fh.write(json.dumps(make_record(rng, i)) + "\n")
                i += 1
                expected["predictions"] += 1

    tail = ("--tail", str(data))
    proc = start_daemon_process(reference_path, state, port, extra=tail)
    try:
        append(20_000)
        wait_until(lambda: _status(port)["counters"]["predictions"] == 20_000, timeout=60,
                   message="first part")
        time.sleep(2.5)  # a snapshot with the first part
        append(150_000)
        wait_until(lambda: _status(port)["counters"]["predictions"] > 30_000, timeout=60,
                   message="second part started")
        os.kill(proc.pid, signal.SIGKILL)  # mid-file
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    proc = start_daemon_process(reference_path, state, port, extra=tail)
    try:
        append(5_000)

        def settled() -> dict | None:
            s = _status(port)
            return s if s["counters"]["predictions"] >= expected["predictions"] and \
                s["queue_records"] == 0 else None

        c = wait_until(settled, timeout=120, message="totals")["counters"]
        assert c["predictions"] == expected["predictions"]
        assert c["errors"]["invalid_json"] == expected["invalid_json"]
        assert c["errors"]["missing_features"] == expected["missing_features"]
        assert c["windows"] == expected["predictions"] // WINDOW
        assert c["received"] == sum(expected.values())
    finally:
        proc.kill()
        proc.wait(10)
