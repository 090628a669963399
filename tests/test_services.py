"""The test services themselves: real Prometheus, Pushgateway and Alertmanager round trips."""

from __future__ import annotations

import socket
import time

import pytest
from prometheus_client import CollectorRegistry, Gauge, push_to_gateway

from services import (
    AlertmanagerServer,
    PrometheusServer,
    PushgatewayServer,
    QueryError,
    ServiceError,
    promtool_check_metrics,
)

pytestmark = pytest.mark.prometheus


def _gauge_registry(name: str, value: float) -> tuple[CollectorRegistry, Gauge]:
    registry = CollectorRegistry()
    gauge = Gauge(name, "A test gauge.", registry=registry)
    gauge.set(value)
    return registry, gauge


def _port_closed(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) != 0


def test_prometheus_scrapes_a_registry_and_answers_queries(prometheus_factory, serve_registry):
    registry, gauge = _gauge_registry("lrwatch_test_value", 42.5)
    exporter = serve_registry(registry)
    prom = prometheus_factory([exporter.address])

    result = prom.wait_for('lrwatch_test_value{job="lrwatch"}')
    assert len(result) == 1
    assert result[0]["metric"]["instance"] == exporter.address
    assert float(result[0]["value"][1]) == 42.5

    # A later value arrives too: Prometheus keeps scraping, we do not read a stale first sample.
    gauge.set(-3.25)
    result = prom.wait_for(
        "lrwatch_test_value", lambda r: bool(r) and float(r[0]["value"][1]) == -3.25, timeout=15
    )
    assert float(result[0]["value"][1]) == -3.25

    [target] = prom.targets()
    assert target["health"] == "up"
    assert target["labels"]["job"] == "lrwatch"

    series = prom.query_range("lrwatch_test_value", start=time.time() - 60, step=1)
    values = {float(v) for _t, v in series[0]["values"]}
    assert {42.5, -3.25} <= values


def test_prometheus_query_errors_are_raised_with_the_reason(prometheus_factory):
    prom = prometheus_factory([])
    with pytest.raises(QueryError, match="bad_data"):
        prom.query("sum(")
    with pytest.raises(QueryError):
        prom.wait_for("rate(")  # a rejected query fails at once instead of polling to the timeout
    assert prom.query("vector(1)")[0]["value"][1] == "1"


def test_prometheus_wait_for_times_out_with_the_last_result(prometheus_factory):
    prom = prometheus_factory([])
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="does_not_exist"):
        prom.wait_for("does_not_exist", timeout=1)
    assert time.monotonic() - start < 10


def test_prometheus_jobs_dict_and_extra_scrape_configs(prometheus_factory, serve_registry):
    a = serve_registry(_gauge_registry("lrwatch_test_a", 1)[0])
    b = serve_registry(_gauge_registry("lrwatch_test_b", 2)[0])
    c = serve_registry(_gauge_registry("lrwatch_test_c", 3)[0])
    prom = prometheus_factory(
        {"train": [a.address], "serve": [b.address]},
        extra_scrape_configs=[
            {"job_name": "extra", "static_configs": [{"targets": [c.address]}]},
        ],
    )
    up = prom.wait_for("up == 1", lambda r: len(r) == 3)
    assert sorted(s["metric"]["job"] for s in up) == ["extra", "serve", "train"]
    assert prom.query('lrwatch_test_b{job="serve"}')[0]["value"][1] == "2"


def test_prometheus_sends_rule_alerts_to_alertmanager(prometheus_factory, alertmanager, tmp_path):
    rules = tmp_path / "test.rules.yml"
    rules.write_text(
        "groups:\n"
        "- name: lrwatch-test\n"
        "  rules:\n"
        "  - alert: LrwatchTestAlwaysFiring\n"
        "    expr: vector(1)\n"
        "    labels: {severity: info}\n"
        "    annotations: {summary: always firing, description: a test alert}\n"
    )
    prom = prometheus_factory([], rule_files=[rules], alertmanager_url=alertmanager.url)

    firing = prom.wait_for("ALERTS{alertname=\"LrwatchTestAlwaysFiring\",alertstate=\"firing\"}")
    assert firing[0]["metric"]["severity"] == "info"
    assert [a["state"] for a in prom.alerts()] == ["firing"]
    assert prom.rules()[0]["name"] == "lrwatch-test"

    received = alertmanager.wait_for_alerts(filter=['alertname="LrwatchTestAlwaysFiring"'])
    assert received[0]["annotations"]["summary"] == "always firing"
    assert received[0]["labels"]["severity"] == "info"


