"""The Prometheus rules and the example configs, checked by the real promtool (and amtool when
installed); conventions of DESIGN.md checked on the parsed files."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from services import find_binary, http_get

sys.path.insert(0, str(Path(__file__).parent))
from stack_helpers import REPO, RULES_DIR  # noqa: E402

RULE_FILES = sorted(RULES_DIR.glob("*.rules.yml"))
TEST_FILES = sorted((RULES_DIR / "tests").glob("*.test.yml"))
RECORD_NAME = re.compile(r"^[a-z_]+:[a-z0-9_]+:[a-z0-9_]+$")
ALERT_NAME = re.compile(r"^Lrwatch([A-Z][a-z0-9]+)+$")

pytestmark = pytest.mark.prometheus


def _promtool(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([find_binary("promtool"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, check=False)


def _rules() -> list[dict[str, Any]]:
    out = []
    for f in RULE_FILES:
        for g in yaml.safe_load(f.read_text())["groups"]:
            for r in g["rules"]:
                out.append({**r, "_file": f.name, "_group": g["name"]})
    return out


def _alerts() -> list[dict[str, Any]]:
    return [r for r in _rules() if "alert" in r]


def test_rule_files_exist() -> None:
    names = {f.name for f in RULE_FILES}
    assert {"lrwatch-training.rules.yml", "lrwatch-serving.rules.yml",
            "lrwatch-health.rules.yml"} <= names
    assert {f.name.replace(".test.yml", ".rules.yml") for f in TEST_FILES} == names


def test_promtool_check_rules() -> None:
    proc = _promtool("check", "rules", *map(str, RULE_FILES))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("SUCCESS") == len(RULE_FILES)


def test_promtool_test_rules() -> None:
    proc = _promtool("test", "rules", *[str(p.relative_to(REPO)) for p in TEST_FILES])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("SUCCESS") == len(TEST_FILES), proc.stdout


def test_promtool_test_rules_can_fail(tmp_path: Path) -> None:
    """A wrong expectation makes promtool fail, so the test above proves something."""
    src = RULES_DIR / "tests" / "lrwatch-training.test.yml"
    text = src.read_text().replace("severity: critical", "severity: warning")
    bad = tmp_path / "bad.test.yml"
    bad.write_text(text.replace("../lrwatch-training.rules.yml",
                                str(RULES_DIR / "lrwatch-training.rules.yml")))
    proc = _promtool("test", "rules", str(bad))
    assert proc.returncode != 0 and "FAILED" in proc.stdout + proc.stderr


def test_every_alert_has_a_firing_and_a_not_firing_test() -> None:
    fires: set[str] = set()
    quiet: set[str] = set()
    for f in TEST_FILES:
        for t in yaml.safe_load(f.read_text())["tests"]:
            for case in t.get("alert_rule_test", []):
                (fires if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = {a["alert"] for a in _alerts()}
    assert names - fires == set(), "alerts without a firing test"
    assert names - quiet == set(), "alerts without a not-firing test"


def test_alert_conventions() -> None:
    alerts = _alerts()
    assert len(alerts) >= 14
    seen = set()
    for a in alerts:
        name = a["alert"]
        assert ALERT_NAME.match(name), name
        assert name not in seen, f"duplicate alert {name}"
        seen.add(name)
        assert "for" in a, f"{name}: no `for`"
        assert a["labels"]["severity"] in ("critical", "warning", "info"), name
        assert set(a["labels"]) == {"severity"}, f"{name}: extra labels {a['labels']}"
        assert a["annotations"].get("summary") and a["annotations"].get("description"), name
        # The value goes in annotations, never in labels.
        assert "$value" not in str(a["labels"]), name
    # Names that lrwatch's own engine alerts use (Lrwatch + rule name) are not reused, so a
    # Prometheus alert and an engine alert never look like one alert to a human.
    for pack in (REPO / "lrwatch" / "rules" / "packs").glob("*.yml"):
        for r in yaml.safe_load(pack.read_text())["rules"]:
            engine = "Lrwatch" + "".join(w.capitalize() for w in re.split(r"[_-]", r["name"]))
            assert engine not in seen, f"{engine} collides with the engine's alert"


def test_expected_alerts_are_present() -> None:
    names = {a["alert"] for a in _alerts()}
    assert {"LrwatchNonFiniteSteps", "LrwatchRollbacks", "LrwatchLossRising",
            "LrwatchTrainingStalled", "LrwatchExporterDown", "LrwatchRuleFiringCritical",
            "LrwatchDriftDetected", "LrwatchModelAccuracyRegression", "LrwatchIngestErrorsHigh",
            "LrwatchLabelCoverageLow", "LrwatchLabelDelayHigh", "LrwatchInternalErrors",
            "LrwatchAlertDeliveryFailing"} <= names


def test_recording_rule_names() -> None:
    records = [r["record"] for r in _rules() if "record" in r]
    assert len(records) >= 10
    for name in records:
        assert RECORD_NAME.match(name), f"{name} is not level:metric:operations"
        assert ":lrwatch_" in name
    assert len(set(records)) == len(records)


def test_example_prometheus_config_is_valid() -> None:
    proc = _promtool("check", "config", "prometheus.yml", cwd=REPO / "exporters")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cfg = yaml.safe_load((REPO / "exporters" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert set(jobs) == {"lrwatch-training", "lrwatch-daemon", "lrwatch-pushgateway"}
    assert jobs["lrwatch-pushgateway"].get("honor_labels") is True
    assert not jobs["lrwatch-training"].get("honor_labels")
    assert jobs["lrwatch-training"]["file_sd_configs"]
    assert cfg["rule_files"] == ["../rules/*.rules.yml"]
    assert cfg["alerting"]["alertmanagers"][0]["api_version"] == "v2"


def test_example_file_sd_targets_carry_no_label_lrwatch_exports_itself() -> None:
    """The file_sd example's target labels must not shadow the exporter's own labels: a
    target label `run` (or `rank`) makes Prometheus rename lrwatch_run_info's `run` (a rank's
    `rank`) to `exported_run` (`exported_rank`), and the rules and dashboards that join on
    them find nothing. The example set `run` on every target until 6 December."""
    import json

    groups = json.loads((REPO / "exporters" / "targets" / "training.json.example").read_text())
    assert groups and all(g["targets"] for g in groups)
    for g in groups:
        assert not {"run", "rank", "job", "instance"} & set(g.get("labels", {})), g


def test_example_alertmanager_config_is_valid(alertmanager_factory: Any) -> None:
    """A real Alertmanager starts with it (and amtool accepts it, where installed)."""
    text = (REPO / "exporters" / "alertmanager.yml").read_text()
    am = alertmanager_factory(text)
    status = json.loads(http_get(f"{am.url}/api/v2/status"))
    assert "ml-oncall-pager" in status["config"]["original"]
    amtool = shutil.which("amtool")
    if amtool:
        proc = subprocess.run([amtool, "check-config", str(REPO / "exporters" / "alertmanager.yml")],
                              capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_example_training_targets_do_not_clash_with_exported_labels(
        prometheus_factory: Any) -> None:
    """The example config's training targets, scraping a rank that exports under
    ``export="all"`` (its own ``rank`` label), as Prometheus stores it: a target label of the
    same name (the example used to set ``rank: "0"``) renames the exported one to
    ``exported_rank`` on every series."""
    from lrwatch.exporters.prometheus import MetricsServer, TrainingExporter

    cfg = yaml.safe_load((REPO / "exporters" / "prometheus.yml").read_text())
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "lrwatch-training"]
    exp = TrainingExporter(run_info={"run": "r"}, const_labels={"rank": "0"})
    server = MetricsServer(exp.registry, 0)
    try:
        static = [{**sc, "targets": [f"127.0.0.1:{server.port}"]}
                  for sc in job["static_configs"]][:1]
        prom = prometheus_factory(extra_scrape_configs=[
            {"job_name": job["job_name"], "static_configs": static}])
        (series,) = prom.wait_for('lrwatch_training_steps_total{job="lrwatch-training"}',
                                  timeout=60)
    finally:
        server.close()
    labels = series["metric"]
    assert labels["rank"] == "0"
    assert [k for k in labels if k.startswith("exported_")] == [], labels
