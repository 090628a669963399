"""The exception tree of lrwatch.

Every error lrwatch raises on purpose derives from :class:`LrwatchError`::

    LrwatchError
    ├── ConfigError          bad arguments or settings (lists the valid choices)
    │   └── DamagedStateError  a saved detector state whose values no detector keeps (wrong
    │                          types, shapes, non-finite sums): refused, not restored
    ├── TraceFormatError     a malformed trace line (names file and line)
    ├── RuleError            a rule file that does not validate (names file, line and key)
    ├── ExporterError        an exporter that cannot be set up when the caller asked to fail hard
    ├── DeliveryError        an alert sink refused or could not be reached (actions.alerts)
    ├── RecordError          a serving record that does not validate (daemon.records; the daemon
    │                        answers 4xx and counts the reason)
    └── ReportError          a trace that `lrwatch report` cannot draw (report)

Monitoring failures at run time (a taken port, an unreachable Pushgateway) are *not* raised into
the training loop: they are logged and counted in ``lrwatch_internal_errors_total`` (fail open).
"""

from __future__ import annotations

__all__ = ["LrwatchError", "ConfigError", "DamagedStateError", "TraceFormatError", "RuleError",
           "ExporterError"]


class LrwatchError(Exception):
    """Root of every exception lrwatch raises on purpose."""


class ConfigError(LrwatchError, ValueError):
    """An argument or setting is invalid; the message says which and lists valid choices."""


class DamagedStateError(ConfigError):
    """A saved detector state holds what the detector never keeps (a string where it keeps a
    number, a row of another width, a missing sum): a hand-edited file, or one written by
    another version. It is refused, never restored; the message names the field."""


class TraceFormatError(LrwatchError, ValueError):
    """A trace line does not follow trace format v1.

    Attributes
    ----------
    path, line:
        Where the bad record is (``line`` counts from 1).
    """

    def __init__(self, path: str, line: int, message: str) -> None:
        super().__init__(f"{path}:{line}: {message}")
        self.path = path
        self.line = line


class RuleError(LrwatchError, ValueError):
    """A rule file does not validate. ``errors`` holds every problem found, not only the first."""

    def __init__(self, message: str, errors: list[str] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or [message]


class ExporterError(LrwatchError):
    """An exporter could not be set up and the caller asked for errors to be raised."""
