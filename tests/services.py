"""Real Prometheus, Pushgateway and Alertmanager processes for the end-to-end tests.

Each service runs from the Debian binary on a free loopback port, in its own working directory
(config, data and a log file), and is stopped (terminate, then kill) when the test ends. A missing
binary skips the test with the name of the Debian package to install. Only the standard library
talks to the services, so a test reads exactly what Prometheus or Alertmanager would serve.

The pytest fixtures that wrap these classes live in ``tests/conftest.py``: ``prometheus_factory``,
``pushgateway`` and ``alertmanager``. Tests that use them carry ``@pytest.mark.prometheus``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Mapping, Sequence

import pytest

__all__ = [
    "ServiceError",
    "QueryError",
    "Service",
    "PrometheusServer",
    "PushgatewayServer",
    "AlertmanagerServer",
    "free_port",
    "find_binary",
    "http_get",
    "http_request",
    "wait_until",
    "promtool_check_metrics",
    "MetricsHTTPServer",
    "DEBIAN_PACKAGES",
    "tmpfs", "fill_filesystem",
]

#: What to install when a binary is missing (Debian/Ubuntu package names).
DEBIAN_PACKAGES = "prometheus prometheus-alertmanager prometheus-pushgateway"
_INSTALL_HINT = f"apt-get install {DEBIAN_PACKAGES}"
#: Binary -> (names to look for on PATH, Debian package that ships it). Upstream tarballs name the
#: Pushgateway and Alertmanager binaries without the ``prometheus-`` prefix.
_BINARIES: dict[str, tuple[tuple[str, ...], str]] = {
    "prometheus": (("prometheus",), "prometheus"),
    "promtool": (("promtool",), "prometheus"),
    "prometheus-pushgateway": (("prometheus-pushgateway", "pushgateway"), "prometheus-pushgateway"),
    "prometheus-alertmanager": (
        ("prometheus-alertmanager", "alertmanager"),
        "prometheus-alertmanager",
    ),
}
_HTTP_TIMEOUT = 5.0


class ServiceError(RuntimeError):
    """A service did not start, or answered a request with an error."""


class QueryError(ServiceError):
    """Prometheus rejected a query (``status`` is not ``success``); the message has its reason."""


# --------------------------------------------------------------------------------------------
# small helpers


@contextlib.contextmanager
def tmpfs(path: str | os.PathLike[str], options: str) -> Iterator[Path]:
    """A real tmpfs mounted at ``path`` (created) with mount ``options`` (``size=1m``,
    ``ro,size=1m``), unmounted after; skips the test without root or ``mount``."""
    where = Path(path)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill_filesystem(path: str | os.PathLike[str]) -> None:
    """Take every free byte of the file system holding ``path`` (a file it creates), so that
    the next write there fails with ENOSPC."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        block = b"\0" * 4096
        while True:
            try:
                if os.write(fd, block) < len(block):
                    block = block[:1]
            except OSError:
                break
    finally:
        os.close(fd)


