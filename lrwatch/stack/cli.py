"""``lrwatch stack`` and ``lrwatch dashboards generate``: formatting only; the logic lives in
:mod:`lrwatch.stack.local` and :mod:`lrwatch.stack.grafana`."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import click

from .._cli_help import examples
from ..errors import LrwatchError

__all__ = ["stack_command", "dashboards_group"]


@click.command("stack", epilog=examples(
    "lrwatch stack",
    "lrwatch stack --training 127.0.0.1:9400 --scrape-interval 5s --data-dir stack-data"))
@click.option("--prometheus-port", type=click.IntRange(0, 65535), default=9090,
              show_default=True, help="Prometheus port on 127.0.0.1 (0: any free one).")
@click.option("--alertmanager-port", type=click.IntRange(0, 65535), default=9093,
              show_default=True, help="Alertmanager port (0: any free one).")
@click.option("--pushgateway-port", type=click.IntRange(0, 65535), default=9091,
              show_default=True, help="Pushgateway port (0: any free one).")
@click.option("--no-pushgateway", is_flag=True, help="Do not start a Pushgateway.")
@click.option("--training", "training", multiple=True, metavar="HOST:PORT",
              help="Scrape this training rank (repeatable) instead of the config's static "
                   "targets (its file_sd lists stay).")
@click.option("--daemon", "daemon", multiple=True, metavar="HOST:PORT",
              help="Scrape this `lrwatch daemon` (repeatable) instead of the config's static "
                   "targets (its file_sd lists stay).")
@click.option("--scrape-interval", default=None, metavar="DURATION",
              help="Scrape and rule-evaluation interval, e.g. 5s [default: the config's].")
@click.option("--prometheus-config", type=click.Path(exists=True, dir_okay=False),
              help="Prometheus config [default: exporters/prometheus.yml].")
@click.option("--alertmanager-config", type=click.Path(exists=True, dir_okay=False),
              help="Alertmanager config [default: exporters/alertmanager.yml].")
@click.option("--rules", "rules_dir", type=click.Path(exists=True, file_okay=False),
              help="Directory of *.rules.yml [default: rules/].")
@click.option("--data-dir", type=click.Path(file_okay=False),
              help="Keep the services' data and logs here [default: a temporary directory, "
                   "removed at exit].")
def stack_command(prometheus_port: int, alertmanager_port: int, pushgateway_port: int,
                  no_pushgateway: bool, training: tuple[str, ...], daemon: tuple[str, ...],
                  scrape_interval: str | None, prometheus_config: str | None,
                  alertmanager_config: str | None, rules_dir: str | None,
                  data_dir: str | None) -> None:
    """Run a local Prometheus, Alertmanager and Pushgateway with lrwatch's configs.

    They bind to 127.0.0.1 and run until Ctrl-C. Prometheus loads rules/*.rules.yml and scrapes
    the jobs of exporters/prometheus.yml (a training rank on :9400, a daemon on :9410, the
    Pushgateway); point Grafana at the printed Prometheus URL and provision grafana/.
    """
    from .local import LocalStack, check_distinct_ports, check_stack_options

    try:   # the options themselves: a usage error (exit 2), as replay's and lr-find's are
        check_stack_options(training, daemon, scrape_interval, rules_dir)
        check_distinct_ports({"alertmanager": alertmanager_port,
                              "pushgateway": None if no_pushgateway else pushgateway_port,
                              "prometheus": prometheus_port})
    except LrwatchError as exc:
        raise click.UsageError(str(exc)) from exc
    try:
        cfg = _stack_config(prometheus_port, alertmanager_port, pushgateway_port,
                            no_pushgateway, training, daemon, scrape_interval,
                            prometheus_config, alertmanager_config, rules_dir, data_dir)
        stack = LocalStack(cfg)
    except LrwatchError as exc:
        raise click.ClickException(str(exc)) from exc
    except OSError as exc:   # a --data-dir that cannot be made
        raise click.ClickException(f"cannot use --data-dir {data_dir}: "
                                   f"{exc.strerror or exc}") from exc

    stop = threading.Event()

    def _term(signum: int, frame: object) -> None:
        stop.set()

    old = {s: signal.signal(s, _term) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            stack.start()
        except LrwatchError as exc:
            raise click.ClickException(str(exc)) from exc
        for name, url in stack.urls.items():
            click.echo(f"{name + ':':14s}{url}")
        click.echo(f"{'rules:':14s}{Path(cfg.rules_dir).resolve()}/*.rules.yml")
        click.echo(f"{'data:':14s}{stack.workdir}"
                   f"{'' if data_dir else ' (removed at exit)'}")
        click.echo("Ctrl-C stops them.", err=True)
        while not stop.wait(1.0):
            dead = stack.failed()
            if dead:
                raise click.ClickException(f"{', '.join(dead)} exited; logs in {stack.workdir}")
        click.echo("stopping", err=True)
    finally:
        stack.stop()
        for s, h in old.items():
            signal.signal(s, h)


@click.group("dashboards")
def dashboards_group() -> None:
    """The Grafana dashboards (generated from lrwatch/stack/grafana.py)."""


@dashboards_group.command("generate", epilog=examples(
    "lrwatch dashboards generate",
    "lrwatch dashboards generate --check     # in CI: exit 1 if grafana/dashboards is stale"))
@click.option("--out", "out", type=click.Path(file_okay=False), default="grafana/dashboards",
              show_default=True, help="Directory to write the dashboard JSON files into.")
@click.option("--check", is_flag=True,
              help="Write nothing; exit 1 if the files in --out differ from the generated ones.")
def dashboards_generate(out: str, check: bool) -> None:
    """Write lrwatch-training.json and lrwatch-serving.json (stable uids, `datasource`, `job`
    and `instance` variables)."""
    from .grafana import check_dashboards, write_dashboards

    if check:
        if not Path(out).is_dir():   # run from elsewhere than the repository root
            raise click.ClickException(f"{out} is not a directory (from {Path.cwd()}): pass "
                                       "--out with the directory that holds the dashboards")
        stale = check_dashboards(out)
        if stale:
            raise click.ClickException(f"out of date in {out}: {', '.join(stale)}; run "
                                       f"`lrwatch dashboards generate --out {out}`")
        click.echo(f"{out}: up to date")
        return
    try:
        written = write_dashboards(out)
    except OSError as exc:
        raise click.ClickException(f"cannot write the dashboards into {out}: "
                                   f"{exc.strerror or exc}") from exc
    for p in written:
        click.echo(str(p))


def _stack_config(prometheus_port: int, alertmanager_port: int, pushgateway_port: int,
                  no_pushgateway: bool, training: tuple[str, ...], daemon: tuple[str, ...],
                  scrape_interval: str | None, prometheus_config: str | None,
                  alertmanager_config: str | None, rules_dir: str | None,
                  data_dir: str | None) -> Any:
    """The StackConfig of the command's options: the repository's files unless all three are
    given (a Prometheus config of your own declares its own targets)."""
    from .local import StackConfig

    kw = dict(prometheus_port=prometheus_port, alertmanager_port=alertmanager_port,
              pushgateway_port=pushgateway_port, pushgateway=not no_pushgateway,
              training_targets=training, daemon_targets=daemon,
              scrape_interval=scrape_interval,
              data_dir=Path(data_dir) if data_dir else None)
    if prometheus_config and alertmanager_config and rules_dir:
        return StackConfig(prometheus_config=Path(prometheus_config),
                           alertmanager_config=Path(alertmanager_config),
                           rules_dir=Path(rules_dir), **kw)  # type: ignore[arg-type]
    cfg = StackConfig.from_repo(**kw)  # type: ignore[arg-type]
    if prometheus_config:
        cfg.prometheus_config = Path(prometheus_config)
        cfg.optional_defaults = False  # a config of your own declares its targets
    if alertmanager_config:
        cfg.alertmanager_config = Path(alertmanager_config)
    if rules_dir:
        cfg.rules_dir = Path(rules_dir)
    return cfg
