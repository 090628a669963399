"""``lrwatch replay``: table and JSON output, exit codes, malformed traces, no torch."""

from __future__ import annotations

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
from lrwatch.rules import Engine, load_pack
from lrwatch.rules.replay import replay_trace
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
    assert [(r["trace"], r["rule"], r["step"]) for r in recs] == [
        (str(bad), "lr_anomaly", 60), (str(bad), "lr_raised_lately", 60),
        (str(bad), "lr_raised", 60), (str(bad), "nonfinite", 100)]
    assert recs[3] == {"trace": str(bad), "rule": "nonfinite", "step": 100,
                       "severity": "critical", "actions": ["rollback"], "value": "nan",
                       "message": "loss is nan at step 100"}
    assert "2 trace(s), 240 samples, 4 firing(s)" in res.stderr


def test_table_output(traces):
    healthy, bad = traces
    res = invoke(healthy, bad)
    assert res.exit_code == 0
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["TRACE", "STEP", "RULE", "SEVERITY", "VALUE", "ACTIONS",
                                "MESSAGE"]
    assert lines[4].split()[:6] == [str(bad), "100", "nonfinite", "critical", "nan", "rollback"]
    assert lines[-1].startswith("2 trace(s), 240 samples, 4 firing(s) (critical: 1, warning: 1, "
                                "info: 2")
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
