"""The daemon's settings: a dataclass, readable from a YAML config file.

Example config file (every key optional)::

    listen: {host: 127.0.0.1, port: 9410}
    auth: {token_file: /etc/lrwatch/token}      # or token: "..."; clients send
                                                # "Authorization: Bearer <token>"
    limits: {max_body_bytes: 10485760, max_queue_records: 20000, max_pending_labels: 100000,
             max_line_bytes: 1048576, max_string_chars: 4096, max_features: 2048}
    http: {max_connections: 4096, backlog: 1024, header_timeout: 10, read_timeout: 10,
           keep_alive_timeout: 30, tls_certfile: null, tls_keyfile: null}
    reference: {path: reference.json}            # or {live_records: 5000}: the first N records
    window: {size: 1000}                         # or {seconds: 60}
    drift: {target_windows: 1000, min_effect: 0.05, min_effect_categorical: 0.02,
            min_missing_delta: 0.01, sequential: true, seq_min_effect: 0.03,
            joint: true}                         # the joint test of the numeric features
    labels: {horizon_seconds: 3600}              # H of the label coverage over a horizon
    estimation: {enabled: true, min_window_labels: 30}  # label-free accuracy estimates
    state_dir: /var/lib/lrwatch                  # snapshots + journal (durability)
    snapshot_interval: 2.0
    tail: [/var/log/model/predictions.jsonl]
    rules: null                                  # a rule file; default: the serving pack
    alerts: {alertmanager: [http://127.0.0.1:9093], webhook: [], log: true}
    hook: {argv: [/usr/local/bin/revert-model, --to, previous], cooldown: 300, timeout: 30,
           rules: [data_drift, accuracy_regression]}
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

import yaml

from ..errors import ConfigError

__all__ = ["DaemonConfig"]


def _flag(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(f"{name} must be true or false, got {v!r}")
    return v


@dataclass
class DaemonConfig:
    host: str = "127.0.0.1"
    port: int = 9410
    token: str | None = None
    max_body_bytes: int = 10 * 1024 * 1024
    max_queue_records: int = 20_000
    max_pending_labels: int = 100_000
    max_line_bytes: int = 1 << 20
    max_string_chars: int = 4096
    max_features: int = 2048
    # HTTP server (see docs/daemon.md, "HTTP server")
    max_connections: int = 4096
    backlog: int = 1024
    header_timeout: float = 10.0
    read_timeout: float = 10.0
    keep_alive_timeout: float = 30.0
    tls_certfile: str | None = None
    tls_keyfile: str | None = None
    reference: str | None = None
    live_records: int = 5000
    window_size: int = 1000
    window_seconds: float | None = None
    target_windows: float = 1000.0
    min_effect: float = 0.05
    min_effect_categorical: float = 0.02
    min_missing_delta: float = 0.01
    sequential: bool = True
    seq_min_effect: float = 0.03
    calibration_sims: int | None = None
    joint_drift: bool = True
    label_horizon_seconds: float = 3600.0
    estimation: bool = True
    estimation_min_window_labels: int = 30
    state_dir: str | None = None
    snapshot_interval: float = 2.0
    tail: list[str] = field(default_factory=list)
    tail_poll: float = 0.2
    rules: str | None = None
    alertmanager: list[str] = field(default_factory=list)
    webhook: list[str] = field(default_factory=list)
    log_alerts: bool = True
    hook_argv: list[str] | None = None
    hook_cooldown: float = 300.0
    hook_timeout: float = 30.0
    hook_rules: list[str] | None = None  # None: every rule whose actions include "hook"
    resend_interval: float = 60.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not (0 <= self.port <= 65535):
            raise ConfigError(f"port must be in 0..65535, got {self.port}")
        for name in ("max_body_bytes", "max_queue_records", "max_pending_labels",
                     "window_size", "live_records", "max_line_bytes", "max_string_chars",
                     "max_features", "max_connections", "backlog",
                     "estimation_min_window_labels"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        for name in ("header_timeout", "read_timeout", "keep_alive_timeout",
                     "label_horizon_seconds"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not v > 0:
                raise ConfigError(f"{name} must be a positive number of seconds, got {v!r}")
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ConfigError("TLS needs both tls_certfile and tls_keyfile")
        if self.window_seconds is not None and not self.window_seconds > 0:
            raise ConfigError(f"window seconds must be > 0, got {self.window_seconds!r}")
        if not self.target_windows > 1:
            raise ConfigError(f"target_windows must be > 1, got {self.target_windows!r}")
        if self.hook_argv is not None and (not isinstance(self.hook_argv, list) or not all(
                isinstance(a, str) for a in self.hook_argv) or not self.hook_argv):
            raise ConfigError("hook argv must be a non-empty list of strings (never a shell "
                              "command line)")

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any], *, base_dir: str = ".") -> "DaemonConfig":
        """Read the config file's structure (see the module docstring)."""
        d = dict(d or {})
        kw: dict[str, Any] = {}
        known = {"listen", "auth", "limits", "http", "reference", "window", "drift", "state_dir",
                 "snapshot_interval", "tail", "rules", "alerts", "hook", "seed", "labels",
                 "estimation"}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown config keys {sorted(unknown)}; valid keys: "
                              f"{', '.join(sorted(known))}")

        def sec(name: str, keys: set[str]) -> dict[str, Any]:
            s = d.get(name) or {}
            if not isinstance(s, dict):
                raise ConfigError(f"config '{name}' must be a mapping")
            bad = set(s) - keys
            if bad:
                raise ConfigError(f"unknown keys {sorted(bad)} in '{name}'; valid: "
                                  f"{', '.join(sorted(keys))}")
            return s

        def path(p: Any) -> Any:
            return p if p is None or os.path.isabs(p) else os.path.join(base_dir, p)

        listen = sec("listen", {"host", "port"})
        kw.update(listen)
        auth = sec("auth", {"token", "token_file"})
        if auth.get("token_file"):
            with open(path(auth["token_file"]), encoding="utf-8") as fh:
                kw["token"] = fh.read().strip()
        elif auth.get("token"):
            kw["token"] = str(auth["token"])
        limits = sec("limits", {"max_body_bytes", "max_queue_records", "max_pending_labels",
                                "max_line_bytes", "max_string_chars", "max_features"})
        kw.update(limits)
        http = sec("http", {"max_connections", "backlog", "header_timeout", "read_timeout",
                            "keep_alive_timeout", "tls_certfile", "tls_keyfile"})
        for k in ("tls_certfile", "tls_keyfile"):
            if http.get(k):
                http[k] = path(http[k])
        kw.update(http)
        ref = sec("reference", {"path", "live_records"})
        if "path" in ref:
            kw["reference"] = path(ref["path"])
        if "live_records" in ref:
            kw["live_records"] = ref["live_records"]
        win = sec("window", {"size", "seconds"})
        if "size" in win:
            kw["window_size"] = win["size"]
        if "seconds" in win:
            kw["window_seconds"] = float(win["seconds"])
        drift = sec("drift", {"target_windows", "min_effect", "min_effect_categorical",
                              "min_missing_delta", "sequential", "seq_min_effect",
                              "calibration_sims", "joint"})
        if "calibration_sims" in drift:
            kw["calibration_sims"] = drift.pop("calibration_sims")
        if "joint" in drift:
            kw["joint_drift"] = _flag("drift.joint", drift.pop("joint"))
        kw.update(drift)
        labels = sec("labels", {"horizon_seconds"})
        if "horizon_seconds" in labels:
            kw["label_horizon_seconds"] = labels["horizon_seconds"]
        est = sec("estimation", {"enabled", "min_window_labels"})
        if "enabled" in est:
            kw["estimation"] = _flag("estimation.enabled", est["enabled"])
        if "min_window_labels" in est:
            kw["estimation_min_window_labels"] = est["min_window_labels"]
        if d.get("state_dir"):
            kw["state_dir"] = path(d["state_dir"])
        for k in ("snapshot_interval", "seed"):
            if k in d:
                kw[k] = d[k]
        if d.get("tail"):
            kw["tail"] = [path(p) for p in d["tail"]]
        if d.get("rules"):
            kw["rules"] = path(d["rules"])
        alerts = sec("alerts", {"alertmanager", "webhook", "log", "resend_interval"})
        for k in ("alertmanager", "webhook"):
            v = alerts.get(k) or []
            kw[k] = [v] if isinstance(v, str) else list(v)
        if "log" in alerts:
            kw["log_alerts"] = bool(alerts["log"])
        if "resend_interval" in alerts:
            kw["resend_interval"] = float(alerts["resend_interval"])
        hook = sec("hook", {"argv", "cooldown", "timeout", "rules"})
        if "argv" in hook:
            kw["hook_argv"] = hook["argv"]
        for k in ("cooldown", "timeout", "rules"):
            if k in hook:
                kw[f"hook_{k}"] = hook[k]
        return cls(**kw)

    @classmethod
    def load(cls, path: str) -> "DaemonConfig":
        try:
            with open(path, encoding="utf-8") as fh:
                data = yaml.safe_load(fh) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config {path!r}: {exc}") from exc
        return cls.from_mapping(data, base_dir=os.path.dirname(os.path.abspath(path)))

    def replace(self, **changes: Any) -> "DaemonConfig":
        vals = {f.name: getattr(self, f.name) for f in fields(self)}
        vals.update({k: v for k, v in changes.items() if v is not None})
        return DaemonConfig(**vals)
