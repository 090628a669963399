"""The committed Grafana dashboards: generated from lrwatch/stack/grafana.py, structurally sound, and
following DESIGN.md's conventions. (That every query returns data is checked against a real
Prometheus in test_stack_e2e.py.)"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from click.testing import CliRunner

from lrwatch.cli import cli
from lrwatch.stack.grafana import DASHBOARDS, DATASOURCE, render

sys.path.insert(0, str(Path(__file__).parent))
from stack_helpers import BUILTINS, DASHBOARDS_DIR, REPO, dashboard_exprs, substitute  # noqa: E402

FILES = sorted(DASHBOARDS_DIR.glob("*.json"))


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _panels(ps: Any) -> Iterator[dict[str, Any]]:
    for p in ps or []:
        yield p
        yield from _panels(p.get("panels"))


def test_committed_dashboards_equal_generated() -> None:
    assert sorted(p.name for p in FILES) == sorted(DASHBOARDS)
    for name, build in DASHBOARDS.items():
        assert (DASHBOARDS_DIR / name).read_text(encoding="utf-8") == render(build()), (
            f"{name} is stale: run `lrwatch dashboards generate --out grafana/dashboards`")


def test_generate_cli_writes_and_checks(tmp_path: Path) -> None:
    out = tmp_path / "d"
    r = CliRunner().invoke(cli, ["dashboards", "generate", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == sorted(DASHBOARDS)
    assert CliRunner().invoke(cli, ["dashboards", "generate", "--out", str(out),
                                    "--check"]).exit_code == 0
    (out / "lrwatch-serving.json").write_text("{}")
    r = CliRunner().invoke(cli, ["dashboards", "generate", "--out", str(out), "--check"])
    assert r.exit_code == 1 and "lrwatch-serving.json" in r.output


def test_check_of_a_missing_directory_says_so(tmp_path: Path) -> None:
    """`--check` from outside the repository (the default --out is relative) used to report
    both dashboards as "out of date" instead of saying there is no such directory."""
    r = CliRunner().invoke(cli, ["dashboards", "generate", "--check",
                                 "--out", str(tmp_path / "nowhere")])
    assert r.exit_code == 1
    assert "is not a directory" in r.output and "out of date" not in r.output, r.output


def test_titles_and_unique_uids() -> None:
    ds = [_load(p) for p in FILES]
    assert {d["title"] for d in ds} == {"lrwatch / Training", "lrwatch / Serving"}
    uids = [d["uid"] for d in ds]
    assert sorted(uids) == ["lrwatch-serving", "lrwatch-training"]
    assert len(set(uids)) == len(uids)
    for d in ds:
        ids = [p["id"] for p in _panels(d["panels"])]
        assert len(ids) == len(set(ids)), f"{d['uid']}: duplicate panel ids"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_structure(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    d = json.loads(text)
    assert "DS_PROMETHEUS" not in text and "__inputs" not in d
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("job", "instance"):
        v = variables[name]
        assert v["type"] == "query" and v["datasource"] == DATASOURCE
        assert v["definition"].startswith("label_values(") and v["definition"].endswith(
            f", {name})")
        assert v["query"]["query"] == v["definition"]
    assert "$job" in variables["instance"]["definition"]
    panels = [p for p in _panels(d["panels"]) if p["type"] != "row"]
    assert len(panels) >= 10
    for p in panels:
        assert p["datasource"] == DATASOURCE, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == DATASOURCE, p["title"]
        gp = p["gridPos"]
        assert 0 <= gp["x"] and gp["x"] + gp["w"] <= 24, p["title"]
    annotations = [a for a in d["annotations"]["list"] if not a.get("builtIn")]
    assert annotations
    for a in annotations:
        assert a["datasource"] == DATASOURCE
    # Every expression: only defined variables, $__rate_interval in rates (no fixed windows
    # except those baked into recording rules), and the job/instance filter.
    known = set(variables) | set(BUILTINS)
    for where, expr in dashboard_exprs(d):
        for m in re.finditer(r"\$\{?(\w+)", expr):
            assert m.group(1) in known, f"{where}: undefined ${m.group(1)}"
        assert not re.search(r"\[\d+[smhdw]\]", expr), f"{where}: fixed range in {expr}"
        assert re.search(r"\b(rate|increase)\(", expr) is None or (
            "$__rate_interval" in expr or "$__range" in expr), where
        assert '$job' in expr, f"{where}: not filtered by $job"
        assert '$instance' in expr, f"{where}: not filtered by $instance"
        substitute(expr, {"job": "j", "instance": "i", "feature": "f"})


def test_required_panels() -> None:
    t = _load(DASHBOARDS_DIR / "lrwatch-training.json")
    titles = " | ".join(p["title"] for p in _panels(t["panels"]))
    for word in ("Learning rate", "Loss", "Gradient norm", "Update ratio", "Accuracy",
                 "Evaluation loss", "Step rate", "Firing lrwatch rules"):
        assert word in titles, word
    ann = {a["name"]: a["expr"] for a in t["annotations"]["list"] if not a.get("builtIn")}
    assert "lrwatch_rollbacks_total" in ann["Rollbacks"]
    s = _load(DASHBOARDS_DIR / "lrwatch-serving.json")
    panels = list(_panels(s["panels"]))
    titles = " | ".join(p["title"] for p in panels)
    for word in ("Drift statistic vs threshold", "Drift heat map", "Prediction distribution",
                 "Realised accuracy and label coverage", "Ingest rate", "Ingest errors",
                 "Firing lrwatch rules"):
        assert word in titles, word
    repeated = [p for p in panels if p.get("repeat")]
    assert repeated and repeated[0]["repeat"] == "feature"


def test_provisioning_files() -> None:
    ds = yaml.safe_load((REPO / "grafana/provisioning/datasources/lrwatch.yml").read_text())
    assert ds["apiVersion"] == 1
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"].startswith("http")
    dash = yaml.safe_load((REPO / "grafana/provisioning/dashboards/lrwatch.yml").read_text())
    assert dash["apiVersion"] == 1
    (provider,) = dash["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]


def _promtool_eval(tmp_path: Path, series: dict[str, str], expr: str, at: str,
                   interval: str = "1m") -> str:
    """The value of ``expr`` at ``at`` over ``series``, computed by the real promtool (its
    ``promql_expr_test`` reports what it got when the expectation fails)."""
    import subprocess

    from services import find_binary

    test = {"rule_files": [], "evaluation_interval": "1m", "tests": [{
        "interval": interval,
        "input_series": [{"series": k, "values": v} for k, v in series.items()],
        "promql_expr_test": [{"expr": expr, "eval_time": at,
                              "exp_samples": [{"labels": "{}", "value": -12345}]}]}]}
    path = tmp_path / "eval.test.yml"
    path.write_text(yaml.safe_dump(test))
    proc = subprocess.run([find_binary("promtool"), "test", "rules", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)
    m = re.search(r"got:\s*(.*)", proc.stdout + proc.stderr)
    assert m, proc.stdout + proc.stderr
    return m.group(1).strip()


@pytest.mark.prometheus
@pytest.mark.parametrize("title,counter", [
    ("Rollbacks in range", "lrwatch_rollbacks_total"),
    ("Non-finite steps in range", "lrwatch_nonfinite_steps_total"),
    ("lrwatch internal errors in range", "lrwatch_internal_errors_total"),
])
def test_event_stats_count_events_before_the_first_scrape(tmp_path: Path, title: str,
                                                          counter: str) -> None:
    """A run that rolled back twice before Prometheus first scraped it (the alerts fire) shows
    2 in the stat, not 0; a rank without events stays 0, another job is not counted, and once
    the range starts after the first scrape only the events inside it count."""
    d = _load(DASHBOARDS_DIR / "lrwatch-training.json")
    (panel,) = [p for p in _panels(d["panels"]) if p["title"] == title]
    (target,) = panel["targets"]
    expr = substitute(target["expr"], {"job": "lrwatch-training", "instance": ".+",
                                       "__range": "1h"})
    series = {f'{counter}{{job="lrwatch-training",instance="rank0:9400"}}': "_x9 2x60",
              f'{counter}{{job="lrwatch-training",instance="rank1:9400"}}': "_x9 0x60",
              f'{counter}{{job="lrwatch-training",instance="rank2:9400"}}': "0x60 1x10",
              f'{counter}{{job="other",instance="rank0:9400"}}': "_x9 7x60"}
    assert _promtool_eval(tmp_path, series, expr, "60m") == "{} 2E+00"
    assert _promtool_eval(tmp_path, series, expr, "70m") == "{} 1E+00"


@pytest.mark.prometheus
def test_step_rate_sum_covers_the_selected_ranks_only(tmp_path: Path) -> None:
    """Two runs scraped under one job (file_sd, as in exporters/targets/): with run a's two
    ranks selected, the summed step rate is run a's (2 + 3 steps/s), not the job's."""
    d = _load(DASHBOARDS_DIR / "lrwatch-training.json")
    (panel,) = [p for p in _panels(d["panels"]) if p["title"] == "Step rate"]
    (summed,) = [t for t in panel["targets"] if t["expr"].startswith("sum by (job)")]
    expr = substitute(summed["expr"], {"job": "lrwatch-training",
                                       "instance": "(a0:9400|a1:9400)"})
    series = {'lrwatch_training_steps_total{job="lrwatch-training",instance="a0:9400"}': "0+120x20",
              'lrwatch_training_steps_total{job="lrwatch-training",instance="a1:9400"}': "0+180x20",
              'lrwatch_training_steps_total{job="lrwatch-training",instance="b0:9400"}': "0+600x20"}
    got = _promtool_eval(tmp_path, series, f"sum({expr})", "10m")
    assert got == "{} 5E+00"
    assert "{{instance}}" in panel["targets"][0]["legendFormat"]
    assert "all ranks" not in summed["legendFormat"]


@pytest.mark.prometheus
@pytest.mark.parametrize("title", ["Steps / s", "Step rate"])
def test_step_rate_of_a_run_that_flushes_less_often_than_the_window(tmp_path: Path,
                                                                    title: str) -> None:
    """25 steps of 3 s between flushes, scraped every 15 s: the rate of the counter over
    $__rate_interval (1m) read 0.42 and 0 in turn for a run at 0.33 steps/s. The panels show
    the rate between the last two flushes, and 0 once the run is overdue (stalled)."""
    d = _load(DASHBOARDS_DIR / "lrwatch-training.json")
    (panel,) = [p for p in _panels(d["panels"]) if p["title"] == title]
    expr = substitute(panel["targets"][0]["expr"], {"job": "lrwatch-training",
                                                    "instance": ".+"})
    expr = expr if expr.startswith("sum(") else f"sum({expr})"
    sel = '{job="lrwatch-training",instance="a:9400"}'
    # sample i at 15 i s; flush k at 75 k s (steps 25 k); the run hangs after 40 flushes
    flushes = [min(i // 5, 40) for i in range(300)]
    series = {f"lrwatch_training_steps_total{sel}": " ".join(str(25 * k) for k in flushes),
              f"lrwatch_step{sel}": " ".join(str(25 * k) for k in flushes),
              f"lrwatch_last_step_timestamp_seconds{sel}": " ".join(
                  str(75 * k) for k in flushes),
              f"lrwatch_flush_interval_seconds{sel}": " ".join(
                  "_" if k < 2 else "75" for k in flushes),
              f"lrwatch_steps_per_second{sel}": " ".join(
                  "_" if k < 2 else str(25 / 75) for k in flushes)}
    for at in ("600s", "615s", "630s", "645s", "660s"):   # flushing every 75 s
        assert _promtool_eval(tmp_path, series, expr, at, interval="15s") == \
            "{} 3.333333333333333E-01", at
    # it hangs after its flush at 3000 s: three intervals are under 15 minutes, so it is
    # overdue after 3900 s and the rate is then the counter's, 0
    assert _promtool_eval(tmp_path, series, expr, "3600s", interval="15s") == \
        "{} 3.333333333333333E-01"
    assert _promtool_eval(tmp_path, series, expr, "4200s", interval="15s") == "{} 0E+00"


@pytest.mark.prometheus
def test_actions_taken_shows_the_first_action_of_each_kind(tmp_path: Path) -> None:
    """lrwatch_actions_total{action} and lrwatch_firings_total{rule,severity} get a series at
    their first event, at 1: plain increase() over $__rate_interval never showed it, so a
    run that rolled back once had an empty "Actions taken" panel."""
    d = _load(DASHBOARDS_DIR / "lrwatch-training.json")
    (panel,) = [p for p in _panels(d["panels"]) if p["title"] == "Actions taken"]
    sel = 'job="lrwatch-training",instance="a:9400"'
    series = {f'lrwatch_actions_total{{{sel},action="rollback"}}': "_x10 1x10 2x10",
              f'lrwatch_firings_total{{{sel},rule="nonfinite",severity="critical"}}':
                  "_x10 1x20"}
    values = {"job": "lrwatch-training", "instance": ".+"}
    actions, firings = (substitute(t["expr"], values) for t in panel["targets"])
    assert _promtool_eval(tmp_path, series, actions, "10m") == \
        '{action="rollback", instance="a:9400"} 1E+00'
    assert _promtool_eval(tmp_path, series, firings, "10m") == \
        '{instance="a:9400", rule="nonfinite"} 1E+00'
    # the next rollback (at 21m) counts as an increase of one; none in between
    assert _promtool_eval(tmp_path, series, actions, "15m") == "nil"
    assert _promtool_eval(tmp_path, series, actions, "21m") == \
        '{action="rollback", instance="a:9400"} 1E+00'
