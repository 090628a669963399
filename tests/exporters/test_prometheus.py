"""The training exporter: a clean exposition, a served /metrics, and a taken port that fails open."""

from __future__ import annotations

import logging
import os
import socket
import urllib.request

import pytest
import torch
from torch import nn

import lrwatch
from lrwatch.exporters.prometheus import TrainingExporter
from lrwatch.samples import Sample
from prometheus_client import CollectorRegistry, generate_latest

from flag_rules import flag_rule, write_flag_rules
from services import promtool_check_metrics


def _train(w: lrwatch.Watcher, model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    torch.manual_seed(0)
    for _ in range(steps):
        x = torch.randn(8, 4)
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        w.log(loss=loss, accuracy=0.5, eval_accuracy=0.75)


@pytest.mark.prometheus
def test_served_exposition_is_promtool_clean_and_has_design_names() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD([{"params": model[0].parameters()},
                           {"params": model[2].parameters(), "lr": 0.01}], lr=0.1, momentum=0.9)
    with lrwatch.Watcher(model, opt, port=0, flush_every=2, per_layer=True, update_ratio=True,
                         update_ratio_every=1, batch_size=8, run_name="t1") as w:
        _train(w, model, opt, 4)
        assert w.metrics_url is not None
        text = urllib.request.urlopen(w.metrics_url, timeout=5).read().decode()
    rc, out = promtool_check_metrics(text)
    assert rc == 0 and out.strip() == "", out
    for name in ("lrwatch_learning_rate{param_group=\"0\"} 0.1",
                 "lrwatch_learning_rate{param_group=\"1\"} 0.01",
                 "lrwatch_loss ", "lrwatch_grad_norm ", "lrwatch_update_ratio ",
                 "lrwatch_accuracy 0.5", "lrwatch_eval_accuracy 0.75",
                 "lrwatch_training_steps_total 4.0", "lrwatch_step 4.0",
                 "lrwatch_rollbacks_total 0.0", "lrwatch_nonfinite_steps_total 0.0",
                 "lrwatch_internal_errors_total 0.0", "lrwatch_build_info{",
                 'lrwatch_run_info{model="Sequential",optimizer="SGD",run="t1"',
                 'lrwatch_layer_grad_norm{layer="0"}', "lrwatch_step_grad_norm_bucket{",
                 "lrwatch_step_loss_count 4.0", "lrwatch_samples_per_second ",
                 'lrwatch_momentum{param_group="0"} 0.9'):
        assert name in text, name


def test_unmeasured_gauges_are_absent_not_zero() -> None:
    exp = TrainingExporter(CollectorRegistry())
    text = generate_latest(exp.registry).decode()
    assert "lrwatch_eval_accuracy " not in text and "lrwatch_loss " not in text
    assert "lrwatch_training_steps_total 0.0" in text


def test_unmeasured_layers_are_absent_not_zero() -> None:
    """Per-layer norms that were never measured (sharded parameters have none, and nothing is
    measured before the first flush) are not exported as a gradient norm of 0."""
    exp = TrainingExporter(CollectorRegistry(), layer_labels=["encoder", "decoder"])
    assert "lrwatch_layer_grad_norm{" not in generate_latest(exp.registry).decode()
    exp.observe([Sample(step=1, values={"grad_norm": 2.0, "grad_norm/encoder": 1.5})])
    exp.observe([Sample(step=2, values={"grad_norm": 2.0})])   # a step without per-layer norms
    text = generate_latest(exp.registry).decode()
    assert 'lrwatch_layer_grad_norm{layer="encoder"} 1.5' in text
    assert 'layer="decoder"' not in text


def test_flush_interval_is_the_step_time_between_flushes() -> None:
    """LrwatchTrainingStalled waits three of these: absent after one flush, then the time
    between the last steps of the last two flushes."""
    exp = TrainingExporter(CollectorRegistry())
    exp.observe([Sample(step=s, time=1000.0 + 40 * s, values={}) for s in range(1, 26)])
    assert exp.registry.get_sample_value("lrwatch_flush_interval_seconds") is None
    exp.observe([Sample(step=s, time=1000.0 + 40 * s, values={}) for s in range(26, 51)])
    assert exp.registry.get_sample_value("lrwatch_flush_interval_seconds") == 1000.0
    exp.observe([Sample(step=51, time=None, values={})])   # a step without a time: kept
    assert exp.registry.get_sample_value("lrwatch_flush_interval_seconds") == 1000.0
    rc, out = promtool_check_metrics(generate_latest(exp.registry))
    assert rc == 0 and out.strip() == "", out


def test_taken_port_warns_counts_and_training_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    port = blocker.getsockname()[1]
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        with caplog.at_level(logging.WARNING, logger="lrwatch"):
            w = lrwatch.Watcher(model, opt, port=port)
        assert w.metrics_url is None
        assert "cannot serve /metrics" in caplog.text
        assert "port=0 for a free one" in caplog.text   # the warning says what to do
        _train(w, model, opt, 3)
        w.close()
        assert w.step == 3
        text = generate_latest(w.registry).decode()
        assert "lrwatch_internal_errors_total 1.0" in text
        assert "lrwatch_training_steps_total 3.0" in text
    finally:
        blocker.close()


def test_two_watchers_keep_separate_registries() -> None:
    a_model, b_model = nn.Linear(4, 2), nn.Linear(4, 2)
    a_opt = torch.optim.SGD(a_model.parameters(), lr=0.1)
    b_opt = torch.optim.SGD(b_model.parameters(), lr=0.2)
    with lrwatch.Watcher(a_model, a_opt) as a, lrwatch.Watcher(b_model, b_opt) as b:
        _train(a, a_model, a_opt, 2)
        _train(b, b_model, b_opt, 5)
    assert "lrwatch_training_steps_total 2.0" in generate_latest(a.registry).decode()
    assert "lrwatch_training_steps_total 5.0" in generate_latest(b.registry).decode()


@pytest.mark.prometheus
def test_watcher_pushes_end_of_job_summary(pushgateway) -> None:  # type: ignore[no-untyped-def]
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with lrwatch.Watcher(model, opt, pushgateway=pushgateway.url, run_name="batch-7") as w:
        _train(w, model, opt, 6)
    text = pushgateway.metrics_text()
    line = [ln for ln in text.splitlines() if ln.startswith("lrwatch_training_steps_total{")]
    assert line and 'job="lrwatch"' in line[0] and 'run="batch-7"' in line[0]
    assert line[0].endswith(" 6")


def test_unreachable_pushgateway_fails_open() -> None:
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with lrwatch.Watcher(model, opt, pushgateway=f"http://127.0.0.1:{port}") as w:
        _train(w, model, opt, 2)
    assert "lrwatch_internal_errors_total 1.0" in generate_latest(w.registry).decode()


@pytest.mark.prometheus
def test_the_untrained_loss_is_a_gauge_that_stays_after_step_1() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 4, generator=g), torch.randint(0, 2, (8,), generator=g))
               for _ in range(12)]

    def loss_of(m: nn.Module, b: tuple) -> torch.Tensor:
        return nn.functional.cross_entropy(m(b[0]), b[1])

    with lrwatch.Watcher(model, opt, port=0, flush_every=5, probe_loss=loss_of,
                         untrained_batches=4) as w:
        with torch.no_grad():
            want = sorted(float(loss_of(model, b)) for b in batches[:4])
        for b in w.batches(batches):
            opt.zero_grad()
            loss = loss_of(model, b)
            loss.backward()
            opt.step()
            w.log(loss=loss)
        w.flush()
        assert w.metrics_url is not None
        text = urllib.request.urlopen(w.metrics_url, timeout=5).read().decode()
    rc, out = promtool_check_metrics(text)
    assert rc == 0 and out.strip() == "", out
    line = next(x for x in text.splitlines() if x.startswith("lrwatch_untrained_loss "))
    assert float(line.split()[1]) == pytest.approx((want[1] + want[2]) / 2, rel=1e-5)
    # the constant-prediction loss, kept after step 1: predicting the pooled class frequencies
    # of the 4 batches, the median of their cross-entropies (mean of the middle two)
    ys = torch.cat([b[1] for b in batches[:4]])
    logp = torch.log(torch.bincount(ys, minlength=2).float() / len(ys))
    each = sorted(float(-logp[b[1]].mean()) for b in batches[:4])
    line = next(x for x in text.splitlines() if x.startswith("lrwatch_constant_loss "))
    assert float(line.split()[1]) == pytest.approx((each[1] + each[2]) / 2, abs=1e-4)


