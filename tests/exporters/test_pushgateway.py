"""End-of-job summaries against a real Pushgateway (``prometheus-pushgateway``)."""

from __future__ import annotations

import logging
import socket
import time

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from lrwatch.errors import ConfigError
from lrwatch.exporters.pushgateway import delete_summary, push_summary
from services import free_port, promtool_check_metrics

pytestmark = pytest.mark.prometheus


def _summary(loss: float = 0.25, steps: int = 1200) -> CollectorRegistry:
    registry = CollectorRegistry()
    Gauge("lrwatch_loss", "Training loss at the end of the run.", registry=registry).set(loss)
    Counter("lrwatch_training_steps", "Optimizer steps taken.", registry=registry).inc(steps)
    return registry


def _errors_counter() -> Counter:
    return Counter("lrwatch_internal_errors", "Monitoring failures.", registry=CollectorRegistry())


def _by_run(pushgateway, name: str) -> dict[str, float]:
    return {s.labels["run"]: s.value for s in pushgateway.samples(name)}


def test_push_reads_back_with_job_and_run_labels(pushgateway):
    assert push_summary(pushgateway.url, _summary(), run="run-7") is True

    [loss] = pushgateway.samples("lrwatch_loss")
    assert loss.value == 0.25
    assert loss.labels == {"job": "lrwatch", "run": "run-7", "instance": ""}
    [steps] = pushgateway.samples("lrwatch_training_steps_total")
    assert steps.value == 1200
    text = pushgateway.metrics_text()
    assert 'lrwatch_loss{instance="",job="lrwatch",run="run-7"} 0.25' in text
    assert 'push_time_seconds{instance="",job="lrwatch",run="run-7"}' in text


def test_pushed_registry_text_is_promtool_clean():
    code, output = promtool_check_metrics(generate_latest(_summary()))
    assert code == 0, output
    assert output.strip() == ""


def test_delete_removes_the_group(pushgateway):
    assert push_summary(pushgateway.url, _summary(), job="nightly", run="r1")
    assert push_summary(pushgateway.url, _summary(loss=0.5), job="nightly", run="r2")
    assert _by_run(pushgateway, "lrwatch_loss") == {"r1": 0.25, "r2": 0.5}

    assert delete_summary(pushgateway.url, job="nightly", run="r1") is True
    assert _by_run(pushgateway, "lrwatch_loss") == {"r2": 0.5}
    assert 'run="r1"' not in pushgateway.metrics_text()  # push_time_seconds went with it
    # Deleting a group that is not there is not an error for the Pushgateway.
    assert delete_summary(pushgateway.url, job="nightly", run="r1") is True


def test_a_second_push_replaces_the_group(pushgateway):
    assert push_summary(pushgateway.url, _summary(loss=3.0), run="r")
    second = CollectorRegistry()
    Gauge("lrwatch_eval_accuracy", "Final evaluation accuracy.", registry=second).set(0.9)
    assert push_summary(pushgateway.url, second, run="r")
    assert pushgateway.samples("lrwatch_loss") == []
    assert [s.value for s in pushgateway.samples("lrwatch_eval_accuracy")] == [0.9]


def test_extra_grouping_and_run_ids_with_slashes(pushgateway):
    run = "sweep/lr=0.1"  # prometheus_client base64-encodes it in the URL
    assert push_summary(pushgateway.address, _summary(), run=run,
                        extra_grouping={"rank": "0"})
    [loss] = pushgateway.samples("lrwatch_loss")
    assert loss.labels == {"job": "lrwatch", "run": run, "rank": "0", "instance": ""}

    # Without the same extra labels the key differs, so nothing is deleted.
    assert delete_summary(pushgateway.url, run=run)
    assert len(pushgateway.samples("lrwatch_loss")) == 1
    assert delete_summary(pushgateway.url, run=run, extra_grouping={"rank": "0"})
    assert pushgateway.samples("lrwatch_loss") == []


def test_unreachable_gateway_fails_open(caplog):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there any more
    errors = _errors_counter()
    caplog.set_level(logging.WARNING, logger="lrwatch")

    assert push_summary(url, _summary(), run="r1", timeout=2, on_error=errors.inc) is False
    assert delete_summary(url, run="r1", timeout=2, on_error=errors.inc) is False

    assert errors._value.get() == 2
    messages = [r.getMessage() for r in caplog.records if r.name == "lrwatch"]
    assert len(messages) == 2
    assert all(url in m and "run=r1" in m for m in messages)
    assert "push" in messages[0] and "delete" in messages[1]


def test_http_error_from_the_gateway_fails_open(pushgateway, caplog):
    # A real 400: the Pushgateway refuses a metric whose type contradicts another group's.
    as_counter = CollectorRegistry()
    Counter("lrwatch_thing", "A thing.", registry=as_counter).inc()
    as_gauge = CollectorRegistry()
    Gauge("lrwatch_thing_total", "A thing.", registry=as_gauge).set(1)
    assert push_summary(pushgateway.url, as_counter, run="a")

    calls = []
    caplog.set_level(logging.WARNING, logger="lrwatch")
    assert push_summary(pushgateway.url, as_gauge, run="b", on_error=lambda: calls.append(1)) \
        is False
    assert calls == [1]
    assert "400" in caplog.text
    assert set(_by_run(pushgateway, "lrwatch_thing_total")) == {"a"}


def test_timeout_is_honoured():
    # A listener that never accepts: the connection hangs, so only the timeout ends the push.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        start = time.monotonic()
        assert push_summary(url, _summary(), run="r", timeout=0.5) is False
        assert time.monotonic() - start < 5


def test_a_failing_on_error_callback_does_not_raise(caplog):
    def broken() -> None:
        raise RuntimeError("counter is gone")

    url = f"http://127.0.0.1:{free_port()}"
    assert push_summary(url, _summary(), run="r", timeout=1, on_error=broken) is False
    assert "on_error callback" in caplog.text


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"run": ""}, "run must be a non-empty string"),
        ({"run": "r", "job": ""}, "job must be a non-empty string"),
        ({"run": "r", "timeout": 0}, "timeout must be a positive"),
        ({"run": "r", "extra_grouping": {"run": "x"}}, "reserved keys: job, run"),
        ({"run": "r", "extra_grouping": {"job": "x"}}, "may not set 'job'"),
        ({"run": "r", "extra_grouping": {"bad-name": "x"}}, "not a valid label name"),
        ({"run": "r", "extra_grouping": {"rank": ""}}, "must be a non-empty string"),
    ],
)
def test_invalid_arguments_raise_before_any_traffic(kwargs, match):
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ConfigError, match=match):
        push_summary(url, _summary(), **kwargs)
    with pytest.raises(ConfigError, match=match):
        delete_summary(url, **kwargs)
