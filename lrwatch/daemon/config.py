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
    labels: {horizon_seconds: 3600,              # H of the label coverage over a horizon
             early_seconds: 300, max_early: 10000}  # labels that come before their prediction
    estimation: {enabled: true, min_window_labels: 30}  # label-free accuracy estimates
    state_dir: /var/lib/lrwatch                  # snapshots + journal (durability)
    snapshot_interval: 2.0
    tail: [/var/log/model/predictions.jsonl]
    rules: null                                  # default: the serving pack; or a rule file,
                                                 # a pack name, or a list of them joined as
                                                 # layers: [serving, my-rules.yml]
    alerts: {alertmanager: [http://127.0.0.1:9093], webhook: [], log: true}
    hook: {argv: [/usr/local/bin/revert-model, --to, previous], cooldown: 300, timeout: 30,
           rules: [data_drift, accuracy_regression]}

Numbers may be written in exponent notation (``target_windows: 1e3``), although YAML 1.1 reads
``1e3`` as text; a value of the wrong type is a :class:`~lrwatch.errors.ConfigError` naming its
key (``drift.target_windows must be a number, got 'lots'``).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

import yaml

from ..rules.schema import PACKS

from ..errors import ConfigError

__all__ = ["DaemonConfig", "read_token_file"]

#: The longest label horizon accepted (seconds): a year.
MAX_LABEL_HORIZON = 365 * 86400.0
#: The most records a live reference may be built from (held in memory until it is).
MAX_LIVE_RECORDS = 1_000_000
#: The fewest calibration resamples accepted (fewer cannot place a 1-in-1000 threshold).
MIN_SIMS = 100


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key written twice in one mapping. PyYAML keeps the
    last silently, so a second ``limits:`` (or ``auth:``) block further down dropped every
    setting of the first without a word; rule files refuse duplicates too."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for knode, _ in node.value:   # before merge keys (<<) are resolved: those may be
            if not isinstance(knode, yaml.ScalarNode) or knode.tag == _MERGE:   # overridden
                continue
            key = self.construct_object(knode)
            if key in seen:
                mark = knode.start_mark
                raise ConfigError(f"{mark.name}:{mark.line + 1}: key {key!r} is written twice "
                                  f"in one mapping; keep one (YAML would silently drop the "
                                  f"first)")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_MERGE = "tag:yaml.org,2002:merge"


def _flag(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(f"{name} must be true or false, got {v!r}")
    return v


#: Exponent notation that YAML 1.1 (PyYAML) reads as text: ``1e-3`` (no dot), ``1.0e3`` (no
#: sign in the exponent).
_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _number(name: str, v: Any) -> Any:
    """A finite number (``None`` passes: the field's own check decides whether it may be
    unset); exponent text such as ``1e-3`` counts as the number it spells."""
    if v is None:
        return v
    if isinstance(v, str) and _EXPONENT.fullmatch(v.strip()):
        v = float(v)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(f"{name} must be a number, got {v!r}")
    return v


def _integer(name: str, v: Any) -> Any:
    """A whole number; ``1000.0`` or ``1e3`` (how YAML may spell one) count as 1000."""
    try:
        v = _number(name, v)
    except ConfigError:
        raise ConfigError(f"{name} must be an integer, got {v!r}") from None
    if isinstance(v, float):
        if not v.is_integer():
            raise ConfigError(f"{name} must be an integer, got {v!r}")
        v = int(v)
    return v


#: Config file sections: key -> (DaemonConfig field, conversion). Conversions: ``None`` keeps
#: the value, ``"path"`` resolves it against the config file's folder, ``"path?"`` does so
#: only when it is set, ``"flag"`` accepts booleans only, ``"number"`` and ``"integer"``
#: numbers only (with a message naming the key; the field's own check sets the range).
_Spec = Mapping[str, "tuple[str, Any]"]
_SECTIONS: dict[str, _Spec] = {
    "listen": {"host": ("host", "text"), "port": ("port", "integer")},
    "limits": {k: (k, "integer") for k in ("max_body_bytes", "max_queue_records",
                                           "max_pending_labels", "max_line_bytes",
                                           "max_string_chars", "max_features")},
    "http": {**{k: (k, "integer") for k in ("max_connections", "backlog")},
             **{k: (k, "number") for k in ("header_timeout", "read_timeout",
                                           "keep_alive_timeout")},
             "tls_certfile": ("tls_certfile", "path?"), "tls_keyfile": ("tls_keyfile", "path?")},
    "reference": {"path": ("reference", "path"), "live_records": ("live_records", "integer")},
    "window": {"size": ("window_size", "integer"), "seconds": ("window_seconds", "number"),
               "max_records": ("window_max_records", "integer")},
    "drift": {**{k: (k, "number") for k in ("target_windows", "min_effect",
                                            "min_effect_categorical", "min_missing_delta",
                                            "seq_min_effect")},
              "sequential": ("sequential", "flag"),
              "calibration_sims": ("calibration_sims", "integer"),
              "joint": ("joint_drift", "flag")},
    "labels": {"horizon_seconds": ("label_horizon_seconds", "number"),
               "early_seconds": ("early_label_seconds", "number"),
               "max_early": ("max_early_labels", "integer")},
    "estimation": {"enabled": ("estimation", "flag"),
                   "min_window_labels": ("estimation_min_window_labels", "integer")},
    "alerts": {"alertmanager": ("alertmanager", "urls"), "webhook": ("webhook", "urls"),
               "log": ("log_alerts", "flag"), "resend_interval": ("resend_interval", "number")},
    "hook": {"argv": ("hook_argv", None), "cooldown": ("hook_cooldown", "number"),
             "timeout": ("hook_timeout", "number"), "rules": ("hook_rules", "names")},
}


def _section(d: Mapping[str, Any], name: str, spec: _Spec) -> dict[str, Any]:
    """One section of the config file, checked against the keys it may have."""
    s = d.get(name) or {}
    if not isinstance(s, dict):
        raise ConfigError(f"config '{name}' must be a mapping")
    bad = set(s) - set(spec)
    if bad:
        raise ConfigError(f"unknown keys {sorted(bad)} in '{name}'; valid: "
                          f"{', '.join(sorted(spec))}")
    return s


def _path(name: str, v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{name} must be a file path, got {v!r}")
    return v


def _strings(name: str, v: Any, what: str) -> list[str]:
    """One string or a list of them (a string is not read as its characters)."""
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(x, str) and x for x in items):
        raise ConfigError(f"{name} must be {what} or a list of them, got {v!r}")
    return list(items)


def _urls(name: str, v: Any) -> list[str]:
    urls = _strings(name, v, "an http:// or https:// URL")
    for u in urls:
        if not u.startswith(("http://", "https://")):
            raise ConfigError(f"{name}: {u!r} is not an http:// or https:// URL")
    return urls


def _convert(name: str, convert: Any, value: Any, path: Any) -> Any:
    if convert is None:
        return value
    if convert == "path":   # null written out: the default, none
        return None if value is None else path(_path(name, value))
    if convert == "path?":
        return path(_path(name, value)) if value else value
    if convert == "flag":
        return _flag(name, value)
    if convert == "number":
        return _number(name, value)
    if convert == "integer":
        return _integer(name, value)
    if convert == "text":
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{name} must be text, got {value!r}")
        return value
    if convert == "urls":   # null written out: the default, none
        return [] if value is None else _urls(name, value)
    if convert == "names":  # a list: one name as a string would match its substrings
        if value is None:   # written out, the default: every rule whose actions have hook
            return None
        if not isinstance(value, list):
            raise ConfigError(f"{name} must be a list of rule names, got {value!r}")
        return _strings(name, value, "a rule name")
    return convert(value)


def read_token_file(path: str) -> str:
    """The bearer token in ``path`` (surrounding whitespace stripped). An empty file is an
    error, never "no authentication": a token file that a deploy left empty (or failed to
    fill) must not open the API to everyone without a word."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise ConfigError(f"cannot read token file {path!r}: {exc.strerror or exc}") from exc
    try:
        token = raw.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"token file {path!r} is not UTF-8 text ({exc.reason} at byte "
                          f"{exc.start}): write the token as text") from exc
    if not token:
        raise ConfigError(f"token file {path!r} is empty: write the bearer token in it (or "
                          f"leave the token file out to run without authentication)")
    return token


def _tail_paths(value: Any) -> list[str]:
    """``tail``: one file path or a list of them (a path is not read as its characters)."""
    paths = [value] if isinstance(value, str) else value
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        raise ConfigError(f"tail must be a file path or a list of file paths, got {value!r}")
    return paths


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
    window_max_records: int = 100_000  # a time window closes early at this many records
    target_windows: float = 1000.0
    min_effect: float = 0.05
    min_effect_categorical: float = 0.02
    min_missing_delta: float = 0.01
    sequential: bool = True
    seq_min_effect: float = 0.03
    calibration_sims: int | None = None
    joint_drift: bool = True
    label_horizon_seconds: float = 3600.0
    # a label that comes before its prediction waits this long for it (0: not at all), at
    # most max_early_labels of them (docs/daemon.md, "Delayed labels")
    early_label_seconds: float = 300.0
    max_early_labels: int = 10_000
    estimation: bool = True
    estimation_min_window_labels: int = 30
    state_dir: str | None = None
    snapshot_interval: float = 2.0
    tail: list[str] = field(default_factory=list)
    tail_poll: float = 0.2
    rules: str | list[str] | None = None   # pack names and rule files, joined as layers
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
                     "estimation_min_window_labels", "window_max_records"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        for name in ("header_timeout", "read_timeout", "keep_alive_timeout",
                     "label_horizon_seconds"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not v > 0:
                raise ConfigError(f"{name} must be a positive number of seconds, got {v!r}")
        if self.token is not None and (not isinstance(self.token, str)
                                       or not self.token.strip()):
            raise ConfigError("the bearer token is empty: set one (or none at all, to run "
                              "without authentication)")
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ConfigError("TLS needs both tls_certfile and tls_keyfile")
        if self.window_seconds is not None and not self.window_seconds >= 0.001:
            # shorter, and a window's end could round to its start at today's unix times
            raise ConfigError(f"window seconds must be at least 0.001, got "
                              f"{self.window_seconds!r}")
        if not self.target_windows > 1:
            raise ConfigError(f"target_windows must be > 1, got {self.target_windows!r}")
        self._check_ranges()
        if self.hook_argv is not None and (not isinstance(self.hook_argv, list) or not all(
                isinstance(a, str) for a in self.hook_argv) or not self.hook_argv):
            raise ConfigError("hook argv must be a non-empty list of strings (never a shell "
                              "command line)")

    def _check_ranges(self) -> None:
        """Numbers that type-check but make no sense: each would fail later (on the worker,
        at every batch) or quietly do something else than asked."""
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        for name in ("snapshot_interval", "resend_interval", "hook_timeout"):
            v = getattr(self, name)
            need(isinstance(v, (int, float)) and v > 0,
                 f"{name} must be a positive number of seconds, got {v!r}")
        need(isinstance(self.hook_cooldown, (int, float)) and self.hook_cooldown >= 0,
             f"hook cooldown must be >= 0 seconds, got {self.hook_cooldown!r}")
        for name in ("min_effect", "min_effect_categorical", "min_missing_delta",
                     "seq_min_effect"):
            v = getattr(self, name)
            need(isinstance(v, (int, float)) and v >= 0, f"{name} must be >= 0, got {v!r}")
        need(isinstance(self.early_label_seconds, (int, float))
             and 0 <= self.early_label_seconds <= MAX_LABEL_HORIZON,
             f"early label seconds must be a number in 0..{MAX_LABEL_HORIZON:.0f} (0: labels "
             f"never wait for their prediction), got {self.early_label_seconds!r}")
        need(isinstance(self.max_early_labels, int) and self.max_early_labels >= 0,
             f"max_early_labels must be an integer >= 0, got {self.max_early_labels!r}")
        # a day's buckets of 2H must stay finite numbers of seconds: a year is plenty
        need(self.label_horizon_seconds <= MAX_LABEL_HORIZON,
             f"label horizon must be at most {MAX_LABEL_HORIZON:.0f} s (a year), got "
             f"{self.label_horizon_seconds!r}")
        need(self.calibration_sims is None or (isinstance(self.calibration_sims, int)
                                               and self.calibration_sims >= MIN_SIMS),
             f"calibration_sims must be an integer >= {MIN_SIMS}, got "
             f"{self.calibration_sims!r}")
        # every record of the open window is held in memory, and the thresholds are
        # calibrated by resampling windows of this size at the start (100,000: 10 s;
        # 1,000,000: more than 2 minutes, before the port even opened)
        need(self.window_size <= self.window_max_records,
             f"window size {self.window_size} is over window.max_records "
             f"({self.window_max_records}), the most records a window holds: a typo? "
             f"(raise window.max_records too if you mean it)")
        # numpy's generators take no negative seed: -1 passed here and stopped the start
        # with numpy's traceback ("expected non-negative integer") once a calibration ran
        need(type(self.seed) is int and self.seed >= 0,
             f"seed must be an integer >= 0, got {self.seed!r}")
        need(self.live_records >= 10, f"live_records must be at least 10 (a reference needs "
             f"10 records), got {self.live_records!r}")
        # the records are held (as dicts, ~0.5 KB a record of 3 features) until the reference
        # is built, and no window is tested before: 1e12 (a typo of 1e4) never monitored
        # anything and grew until the process was killed
        need(self.live_records <= MAX_LIVE_RECORDS,
             f"live_records must be at most {MAX_LIVE_RECORDS:,} (they are held in memory "
             f"until the reference is built, and nothing is tested before), got "
             f"{self.live_records!r}: for a larger reference, build it from a file with "
             f"`lrwatch baseline build` and give it as reference.path")
        need(isinstance(self.host, str) and bool(self.host),
             f"host must be text, got {self.host!r}")

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any], *, base_dir: str = ".") -> "DaemonConfig":
        """Read the config file's structure (see the module docstring)."""
        if d is not None and not isinstance(d, Mapping):
            raise ConfigError(f"a daemon config is a mapping of keys (state_dir, tail, "
                              f"window, ...), got a {type(d).__name__}")
        d = dict(d or {})
        known = {"state_dir", "snapshot_interval", "tail", "rules", "seed", "auth", *_SECTIONS}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown config keys {sorted(unknown)}; valid keys: "
                              f"{', '.join(sorted(known))}")

        def path(p: Any) -> Any:
            return p if p is None or os.path.isabs(p) else os.path.join(base_dir, p)

        kw: dict[str, Any] = {}
        for name, spec in _SECTIONS.items():
            for key, value in _section(d, name, spec).items():
                field_name, convert = spec[key]
                kw[field_name] = _convert(f"{name}.{key}", convert, value, path)
        auth = _section(d, "auth", {"token": ("", None), "token_file": ("", None)})
        if auth.get("token_file") is not None:
            if not isinstance(auth["token_file"], str) or not auth["token_file"]:
                raise ConfigError(f"auth.token_file must be a file path, got "
                                  f"{auth['token_file']!r}")
            kw["token"] = read_token_file(path(auth["token_file"]))
        elif auth.get("token") is not None:
            kw["token"] = str(auth["token"])
        for k in ("alertmanager", "webhook"):   # one URL or a list of them
            kw[k] = kw.get(k) or []
        win = d.get("window") or {}
        if "size" in win and "seconds" in win:
            raise ConfigError("window: give size (records) or seconds, not both")
        if d.get("state_dir") is not None:
            kw["state_dir"] = path(_path("state_dir", d["state_dir"]))
        if "snapshot_interval" in d:
            kw["snapshot_interval"] = _number("snapshot_interval", d["snapshot_interval"])
        if "seed" in d:
            kw["seed"] = _integer("seed", d["seed"])
        if d.get("tail") == "":  # an unset variable in a template: it tailed nothing
            raise ConfigError("tail: '' names no file: give a file path or a list of them, "
                              "or leave the key out")
        if d.get("tail"):
            kw["tail"] = [path(p) for p in _tail_paths(d["tail"])]
            for p in kw["tail"]:
                if os.path.isdir(p):
                    raise ConfigError(f"tail: {p!r} is a directory; name the file to follow")
        if d.get("rules") == []:  # it read as "no rules" and ran the serving pack
            raise ConfigError("rules: the list is empty: name packs or rule files (or leave "
                              "the key out, or null, for the serving pack)")
        if d.get("rules") is not None:   # pack names and files, joined in order as layers
            kw["rules"] = [x if x in PACKS else path(x) for x in
                           _strings("rules", d["rules"], "a rule file or pack name")]
        return cls(**kw)

    @classmethod
    def load(cls, path: str) -> "DaemonConfig":
        try:
            with open(path, encoding="utf-8") as fh:
                data = yaml.load(fh, Loader=_UniqueKeyLoader) or {}
        except RecursionError:
            raise ConfigError(f"cannot read config {path!r}: YAML nested too deeply") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"cannot read config {path!r}: not UTF-8 text ({exc.reason} at "
                              f"byte {exc.start}); save it as UTF-8") from None
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config {path!r}: {exc}") from exc
        return cls.from_mapping(data, base_dir=os.path.dirname(os.path.abspath(path)))

    def replace(self, **changes: Any) -> "DaemonConfig":
        vals = {f.name: getattr(self, f.name) for f in fields(self)}
        vals.update({k: v for k, v in changes.items() if v is not None})
        return DaemonConfig(**vals)
