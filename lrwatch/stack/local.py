"""A local Prometheus, Alertmanager and Pushgateway with lrwatch's configs: ``lrwatch stack``.

For one machine and a first look: the services bind to loopback, keep their data in a temporary
directory, and stop together. The configs are the repository's ``exporters/prometheus.yml``
(scrape jobs and rule files), ``rules/*.rules.yml`` and ``exporters/alertmanager.yml``; the
Prometheus config is copied with the chosen ports and absolute paths filled in.
Production set-ups load those files into their own Prometheus and Alertmanager instead
(docs/stack.md).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Mapping, Sequence

import yaml

from ..errors import ConfigError, LrwatchError

__all__ = ["StackConfig", "LocalStack", "find_binary", "repo_root", "assign_ports",
           "check_stack_options", "check_distinct_ports", "BINARIES", "OPTIONAL_LABEL"]

#: Service -> (executable names, Debian package).
BINARIES: dict[str, tuple[tuple[str, ...], str]] = {
    "prometheus": (("prometheus",), "prometheus"),
    "alertmanager": (("prometheus-alertmanager", "alertmanager"), "prometheus-alertmanager"),
    "pushgateway": (("prometheus-pushgateway", "pushgateway"), "prometheus-pushgateway"),
}


#: The target label that marks a default target nobody declared (see StackConfig).
OPTIONAL_LABEL = "lrwatch_optional"


def repo_root() -> Path | None:
    """The source checkout lrwatch runs from (it holds ``rules/`` and ``exporters/``), if any."""
    root = Path(__file__).resolve().parents[2]   # lrwatch/stack/local.py -> the checkout
    if (root / "rules").is_dir() and (root / "exporters" / "prometheus.yml").is_file():
        return root
    return None


def find_binary(service: str) -> str:
    names, package = BINARIES[service]
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    raise ConfigError(f"{service} not found on PATH (looked for {', '.join(names)}); install "
                      f"it, e.g. `apt-get install {package}`")


def check_distinct_ports(requested: Mapping[str, int | None]) -> None:
    """Raise :class:`~lrwatch.errors.ConfigError` naming both options when two services are
    asked for the same port (0 and ``None`` ask for none)."""
    seen: dict[int, str] = {}
    for name, port in requested.items():
        if port:
            if port in seen:
                raise ConfigError(f"--{seen[port]}-port and --{name}-port are both {port}: give "
                                  "each service its own port (or 0 for any free one)")
            seen[port] = name


def assign_ports(requested: dict[str, int | None]) -> dict[str, int]:
    """The port of each service: the one asked for, or for 0 a free one; ``None``: not started.

    Two services asked to share a port would fight over it, and the loser's log would be the
    only hint (``lrwatch stack --prometheus-port 9091`` beside the default Pushgateway): that
    is a :class:`~lrwatch.errors.ConfigError` naming both options. Free ports are held open
    together while they are chosen, so two 0s never get the same one.

    >>> assign_ports({"prometheus": 9091, "pushgateway": 9091})
    Traceback (most recent call last):
    ...
    lrwatch.errors.ConfigError: --prometheus-port and --pushgateway-port are both 9091: give each service its own port (or 0 for any free one)
    """
    check_distinct_ports(requested)
    seen = {port for port in requested.values() if port}
    out: dict[str, int] = {}
    held: list[socket.socket] = []
    try:
        for name, port in requested.items():
            if port is None:
                continue
            while not port:   # held open: the next one cannot be the same
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", 0))
                port = int(s.getsockname()[1])
                port = 0 if port in seen else port   # a port asked for by another service
            out[name] = port
    finally:
        for s in held:
            s.close()
    return out


_TARGET = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):([0-9]{1,5})$")
_DURATION = re.compile(r"^(\d+y)?(\d+w)?(\d+d)?(\d+h)?(\d+m)?(\d+s)?(\d+ms)?$")


def check_stack_options(training: Sequence[str], daemon: Sequence[str],
                        scrape_interval: str | None, rules_dir: str | None = None) -> None:
    """Raise :class:`~lrwatch.errors.ConfigError` for a target that is not ``HOST:PORT`` (the
    URL ``lrwatch demo`` prints is not one) or an interval Prometheus would not parse, before
    anything starts: Prometheus would exit with an error about a config file in a temporary
    directory that is gone by the time it is read.

    >>> check_stack_options(["127.0.0.1:9400", "[::1]:9401", "gpu-3:9400"], [], "15s")
    >>> check_stack_options(["http://127.0.0.1:9400/metrics"], [], None)
    Traceback (most recent call last):
    ...
    lrwatch.errors.ConfigError: --training 'http://127.0.0.1:9400/metrics' is not HOST:PORT (e.g. 127.0.0.1:9400; no scheme, no /metrics path)
    """
    for option, targets in (("--training", training), ("--daemon", daemon)):
        for t in targets:
            m = _TARGET.match(t)
            if m is None or not 0 < int(m.group(2)) <= 65535:
                raise ConfigError(f"{option} {t!r} is not HOST:PORT (e.g. 127.0.0.1:9400; no "
                                  "scheme, no /metrics path)")
    if scrape_interval is not None and (not _DURATION.match(scrape_interval)
                                        or not re.search(r"[1-9]", scrape_interval)):
        raise ConfigError(f"--scrape-interval {scrape_interval!r} is not a Prometheus duration "
                          "above zero (e.g. 5s, 1m, 1m30s)")
    if rules_dir is not None:
        _check_rules_dir(Path(rules_dir))


def _check_rules_dir(rules_dir: Path) -> None:
    """A ``--rules`` directory without a ``*.rules.yml`` file started Prometheus with no
    alerting rule at all, and said ``rules: DIR/*.rules.yml`` as if they were loaded."""
    if any(rules_dir.glob("*.rules.yml")):
        return
    other = sorted(p.name for p in rules_dir.iterdir()
                   if p.suffix in (".yml", ".yaml") and p.is_file())[:5]
    hint = (f" (it has {', '.join(other)}: name a rule file NAME.rules.yml)" if other else "")
    raise ConfigError(f"--rules {rules_dir}: no *.rules.yml file there, so Prometheus would "
                      f"load no alerting rule{hint}; the shipped rules are in the "
                      "repository's rules/")


@dataclass
class StackConfig:
    """What :class:`LocalStack` starts. Ports of 0 are chosen free at start."""

    prometheus_config: Path
    alertmanager_config: Path
    rules_dir: Path
    prometheus_port: int = 9090
    alertmanager_port: int = 9093
    pushgateway_port: int = 9091
    pushgateway: bool = True
    training_targets: Sequence[str] = ()
    daemon_targets: Sequence[str] = ()
    scrape_interval: str | None = None
    data_dir: Path | None = None
    ready_timeout: float = 60.0
    #: Label the example config's training and daemon targets ``lrwatch_optional="true"`` when
    #: they were not declared (``--training``/``--daemon``): the health rules then only page
    #: about such a target once it has been up (a demo on :9400 but no daemon on :9410 is no
    #: outage). Set by :meth:`from_repo`; a config of your own declares its targets.
    optional_defaults: bool = False

    def __post_init__(self) -> None:
        check_stack_options(self.training_targets, self.daemon_targets, self.scrape_interval)

    @classmethod
    def from_repo(cls, root: Path | None = None, **kw: Any) -> "StackConfig":
        root = root or repo_root()
        if root is None:
            raise ConfigError("cannot find the lrwatch repository's rules/ and exporters/ "
                              "(lrwatch is not running from a source checkout); pass "
                              "--prometheus-config, --alertmanager-config and --rules")
        kw.setdefault("optional_defaults", True)
        return cls(prometheus_config=root / "exporters" / "prometheus.yml",
                   alertmanager_config=root / "exporters" / "alertmanager.yml",
                   rules_dir=root / "rules", **kw)


@dataclass
class _Proc:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: IO[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class LocalStack:
    """Start with :meth:`start`, stop with :meth:`stop` (or use it as a context manager)."""

    config: StackConfig
    workdir: Path = field(init=False)
    procs: dict[str, _Proc] = field(default_factory=dict, init=False)
    _own_dir: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        if self.config.data_dir is not None:
            # absolute: the processes run with it as their cwd and get paths inside it
            self.workdir = Path(self.config.data_dir).resolve()
            self.workdir.mkdir(parents=True, exist_ok=True)
        else:
            self.workdir = Path(tempfile.mkdtemp(prefix="lrwatch-stack-"))
            self._own_dir = True

    # --- configuration ------------------------------------------------------------------------
    def prometheus_yaml(self, am_port: int, pg_port: int | None) -> dict[str, Any]:
        """The repository's Prometheus config with ports, targets and paths filled in."""
        c = self.config
        try:
            cfg = yaml.safe_load(Path(c.prometheus_config).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{c.prometheus_config}: {exc}") from exc
        base = Path(c.prometheus_config).resolve().parent
        # lrwatch's rules, then the config's own (a user's recording rules and alerts kept;
        # they were replaced until 6 December), each once
        own = [str(Path(c.rules_dir).resolve() / "*.rules.yml")]
        theirs = [str((base / f).resolve()) for f in cfg.get("rule_files") or []
                  if isinstance(f, str)]
        cfg["rule_files"] = own + [f for f in dict.fromkeys(theirs) if f not in own]
        cfg["alerting"] = {"alertmanagers": [{"api_version": "v2", "static_configs": [
            {"targets": [f"127.0.0.1:{am_port}"]}]}]}
        if c.scrape_interval:
            cfg.setdefault("global", {})["scrape_interval"] = c.scrape_interval
            cfg["global"]["evaluation_interval"] = c.scrape_interval
        jobs = []
        for job in cfg.get("scrape_configs") or []:
            name = job.get("job_name", "")
            for sd in job.get("file_sd_configs") or []:
                sd["files"] = [str(base / f) if not os.path.isabs(f) else f
                               for f in sd.get("files", [])]
            if name.endswith("pushgateway"):
                if pg_port is None:
                    continue
                job["static_configs"] = [{"targets": [f"127.0.0.1:{pg_port}"]}]
            elif name.endswith("training") or name.endswith("daemon"):
                declared = c.training_targets if name.endswith("training") else c.daemon_targets
                if declared:
                    job["static_configs"] = [{"targets": list(declared)}]
                elif c.optional_defaults:
                    for sc in job.get("static_configs") or []:
                        sc["labels"] = {**(sc.get("labels") or {}), OPTIONAL_LABEL: "true"}
            jobs.append(job)
        cfg["scrape_configs"] = jobs
        return cfg

    # --- processes ----------------------------------------------------------------------------
    def start(self) -> "LocalStack":
        c = self.config
        try:
            ports = assign_ports({"alertmanager": c.alertmanager_port,
                                  "pushgateway": c.pushgateway_port if c.pushgateway else None,
                                  "prometheus": c.prometheus_port})
            am_port, prom_port = ports["alertmanager"], ports["prometheus"]
            pg_port = ports.get("pushgateway")
            for service, port in (("alertmanager", am_port), ("pushgateway", pg_port),
                                  ("prometheus", prom_port)):
                if port is not None:
                    self._check_port(service, port)
            am_dir = self.workdir / "alertmanager"
            am_dir.mkdir(exist_ok=True)
            self._launch("alertmanager", am_port, [
                f"--config.file={Path(c.alertmanager_config).resolve()}",
                f"--storage.path={am_dir}",
                f"--web.listen-address=127.0.0.1:{am_port}",
                "--cluster.listen-address="])
            if pg_port is not None:
                self._launch("pushgateway", pg_port, [
                    f"--web.listen-address=127.0.0.1:{pg_port}", "--persistence.file="])
            prom_dir = self.workdir / "prometheus"
            prom_dir.mkdir(exist_ok=True)
            prom_cfg = self.workdir / "prometheus.yml"
            prom_cfg.write_text(yaml.safe_dump(self.prometheus_yaml(am_port, pg_port),
                                               sort_keys=False), encoding="utf-8")
            self._launch("prometheus", prom_port, [
                f"--config.file={prom_cfg}",
                f"--storage.tsdb.path={prom_dir}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
                f"--web.external-url=http://127.0.0.1:{prom_port}/",
                "--web.enable-lifecycle"])
            for p in self.procs.values():
                self._wait_ready(p)
        except BaseException:
            self.stop()
            raise
        return self

    def _check_port(self, service: str, port: int) -> None:
        with socket.socket() as s:
            # As the services themselves do (Go sets SO_REUSEADDR): a connection of the last
            # run lingering in TIME-WAIT must not make a free port look taken.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError as exc:
                raise ConfigError(f"port {port} for {service} is taken ({exc}); choose another "
                                  f"one or 0 for any free port") from exc

    def _launch(self, name: str, port: int, args: list[str]) -> None:
        exe = find_binary(name)
        log_path = self.workdir / f"{name}.log"
        log = open(log_path, "ab")
        proc = subprocess.Popen([exe, *args], cwd=self.workdir, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT)
        self.procs[name] = _Proc(name, port, proc, log, log_path)

    def _wait_ready(self, p: _Proc) -> None:
        deadline = time.monotonic() + self.config.ready_timeout
        while True:
            if p.proc.poll() is not None:
                raise LrwatchError(f"{p.name} exited with status {p.proc.returncode}:\n"
                                   f"{_tail(p.log_path)}")
            try:
                with urllib.request.urlopen(f"{p.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise LrwatchError(f"{p.name} not ready after {self.config.ready_timeout:g} s:"
                                   f"\n{_tail(p.log_path)}")
            time.sleep(0.2)

    @property
    def urls(self) -> dict[str, str]:
        return {name: p.url for name, p in self.procs.items()}

    def failed(self) -> list[str]:
        """Services whose process has exited."""
        return [n for n, p in self.procs.items() if p.proc.poll() is not None]

    def stop(self) -> None:
        """Terminate every service (kill after 10 s); remove the temporary data directory."""
        for p in reversed(list(self.procs.values())):
            if p.proc.poll() is None:
                p.proc.terminate()
        for p in self.procs.values():
            try:
                p.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.proc.kill()
                p.proc.wait(timeout=10)
            p.log.close()
        self.procs.clear()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "LocalStack":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""
