"""The ``hook`` action with real processes and a real local HTTP receiver."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from lrwatch.actions import HookAction, hook_payload
from lrwatch.errors import ConfigError
from lrwatch.rules.engine import Engine
from lrwatch.rules.schema import parse_rules
from lrwatch.samples import Sample
from services import wait_until

#: A hook program that appends its argv, its LRWATCH_* environment and its stdin to a file.
RECORDER = textwrap.dedent("""
    import json, os, sys
    out, *rest = sys.argv[1:]
    record = {"argv": rest, "stdin": sys.stdin.read(),
              "env": {k: v for k, v in os.environ.items() if k.startswith("LRWATCH_")},
              "extra": os.environ.get("HOOK_EXTRA")}
    with open(out, "a") as f:
        f.write(json.dumps(record) + "\\n")
""")


def _records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def _event(rule: str = "loss_blowup", **kw: Any) -> dict[str, Any]:
    return {"rule": rule, "severity": "critical", "step": 120, "value": 12.5,
            "message": "loss blew up at step 120", **kw}


def _runs(hook: HookAction, result: str) -> float:
    return hook.registry.get_sample_value("lrwatch_hooks_run_total", {"result": result}) or 0.0


def _suppressed(hook: HookAction, reason: str) -> float:
    return hook.registry.get_sample_value("lrwatch_hooks_suppressed_total",
                                          {"reason": reason}) or 0.0


@pytest.fixture
def hooks() -> Iterator[list[HookAction]]:
    made: list[HookAction] = []
    yield made
    for h in made:
        h.close(timeout=10)


class Receiver:
    """A real HTTP server on a free loopback port that records POSTed JSON bodies."""

    def __init__(self, status: int = 200, delay: float = 0.0) -> None:
        self.bodies: list[Any] = []
        self.headers: list[dict[str, str]] = []
        outer = self
        self._stop = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.bodies.append(json.loads(raw))
                outer.headers.append(dict(self.headers))
                outer._stop.wait(delay)
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/revert"

    def close(self) -> None:
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver_factory() -> Iterator[Callable[..., Receiver]]:
    made: list[Receiver] = []

    def make(**kwargs: Any) -> Receiver:
        made.append(Receiver(**kwargs))
        return made[-1]

    yield make
    for r in made:
        r.close()


# ------------------------------------------------------------------------------------------------
# configuration


@pytest.mark.parametrize("argv", ["touch /tmp/x", [], [""], ["ok", 3], ("a", None), 42])
def test_argv_must_be_a_non_empty_list_of_strings(argv: Any) -> None:
    with pytest.raises(ConfigError, match="never run through a shell"):
        HookAction(argv)


@pytest.mark.parametrize("kwargs, match", [
    ({}, "exactly one"),
    ({"argv": ["true"], "url": "http://127.0.0.1:1/x"}, "exactly one"),
    ({"url": "127.0.0.1:8080/x"}, "http://"),
    ({"argv": ["true"], "timeout": 0}, "timeout"),
    ({"argv": ["true"], "cooldown": -1}, "cooldown"),
])
def test_invalid_configuration_is_rejected(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        HookAction(**kwargs)


# ------------------------------------------------------------------------------------------------
# commands


def test_command_gets_the_firing_in_env_and_stdin(tmp_path: Path,
                                                  hooks: list[HookAction]) -> None:
    out = tmp_path / "runs.jsonl"
    hook = HookAction([sys.executable, "-c", RECORDER, str(out), "--to", "previous"],
                      env={"HOOK_EXTRA": "yes"})
    hooks.append(hook)
    rules = parse_rules("""
rules:
  - name: nan_loss
    metric: loss
    detector: nonfinite
    severity: critical
    actions: [hook]
    labels: {team: ml}
    annotations: {summary: "loss is {value} at step {step}"}