def find_binary(name: str) -> str:
    """The path of ``name`` (a key of ``_BINARIES``), or skip the test naming the package."""
    candidates, package = _BINARIES[name]
    for candidate in candidates:
        path = shutil.which(candidate)
        if path:
            return path
    pytest.skip(
        f"{name} not found on PATH (Debian package {package!r}); "
        f"install the Prometheus stack with: {_INSTALL_HINT}"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_request(
    url: str,
    *,
    method: str = "GET",
    data: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = _HTTP_TIMEOUT,
) -> tuple[int, bytes]:
    """``(status, body)`` of one HTTP request; HTTP error statuses are returned, not raised."""
    req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return int(exc.code), exc.read()


def http_get(url: str, *, timeout: float = _HTTP_TIMEOUT) -> bytes:
    """The body of ``GET url``; raises :class:`ServiceError` on a non-2xx status."""
    status, body = http_request(url, timeout=timeout)
    if not 200 <= status < 300:
        raise ServiceError(f"GET {url} -> HTTP {status}: {body[:500].decode(errors='replace')}")
    return body


def wait_until(
    fn: Callable[[], Any],
    *,
    timeout: float = 30.0,
    interval: float = 0.2,
    message: str = "condition",
) -> Any:
    """Call ``fn`` until it returns something truthy and return that; ``TimeoutError`` otherwise."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = fn()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{message} not met within {timeout:g}s (last value: {last!r})")
        time.sleep(interval)


def promtool_check_metrics(text: str | bytes) -> tuple[int, str]:
    """Run ``promtool check metrics`` on an exposition text: ``(returncode, stdout + stderr)``.

    ``returncode`` is 0 when the text is clean (lint problems make it non-zero and are listed in
    the output). Skips the test when ``promtool`` is not installed.
    """
    promtool = find_binary("promtool")
    data = text.encode() if isinstance(text, str) else text
    proc = subprocess.run(
        [promtool, "check", "metrics"],
        input=data,
        capture_output=True,
        timeout=60,
        check=False,
    )
    output = (proc.stdout + proc.stderr).decode(errors="replace")
    return proc.returncode, output


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    # If pytest itself is killed (SIGKILL, CI timeout), the kernel kills the service too, so no
    # Prometheus is left listening on the machine.
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    except Exception:
        pass


# --------------------------------------------------------------------------------------------
# the services


class Service:
    """One service process on a free loopback port; a context manager.

    Subclasses set ``binary`` and build the command line in :meth:`_args`. :meth:`start` writes
    the config, launches the process with stdout/stderr going to ``<workdir>/<name>.log`` and polls
    ``/-/ready``; if the service dies or does not become ready, the log is printed and a
    :class:`ServiceError` carrying its tail is raised. :meth:`stop` terminates, then kills.

    Parameters
    ----------
    workdir:
        Directory for config, data and log; a fresh temporary one (removed at :meth:`stop`) when
        ``None``. Directories passed in are left in place so the log can be read after a failure.
    ready_timeout:
        Seconds to wait for ``/-/ready``.
    """

    binary: str = ""
    name: str = "service"
    #: Start attempts: another process can take the port between choosing and binding it.
    start_attempts: int = 3

    def __init__(
        self, workdir: str | os.PathLike[str] | None = None, *, ready_timeout: float = 30.0
    ) -> None:
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix=f"lrwatch-{self.name}-") if workdir is None
                            else workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ready_timeout = ready_timeout
        self.port: int = 0
        self.log_path = self.workdir / f"{self.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    # -- public ---------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:40123`` (no trailing slash)."""
        if not self.port:
            raise ServiceError(f"{self.name} is not started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        """``host:port`` as scrape configs and ``push_to_gateway`` take it."""
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> "Service":
        """Start the process and wait until ``/-/ready`` answers 200; returns ``self``."""
        if self.running():
            return self
        exe = find_binary(self.binary)
        self._prepare()
        failure = ""
        for _attempt in range(self.start_attempts):
            self.port = free_port()
            self._launch([exe, *self._args()])
            ok, failure = self._wait_ready()
            if ok:
                return self
            log = self.read_log()
            self._terminate()
            if "address already in use" not in log:
                break
        self.port = 0
        log = self.read_log()
        # Printed so pytest shows it in the captured output of the failing test.
        print(f"----- {self.name} log ({self.log_path}) -----\n{log}\n----- end of log -----",
              file=sys.stderr)
        raise ServiceError(f"{self.name} did not become ready: {failure}\n"
                           f"last lines of {self.log_path}:\n{_tail(log, 40)}")

    def stop(self) -> None:
        """Terminate the process (kill it after 10 s) and close the log. Safe to call twice."""
        self._terminate()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def read_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> "Service":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid={self.pid} url={self.url}" if self.running() else "stopped"
        return f"<{type(self).__name__} {state} workdir={self.workdir}>"

    # -- for subclasses ---------------------------------------------------------------------------

    def _prepare(self) -> None:
        """Write config files before the first launch."""

    def _args(self) -> list[str]:
        raise NotImplementedError

    def _get(self, path: str, params: Mapping[str, Any] | None = None) -> bytes:
        query = "?" + urllib.parse.urlencode(params, doseq=True) if params else ""
        return http_get(f"{self.url}{path}{query}")

    # -- internals --------------------------------------------------------------------------------

    def _launch(self, cmd: list[str]) -> None:
        self._log_file = open(self.log_path, "ab")
        self._log_file.write(f"$ {' '.join(cmd)}\n".encode())
        self._log_file.flush()
        self._proc = subprocess.Popen(
            cmd,
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )

    def _wait_ready(self) -> tuple[bool, str]:
        deadline = time.monotonic() + self.ready_timeout
        last = "no answer"
        while time.monotonic() < deadline:
            assert self._proc is not None
            code = self._proc.poll()
            if code is not None:
                return False, f"process exited with status {code}"
            try:
                status, _body = http_request(f"{self.url}/-/ready", timeout=1.0)
                if status == 200:
                    return True, ""
                last = f"/-/ready answered HTTP {status}"
            except (OSError, urllib.error.URLError) as exc:
                last = f"/-/ready: {exc}"
            time.sleep(0.05)
        return False, f"timed out after {self.ready_timeout:g}s ({last})"

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _write_yaml(path: Path, data: Mapping[str, Any] | str) -> None:
    # JSON is YAML (1.2), so configs are written with the standard library only.
    text = data if isinstance(data, str) else json.dumps(data, indent=2)
    path.write_text(text)


def _check_targets(targets: Iterable[str]) -> list[str]:
    out = list(targets)
    for t in out:
        if "://" in t or "/" in t:
            raise ValueError(f"scrape target {t!r} must be 'host:port' (the path is /metrics)")
    return out


class PrometheusServer(Service):
    """A Prometheus server scraping the given targets, with its own config and TSDB.

    Parameters
    ----------
    scrape_targets:
        ``["127.0.0.1:8000", ...]`` (one job called ``lrwatch``) or ``{"job": [targets], ...}``.
    rule_files:
        Paths of rule files to load (made absolute).
    alertmanager_url:
        e.g. ``alertmanager.url``: where firing alerts are sent (API v2).
    scrape_interval, evaluation_interval:
        Prometheus durations; the scrape timeout equals the scrape interval.
    extra_scrape_configs:
        Further ``scrape_configs`` entries (dicts, as in prometheus.yml), appended as they are.
    workdir, ready_timeout:
        See :class:`Service`.

    Notes
    -----
    The first scrape (and the first alert sent to Alertmanager) comes about 5 s after start:
    Prometheus 2.42 throttles discovery updates to 5 s and has no flag to change that. Poll with
    :meth:`wait_for` rather than sleeping.
    """

    binary = "prometheus"
    name = "prometheus"

    def __init__(
        self,
        scrape_targets: Sequence[str] | Mapping[str, Sequence[str]] = (),
        rule_files: Iterable[str | os.PathLike[str]] = (),
        alertmanager_url: str | None = None,
        scrape_interval: str = "1s",
        evaluation_interval: str = "1s",
        extra_scrape_configs: Iterable[Mapping[str, Any]] | None = None,
        *,
        workdir: str | os.PathLike[str] | None = None,
        ready_timeout: float = 30.0,
    ) -> None:
        # Arguments are checked before the base class makes a temporary directory.
        if isinstance(scrape_targets, Mapping):
            self.jobs = {str(j): _check_targets(t) for j, t in scrape_targets.items()}
        else:
            if isinstance(scrape_targets, str):
                raise TypeError("scrape_targets must be a list of 'host:port' strings, not a str")
            self.jobs = {"lrwatch": _check_targets(scrape_targets)} if scrape_targets else {}
        self.rule_files = [str(Path(p).resolve()) for p in rule_files]
        for p in self.rule_files:
            if not Path(p).is_file():
                raise FileNotFoundError(f"rule file {p} does not exist")
        self.alertmanager_url = alertmanager_url
        self.scrape_interval = scrape_interval
        self.evaluation_interval = evaluation_interval
        self.extra_scrape_configs = [dict(c) for c in (extra_scrape_configs or ())]
        super().__init__(workdir, ready_timeout=ready_timeout)
        self.config_path = self.workdir / "prometheus.yml"

    def config(self) -> dict[str, Any]:
        """The configuration written to ``prometheus.yml`` (as a dict)."""
        cfg: dict[str, Any] = {
            "global": {
                "scrape_interval": self.scrape_interval,
                "scrape_timeout": self.scrape_interval,
                "evaluation_interval": self.evaluation_interval,
            },
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": targets}]}
                for job, targets in self.jobs.items()
            ] + self.extra_scrape_configs,
        }
        if self.rule_files:
            cfg["rule_files"] = self.rule_files
        if self.alertmanager_url:
            u = urllib.parse.urlsplit(self.alertmanager_url)
            am: dict[str, Any] = {
                "scheme": u.scheme or "http",
                "api_version": "v2",
                "static_configs": [{"targets": [u.netloc]}],
            }
            if u.path.strip("/"):
                am["path_prefix"] = u.path
            cfg["alerting"] = {"alertmanagers": [am]}
        return cfg

    def _prepare(self) -> None:
        _write_yaml(self.config_path, self.config())
        (self.workdir / "data").mkdir(exist_ok=True)

    def _args(self) -> list[str]:
        return [
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            "--storage.tsdb.retention.time=1h",
            # Prometheus finds its Alertmanager a few seconds after start (discovery is throttled
            # to 5 s); alerts that fire before then would only be re-sent after the default 1 m.
            f"--rules.alert.resend-delay={self.evaluation_interval}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            # Otherwise alert generator URLs name the machine's host name.
            f"--web.external-url=http://127.0.0.1:{self.port}/",
            "--log.level=info",
        ]

    # -- HTTP API ---------------------------------------------------------------------------------

    def api(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        """``data`` of ``GET /api/v1/<path>``; :class:`QueryError` unless ``status`` is success."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params, doseq=True)
        status, body = http_request(url)
        try:
            payload = json.loads(body)
        except ValueError:
            raise QueryError(f"GET {url} -> HTTP {status}, not JSON: {body[:300]!r}") from None
        if status != 200 or payload.get("status") != "success":
            raise QueryError(
                f"Prometheus rejected {dict(params or {})!r} on /api/v1/{path}: HTTP {status}, "
                f"{payload.get('errorType', '?')}: {payload.get('error', payload)}"
            )
        return payload["data"]

    def query(self, promql: str, at: float | None = None) -> list[Any]:
        """Instant query (now, or at unix time ``at``); the ``result`` list.

        For a vector: ``[{"metric": {...labels}, "value": [unix_time, "1.5"]}, ...]``.
        """
        params: dict[str, Any] = {"query": promql}
        if at is not None:
            params["time"] = at
        return self.api("query", params)["result"]

    def query_range(
        self,
        promql: str,
        start: float | None = None,
        end: float | None = None,
        step: float | str = 1.0,
    ) -> list[Any]:
        """Range query (default: the last 5 minutes).

        Returns ``[{"metric": {...labels}, "values": [[unix_time, "1.5"], ...]}, ...]``.
        """
        end = time.time() if end is None else end
        start = end - 300 if start is None else start
        return self.api("query_range", {"query": promql, "start": start, "end": end,
                                        "step": step})["result"]

    def wait_for(
        self,
        promql: str,
        predicate: Callable[[list[Any]], bool] | None = None,
        timeout: float = 30.0,
        interval: float = 0.25,
    ) -> list[Any]:
        """Poll ``query(promql)`` until it is non-empty (or ``predicate(result)`` is true).

        Returns the result. A rejected query raises :class:`QueryError` at once; a timeout raises
        ``TimeoutError`` with the last result and the state of the scrape targets.
        """
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(promql)
            if (predicate(result) if predicate is not None else bool(result)):
                return result
            if time.monotonic() >= deadline:
                targets = [
                    {k: t.get(k) for k in ("scrapeUrl", "health", "lastError")}
                    for t in self.targets()
                ]
                raise TimeoutError(
                    f"{promql!r} not satisfied within {timeout:g}s; last result: {result!r}; "
                    f"targets: {targets!r}"
                )
            time.sleep(interval)

    def targets(self) -> list[dict[str, Any]]:
        """Active scrape targets (``scrapeUrl``, ``health``, ``lastError``, ``labels``, ...)."""
        return list(self.api("targets")["activeTargets"])

    def alerts(self) -> list[dict[str, Any]]:
        """Alerts of the loaded alerting rules (``labels``, ``annotations``, ``state``, ...)."""
        return list(self.api("alerts")["alerts"])

    def rules(self) -> list[dict[str, Any]]:
        """Loaded rule groups."""
        return list(self.api("rules")["groups"])


class PushgatewayServer(Service):
    """A Pushgateway without persistence (Debian's default file is shared, so it is disabled)."""

    binary = "prometheus-pushgateway"
    name = "pushgateway"

    def _args(self) -> list[str]:
        return [
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--persistence.file=",
            "--log.level=info",
        ]

    def metrics_text(self) -> str:
        """The exposition text of ``/metrics`` (pushed groups plus the gateway's own metrics)."""
        return self._get("/metrics").decode()

    def samples(self, name: str | None = None) -> list[Any]:
        """Parsed samples of ``/metrics`` (``prometheus_client`` ``Sample`` tuples).

        With ``name``, only samples of that exact sample name (e.g. ``"lrwatch_loss"``).
        """
        from prometheus_client.parser import text_string_to_metric_families

        out = []
        for family in text_string_to_metric_families(self.metrics_text()):
            out.extend(s for s in family.samples if name is None or s.name == name)
        return out


_DEFAULT_ALERTMANAGER_CONFIG: dict[str, Any] = {
    "route": {
        "receiver": "null",
        "group_wait": "1s",
        "group_interval": "1s",
        "repeat_interval": "1h",
    },
    "receivers": [{"name": "null"}],
}


class AlertmanagerServer(Service):
    """An Alertmanager without clustering (no gossip port), with its own storage.

    Parameters
    ----------
    config:
        The configuration as a dict or as YAML text; by default one route to a receiver that
        does nothing, so alerts are only held and shown by the API.
    """

    binary = "prometheus-alertmanager"
    name = "alertmanager"

    def __init__(
        self,
        config: Mapping[str, Any] | str | None = None,
        *,
        workdir: str | os.PathLike[str] | None = None,
        ready_timeout: float = 30.0,
    ) -> None:
        super().__init__(workdir, ready_timeout=ready_timeout)
        self.config = _DEFAULT_ALERTMANAGER_CONFIG if config is None else config
        self.config_path = self.workdir / "alertmanager.yml"

    def _prepare(self) -> None:
        _write_yaml(self.config_path, self.config)
        (self.workdir / "data").mkdir(exist_ok=True)

    def _args(self) -> list[str]:
        return [
            f"--config.file={self.config_path}",
            f"--storage.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--cluster.listen-address=",
            "--log.level=info",
        ]

    def alerts(self, **params: Any) -> list[dict[str, Any]]:
        """``GET /api/v2/alerts``; ``params`` are its query parameters, e.g.
        ``filter=['alertname="X"']``, ``active=True``, ``silenced=False``."""
        q = {k: (str(v).lower() if isinstance(v, bool) else v) for k, v in params.items()}
        return list(json.loads(self._get("/api/v2/alerts", q)))

    def post_alerts(self, alerts: Sequence[Mapping[str, Any]]) -> None:
        """``POST /api/v2/alerts`` (a test helper; lrwatch's own sink is under test elsewhere)."""
        status, body = http_request(
            f"{self.url}/api/v2/alerts",
            method="POST",
            data=json.dumps(list(alerts)).encode(),
            headers={"Content-Type": "application/json"},
        )
        if status != 200:
            raise ServiceError(f"POST /api/v2/alerts -> HTTP {status}: {body[:500]!r}")

    def wait_for_alerts(
        self,
        predicate: Callable[[list[dict[str, Any]]], bool] | None = None,
        timeout: float = 30.0,
        **params: Any,
    ) -> list[dict[str, Any]]:
        """Poll :meth:`alerts` until non-empty (or ``predicate(alerts)``) and return them."""
        def check() -> tuple[list[dict[str, Any]]] | None:
            got = self.alerts(**params)
            ok = predicate(got) if predicate is not None else bool(got)
            return (got,) if ok else None  # a 1-tuple is truthy even when ``got`` is empty

        return wait_until(check, timeout=timeout, message=f"Alertmanager alerts {params or ''}")[0]


class MetricsHTTPServer:
    """``prometheus_client``'s exposition server for one registry, on a free loopback port.

    A context manager; ``address`` (``host:port``) is what a Prometheus scrape config takes.
    The port is chosen by the kernel at bind time (port 0), so there is no race for it.
    """

    def __init__(self, registry: Any) -> None:
        from prometheus_client import start_http_server

        self._server, self._thread = start_http_server(0, addr="127.0.0.1", registry=registry)
        self.port = int(self._server.server_port)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "MetricsHTTPServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
