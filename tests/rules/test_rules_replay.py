"""``lrwatch replay``: table and JSON output, exit codes, malformed traces, no torch."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from lrwatch.cli import cli
from lrwatch.exporters.trace import TraceWriter, read_trace
from lrwatch.rules import Engine, load_pack, load_rules
from lrwatch.rules.replay import adopt_state, replay_trace
from lrwatch.rules.schema import parse_rules
from lrwatch.samples import Sample


def write_trace(path: Path, n: int = 120, nan_at: int | None = None, lr_jump_at: int | None = None,
                seed: int = 0) -> Path:
    import random
    rng = random.Random(seed)
    with TraceWriter(path) as w:
        for i in range(n):
            lr = 0.5 if i == lr_jump_at else 1e-3
            loss = (0.3 + 2 * math.exp(-i / 30)) * math.exp(rng.gauss(0, 0.1))
            if nan_at is not None and i >= nan_at:
                loss = math.nan
            vals = {"lr": lr, "loss": loss, "grad_norm": math.exp(rng.gauss(0, 0.3))}
            w.write(Sample(step=i, time=1000.0 + i, values=vals, lr_groups=(lr,)))
    return path


@pytest.fixture
def traces(tmp_path):
    return (write_trace(tmp_path / "healthy.jsonl"),
            write_trace(tmp_path / "nan.jsonl", nan_at=100, lr_jump_at=60, seed=1))


def invoke(*args):
    return CliRunner().invoke(cli, ["replay", *map(str, args)])


def test_json_contract(traces):
    healthy, bad = traces
    res = invoke("--json", healthy, bad)
    assert res.exit_code == 0, res.output
    recs = [json.loads(line) for line in res.stdout.splitlines()]
    # grad_below_start (info, a building block of never_learned since the sixteenth round):
    # this trace's gradient norms are random about 1 and its first one happened to be high
    assert [(r["trace"], r["rule"], r["step"]) for r in recs] == [
        (str(bad), "grad_below_start", 40),
        (str(bad), "lr_anomaly", 60), (str(bad), "lr_raised_lately", 60),
        (str(bad), "lr_raised", 60), (str(bad), "nonfinite", 100)]
    assert recs[4] == {"trace": str(bad), "rule": "nonfinite", "step": 100,
                       "severity": "critical", "actions": ["rollback"], "value": "nan",
                       "message": "loss is nan at step 100"}
    assert "2 trace(s), 240 samples, 5 firing(s)" in res.stderr


def test_table_output(traces):
    healthy, bad = traces
    res = invoke(healthy, bad)
    assert res.exit_code == 0
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["TRACE", "STEP", "RULE", "SEVERITY", "VALUE", "ACTIONS",
                                "MESSAGE"]
    assert lines[5].split()[:6] == [str(bad), "100", "nonfinite", "critical", "nan", "rollback"]
    assert lines[-1].startswith("2 trace(s), 240 samples, 5 firing(s) (critical: 1, warning: 1, "
                                "info: 3")
    res = invoke(healthy)
    assert res.stdout.splitlines()[0] == "no rule fired"


def test_resolved_flag(traces):
    res = invoke("--json", "--resolved", traces[1])
    kinds = [(json.loads(x)["rule"], json.loads(x)["kind"]) for x in res.stdout.splitlines()]
    assert ("lr_anomaly", "resolved") in kinds and ("nonfinite", "firing") in kinds


def test_fail_on(traces):
    healthy, bad = traces
    assert invoke("--fail-on", "critical", bad).exit_code == 1
    assert invoke("--fail-on", "warning", bad).exit_code == 1
    assert invoke("--fail-on", "critical", healthy).exit_code == 0
    assert invoke(bad).exit_code == 0


def test_custom_rules_and_bad_rules(tmp_path, traces):
    rules = tmp_path / "r.yml"
    rules.write_text(textwrap.dedent("""\
        rules:
          - name: high_loss
            metric: loss
            detector: threshold
            params: {above: 2.0}
            hysteresis: 1000
            severity: info
        """))
    res = invoke("--json", "--rules", rules, traces[0])
    assert [json.loads(x)["rule"] for x in res.stdout.splitlines()] == ["high_loss"]
    rules.write_text("rules: [{name: x, metric: loss, detector: nope, severity: info}]\n")
    res = invoke("--rules", rules, traces[0])
    assert res.exit_code == 2
    assert f"{rules}:1: key 'rules[0].detector': unknown detector 'nope'" in res.stderr
    assert "Traceback" not in res.output


def test_serving_pack_option(traces):
    res = invoke("--pack", "serving", "--json", traces[1])
    assert res.exit_code == 0 and res.stdout == ""


def test_malformed_lines_strict_and_lenient(tmp_path):
    t = write_trace(tmp_path / "t.jsonl", n=50, nan_at=40)
    lines = t.read_text().splitlines()
    lines.insert(10, "{not json")
    lines.insert(20, '{"step": "x"}')
    t.write_text("\n".join(lines) + "\n")
    res = invoke("--json", t)
    assert res.exit_code == 2
    assert f"error: {t}:11: " in res.stderr
    assert "1 trace(s) with errors" in res.stderr
    res = invoke("--json", "--lenient", t)
    assert res.exit_code == 0
    assert f"warning: {t}: skipped 2 malformed line(s); first: {t}:11:" in res.stderr
    assert "2 malformed line(s) skipped" in res.stderr
    assert [json.loads(x)["step"] for x in res.stdout.splitlines()] == [40]


def test_directory_and_progress(tmp_path):
    d = tmp_path / "runs"
    d.mkdir()
    for i in range(3):
        write_trace(d / f"r{i}.jsonl", n=30, nan_at=20 + i)
    res = invoke("--json", "--progress", d)
    assert res.exit_code == 0
    assert [json.loads(x)["step"] for x in res.stdout.splitlines()] == [20, 21, 22]
    assert "replay: 3/3 traces, 90 samples, 3 firings" in res.stderr


def test_replay_equals_feeding_an_engine(tmp_path):
    t = write_trace(tmp_path / "t.jsonl", n=200, nan_at=150, lr_jump_at=90, seed=5)
    eng = Engine(load_pack("training"))
    direct = [e for s in read_trace(t) for e in eng.update(s)]
    res = replay_trace(t, load_pack("training"))
    assert res.events == direct and res.samples == 200 and res.error is None
    out = invoke("--json", "--resolved", t)
    recs = [json.loads(x) for x in out.stdout.splitlines()]
    assert recs == [{**e.to_json(str(t)), "kind": e.kind} for e in direct]


def test_replay_does_not_import_torch(tmp_path):
    t = write_trace(tmp_path / "t.jsonl", n=50, nan_at=30)
    code = textwrap.dedent(f"""
        import sys
        from click.testing import CliRunner
        from lrwatch.cli import cli
        res = CliRunner().invoke(cli, ["replay", "--json", {str(t)!r}])
        assert res.exit_code == 0, res.output
        assert '"nonfinite"' in res.stdout, res.stdout
        bad = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
        print("TORCH" if bad else "NO-TORCH")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "NO-TORCH"


