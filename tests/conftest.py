"""Shared fixtures. The Prometheus-stack fixtures start real services (see ``tests/services.py``).

Fixtures (all function-scoped, each service in its own numbered ``tmp_path_factory`` directory,
stopped at teardown; a missing binary skips the test and names the Debian package):

``prometheus_factory(scrape_targets, rule_files=(), alertmanager_url=None, scrape_interval="1s",
evaluation_interval="1s", extra_scrape_configs=None) -> PrometheusServer``
    Starts a Prometheus with a generated config; call it as often as needed.
``pushgateway -> PushgatewayServer``
    A started Pushgateway (no persistence).
``alertmanager -> AlertmanagerServer``
    A started Alertmanager with a do-nothing receiver; ``alertmanager_factory(config)`` for others.
``serve_registry(registry) -> MetricsHTTPServer``
    Serves a ``CollectorRegistry`` on a free loopback port for Prometheus to scrape.

Tests that use the service fixtures are marked ``prometheus`` (explicitly, and automatically by
:func:`pytest_collection_modifyitems` as a safety net), so ``-m "not prometheus"`` leaves them out.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator

# One intra-op thread for torch, here and in every process a test starts (they inherit the
# environment). The suite trains tiny models, for which a second OpenMP thread buys nothing and
# costs a great deal whenever the cores are busy -- under `pytest -n 2`, or on a shared machine
# (measured: a 40-step Adam test took 8.3 s with 2 threads on a loaded 2-core machine, 0.7 s with
# 1). A user's own setting stands.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy's BLAS (the joint drift model's fits)

import pytest  # noqa: E402

# pyproject.toml sets ``pythonpath = ["tests"]`` (with ``--import-mode=importlib``), so the
# helpers import as the top-level module ``services`` from here and from any test file.
from services import (  # noqa: E402
    AlertmanagerServer,
    MetricsHTTPServer,
    PrometheusServer,
    PushgatewayServer,
    Service,
)

_SERVICE_FIXTURES = frozenset(
    {"prometheus_factory", "pushgateway", "alertmanager", "alertmanager_factory"}
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _SERVICE_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.prometheus)


class _Started:
    """Starts services and stops every one of them, newest first, at teardown."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self._tmp = tmp_path_factory
        self._services: list[Service] = []

    def workdir(self, name: str) -> Any:
        return self._tmp.mktemp(name)

    def start(self, service: Service) -> Any:
        self._services.append(service)
        return service.start()

    def stop_all(self) -> None:
        errors: list[BaseException] = []
        while self._services:
            try:
                self._services.pop().stop()
            except BaseException as exc:  # stop the others before reporting
                errors.append(exc)
        if errors:
            raise errors[0]


@pytest.fixture
def _services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Started]:
    started = _Started(tmp_path_factory)
    try:
        yield started
    finally:
        started.stop_all()


@pytest.fixture
def prometheus_factory(_services: _Started) -> Callable[..., PrometheusServer]:
    """Call with :class:`PrometheusServer` arguments; returns it started (stopped at teardown)."""

    def make(*args: Any, **kwargs: Any) -> PrometheusServer:
        kwargs.setdefault("workdir", _services.workdir("prometheus"))
        return _services.start(PrometheusServer(*args, **kwargs))

    return make


@pytest.fixture
def pushgateway(_services: _Started) -> PushgatewayServer:
    """A started Pushgateway on a free loopback port."""
    return _services.start(PushgatewayServer(workdir=_services.workdir("pushgateway")))


@pytest.fixture
def alertmanager_factory(_services: _Started) -> Callable[..., AlertmanagerServer]:
    """Call with an Alertmanager config (dict or YAML text, or nothing for the default)."""

    def make(config: Any = None, **kwargs: Any) -> AlertmanagerServer:
        kwargs.setdefault("workdir", _services.workdir("alertmanager"))
        return _services.start(AlertmanagerServer(config, **kwargs))

    return make


@pytest.fixture
def alertmanager(alertmanager_factory: Callable[..., AlertmanagerServer]) -> AlertmanagerServer:
    """A started Alertmanager whose only receiver does nothing (alerts show in the API)."""
    return alertmanager_factory()


@pytest.fixture
def serve_registry() -> Iterator[Callable[[Any], MetricsHTTPServer]]:
    """Call with a ``CollectorRegistry``; serves it until teardown. Use ``.address`` to scrape."""
    servers: list[MetricsHTTPServer] = []

    def make(registry: Any) -> MetricsHTTPServer:
        server = MetricsHTTPServer(registry)
        servers.append(server)
        return server

    yield make
    for server in reversed(servers):
        server.close()
