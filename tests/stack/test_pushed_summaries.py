"""End-of-job summaries on a real Pushgateway, scraped by a real Prometheus with
``honor_labels: true`` as in exporters/prometheus.yml, beside a live training target: the rules
as shipped leave the summaries out (their state is where a finished run ended, not a live one)
and still catch the live target."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from lrwatch.exporters.prometheus import MetricsServer, TrainingExporter
from lrwatch.exporters.pushgateway import push_summary
from lrwatch.samples import Sample

sys.path.insert(0, str(Path(__file__).parent))
from stack_helpers import DASHBOARDS_DIR, RULES_DIR, substitute  # noqa: E402

pytestmark = [pytest.mark.prometheus, pytest.mark.slow]

RULE_FILES = [RULES_DIR / "lrwatch-health.rules.yml", RULES_DIR / "lrwatch-training.rules.yml"]


def _expr(alert: str) -> str:
    for f in RULE_FILES:
        for g in yaml.safe_load(f.read_text())["groups"]:
            for r in g["rules"]:
                if r.get("alert") == alert:
                    return str(r["expr"])
    raise KeyError(alert)


def _ended_with_a_critical_rule(run: str) -> TrainingExporter:
    """A run stopped by a critical rule, with two absorbed failures (a trace it could not
    open), as its registry is at close()."""
    exp = TrainingExporter(run_info={"run": run})
    exp.observe([Sample(step=1, time=None, values={"loss": 2.0})])
    exp.set_rule_state("diverged", "critical", True)
    exp.count_error()
    exp.count_error()
    return exp


def _jobs(result: list[Any]) -> list[str]:
    return sorted(r["metric"].get("job", "") for r in result)


def test_pushed_summaries_fire_nothing_and_live_targets_still_do(
        pushgateway: Any, prometheus_factory: Callable[..., Any]) -> None:
    for run in ("nightly-1", "nightly-2"):
        assert push_summary(pushgateway.url, _ended_with_a_critical_rule(run).registry, run=run)
    live = _ended_with_a_critical_rule("live")
    server = MetricsServer(live.registry, 0)
    try:
        prom = prometheus_factory(
            {"lrwatch-training": [f"127.0.0.1:{server.port}"]}, rule_files=RULE_FILES,
            extra_scrape_configs=[{"job_name": "lrwatch-pushgateway", "honor_labels": True,
                                   "static_configs": [{"targets": [pushgateway.address]}]}])
        prom.wait_for("push_time_seconds", lambda r: len(r) == 2, timeout=60)
        pushed = prom.wait_for('lrwatch_rule_firing{severity="critical"}',
                               lambda r: len(r) == 3, timeout=60)
        assert _jobs(pushed) == ["lrwatch", "lrwatch", "lrwatch-training"]
        for alert in ("LrwatchRuleFiringCritical", "LrwatchInternalErrors"):
            assert _jobs(prom.query(_expr(alert))) == ["lrwatch-training"], alert
        # The per-run loss record joins the live run only (two pushed run_info share one job
        # and instance) and every rule evaluates without error.
        runs = prom.wait_for("instance_run:lrwatch_step_loss:mean5m", timeout=60)
        assert [r["metric"]["run"] for r in runs] == ["live"]
        bad = [(r["name"], r.get("lastError")) for g in prom.rules() for r in g["rules"]
               if r.get("health") not in ("ok", "unknown")]
        assert bad == []
    finally:
        server.close()


def _label_values(definition: str) -> tuple[str, str]:
    inner = definition[len("label_values("):-1]
    selector, label = inner.rsplit(",", 1)
    return selector.strip(), label.strip()


def test_the_dashboards_open_on_a_live_job_not_on_pushed_summaries(
        pushgateway: Any, prometheus_factory: Callable[..., Any]) -> None:
    """With an end-of-job summary on the Pushgateway (job "lrwatch", instance "" under
    honor_labels), the job variable listed "lrwatch" first (sorted), so the training dashboard
    opened on it and its instance variable had nothing to select: every panel empty."""
    import json

    assert push_summary(pushgateway.url, _ended_with_a_critical_rule("nightly").registry,
                        run="nightly")
    live = _ended_with_a_critical_rule("live")
    server = MetricsServer(live.registry, 0)
    try:
        prom = prometheus_factory(
            {"lrwatch-training": [f"127.0.0.1:{server.port}"]},
            extra_scrape_configs=[{"job_name": "lrwatch-pushgateway", "honor_labels": True,
                                   "static_configs": [{"targets": [pushgateway.address]}]}])
        prom.wait_for("lrwatch_training_steps_total", lambda r: len(r) == 2, timeout=60)
        d = json.loads((DASHBOARDS_DIR / "lrwatch-training.json").read_text())
        var = {v["name"]: v for v in d["templating"]["list"]}
        assert var["job"]["sort"] == 1   # alphabetical: Grafana opens on the first
        selector, label = _label_values(var["job"]["definition"])
        jobs = sorted({r["metric"][label] for r in prom.query(selector)})
        assert jobs == ["lrwatch-training"], jobs
        selector, label = _label_values(substitute(var["instance"]["definition"],
                                                   {"job": jobs[0]}))
        assert {r["metric"][label] for r in prom.query(selector)} == \
            {f"127.0.0.1:{server.port}"}
    finally:
        server.close()