def test_runs_one_after_another_share_a_registry() -> None:
    """A sweep in one process on one registry (the global REGISTRY, say): each Watcher's
    metrics, its alert sender's and its hook's make way once it is closed (the second run
    raised DuplicateTimeseries); two open at once is an error that says what to do."""
    from lrwatch.errors import ConfigError

    registry = CollectorRegistry()
    for run in range(2):
        model = nn.Linear(4, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        w = lrwatch.Watcher(model, opt, registry=registry, run_name=f"sweep-{run}",
                            alertmanager="http://127.0.0.1:9", hook=["true"])
        for _ in range(3):
            opt.zero_grad()
            loss = model(torch.randn(8, 4)).pow(2).mean()
            loss.backward()
            opt.step()
            w.log(loss=loss)
        w.close()
        assert registry.get_sample_value("lrwatch_step") == 3   # this run's, kept after close
        info = [s for m in registry.collect() if m.name == "lrwatch_run"
                for s in m.samples]
        assert [s.labels["run"] for s in info] == [f"sweep-{run}"]
    w = lrwatch.Watcher(model, opt, registry=registry)
    with pytest.raises(ConfigError, match="still open"):
        lrwatch.Watcher(model, opt, registry=registry)
    w.close()


def test_momentum_of_many_parameter_groups_keeps_its_group() -> None:
    """Eleven or more groups: the momentum/<g> keys were sorted as text (10 before 2)."""
    registry = CollectorRegistry()
    params = [nn.Parameter(torch.randn(2)) for _ in range(12)]
    opt = torch.optim.Adam([{"params": [p], "betas": (0.5 + 0.04 * g, 0.999)}
                            for g, p in enumerate(params)], lr=0.01)
    w = lrwatch.Watcher(nn.ParameterList(params), opt, registry=registry, recovery=False)
    for _ in range(2):
        opt.zero_grad()
        sum(p.sum() for p in params).backward()
        opt.step()
        w.log(loss=torch.tensor(1.0))
    w.close()
    for g in range(12):
        got = registry.get_sample_value("lrwatch_momentum", {"param_group": str(g)})
        assert got == pytest.approx(0.5 + 0.04 * g)




def _scrape_firing(url: str) -> dict[str, float]:
    from services import http_get

    text = http_get(url).decode()
    return {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
            if ln.startswith(("lrwatch_rule_firing{", "lrwatch_firings_total{"))}


def test_a_closed_watcher_fires_no_rule_on_a_registry_still_served(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A process that serves its registry itself (``registry=``, its own server) goes on
    serving after the run: the last run's ``lrwatch_rule_firing`` stayed at 1, and
    LrwatchRuleFiringCritical paged for a finished run. At close every firing gauge is 0;
    the count of firings stays."""
    from lrwatch.exporters.prometheus import MetricsServer

    rules = write_flag_rules(tmp_path / "rules.yml", flag_rule("signal_high", "signal", ()))
    registry = CollectorRegistry()
    server = MetricsServer(registry, 0)
    try:
        model = nn.Linear(4, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        w = lrwatch.Watcher(model, opt, registry=registry, rules=str(rules), flush_every=1,
                            recovery=False, run_name="served")
        for _ in range(4):
            opt.zero_grad()
            loss = model(torch.randn(8, 4)).pow(2).mean()
            loss.backward()
            opt.step()
            w.log(loss=loss, signal=1.0)
        firing = 'lrwatch_rule_firing{rule="signal_high",severity="critical"}'
        count = 'lrwatch_firings_total{rule="signal_high",severity="critical"}'
        assert _scrape_firing(server.url) == {firing: 1.0, count: 1.0}
        w.close()
        assert _scrape_firing(server.url) == {firing: 0.0, count: 1.0}
    finally:
        server.close()


def test_alerts_sent_is_exported_at_zero_without_sinks() -> None:
    """A Watcher without alert sinks served no ``lrwatch_alerts_sent_total`` (an engine family
    of DESIGN.md): it is 0, without a ``sink`` label; a later run on the same registry with a
    sink exports that sink's series instead."""
    from services import http_get

    registry = CollectorRegistry()
    for alertmanager, want in ((None, ["lrwatch_alerts_sent_total 0.0"]),
                               ("http://127.0.0.1:9",
                                ['lrwatch_alerts_sent_total{sink="alertmanager"} 0.0'])):
        model = nn.Linear(4, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with lrwatch.Watcher(model, opt, registry=registry, port=0, flush_every=1,
                             alertmanager=alertmanager) as w:
            _train(w, model, opt, 2)
            assert w.metrics_url is not None
            text = http_get(w.metrics_url).decode()
        assert [ln for ln in text.splitlines()
                if ln.startswith("lrwatch_alerts_sent_total")] == want


def test_a_run_name_that_is_not_text_is_refused_at_once() -> None:
    """``run_name=42`` was taken: every /metrics scrape then failed with HTTP 500 (an int
    label value of lrwatch_run_info), and with a Pushgateway ``close()`` raised after the run,
    leaving the server up. Now the Watcher refuses it when built, saying what to pass; text
    of any kind (quotes, a newline, unicode) goes through escaped and promtool-clean."""
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for bad in (42, b"run", ("a",)):
        with pytest.raises(lrwatch.ConfigError, match="run_name must be a string"):
            lrwatch.Watcher(model, opt, run_name=bad, port=0)  # type: ignore[arg-type]
    with pytest.raises(lrwatch.ConfigError, match="pushgateway must be the URL"):
        lrwatch.Watcher(model, opt, pushgateway=9091)  # type: ignore[arg-type]
    with lrwatch.Watcher(model, opt, port=0, run_name='a "quoted"\nrun ü') as w:
        _train(w, model, opt, 2)
        text = urllib.request.urlopen(w.metrics_url, timeout=5).read().decode()
    assert 'run="a \\"quoted\\"\\nrun ü"' in text
    rc, out = promtool_check_metrics(text)
    assert rc == 0 and out.strip() == "", out


def test_an_evaluation_on_a_step_that_ends_no_flush_reaches_metrics() -> None:
    """An evaluation logged on a step inside a flush (every epoch of 391 steps with
    flush_every=25) reaches /metrics at that flush: the gauges took the flush's last sample
    only, so lrwatch_eval_accuracy stayed absent (or at an older evaluation) for the run."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with lrwatch.Watcher(model, opt, port=0, flush_every=5, run_name="eval-mid") as w:
        assert w.metrics_url is not None
        for step in range(1, 11):
            opt.zero_grad()
            loss = model(torch.randn(8, 4)).pow(2).mean()
            loss.backward()
            opt.step()
            extra = {"eval_accuracy": 0.75, "eval_loss": 0.5} if step == 3 else {}
            if step == 8:
                extra = {"eval_accuracy": 0.8, "accuracy": 0.6}
            w.log(loss=loss, **extra)
            if step == 5:   # the first flush is done: step 3's evaluation is exported
                text = urllib.request.urlopen(w.metrics_url, timeout=5).read().decode()
                assert "lrwatch_step 5.0" in text
                assert "lrwatch_eval_accuracy 0.75" in text, text
                assert "lrwatch_eval_loss 0.5" in text
        text = urllib.request.urlopen(w.metrics_url, timeout=5).read().decode()
    assert "lrwatch_step 10.0" in text
    assert "lrwatch_eval_accuracy 0.8" in text and "lrwatch_accuracy 0.6" in text
    assert "lrwatch_eval_loss 0.5" in text    # not measured since: its last value stays


@pytest.mark.prometheus
def test_summaries_with_and_without_alert_sinks_are_one_family(pushgateway) -> None:  # type: ignore[no-untyped-def]
    """A run without alert sinks and one with an Alertmanager push lrwatch_alerts_sent_total
    with one HELP: two made the Pushgateway log "inconsistent help strings ... This is bad.
    Fix your pushed metrics!" at every push after the second."""
    for run, kwargs in (("no-sinks", {}), ("with-sink", {"alertmanager": "http://127.0.0.1:9"}),
                        ("no-sinks-2", {})):
        model = nn.Linear(4, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with lrwatch.Watcher(model, opt, pushgateway=pushgateway.url, run_name=run,
                             rules=None, **kwargs) as w:
            _train(w, model, opt, 2)
        assert w.registry.get_sample_value("lrwatch_internal_errors_total") == 0.0
    text = pushgateway.metrics_text()
    assert 'lrwatch_alerts_sent_total{instance="",job="lrwatch",run="no-sinks"} 0' in text
    assert 'run="with-sink",sink="alertmanager"} 0' in text
    assert "inconsistent help" not in pushgateway.read_log()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not hasattr(os, "register_at_fork"), reason="needs fork")
def test_a_forked_dataloader_worker_does_not_keep_the_metrics_port() -> None:
    """Persistent DataLoader workers forked while a Watcher served /metrics kept its
    listening socket: after close() the port stayed taken, so the next Watcher on it (the
    next run of a sweep in this process) could not serve, and scrapes of it hung."""
    from torch.utils.data import DataLoader, TensorDataset

    port = _free_port()
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(TensorDataset(torch.randn(32, 4)), batch_size=8, num_workers=1,
                        persistent_workers=True, multiprocessing_context="fork")
    with lrwatch.Watcher(model, opt, port=port, rules=None) as w:
        assert w.metrics_url is not None
        for (x,) in loader:   # the worker is forked now, and stays
            opt.zero_grad()
            loss = model(x).pow(2).mean()
            loss.backward()
            opt.step()
            w.log(loss=loss)
    assert any(p.is_alive() for p in loader._iterator._workers)   # still there
    with lrwatch.Watcher(model, opt, port=port, rules=None, run_name="next") as w2:
        assert w2.metrics_url == f"http://127.0.0.1:{port}/metrics"
        text = urllib.request.urlopen(w2.metrics_url, timeout=5).read().decode()
        assert 'run="next"' in text
    del loader


def test_a_port_past_65535_fails_open(caplog: pytest.LogCaptureFixture) -> None:
    """Under export="all" rank r serves on port + r: port=65535 put rank 1 on 65536, and
    bind()'s OverflowError (not an OSError) crashed that rank's Watcher at construction."""
    from lrwatch.exporters.prometheus import start_metrics_server

    errors: list[int] = []
    with caplog.at_level(logging.WARNING, logger="lrwatch"):
        server = start_metrics_server(CollectorRegistry(), 65535 + 1,
                                      on_error=lambda: errors.append(1))
    assert server is None and errors == [1]
    assert "cannot serve /metrics on 127.0.0.1:65536" in caplog.text
    assert "port=0 for a free one" in caplog.text


def test_steps_per_second_is_the_rate_between_the_last_two_flushes() -> None:
    """What the dashboards' step rate reads: the rate of lrwatch_training_steps_total over a
    minute is 0 between flushes further apart than that."""
    exp = TrainingExporter(CollectorRegistry())
    exp.observe([Sample(step=s, time=1000.0 + 40 * s, values={}) for s in range(1, 26)])
    assert exp.registry.get_sample_value("lrwatch_steps_per_second") is None
    exp.observe([Sample(step=s, time=1000.0 + 40 * s, values={}) for s in range(26, 51)])
    assert exp.registry.get_sample_value("lrwatch_steps_per_second") == 25 / 1000
    exp.observe([Sample(step=s, time=3000.0 + 60 * (s - 50), values={}) for s in range(51, 61)])
    assert exp.registry.get_sample_value("lrwatch_steps_per_second") == 10 / 600
    rc, out = promtool_check_metrics(generate_latest(exp.registry))
    assert rc == 0 and out.strip() == "", out
