"""Defects found by the twelfth round's audit of rule files, replay and the trace reader
(6 December; docs/rules.md, "Defects found by the twelfth round's audit"). Each test failed
on the code before its fix."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from lrwatch.cli import cli
from lrwatch.errors import RuleError
from lrwatch.rules import Engine, load_pack
from lrwatch.rules.replay import replay_trace
from lrwatch.rules.schema import parse_rules
from lrwatch.samples import Sample
from lrwatch.trace import read_trace


def _file(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text).lstrip())
    return p


# --- 1. action parameters: every problem, with its key and line; replay refuses them too ----

_BAD_ACTIONS = """
    rules:
      - name: a
        metric: loss
        detector: nonfinite
        severity: urgent
      - name: b
        metric: loss
        detector: nonfinite
        severity: critical
        actions:
          - alert
          - {reduce_lr: {factor: 5}}
          - {rollback: {lr_factor: 0.1}}
    """


def test_action_parameter_errors_come_with_the_other_errors_and_name_key_and_line() -> None:
    """They were checked only once the rest of the file was valid (the bad severity hid them:
    'every problem in a file is reported'), as 'FILE:LINE: rule ...' without the key, at the
    rule's line rather than the action's."""
    with pytest.raises(RuleError) as info:
        parse_rules(textwrap.dedent(_BAD_ACTIONS).lstrip(), "f.yml")
    errors = info.value.errors
    assert errors[0].startswith("f.yml:5: key 'rules[0].severity'")
    assert ("f.yml:12: key 'rules[1].actions[1]': reduce_lr: factor: must be a number > 0 "
            "and < 1, got 5") in errors
    assert ("f.yml:13: key 'rules[1].actions[2]': rollback: takes no parameters, got "
            "'lr_factor' (write it as a bare name: rollback)") in errors
    assert len(errors) == 3


def test_replay_refuses_a_rule_file_that_rules_check_refuses(tmp_path: Path) -> None:
    """``replay --rules`` replayed a file whose action parameters ``rules check`` and the
    Watcher reject, and exited 0 (the docs: 2 for a bad rule file)."""
    rules = _file(tmp_path, "r.yml", """
        rules:
          - name: b
            metric: loss
            detector: nonfinite
            severity: critical
            actions: [{reduce_lr: {factor: 5}}]
        """)
    trace = _file(tmp_path, "t.jsonl", '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": "nan"}\n')
    check = CliRunner().invoke(cli, ["rules", "check", str(rules)])
    assert check.exit_code == 1
    assert f"{rules}:6: key 'rules[0].actions[0]': reduce_lr: factor: must be" in check.stderr
    res = CliRunner().invoke(cli, ["replay", str(trace), "--rules", str(rules)])
    assert res.exit_code == 2, res.output
    assert f"{rules}:6: key 'rules[0].actions[0]': reduce_lr: factor: must be" in res.stderr
    assert "Traceback" not in res.output


# --- 2. replay with several rule sets, as the Watcher takes them ------------------------------

def test_replay_joins_every_rules_option_as_the_watcher_joins_its_list(tmp_path: Path) -> None:
    """``--rules a.yml --rules b.yml`` replayed b.yml alone (click keeps the last value of an
    option given twice), without a word; and a run watched with ``rules=["training",
    "plateau_cut"]`` (the documented way to add the cut) could not be replayed as live."""
    a = _file(tmp_path, "a.yml", """
        rules:
          - {name: a_nan, metric: loss, detector: nonfinite, severity: critical}
        """)
    b = _file(tmp_path, "b.yml", """
        rules:
          - {name: b_high, metric: loss, detector: threshold, params: {above: 5}, severity: warning}
        """)
    trace = _file(tmp_path, "t.jsonl", '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": "nan"}\n'
                                       '{"step": 3, "loss": 9}\n')
    res = CliRunner().invoke(cli, ["replay", str(trace), "--json", "--rules", str(a),
                                   "--rules", str(b)])
    assert res.exit_code == 0, res.output
    assert [(r["rule"], r["step"]) for r in map(json.loads, res.stdout.splitlines())] == [
        ("a_nan", 2), ("b_high", 3)]
    # pack names, as in Watcher(rules=[...]): joined in the order given
    joined = load_pack("training") + load_pack("plateau_cut")
    lines = [json.dumps({"step": s, "lr": 0.1, "loss": 2.0 + 0.001 * (s % 3)})
             for s in range(1, 301)]
    flat = _file(tmp_path, "flat.jsonl", "\n".join(lines) + "\n")
    want = [e.to_json(str(flat)) for e in replay_trace(str(flat), joined).firings]
    assert any(r["rule"] == "loss_plateau_cut" for r in want)
    for args in (["--rules", "training", "--rules", "plateau_cut"],
                 ["--pack", "training", "--pack", "plateau_cut"]):
        res = CliRunner().invoke(cli, ["replay", str(flat), "--json", *args])
        assert res.exit_code == 0, res.output
        assert [json.loads(x) for x in res.stdout.splitlines()] == want
    # the same rule set twice is an error, as in the Watcher's list (one line since the
    # fifteenth round; a rule name in two sets is still a duplicate name)
    res = CliRunner().invoke(cli, ["replay", str(trace), "--rules", str(a), "--rules", str(a)])
    assert res.exit_code == 2 and "is given twice (rule sets 1 and 2)" in res.stderr
    again = _file(tmp_path, "again.yml", a.read_text())
    res = CliRunner().invoke(cli, ["replay", str(trace), "--rules", str(a), "--rules",
                                   str(again)])
    assert res.exit_code == 2 and "duplicate rule names: a_nan" in res.stderr


# --- 3. a trace line's error message echoes at most a short piece of what it holds ------------

def test_a_malformed_trace_line_is_named_with_its_value_cut_short(tmp_path: Path) -> None:
    """A value that is not a number was echoed whole: a 200,000-character string made a
    200 kB error line (and ``--lenient`` kept up to 100 of them in memory)."""
    from lrwatch.errors import TraceFormatError
    huge = "x" * 200_000
    lines = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": huge}, {"step": [0] * 50_000},
             {"step": 4, "lr": [huge]}, {"step": 5, "loss": 2.0}]
    trace = _file(tmp_path, "t.jsonl", "".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(TraceFormatError) as info:
        read_trace(trace)
    assert str(info.value).startswith(f"{trace}:2: key 'loss': expected a number")
    assert len(str(info.value)) < 300
    res = CliRunner().invoke(cli, ["replay", "--lenient", str(trace)])
    assert res.exit_code == 0 and "2 samples" in res.stdout and "3 malformed line(s)" in res.stdout
    assert len(res.stderr) < 500, res.stderr[:300]
    from lrwatch.trace import TraceReader
    reader = TraceReader(trace, strict=False)
    assert [s.step for s in reader] == [1, 5]
    assert [e[len(str(trace)) + 1:].split(":")[0] for e in reader.errors] == ["2", "3", "4"]
    assert all(len(e) < len(str(trace)) + 200 for e in reader.errors), reader.errors


# --- 4. {time} in a summary of a sample without a time ---------------------------------------

def test_a_summary_with_a_time_format_renders_on_samples_without_a_time() -> None:
    """The trace contract makes ``time`` optional, and a duration is met on samples without
    one; but a summary ``"... at {time:.0f}"`` came out as that raw template, braces and all
    (formatting ``None`` failed and the template was kept), in replay and live alike."""
    rules = parse_rules(textwrap.dedent("""
        rules:
          - name: high
            metric: loss
            detector: threshold
            params: {above: 5}
            severity: warning
            annotations: {summary: "loss {value:.2f} at t={time:.0f}", description: "{time}"}
        """))
    (e,) = Engine(rules).update(Sample(step=3, values={"loss": 9.0}))
    assert e.message == "loss 9.00 at t=nan" and e.annotations["description"] == "nan"
    (e,) = Engine(rules).update(Sample(step=3, time=100.0, values={"loss": 9.0}))
    assert e.message == "loss 9.00 at t=100"


# --- 6. a state saved with a longer window, loaded into a shorter one ------------------------

def _canonical(state: dict, window: int, sums: bool) -> dict:
    """``state`` as a detector of ``window`` values holds it: the last ``window`` values, and
    what is derived from them computed from them alone."""
    buf = state["buf"][-window:]
    out = {**state, "buf": buf}
    if sums:   # trend: the sums over the window, recomputed
        import math
        out.update(sy=math.fsum(buf), syy=math.fsum(y * y for y in buf),
                   sty=math.fsum(i * y for i, y in enumerate(buf)), since=0)
    else:      # spike: the sorted copy of the window
        out["sorted"] = sorted(buf)
    return out


@pytest.mark.parametrize("name", ["spike", "trend"])
def test_a_state_of_a_longer_window_loads_as_its_last_values(name: str) -> None:
    """Back-testing a rule with another window (``lrwatch rules show training > my.yml``,
    ``window: 10`` for ``loss_blowup``, ``lrwatch replay --rules my.yml`` on a run with a
    rollback) loads the live run's state of the same detector: its window deque kept the last
    10 values, but spike kept all 50 in its sorted copy -- for the rest of the run its median
    and scale came from 40 values frozen at the rollback -- and trend kept the sums of 50 until
    its next recomputation. What was derived from the window is now derived again."""
    import random

    from lrwatch.rules.detectors import DETECTORS
    cls = DETECTORS[name]
    kw = {"window": 50, "warmup": 5} if name == "spike" else {"window": 50}
    short_kw = {**kw, "window": 10}
    rng = random.Random(3)
    d50 = cls(**kw)
    for i in range(60):
        d50.update(1.0 + 0.01 * i + rng.gauss(0, 0.05))
    state = json.loads(json.dumps(d50.state_dict()))
    loaded, canonical = cls(**short_kw), cls(**short_kw)
    loaded.load_state_dict(state)
    canonical.load_state_dict(_canonical(state, 10, sums=name == "trend"))
    assert loaded.state_dict() == canonical.state_dict()
    for i in range(100):
        x = 1.6 + 0.02 * i + rng.gauss(0, 0.05) if i != 50 else 40.0
        assert loaded.update(x) == canonical.update(x), i
        assert loaded.statistic == canonical.statistic, i
    # the same window keeps its state exactly (the resume and replay-equals-live contract)
    same = cls(**kw)
    same.load_state_dict(state)
    assert same.state_dict() == d50.state_dict()


def test_replay_refuses_a_pack_it_would_drop(tmp_path: Path) -> None:
    """``--pack plateau_cut --rules my.yml`` replayed my.yml alone: --pack is the default
    for when --rules is not given, and was dropped without a word beside it."""
    a = _file(tmp_path, "a.yml", """
        rules:
          - {name: a_nan, metric: loss, detector: nonfinite, severity: critical}
        """)
    trace = _file(tmp_path, "t.jsonl", '{"step": 1, "loss": 1.0}\n')
    res = CliRunner().invoke(cli, ["replay", str(trace), "--pack", "plateau_cut",
                                   "--rules", str(a)])
    assert res.exit_code == 2 and "--rules plateau_cut" in res.output
    res = CliRunner().invoke(cli, ["replay", str(trace), "--rules", "plateau_cut",
                                   "--rules", str(a)])
    assert res.exit_code == 0, res.output
