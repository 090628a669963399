"""`lrwatch stack` starts a real Prometheus, Alertmanager and Pushgateway with the repository's
configs, and stops them on Ctrl-C (SIGINT)."""

from __future__ import annotations

import json
import re
import signal
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter

from services import MetricsHTTPServer, find_binary, http_get, http_request, wait_until

sys.path.insert(0, str(Path(__file__).parent))
from stack_helpers import Proc, lrwatch_cmd  # noqa: E402

pytestmark = [pytest.mark.prometheus, pytest.mark.slow]


def test_stack_starts_loads_configs_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    for b in ("prometheus", "prometheus-alertmanager", "prometheus-pushgateway"):
        find_binary(b)  # skips, naming the package, when one is missing
    registry = CollectorRegistry()
    Counter("lrwatch_training_steps", "steps", registry=registry).inc(3)
    with MetricsHTTPServer(registry) as rank0:
        proc = Proc(lrwatch_cmd("stack", "--prometheus-port", "0", "--alertmanager-port", "0",
                                "--pushgateway-port", "0", "--scrape-interval", "1s",
                                "--training", rank0.address), tmp_path / "stack.log")
        try:
            proc.wait_for_output(r"Ctrl-C", timeout=90)
            out = proc.log()
            urls = dict(re.findall(r"^(prometheus|alertmanager|pushgateway):\s+(\S+)$", out,
                                   re.M))
            assert set(urls) == {"prometheus", "alertmanager", "pushgateway"}, out
            data_dir = Path(re.search(r"^data:\s+(\S+)", out, re.M).group(1))
            assert data_dir.is_dir()
            for url in urls.values():
                assert http_request(url + "/-/ready")[0] == 200
                assert url.startswith("http://127.0.0.1:")
            prom = urls["prometheus"]
            groups = json.loads(http_get(prom + "/api/v1/rules"))["data"]["groups"]
            assert {"lrwatch-training.alerts", "lrwatch-serving.alerts",
                    "lrwatch-health.alerts"} <= {g["name"] for g in groups}
            am_status = json.loads(http_get(urls["alertmanager"] + "/api/v2/status"))
            assert "ml-oncall-pager" in am_status["config"]["original"]

            def scraped() -> bool:
                r = json.loads(http_get(prom + "/api/v1/query?query="
                                        "lrwatch_training_steps_total"))["data"]["result"]
                return bool(r) and r[0]["metric"]["job"] == "lrwatch-training"

            wait_until(scraped, timeout=60, message="the training target scraped")
            targets = json.loads(http_get(prom + "/api/v1/targets"))["data"]["activeTargets"]
            pg = [t for t in targets if t["labels"]["job"] == "lrwatch-pushgateway"]
            assert pg and pg[0]["scrapeUrl"].startswith(urls["pushgateway"])
            am = json.loads(http_get(prom + "/api/v1/alertmanagers"))["data"]
            wait_until(lambda: json.loads(http_get(prom + "/api/v1/alertmanagers"))["data"][
                "activeAlertmanagers"], timeout=30, message="Alertmanager discovered")
            assert am is not None
            proc.proc.send_signal(signal.SIGINT)
            assert proc.proc.wait(timeout=60) == 0, proc.log()
            for url in urls.values():
                with pytest.raises(OSError):
                    http_request(url + "/-/ready", timeout=2)
            assert not data_dir.exists()
        finally:
            proc.stop()


def test_stack_reports_a_taken_port(tmp_path: Path) -> None:
    find_binary("prometheus")
    registry = CollectorRegistry()
    with MetricsHTTPServer(registry) as taken:
        proc = Proc(lrwatch_cmd("stack", "--prometheus-port", str(taken.port),
                                "--alertmanager-port", "0", "--pushgateway-port", "0"),
                    tmp_path / "stack.log")
        try:
            assert proc.proc.wait(timeout=60) == 1
            assert f"port {taken.port} for prometheus is taken" in proc.log()
        finally:
            proc.stop()


