"""Fixtures for the daemon tests: a small calibrated reference and a running daemon."""

from __future__ import annotations

import json
import os
import random
import sys
from typing import Any, Callable, Iterator

import pytest

from lrwatch.daemon import Daemon, DaemonConfig, DaemonServer, build_reference
from services import http_request

sys.path.insert(0, os.path.dirname(__file__))
from daemon_helpers import WINDOW, make_record  # noqa: E402


@pytest.fixture(scope="session")
def reference_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    rng = random.Random(0)
    ref = build_reference([make_record(rng, i) for i in range(3000)], window_size=WINDOW,
                          sims=300, seed=0)
    path = str(tmp_path_factory.mktemp("ref") / "reference.json")
    ref.save(path)
    return path


class Running:
    def __init__(self, daemon: Daemon, server: DaemonServer) -> None:
        self.daemon = daemon
        self.server = server
        self.url = server.url

    def post(self, path: str, body: bytes | str | Any, headers: dict[str, str] | None = None
             ) -> tuple[int, dict[str, Any]]:
        if not isinstance(body, (bytes, str)):
            body = json.dumps(body)
        if isinstance(body, str):
            body = body.encode()
        status, out = http_request(self.url + path, method="POST", data=body,
                                   headers=headers or {})
        return status, json.loads(out) if out else {}

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        return http_request(self.url + path, headers=headers or {})

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        self.daemon.drain()
        return self.daemon.registry.get_sample_value(name, labels or {})


@pytest.fixture
def run_daemon(reference_path: str, tmp_path: Any) -> Iterator[Callable[..., Running]]:
    started: list[Running] = []

    def start(*, start_worker: bool = True, **kw: Any) -> Running:
        kw.setdefault("reference", reference_path)
        kw.setdefault("window_size", WINDOW)
        kw.setdefault("port", 0)
        kw.setdefault("log_alerts", False)
        d = Daemon(DaemonConfig(**kw))
        s = DaemonServer(d).start()
        if start_worker:
            d.start()
        r = Running(d, s)
        started.append(r)
        return r

    yield start
    for r in started:
        r.server.stop()
        r.daemon.stop(timeout=2)