def test_the_engine_side_does_not_depend_on_the_exporters():
    # replay reads traces through lrwatch.trace (the codec), never through an exporter
    code = ("import sys, lrwatch.rules.replay; "
            "print(sorted(m for m in sys.modules if m.startswith('lrwatch.exporters')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_parallel_replay_gives_the_same_output_in_the_same_order(tmp_path, traces):
    # many copies of the two traces, in a mixed order: worker processes must not reorder them
    paths = []
    for i in range(24):
        src = traces[i % 2]
        dst = tmp_path / f"t{i:02d}.jsonl"
        dst.write_text(Path(src).read_text())
        paths.append(dst)
    serial = invoke("--json", "--jobs", "1", "--no-progress", *paths)
    parallel = invoke("--json", "--jobs", "2", "--no-progress", *paths)
    assert serial.exit_code == parallel.exit_code == 0
    assert serial.stdout == parallel.stdout and serial.stdout.count("\n") >= 12
    rules = tmp_path / "r.yml"
    rules.write_text("rules:\n  - {name: any_loss, metric: loss, detector: threshold, "
                     "params: {above: 0}, severity: info}\n")
    custom = invoke("--json", "--jobs", "2", "--rules", rules, *paths)   # workers load the file
    assert custom.exit_code == 0 and custom.stdout.count('"rule": "any_loss"') == 24


def test_broken_inputs_are_errors_with_their_place_never_tracebacks(tmp_path):
    """A rule file nested past the interpreter's recursion limit, a trace holding an integer
    no float can hold, and a folder with no trace (a CI job pointed at the wrong folder used
    to pass on nothing)."""
    deep = tmp_path / "deep.yml"
    deep.write_text("rules: " + "[" * 3000 + "]" * 3000 + "\n")
    res = CliRunner().invoke(cli, ["rules", "check", str(deep)])
    assert res.exit_code == 1 and "deep.yml:1: invalid YAML: nested too deeply" in res.output
    good = tmp_path / "t.jsonl"
    write_trace(good, n=30)
    lines = good.read_text().splitlines()
    lines[9] = lines[9].replace('"loss": ', '"loss": ' + "9" * 400 + ', "x": ', 1)
    big = tmp_path / "big.jsonl"
    big.write_text("\n".join(lines) + "\n")
    res = invoke(big)
    assert res.exit_code == 2 and "beyond the float range" in res.output
    assert invoke("--lenient", big).exit_code == 0
    empty = tmp_path / "none"
    empty.mkdir()
    res = invoke(empty, "--fail-on", "info")
    assert res.exit_code == 2 and "no trace found" in res.output


def _rollback_trace(path: Path, rules, state_rules=None) -> dict:
    """A trace like the Watcher writes after a rollback: the rollback event at step 8 carries
    the state that an engine over ``rules`` had at step 5. Returns that state."""
    eng = Engine(rules)
    lines, saved = [], None
    for step in range(1, 11):
        rec = {"step": step, "time": 1000.0 + step, "lr": 0.1, "loss": 2.0 - 0.01 * step}
        if step == 8:
            rec["loss"] = "nan"
            rec["events"] = [{"type": "firing", "step": 8, "rule": "nonfinite"},
                             {"type": "rollback", "step": 8, "to_step": 5, "engine_state": saved}]
        eng.update(read_trace(io.StringIO(json.dumps(rec)))[0])
        if step == 5:
            saved = json.loads(json.dumps(eng.state_dict()))
        lines.append(json.dumps(rec))
    path.write_text("\n".join(lines) + "\n")
    return saved


def test_a_rollback_state_saved_under_other_rules_does_not_stop_the_replay(tmp_path):
    """Back-testing other rules over a trace with a rollback: the state the live run saved
    (the training pack's) used to be a ConfigError traceback (exit 1, the --fail-on code), and
    with -j the whole batch died."""
    t = tmp_path / "rb.jsonl"
    _rollback_trace(t, load_pack("training"))
    rules = tmp_path / "mine.yml"
    rules.write_text("rules:\n  - {name: nan_loss, metric: loss, detector: nonfinite, "
                     "severity: critical, actions: [rollback]}\n")
    res = invoke("--json", "--rules", rules, t)
    assert res.exit_code == 0, res.output
    assert [json.loads(x)["rule"] for x in res.stdout.splitlines()] == ["nan_loss"]
    assert invoke("--pack", "plateau_cut", t).exit_code == 0
    copies = [t] + [tmp_path / f"c{i}.jsonl" for i in range(3)]
    for c in copies[1:]:
        c.write_text(t.read_text())
    res = invoke("--json", "-j", "2", "--rules", rules, *copies)
    assert res.exit_code == 0 and res.stdout.count('"nan_loss"') == 4


def test_a_rollback_state_is_applied_to_the_rules_it_matches():
    """A rule of the same name and detectors takes its saved state; the others go on."""
    live = parse_rules("rules:\n"
                       "  - {name: hi, metric: loss, detector: threshold, params: {above: 5}, "
                       "for: 3, severity: info}\n"
                       "  - {name: gone, metric: loss, detector: nonfinite, severity: info}\n")
    back = parse_rules("rules:\n"
                       "  - {name: hi, metric: loss, detector: threshold, params: {above: 5}, "
                       "for: 3, severity: info}\n"
                       "  - {name: new, metric: loss, detector: threshold, params: {above: 5}, "
                       "for: 3, severity: info}\n"
                       "  - {name: gone, metric: loss, detector: spike, severity: info}\n")
    a, b = Engine(live), Engine(back)
    for step in (1, 2):
        a.update(Sample(step=step, values={"loss": 9.0}))
    saved = json.loads(json.dumps(a.state_dict()))
    assert saved["rules"]["hi"]["pending"] == 2
    b.update(Sample(step=1, values={"loss": 1.0}))
    for step in (2, 3):
        b.update(Sample(step=step, values={"loss": 9.0}))
    before = b.state_dict()
    adopt_state(b, saved)
    after = b.state_dict()
    assert after["rules"]["hi"] == saved["rules"]["hi"]
    assert after["rules"]["new"] == before["rules"]["new"]      # not in the saved state
    assert after["rules"]["gone"] == before["rules"]["gone"]    # another detector then
    assert after["last_step"] == 2


def test_a_corrupt_rollback_state_is_a_malformed_line(tmp_path):
    """Named FILE:LINE: key 'events[i].engine_state', counted, exit 2; skipped with
    --lenient; and never half applied."""
    t = tmp_path / "rb.jsonl"
    _rollback_trace(t, load_pack("training"))
    lines = t.read_text().splitlines()
    rec = json.loads(lines[7])
    rec["events"][1]["engine_state"] = {"version": 1, "rules": {"nonfinite": {}}}
    lines[7] = json.dumps(rec)
    t.write_text("\n".join(lines) + "\n")
    res = invoke("--json", t)
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert (f"error: {t}:8: key 'events[1].engine_state': rule 'nonfinite': expected an "
            f"object with 'detectors'") in res.stderr
    assert [json.loads(x)["step"] for x in res.stdout.splitlines()] == [8]   # what it fired
    res = invoke("--json", "--lenient", "--fail-on", "critical", t)
    assert res.exit_code == 1 and "1 malformed line(s) skipped" in res.stderr
    rec["events"][1]["engine_state"] = {"version": 2}
    lines[7] = json.dumps(rec)
    t.write_text("\n".join(lines) + "\n")
    res = invoke(t)
    assert res.exit_code == 2 and "unsupported engine state version 2" in res.stderr
    eng = Engine(load_pack("training"))
    eng.update(Sample(step=1, values={"loss": 2.0}))
    before = eng.state_dict()
    broken = json.loads(json.dumps(before))
    # the first rule's counter changed, a later rule's detector state lacking its keys
    stateful = [n for n in (r.name for r in eng.rules)
                if any(len(d) > 1 for d in broken["rules"][n]["detectors"].values())]
    broken["rules"][eng.rules[0].name]["pending"] = 7
    for det in broken["rules"][stateful[-1]]["detectors"].values():
        del det[next(k for k in det if k != "detector")]
    with pytest.raises(ValueError, match="cannot be loaded"):
        adopt_state(eng, broken)
    assert eng.state_dict() == before


def test_an_exception_out_of_the_rules_ends_that_trace_with_an_error(tmp_path):
    """A state that loads but breaks the rule on the next step (a counter that is not a
    number): an error naming the line, exit 2, and the other traces of the batch replayed."""
    rules = tmp_path / "r.yml"
    rules.write_text("rules:\n  - {name: hi, metric: loss, detector: threshold, "
                     "params: {above: 5}, for: 3, severity: info}\n")
    t = tmp_path / "t.jsonl"
    saved = _rollback_trace(t, load_rules(rules))
    saved["rules"]["hi"]["pending"] = "x"
    lines = t.read_text().splitlines()
    rec = json.loads(lines[7])
    rec["events"][1]["engine_state"] = saved
    lines[7] = json.dumps(rec)
    lines[8] = lines[8].replace('"loss": 1.91', '"loss": 9')
    t.write_text("\n".join(lines) + "\n")
    ok = tmp_path / "ok.jsonl"
    ok.write_text('{"step": 1, "loss": 9}\n{"step": 2, "loss": 9}\n{"step": 3, "loss": 9}\n')
    for jobs in ("1", "2"):
        res = invoke("--json", "-j", jobs, "--rules", rules, t, ok)
        assert res.exit_code == 2 and "Traceback" not in res.output
        assert f"error: {t}:9: the rules failed on this line (TypeError: " in res.stderr
        assert '"trace": "' + str(ok) + '", "rule": "hi", "step": 3' in res.stdout


def test_a_trace_line_that_is_not_utf8_fails_the_replay(tmp_path):
    """It used to replay as a clean run (exit 0 with --fail-on critical): the NaN loss on that
    line was read under a mangled key."""
    t = tmp_path / "t.jsonl"
    t.write_bytes(b'{"step":1,"loss":1.0}\n{"step":2,"lo\xffss":"nan"}\n{"step":3,"loss":1.0}\n')
    res = invoke("--fail-on", "critical", t)
    assert res.exit_code == 2 and f"error: {t}:2: not valid UTF-8" in res.stderr
    res = invoke("--lenient", t)
    assert res.exit_code == 0 and "1 malformed line(s) skipped" in res.stdout


def test_a_trace_without_samples_is_an_error(tmp_path):
    """An empty or blank trace (a run that died before its first flush) used to replay as
    "0 samples", exit 0 even with --fail-on info, while ``lrwatch report`` rejected it."""
    empty, blank, junk = tmp_path / "empty.jsonl", tmp_path / "blank.jsonl", tmp_path / "j.jsonl"
    empty.write_bytes(b"")
    blank.write_text("\n  \n")
    junk.write_text("garbage\n")
    res = invoke("--fail-on", "info", empty, blank)
    assert res.exit_code == 2
    assert f"error: {empty}: no samples in the trace" in res.stderr
    assert f"error: {blank}: no samples in the trace" in res.stderr
    assert "2 trace(s) with errors" in res.stdout
    res = invoke("--lenient", junk)
    assert res.exit_code == 2
    assert f"error: {junk}: no samples in the trace (1 malformed line(s) skipped)" in res.stderr
    assert replay_trace(io.StringIO(""), load_pack("training")).error is not None


def test_a_duration_rule_decides_in_replay_as_it_did_live():
    """The trace rounded 'time' to microseconds: two samples 0.9999997 s apart live were
    1.0 s apart in the trace, so a 'for: 1s' rule fired in replay and not live."""
    rules = parse_rules("rules: [{name: slow_high, metric: loss, detector: threshold, "
                        "params: {above: 5}, for: 1s, severity: critical}]")
    samples = [Sample(step=1, time=1764300000.0000004, values={"loss": 9.0}),
               Sample(step=2, time=1764300001.0000001, values={"loss": 9.0}),
               Sample(step=3, time=1764300001.5, values={"loss": 9.0})]
    live = Engine(rules)
    live_events = [e for s in samples for e in live.update(s)]
    buf = io.StringIO()
    TraceWriter(buf).write_many(samples)
    assert [s.time for s in read_trace(io.StringIO(buf.getvalue()))] == [s.time for s in samples]
    res = replay_trace(io.StringIO(buf.getvalue()), rules, name="t.jsonl")
    assert res.events == live_events and [e.step for e in live_events] == [3]