""")
    eng = Engine(rules)
    [firing] = eng.update(Sample(step=42, time=1764300000.0, values={"loss": float("inf")}))
    assert hook.run(firing) is True
    assert hook.flush(30)

    [rec] = _records(out)
    assert rec["argv"] == ["--to", "previous"]
    assert rec["extra"] == "yes"
    assert rec["env"] == {"LRWATCH_RULE": "nan_loss", "LRWATCH_SEVERITY": "critical",
                          "LRWATCH_STEP": "42", "LRWATCH_VALUE": "inf",
                          "LRWATCH_MESSAGE": "loss is inf at step 42",
                          "LRWATCH_KIND": "firing", "LRWATCH_TIME": "1764300000.0"}
    payload = json.loads(rec["stdin"])
    assert payload == hook_payload(firing)
    assert payload["rule"] == "nan_loss" and payload["value"] == "inf"
    assert payload["labels"] == {"team": "ml"} and payload["actions"] == ["hook"]
    assert _runs(hook, "ok") == 1.0


def test_command_is_never_run_through_a_shell(tmp_path: Path, hooks: list[HookAction]) -> None:
    out = tmp_path / "runs.jsonl"
    marker = tmp_path / "pwned"
    nasty = [f"x; touch {marker}", f"$(touch {marker})", f"`touch {marker}`", "*", "$HOME"]
    hook = HookAction([sys.executable, "-c", RECORDER, str(out), *nasty])
    hooks.append(hook)
    hook.run(_event(message=f"msg; touch {marker}"))
    assert hook.flush(30)
    [rec] = _records(out)
    assert rec["argv"] == nasty  # verbatim: no expansion, no substitution, no splitting
    assert rec["env"]["LRWATCH_MESSAGE"] == f"msg; touch {marker}"
    assert not marker.exists()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # a zombie is dead; only its parent has yet to reap it


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_timeout_kills_the_command_and_its_children(tmp_path: Path,
                                                    hooks: list[HookAction]) -> None:
    pids = tmp_path / "pids"
    script = textwrap.dedent(f"""
        import os, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        with open({str(pids)!r}, "w") as f:
            f.write(f"{{os.getpid()}} {{child.pid}}")
        time.sleep(120)
    """)
    errors: list[int] = []
    hook = HookAction([sys.executable, "-c", script], timeout=1.0,
                      on_error=lambda: errors.append(1))
    hooks.append(hook)
    t0 = time.monotonic()
    assert hook.run(_event()) is True
    assert time.monotonic() - t0 < 1.0  # run() only queues; the command runs elsewhere
    assert hook.flush(60)
    assert _runs(hook, "timeout") == 1.0 and _runs(hook, "ok") == 0.0
    assert errors == [1]
    parent, child = (int(p) for p in pids.read_text().split())
    wait_until(lambda: not _alive(parent) and not _alive(child), timeout=30,
               message="hook process group killed")


def test_failing_commands_are_counted_and_never_raise(tmp_path: Path,
                                                      hooks: list[HookAction]) -> None:
    errors: list[int] = []
    bad_exit = HookAction([sys.executable, "-c", "import sys; sys.exit(3)"], cooldown=0,
                          on_error=lambda: errors.append(1))
    missing = HookAction([str(tmp_path / "no-such-program")])
    hooks += [bad_exit, missing]
    assert bad_exit.run(_event()) and bad_exit.run(_event())
    assert missing.run(_event())
    assert bad_exit.flush(30) and missing.flush(30)
    assert _runs(bad_exit, "failed") == 2.0 and errors == [1, 1]
    assert _runs(missing, "failed") == 1.0
    assert missing.run({"no": "rule"}) is False  # a bad event is logged, not raised


def test_a_hook_that_keeps_failing_is_logged_once_a_minute_and_counted_every_time(
        hooks: list[HookAction], caplog: pytest.LogCaptureFixture) -> None:
    errors: list[int] = []
    bad_exit = HookAction([sys.executable, "-c", "import sys; sys.exit(3)"], cooldown=0,
                          on_error=lambda: errors.append(1))
    hooks.append(bad_exit)
    with caplog.at_level("WARNING", logger="lrwatch"):
        for _ in range(4):
            assert bad_exit.run(_event())
        assert bad_exit.flush(60)
    lines = [r for r in caplog.records if "exited with status 3" in r.getMessage()]
    assert len(lines) == 1                      # the repeats within a minute are held back ...
    assert _runs(bad_exit, "failed") == 4.0 and errors == [1] * 4   # ... and all counted


def test_cooldown_per_rule(tmp_path: Path, hooks: list[HookAction]) -> None:
    out = tmp_path / "runs.jsonl"
    now = [1000.0]
    hook = HookAction([sys.executable, "-c", RECORDER, str(out)], cooldown=60.0,
                      clock=lambda: now[0])
    hooks.append(hook)
    assert hook.run(_event("flappy")) is True
    now[0] += 10
    assert hook.run(_event("flappy")) is False  # within its cooldown
    assert hook.run(_event("other")) is True  # another rule has its own
    now[0] += 51
    assert hook.run(_event("flappy")) is True  # 61 s after the first run
    assert hook.flush(30)
    assert [r["env"]["LRWATCH_RULE"] for r in _records(out)] == ["flappy", "other", "flappy"]
    assert _runs(hook, "ok") == 3.0
    assert _suppressed(hook, "cooldown") == 1.0


def test_resolutions_run_only_when_asked(tmp_path: Path, hooks: list[HookAction]) -> None:
    out = tmp_path / "runs.jsonl"
    quiet = HookAction([sys.executable, "-c", RECORDER, str(out)], cooldown=0)
    loud = HookAction([sys.executable, "-c", RECORDER, str(out), "loud"], cooldown=0,
                      on_resolved=True)
    hooks += [quiet, loud]
    assert quiet.run(_event(kind="resolved")) is False
    assert loud.run(_event(kind="resolved")) is True
    assert quiet.flush(30) and loud.flush(30)
    [rec] = _records(out)
    assert rec["argv"] == ["loud"] and rec["env"]["LRWATCH_KIND"] == "resolved"


def test_full_queue_drops_the_oldest(tmp_path: Path, hooks: list[HookAction]) -> None:
    out = tmp_path / "runs.jsonl"
    gate = tmp_path / "gate"
    # The first run waits for the gate file, so the next ones pile up in the queue of 2.
    script = RECORDER + textwrap.dedent(f"""
        import time
        while not os.path.exists({str(gate)!r}):
            time.sleep(0.02)
    """)
    hook = HookAction([sys.executable, "-c", script, str(out)], cooldown=0,
                      queue_size=2)
    hooks.append(hook)
    hook.run(_event("r0"))
    wait_until(lambda: _records(out), timeout=30, message="first hook started")
    for i in range(1, 6):
        hook.run(_event(f"r{i}"))
    assert _suppressed(hook, "dropped") == 3.0
    gate.touch()
    assert hook.flush(60)
    assert [r["env"]["LRWATCH_RULE"] for r in _records(out)] == ["r0", "r4", "r5"]


def test_close_finishes_queued_runs_and_then_refuses(tmp_path: Path) -> None:
    out = tmp_path / "runs.jsonl"
    hook = HookAction([sys.executable, "-c", RECORDER, str(out)], cooldown=0)
    for i in range(3):
        hook.run(_event(f"r{i}"))
    assert hook.close(timeout=60)
    assert len(_records(out)) == 3
    assert hook.run(_event("late")) is False
    assert _suppressed(hook, "dropped") == 1.0


# ------------------------------------------------------------------------------------------------
# URLs


def test_url_hook_posts_the_payload(receiver_factory: Callable[..., Receiver],
                                    hooks: list[HookAction]) -> None:
    rec = receiver_factory()
    hook = HookAction(url=rec.url, headers={"Authorization": "Bearer t"})
    hooks.append(hook)
    hook.run(_event(value=float("nan"), labels={"team": "ml"}))
    assert hook.flush(30)
    [body] = rec.bodies
    assert body == {"rule": "loss_blowup", "severity": "critical", "kind": "firing", "step": 120,
                    "time": None, "value": "nan", "message": "loss blew up at step 120",
                    "metric": None, "labels": {"team": "ml"}, "annotations": {}, "actions": []}
    assert rec.headers[0]["Authorization"] == "Bearer t"
    assert rec.headers[0]["Content-Type"] == "application/json"
    assert _runs(hook, "ok") == 1.0


def test_url_hook_failures_and_timeouts_are_counted(receiver_factory: Callable[..., Receiver],
                                                    hooks: list[HookAction]) -> None:
    broken = receiver_factory(status=500)
    slow = receiver_factory(delay=30.0)
    h_broken = HookAction(url=broken.url)
    h_slow = HookAction(url=slow.url, timeout=0.5)
    hooks += [h_broken, h_slow]
    h_broken.run(_event())
    h_slow.run(_event())
    assert h_broken.flush(30) and h_slow.flush(30)
    assert _runs(h_broken, "failed") == 1.0
    assert _runs(h_slow, "timeout") == 1.0