def test_two_services_on_one_port_is_a_clear_error(tmp_path: Path) -> None:
    """`--prometheus-port 9091` beside the default Pushgateway: one of the two used to lose the
    port and the error was its log tail; now nothing starts and the error names both options."""
    find_binary("prometheus")
    with MetricsHTTPServer(CollectorRegistry()) as probe:
        port = probe.port          # a port that is free once the probe stops
    proc = Proc(lrwatch_cmd("stack", "--prometheus-port", str(port), "--alertmanager-port", "0",
                            "--pushgateway-port", str(port), "--data-dir",
                            str(tmp_path / "data")), tmp_path / "stack.log")
    try:
        assert proc.proc.wait(timeout=60) == 2   # a usage error (fourteenth round: it was 1)
        assert (f"--pushgateway-port and --prometheus-port are both {port}: give each service "
                "its own port") in proc.log(), proc.log()
        assert not (tmp_path / "data" / "prometheus.log").exists()   # nothing was started
    finally:
        proc.stop()


@pytest.mark.parametrize("args,message", [
    (["--training", "http://127.0.0.1:9400/metrics"],
     "--training 'http://127.0.0.1:9400/metrics' is not HOST:PORT"),
    (["--daemon", "127.0.0.1"], "--daemon '127.0.0.1' is not HOST:PORT"),
    (["--scrape-interval", "5x"], "--scrape-interval '5x' is not a Prometheus duration"),
])
def test_bad_targets_and_intervals_are_refused_before_anything_starts(
        tmp_path: Path, args: list[str], message: str) -> None:
    """The URL `lrwatch demo` prints, a target without a port, an interval Prometheus cannot
    parse: each used to start Alertmanager and the Pushgateway, then fail with Prometheus's
    error about a config file in a directory that was already removed."""
    proc = Proc(lrwatch_cmd("stack", "--prometheus-port", "0", "--alertmanager-port", "0",
                            "--pushgateway-port", "0", "--data-dir", str(tmp_path / "data"),
                            *args), tmp_path / "stack.log")
    try:
        assert proc.proc.wait(timeout=60) == 2   # a usage error, as replay's and lr-find's
        assert message in proc.log(), proc.log()
        assert not (tmp_path / "data" / "alertmanager.log").exists()   # nothing was started
    finally:
        proc.stop()


def test_a_prometheus_config_keeps_its_own_rule_files(tmp_path: Path) -> None:
    """--prometheus-config with rule_files of its own: they are loaded beside lrwatch's rules
    (they were silently replaced by lrwatch's), the shipped ../rules glob once; promtool
    accepts the config the stack writes."""
    import subprocess

    import yaml

    from lrwatch.stack import LocalStack, StackConfig, repo_root

    root = repo_root()
    cfg = yaml.safe_load((root / "exporters" / "prometheus.yml").read_text())
    mine = tmp_path / "my.rules.yml"
    mine.write_text("groups:\n  - name: mine\n    rules:\n"
                    "      - record: job:my_custom:one\n        expr: vector(1)\n")
    cfg["rule_files"] = [str(root / "rules" / "*.rules.yml"), "my.rules.yml"]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg))
    stack = LocalStack(StackConfig(prometheus_config=path,
                                   alertmanager_config=root / "exporters" / "alertmanager.yml",
                                   rules_dir=root / "rules", data_dir=tmp_path / "stack"))
    out = stack.prometheus_yaml(9093, 9091)
    assert out["rule_files"] == [str((root / "rules").resolve() / "*.rules.yml"),
                                 str(mine.resolve())]
    written = tmp_path / "out.yml"
    written.write_text(yaml.safe_dump(out))
    proc = subprocess.run([find_binary("promtool"), "check", "config", str(written)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "my.rules.yml" in proc.stdout and "SUCCESS" in proc.stdout


def test_a_rules_directory_without_rule_files_is_refused(tmp_path: Path) -> None:
    """`--rules DIR` where DIR holds no *.rules.yml (rule files named alerts.yml) started
    Prometheus with no alerting rule and printed `rules: DIR/*.rules.yml`: nothing could
    ever fire."""
    rules = tmp_path / "my-rules"
    rules.mkdir()
    (rules / "alerts.yml").write_text("groups: []\n")
    proc = Proc(lrwatch_cmd("stack", "--prometheus-port", "0", "--alertmanager-port", "0",
                            "--pushgateway-port", "0", "--data-dir", str(tmp_path / "data"),
                            "--rules", str(rules)), tmp_path / "stack.log")
    try:
        assert proc.proc.wait(timeout=60) == 2, proc.log()
        assert f"--rules {rules}: no *.rules.yml file there" in proc.log(), proc.log()
        assert "alerts.yml: name a rule file NAME.rules.yml" in proc.log()
        assert not (tmp_path / "data" / "alertmanager.log").exists()   # nothing was started
    finally:
        proc.stop()
