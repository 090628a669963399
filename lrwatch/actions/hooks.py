"""The ``hook`` action: run a configured command, or POST to a URL, when a rule fires.

A hook is how lrwatch hands a firing to the user's own tooling: revert the serving model to the
previous version, open a ticket, page through a system lrwatch does not know. :class:`HookAction`
does it off the caller's thread, with a timeout, with a cooldown per rule so that a flapping rule
does not run it over and over, and without ever raising into training or serving (fail open).

The command is an argv list executed directly, **never through a shell**: an argument such as
``"x; rm -rf ~"`` reaches the program as that literal string. The firing reaches it twice:

* as environment variables (added to lrwatch's own environment): ``LRWATCH_RULE``,
  ``LRWATCH_SEVERITY``, ``LRWATCH_STEP``, ``LRWATCH_VALUE``, ``LRWATCH_MESSAGE``, plus
  ``LRWATCH_KIND`` (``firing``/``resolved``) and ``LRWATCH_TIME`` (unix seconds, may be empty);
* as one JSON object on stdin, the same one a URL hook receives as its ``POST`` body
  (see :func:`hook_payload`).

A command that runs past ``timeout`` is killed with its whole process group. Results are counted
in ``lrwatch_hooks_run_total{result="ok|failed|timeout"}``; runs that did not happen are counted
in ``lrwatch_hooks_suppressed_total{reason="cooldown|dropped"}``.

Examples
--------
>>> import sys
>>> hook = HookAction([sys.executable, "-c", "import sys; sys.stdin.read()"], cooldown=60)
>>> hook.run({"rule": "loss_blowup", "severity": "critical", "step": 120, "value": 12.5,
...           "message": "loss blew up"})
True
>>> hook.run({"rule": "loss_blowup", "severity": "critical", "step": 121})  # cooldown
False
>>> hook.close()
True
>>> hook.registry.get_sample_value("lrwatch_hooks_run_total", {"result": "ok"})
1.0
>>> HookAction("touch /tmp/x")
Traceback (most recent call last):
...
lrwatch.errors.ConfigError: hook argv must be a non-empty list of strings such as ["/usr/local/bin/revert-model", "--to", "previous"] (it is never run through a shell), got 'touch /tmp/x'
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
import time
from typing import Any, Callable, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter

from ..errors import ConfigError
from ..samples import encode_number
from .alerts import BoundedQueue, DeliveryError, is_saved_count, post_json, wait_drained

__all__ = ["HookAction", "hook_payload"]

from .._ratelimit import LogLimiter

_log = logging.getLogger("lrwatch")
_RESULTS = ("ok", "failed", "timeout")
_OUTPUT_TAIL = 2000  # characters of a hook's output kept for the log


def hook_payload(event: Any) -> dict[str, Any]:
    """The JSON object a hook receives, from an engine ``Firing`` or a mapping with its fields.

    Keys: ``rule``, ``severity``, ``kind`` (``"firing"`` or ``"resolved"``), ``step``, ``time``,
    ``value`` (a number, ``null``, or ``"nan"``/``"inf"``/``"-inf"``), ``message``, ``metric``,
    ``labels``, ``annotations``, ``actions``.

    >>> hook_payload({"rule": "nan_loss", "severity": "critical", "step": 7,
    ...               "value": float("nan")})["value"]
    'nan'
    """
    def get(name: str, default: Any = None) -> Any:
        if isinstance(event, Mapping):
            return event.get(name, default)
        return getattr(event, name, default)

    rule = get("rule")
    if not isinstance(rule, str) or not rule:
        raise ConfigError(f"a hook event needs a non-empty 'rule', got {rule!r}")
    step = get("step")
    value = get("value")
    return {
        "rule": rule,
        "severity": str(get("severity", "") or ""),
        "kind": str(get("kind", "firing") or "firing"),
        "step": None if step is None else int(step),
        "time": encode_number(get("time")),
        "value": encode_number(None if value is None else float(value)),
        "message": str(get("message", "") or ""),
        "metric": get("metric"),
        "labels": dict(get("labels") or {}),
        "annotations": dict(get("annotations") or {}),
        "actions": list(get("actions") or ()),
    }


def _env_value(v: Any) -> str:
    return "" if v is None else str(v)


def hook_env(payload: Mapping[str, Any]) -> dict[str, str]:
    """The ``LRWATCH_*`` environment variables of a :func:`hook_payload`.

    >>> hook_env({"rule": "r", "severity": "info", "step": 3, "value": 1.5, "message": "m",
    ...           "kind": "firing", "time": None})["LRWATCH_VALUE"]
    '1.5'
    """
    return {
        "LRWATCH_RULE": _env_value(payload.get("rule")),
        "LRWATCH_SEVERITY": _env_value(payload.get("severity")),
        "LRWATCH_STEP": _env_value(payload.get("step")),
        "LRWATCH_VALUE": _env_value(payload.get("value")),
        "LRWATCH_MESSAGE": _env_value(payload.get("message")),
        "LRWATCH_KIND": _env_value(payload.get("kind")),
        "LRWATCH_TIME": _env_value(payload.get("time")),
    }


def _check_argv(argv: Any) -> list[str]:
    if (not isinstance(argv, (list, tuple)) or not argv
            or not all(isinstance(a, str) for a in argv) or not argv[0]):
        raise ConfigError(
            'hook argv must be a non-empty list of strings such as '
            '["/usr/local/bin/revert-model", "--to", "previous"] (it is never run through a '
            f'shell), got {argv!r}')
    return list(argv)


class HookAction:
    """Runs a command (argv) or POSTs JSON to a URL for each firing, off the caller's thread.

    Parameters
    ----------
    argv : list of str, optional
        The command, executed directly (never through a shell). Exactly one of ``argv`` and
        ``url`` must be given.
    url : str, optional
        POST the :func:`hook_payload` JSON here instead.
    timeout : float, default 30
        Seconds a command may run (then it and its process group are killed) or an HTTP request
        may take.
    cooldown : float, default 300
        Seconds after a run during which the same rule does not run the hook again (0: no
        cooldown). Counted from when the run was accepted, whether it succeeded or not.
    headers : mapping, optional
        Extra HTTP headers for ``url``.
    env : mapping, optional
        Extra environment variables for the command (the ``LRWATCH_*`` ones win).
    cwd : str, optional
        Working directory of the command.
    on_resolved : bool, default False
        Also run the hook when a rule resolves (``LRWATCH_KIND=resolved``).
    registry : CollectorRegistry, optional
        Where the counters go; a fresh one when ``None``. One HookAction per registry.
    queue_size : int, default 100
        Runs waiting for the worker; when full, the oldest is dropped and counted.
    clock : callable, default time.monotonic
        Seconds, for the cooldown.
    on_error : callable, optional
        Called with no arguments when a run fails or times out (e.g. to count
        ``lrwatch_internal_errors_total``).

    Raises
    ------
    ConfigError
        ``argv`` is not a non-empty list of strings, both or neither of ``argv`` and ``url`` are
        given, or a number is out of range.
    """

    def __init__(self, argv: Sequence[str] | None = None, *, url: str | None = None,
                 timeout: float = 30.0, cooldown: float = 300.0,
                 headers: Mapping[str, str] | None = None, env: Mapping[str, str] | None = None,
                 cwd: str | os.PathLike[str] | None = None, on_resolved: bool = False,
                 registry: CollectorRegistry | None = None, queue_size: int = 100,
                 clock: Callable[[], float] = time.monotonic,
                 on_error: Callable[[], object] | None = None) -> None:
        if (argv is None) == (url is None):
            raise ConfigError("a hook needs exactly one of argv (a command) and url (a webhook)")
        self.argv = None if argv is None else _check_argv(argv)
        if url is not None and (not isinstance(url, str)
                                or not url.startswith(("http://", "https://"))):
            raise ConfigError(f"hook url must start with http:// or https://, got {url!r}")
        self.url = url
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ConfigError(f"hook timeout must be positive seconds, got {timeout!r}")
        if not (isinstance(cooldown, (int, float)) and cooldown >= 0):
            raise ConfigError(f"hook cooldown must be seconds >= 0, got {cooldown!r}")
        self.timeout = float(timeout)
        self.cooldown = float(cooldown)
        self.headers = dict(headers or {})
        self.env = {str(k): str(v) for k, v in (env or {}).items()}
        self.cwd = cwd
        self.on_resolved = on_resolved
        self.clock = clock
        self.on_error = on_error
        self._limit = LogLimiter()   # a hook failing at every firing: one line a minute
        self.registry = registry if registry is not None else CollectorRegistry()

        runs = Counter("lrwatch_hooks_run", "Hook runs, by result (ok, failed, timeout).",
                       ["result"], registry=None)
        suppressed = Counter("lrwatch_hooks_suppressed",
                             "Hook runs not made: the rule was in its cooldown, or the queue "
                             "was full.", ["reason"], registry=None)
        from ..exporters.prometheus import register_owned

        self.closed = False
        register_owned(self.registry, self, [runs, suppressed])
        self._runs = {r: runs.labels(r) for r in _RESULTS}
        self._suppressed = {r: suppressed.labels(r) for r in ("cooldown", "dropped")}

        self._queue: BoundedQueue[dict[str, Any]] = BoundedQueue(queue_size)
        self._cond = self._queue.cond
        self._last_run: dict[str, float] = {}
        self._outstanding = 0
        self._closing = False
        self._thread = threading.Thread(target=self._work, name="lrwatch-hooks", daemon=True)
        self._thread.start()

    # --- caller side --------------------------------------------------------------------------
    def run(self, event: Any) -> bool:
        """Queue the hook for ``event`` (an engine ``Firing`` or a mapping with its fields).

        Returns ``True`` if a run was queued, ``False`` if it was suppressed (cooldown, a
        resolution without ``on_resolved``, a closed hook or a bad event). Never raises, never
        waits for the command.
        """
        try:
            payload = hook_payload(event)
            if payload["kind"] == "resolved" and not self.on_resolved:
                return False
            with self._cond:
                if self._closing:
                    self._suppressed["dropped"].inc()
                    return False
                now = self.clock()
                last = self._last_run.get(payload["rule"])
                if last is not None and now - last < self.cooldown:
                    self._suppressed["cooldown"].inc()
                    return False
                self._last_run[payload["rule"]] = now
                self._outstanding += 1
                if self._queue.put(payload):
                    self._outstanding -= 1
                    self._suppressed["dropped"].inc()
            return True
        except Exception:  # fail open
            _log.exception("lrwatch: could not queue the hook for %r", event)
            return False

    __call__ = run

    def counts(self) -> dict[str, Any]:
        """The counters' totals (``run`` by result, ``suppressed`` by reason), which the daemon
        saves with its state so that a restart does not reset them."""
        get = self.registry.get_sample_value
        return {"run": {r: get("lrwatch_hooks_run_total", {"result": r}) or 0.0
                        for r in self._runs},
                "suppressed": {r: get("lrwatch_hooks_suppressed_total", {"reason": r}) or 0.0
                               for r in self._suppressed}}

    def restore_counts(self, saved: Mapping[str, Any]) -> None:
        """Add the totals of :meth:`counts` saved before a restart (before anything runs)."""
        for key, children in (("run", self._runs), ("suppressed", self._suppressed)):
            for name, v in (saved.get(key) or {}).items():
                if name in children and is_saved_count(v):
                    children[name].inc(v)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every queued run has finished; ``False`` on timeout."""
        return wait_drained(self, timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Finish the queued runs (waiting up to ``timeout``, default the hook's own timeout
        plus a margin), then stop the worker. Idempotent; ``True`` if all finished."""
        wait = self.timeout + 5.0 if timeout is None else timeout
        self.closed = True   # its counters make way for the next run's in a shared registry
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(wait)
        return not self._thread.is_alive() and self._outstanding == 0

    def __enter__(self) -> "HookAction":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- worker -------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cond:
                while not len(self._queue) and not self._closing:
                    self._cond.wait()
                items = self._queue.drain(1)
                if not items:
                    return  # closing and drained
            try:
                result = self._execute(items[0])
            except Exception:
                _log.exception("lrwatch: hook failed unexpectedly")
                result = "failed"
            self._runs[result].inc()
            if result != "ok" and self.on_error is not None:
                try:
                    self.on_error()
                except Exception:
                    _log.exception("lrwatch: hook on_error callback failed")
            with self._cond:
                self._outstanding -= 1
                self._cond.notify_all()

    def _execute(self, payload: dict[str, Any]) -> str:
        if self.url is not None:
            return self._post(payload)
        return self._command(payload)

    def _post(self, payload: dict[str, Any]) -> str:
        try:
            post_json(self.url or "", payload, timeout=self.timeout, headers=self.headers)
        except DeliveryError as exc:
            timed_out = "timed out" in str(exc)
            self._limit.warning(_log, "post", "lrwatch: hook POST for rule %s %s: %s",
                                payload["rule"], "timed out" if timed_out else "failed", exc)
            return "timeout" if timed_out else "failed"
        return "ok"

    def _command(self, payload: dict[str, Any]) -> str:
        assert self.argv is not None
        env = {**os.environ, **self.env, **hook_env(payload)}
        data = json.dumps(payload, allow_nan=False).encode()
        rule = payload["rule"]
        try:
            # A list argv and shell=False: the program gets its arguments verbatim. Its own
            # session, so a timeout kills the whole group (a wrapper script's children too).
            proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env=env, cwd=self.cwd, shell=False,
                                    start_new_session=True)
        except (OSError, ValueError) as exc:
            self._limit.warning(_log, "start", "lrwatch: hook %s for rule %s could not start: %s",
                                self.argv[0], rule,
                         exc)
            return "failed"
        try:
            out, err = proc.communicate(data, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self._kill(proc)
            self._limit.warning(_log, "timeout", "lrwatch: hook %s for rule %s ran past %.1fs and "
                                "was killed",
                         self.argv[0], rule, self.timeout)
            return "timeout"
        tail = (out + err)[-_OUTPUT_TAIL:].decode(errors="replace").strip()
        if proc.returncode != 0:
            self._limit.warning(_log, "status", "lrwatch: hook %s for rule %s exited with status "
                                "%s: %s", self.argv[0],
                         rule, proc.returncode, tail)
            return "failed"
        _log.debug("lrwatch: hook %s for rule %s ran: %s", self.argv[0], rule, tail)
        return "ok"

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes]) -> None:
        try:
            if hasattr(os, "killpg"):
                os.killpg(proc.pid, signal.SIGKILL)
            else:  # pragma: no cover - Windows has no process groups of this kind
                proc.kill()
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.communicate(timeout=5.0)  # reap it; a daemonised grandchild may hold the pipes
        except subprocess.TimeoutExpired:
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
            try:
                proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                _log.warning("lrwatch: hook process %s did not die after SIGKILL", proc.pid)

    def __repr__(self) -> str:
        target = self.argv if self.argv is not None else self.url
        return f"HookAction({target!r}, timeout={self.timeout:g}, cooldown={self.cooldown:g})"
