"""`lrwatch stack` only alerts on targets that were declared or that came up: the example
config's default daemon target, which nobody started, never counts as an exporter down; a
declared one that is down does. Checked on a real Prometheus started by LocalStack, with the
real rules/lrwatch-health.rules.yml expression."""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml

from lrwatch.stack import OPTIONAL_LABEL, LocalStack, StackConfig, repo_root
from services import find_binary, free_port, http_get, wait_until

pytestmark = [pytest.mark.prometheus, pytest.mark.slow]


def _exporter_down_expr() -> str:
    rules = yaml.safe_load((repo_root() / "rules" / "lrwatch-health.rules.yml").read_text())
    (rule,) = [r for g in rules["groups"] for r in g["rules"]
               if r.get("alert") == "LrwatchExporterDown"]
    return str(rule["expr"])


def _query(prom: str, q: str) -> list[dict[str, Any]]:
    body = http_get(f"{prom}/api/v1/query?query={urllib.parse.quote(q)}")
    return json.loads(body)["data"]["result"]


def _start(tmp_path: Path, **kw: Any) -> LocalStack:
    for b in ("prometheus", "prometheus-alertmanager", "prometheus-pushgateway"):
        find_binary(b)
    cfg = StackConfig.from_repo(prometheus_port=0, alertmanager_port=0, pushgateway_port=0,
                                scrape_interval="1s", data_dir=tmp_path / "stack", **kw)
    return LocalStack(cfg).start()


def test_undeclared_default_daemon_is_optional_and_never_down(tmp_path: Path) -> None:
    stack = _start(tmp_path)
    try:
        prom = stack.urls["prometheus"]
        wait_until(lambda: len(_query(prom, 'up{job="lrwatch-daemon"}')) == 1, timeout=60,
                   message="the default daemon target scraped")
        (daemon,) = _query(prom, 'up{job="lrwatch-daemon"}')
        assert daemon["metric"][OPTIONAL_LABEL] == "true"
        if daemon["value"][1] == "1":
            pytest.skip("something listens on the default daemon port 9410")
        # The pushgateway the stack started is not optional: it was started. (Targets are
        # scraped at their own offsets: wait for its first scrape too.)
        wait_until(lambda: len(_query(prom, 'up{job="lrwatch-pushgateway"}')) == 1,
                   timeout=60, message="the pushgateway target scraped")
        (pg,) = _query(prom, 'up{job="lrwatch-pushgateway"}')
        assert OPTIONAL_LABEL not in pg["metric"]
        down = _query(prom, _exporter_down_expr())
        assert [d for d in down if d["metric"]["job"] == "lrwatch-daemon"] == [], down
    finally:
        stack.stop()


def test_declared_daemon_that_is_down_counts(tmp_path: Path) -> None:
    dead = f"127.0.0.1:{free_port()}"   # declared, but nothing listens there
    stack = _start(tmp_path, daemon_targets=[dead])
    try:
        prom = stack.urls["prometheus"]
        wait_until(lambda: len(_query(prom, 'up{job="lrwatch-daemon"}')) == 1, timeout=60,
                   message="the declared daemon target scraped")
        down = _query(prom, _exporter_down_expr())
        hits = [d["metric"] for d in down if d["metric"]["job"] == "lrwatch-daemon"]
        assert hits and hits[0]["instance"] == dead and OPTIONAL_LABEL not in hits[0], down
    finally:
        stack.stop()
