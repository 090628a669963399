"""Helpers shared by the daemon tests (imported by name: conftest puts this folder on the
path)."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
from typing import Any

from services import http_request, wait_until

WINDOW = 100


def make_record(rng: random.Random, i: int, shift: float = 0.0, **extra: Any) -> dict[str, Any]:
    return {"id": f"r{i}", "features": {"x": rng.gauss(shift, 1.0), "y": rng.gauss(0.0, 1.0),
                                        "c": rng.choice("abc")},
            "prediction": rng.random(), **extra}


def assert_balanced(daemon: Any) -> None:
    """``accepted + rejected == received``, in the counters and in the metrics."""
    from lrwatch.daemon.records import REASONS

    assert daemon.drain()
    c = daemon.counters
    assert c["predictions"] + c["labels"] + sum(c["errors"].values()) == c["received"]
    m = daemon.registry.get_sample_value
    errors = sum(m("lrwatch_ingest_errors_total", {"reason": x}) for x in REASONS)
    assert m("lrwatch_predictions_total") + m("lrwatch_labels_total") + errors == \
        m("lrwatch_ingest_received_total")


def binary_record(rng: random.Random, i: int, *, shift: float = 0.0, t: float | None = None,
                  label: bool = True) -> dict[str, Any]:
    """A calibrated binary model's record: p = sigmoid(2x), its label (inline) ~ B(p)."""
    x = rng.gauss(shift, 1.0)
    p = 1.0 / (1.0 + math.exp(-2.0 * x))
    r: dict[str, Any] = {"id": f"b{i}", "features": {"x": x, "y": rng.gauss(0, 1)},
                         "prediction": round(p, 6)}
    if label:
        r["label"] = int(rng.random() < p)
    if t is not None:
        r["time"] = t
    return r


def saved_binary_reference(factory: Any, seed: int, n: int, sims: int, name: str) -> str:
    """A reference of ``n`` :func:`binary_record` rows with its fitted estimator, saved under
    a fresh directory of ``factory`` (pytest's ``tmp_path_factory``); its path."""
    from lrwatch.daemon import build_reference

    rng = random.Random(seed)
    ref = build_reference([binary_record(rng, i) for i in range(n)], window_size=WINDOW,
                          sims=sims)
    assert ref.estimator is not None
    path = str(factory.mktemp(name) / "reference.json")
    ref.save(path)
    return path


def _sighup_default() -> None:
    """The daemon starts with SIGHUP's default disposition, as from a terminal, whatever the
    test runner inherited: under `nohup pytest` (or a CI runner that ignores SIGHUP) the
    daemon kept SIGHUP ignored, as it should, and the SIGHUP test waited for an exit that
    never came."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def start_daemon_process(reference: str, state: str, port: int, log: str = os.devnull,
                         extra: tuple[str, ...] = ()) -> "subprocess.Popen[bytes]":
    """``lrwatch daemon`` as a real process on ``port`` with a state directory, up (healthz)
    when it returns; its stderr goes to ``log``."""
    with open(log, "ab") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lrwatch", "daemon", "--reference", reference, "--state-dir",
             state, "--port", str(port), "--window-size", str(WINDOW), "-v", *extra],
            stdout=subprocess.DEVNULL, stderr=err, preexec_fn=_sighup_default)
    wait_until(lambda: http_status(port, "/healthz") == 200 or proc.poll() is not None,
               timeout=60, message="daemon up")
    assert proc.poll() is None, open(log).read()[-3000:] if log != os.devnull else "exited"
    return proc


def http_status(port: int, path: str) -> int:
    """The status of ``GET path`` on a local daemon, 0 while nothing answers."""
    try:
        return http_request(f"http://127.0.0.1:{port}{path}", timeout=1)[0]
    except OSError:
        return 0


def edited_state(good: dict[str, Any], edit: str) -> dict[str, Any]:
    """``good`` (a saved state.json, as read) with one hand edit: a path of keys (list indices
    as numbers), ``=``, the new value as JSON."""
    path, value = edit.split("=", 1)
    snap = json.loads(json.dumps(good))
    *keys, last = path.split(".")
    d = snap
    for k in keys:
        d = d[int(k)] if isinstance(d, list) else d[k]
    d[int(last) if isinstance(d, list) else last] = json.loads(value)
    return snap