def test_a_bad_config_fails_with_the_log(tmp_path, capsys):
    prom = PrometheusServer(
        [], extra_scrape_configs=[{"job_name": "x", "no_such_key": 1}], workdir=tmp_path,
        ready_timeout=20,
    )
    with pytest.raises(ServiceError, match="no_such_key") as info:
        prom.start()
    assert "did not become ready" in str(info.value)
    assert "no_such_key" in capsys.readouterr().err  # the whole log is printed for the report
    assert not prom.running()
    prom.stop()  # harmless after a failed start


def test_pushgateway_round_trip(pushgateway):
    registry, _ = _gauge_registry("lrwatch_test_pushed", 12.5)
    push_to_gateway(pushgateway.address, job="svc-test", registry=registry,
                    grouping_key={"run": "r1"}, timeout=5)

    [sample] = pushgateway.samples("lrwatch_test_pushed")
    assert sample.value == 12.5
    assert sample.labels["job"] == "svc-test"
    assert sample.labels["run"] == "r1"
    assert 'lrwatch_test_pushed{instance="",job="svc-test",run="r1"} 12.5' in (
        pushgateway.metrics_text()
    )


def test_alertmanager_round_trip(alertmanager):
    alertmanager.post_alerts([{
        "labels": {"alertname": "LrwatchTestPosted", "severity": "warning"},
        "annotations": {"summary": "posted by a test", "value": "12.3"},
        "generatorURL": "http://127.0.0.1/test",
    }])
    [alert] = alertmanager.wait_for_alerts(filter=['alertname="LrwatchTestPosted"'])
    assert alert["labels"] == {"alertname": "LrwatchTestPosted", "severity": "warning"}
    assert alert["annotations"]["value"] == "12.3"
    assert alert["status"]["state"] in {"active", "unprocessed"}
    assert alertmanager.alerts(filter=['alertname="SomethingElse"']) == []


def test_services_stop_and_free_their_port(tmp_path):
    with PushgatewayServer(workdir=tmp_path / "pg") as pg, \
            AlertmanagerServer(workdir=tmp_path / "am") as am:
        ports = [pg.port, am.port]
        assert pg.running() and am.running()
        assert not any(_port_closed(p) for p in ports)
    assert not pg.running() and not am.running()
    assert all(_port_closed(p) for p in ports)
    assert (tmp_path / "pg" / "pushgateway.log").read_text()  # logs stay for post-mortems


def test_own_workdir_is_removed_at_stop():
    pg = PushgatewayServer().start()
    workdir = pg.workdir
    assert workdir.is_dir()
    pg.stop()
    assert not workdir.exists()


def test_a_missing_binary_skips_with_the_package_name(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no binaries at all
    with pytest.raises(pytest.skip.Exception, match="prometheus-alertmanager") as info:
        AlertmanagerServer(workdir=tmp_path / "am").start()
    assert "apt-get install" in str(info.value)
    with pytest.raises(pytest.skip.Exception, match="'prometheus'"):
        promtool_check_metrics("")


def test_promtool_check_metrics():
    code, output = promtool_check_metrics(
        "# HELP lrwatch_steps_total Steps.\n# TYPE lrwatch_steps_total counter\n"
        "lrwatch_steps_total 3\n"
    )
    assert (code, output.strip()) == (0, "")
    code, output = promtool_check_metrics("# TYPE lrwatch_steps counter\nlrwatch_steps 3\n")
    assert code != 0
    assert '"_total" suffix' in output
    assert "no help text" in output


def test_scrape_targets_are_validated():
    with pytest.raises(ValueError, match="host:port"):
        PrometheusServer(["http://127.0.0.1:1/metrics"])
    with pytest.raises(TypeError):
        PrometheusServer("127.0.0.1:1")
