"""No state lives on the daemon's classes: two instances never share it (issue 16)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections import deque

import numpy as np

import lrwatch.daemon
from daemon_helpers import WINDOW
from lrwatch.daemon import Daemon, DaemonConfig, DriftDetector, Reference

_MUTABLE = (list, dict, set, bytearray, deque, np.ndarray)


def test_no_class_in_the_daemon_holds_mutable_state():
    found = []
    for info in pkgutil.iter_modules(lrwatch.daemon.__path__):
        mod = importlib.import_module(f"lrwatch.daemon.{info.name}")
        for cname, cls in inspect.getmembers(mod, inspect.isclass):
            if cls.__module__ != mod.__name__:
                continue
            for name, value in vars(cls).items():
                if isinstance(value, _MUTABLE) and not name.startswith("__"):
                    found.append(f"{mod.__name__}.{cname}.{name}")
    assert found == []
    # the two named in the issue are set per instance, not defaulted on the class
    assert "_busy" not in vars(Daemon)
    assert "_seq_shift" not in vars(DriftDetector)


def test_two_daemons_do_not_share_the_busy_flag(reference_path):
    cfg = dict(reference=reference_path, window_size=WINDOW, port=0, log_alerts=False)
    a, b = Daemon(DaemonConfig(**cfg)), Daemon(DaemonConfig(**cfg))
    try:
        assert vars(a)["_busy"] is False and vars(b)["_busy"] is False
        a._busy = True  # as the worker sets it while applying an entry
        assert b._busy is False
        assert not a.drain(timeout=0.05)  # a waits for its own entry ...
        assert b.drain(timeout=0.5)  # ... b has nothing in flight
        a._busy = False
        assert a.drain(timeout=0.5)
    finally:
        a.stop(timeout=1)
        b.stop(timeout=1)


def test_two_detectors_do_not_share_the_sequential_shift(reference_path):
    ref = Reference.load(reference_path)
    a, b = DriftDetector(ref), DriftDetector(ref)
    prof = a.profile
    fn = len(prof.num_names)
    assert a._seq_shift.shape == b._seq_shift.shape == (fn,)
    assert a._seq_shift is not b._seq_shift
    rng = np.random.default_rng(2)
    j = prof.num_names.index("x")
    for _ in range(4):
        x = rng.normal(0, 1, (WINDOW, fn))
        x[:, prof.num_names.index("_prediction")] = rng.random(WINDOW)
        x[:, j] += 2.0
        a.update(x, [prof.encode(0, list(rng.choice(list("abc"), WINDOW)))])
    assert a._seq_shift[j] > 1.0  # a has seen the shift ...
    assert not b._seq_shift.any()  # ... b has not
    x = rng.normal(0, 1, (WINDOW, fn))
    x[:, prof.num_names.index("_prediction")] = rng.random(WINDOW)
    res = b.update(x, [prof.encode(0, list(rng.choice(list("abc"), WINDOW)))])
    assert "x" not in res.drifted_features
    assert abs(b._seq_shift[j]) < 0.5
