"""``lrwatch daemon`` and ``lrwatch baseline build``: formatting only; logic lives elsewhere."""

from __future__ import annotations

import gc
import logging
import signal
import sys
import threading

import click

from .._cli_help import examples
from ..errors import LrwatchError

__all__ = ["daemon_command", "baseline_group"]


@click.command("daemon", epilog=examples(
    "lrwatch daemon --reference reference.json --state-dir /var/lib/lrwatch",
    "lrwatch daemon --config lrwatch.yml",
    "lrwatch daemon --live-reference 5000 --tail predictions.jsonl --rules serving --rules my-rules.yml"))
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
              help="YAML config file (see docs/daemon.md).")
@click.option("--host", help="Address to bind (default 127.0.0.1).")
@click.option("--port", type=click.IntRange(0, 65535), help="Port (default 9410; 0: any).")
@click.option("--reference", type=click.Path(dir_okay=False),
              help="Reference profile from `lrwatch baseline build`.")
@click.option("--live-reference", type=click.IntRange(10), default=None,
              help="Without --reference: build it from the first N live records (default 5000).")
@click.option("--window-size", type=click.IntRange(10),
              help="Records per window (default 1000).")
@click.option("--window-seconds", type=click.FloatRange(min=0, min_open=True),
              help="Time windows of this many seconds instead of counts (default: counts).")
@click.option("--target-windows", type=click.FloatRange(min=1, min_open=True),
              help="One false drift alarm per this many windows (default 1000).")
@click.option("--label-horizon", type=click.FloatRange(min=0, min_open=True),
              help="H of the label coverage: the share of predictions made 2H to H ago that "
                   "got a label (seconds, default 3600).")
@click.option("--state-dir", type=click.Path(file_okay=False),
              help="Where snapshots and the journal live (durability; default: none, nothing "
                   "survives a restart).")
@click.option("--tail", "tail", multiple=True, type=click.Path(dir_okay=False),
              help="JSONL file to follow (repeatable).")
@click.option("--rules", multiple=True,
              help="Rule file or pack name (default: the serving pack); repeatable: joined "
                   "in order as layers, e.g. --rules serving --rules my-rules.yml.")
@click.option("--alertmanager", multiple=True, help="Alertmanager URL (repeatable).")
@click.option("--token-file", type=click.Path(exists=True, dir_okay=False),
              help="File holding the bearer token clients must send.")
@click.option("-v", "--verbose", is_flag=True, help="Log at INFO level.")
def daemon_command(config_path: str | None, host: str | None, port: int | None,
                   reference: str | None, live_reference: int | None, window_size: int | None,
                   window_seconds: float | None, target_windows: float | None,
                   label_horizon: float | None, state_dir: str | None, tail: tuple[str, ...], rules: tuple[str, ...],
                   alertmanager: tuple[str, ...], token_file: str | None, verbose: bool) -> None:
    """Watch a model in production: drift, accuracy from delayed labels, alerts, hooks.

    Serves POST /v1/predictions, POST /v1/labels, GET /metrics, /healthz and /v1/status.
    The options override the --config file's settings; every setting is in docs/daemon.md.
    SIGTERM, SIGINT and SIGHUP stop it cleanly (the queue drained, a last snapshot written,
    exit 0; under nohup SIGHUP stays ignored); nothing is reloaded: restart it to read a
    changed config or reference.
    """
    from .config import DaemonConfig, read_token_file
    from .core import Daemon
    from .server import DaemonServer
    from .sources import FileTailer

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Ingest allocates a dict per record; the default gen-0 threshold (700) runs the cyclic
    # collector every few hundred records (~10% of ingest time). This is the daemon's own
    # process, so tuning it here touches no library user.
    gc.set_threshold(50_000, 20, 100)
    try:
        cfg = DaemonConfig.load(config_path) if config_path else DaemonConfig()
        token = read_token_file(token_file) if token_file is not None else None
        cfg = cfg.replace(host=host, port=port, reference=reference,
                          live_records=live_reference, window_size=window_size,
                          window_seconds=window_seconds, target_windows=target_windows,
                          label_horizon_seconds=label_horizon, state_dir=state_dir, tail=list(tail) or None, rules=list(rules) or None,
                          alertmanager=list(alertmanager) or None, token=token)
        d = Daemon(cfg)
        d.tailers = [FileTailer(d, p, cfg.tail_poll) for p in cfg.tail]
        server = DaemonServer(d)
    except (LrwatchError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    d.start()
    host_, port_ = server.address
    click.echo(f"lrwatch daemon listening on http://{host_}:{port_} "
               f"(reference: {'loaded' if d.reference else 'from the first %d records' % cfg.live_records})",
               err=True)
    stop, got = _stop_on_signals()
    server.start()
    stop.wait()
    click.echo(f"stopping ({got[0] if got else 'signal'}): draining the queue and writing "
               f"a snapshot", err=True)
    server.stop()
    d.stop()
    sys.exit(0)


def _stop_on_signals() -> tuple[threading.Event, list[str]]:
    """An event set by SIGTERM, SIGINT or SIGHUP, and the list their names go to.

    SIGHUP too (its terminal closed, a `kill -HUP` meant as a reload): Python's default
    ended the process with no drain and no last snapshot. Nothing is reloaded. Under
    `nohup` (SIGHUP ignored when started) it stays ignored."""
    stop = threading.Event()
    got: list[str] = []

    def _term(signum: int, frame: object) -> None:
        got.append(signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        if not (sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN):
            signal.signal(sig, _term)
    return stop, got


@click.group("baseline")
def baseline_group() -> None:
    """Reference profiles for `lrwatch daemon`."""


@baseline_group.command("build", epilog=examples(
    "lrwatch baseline build reference.jsonl -o reference.json",
    "lrwatch baseline build reference.csv -o reference.json --window-size 500 --kind zip=categorical"))
@click.argument("data", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Where to write the reference JSON.")
@click.option("--window-size", type=click.IntRange(10), default=1000, show_default=True,
              help="Window size the thresholds are calibrated for.")
@click.option("--target-windows", type=click.FloatRange(min=1, min_open=True), default=1000.0,
              show_default=True, help="One false alarm per this many windows.")
@click.option("--kind", "kinds", multiple=True, metavar="FEATURE=KIND",
              help="Force a feature's kind: numeric, categorical or binary (repeatable).")
@click.option("--sims", type=click.IntRange(100), default=None,
              help="Resamples for calibration (default 2000).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the calibration's resamples (a build repeats exactly).")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines on stderr.")
def baseline_build(data: str, output: str, window_size: int, target_windows: float,
                   kinds: tuple[str, ...], sims: int | None, seed: int, quiet: bool) -> None:
    """Profile DATA (JSONL records or CSV) and calibrate drift thresholds.

    Progress goes to stderr (a line every few seconds while calibrating); the summary to
    stdout.
    """
    from ..progress import Progress
    from .baseline import build_reference
    from .reference import PREDICTION, describe_prediction_type, read_data

    try:
        kind_map = {}
        for k in kinds:
            if "=" not in k:
                raise click.BadParameter(f"expected FEATURE=KIND, got {k!r}", param_hint="--kind")
            name, v = k.split("=", 1)
            kind_map[name] = v
        progress = Progress("calibrating", enabled=not quiet)
        progress.message(f"reading {data}")
        rows = read_data(data)
        progress.message(f"{len(rows)} records; profiling them, then calibrating the "
                         f"thresholds for {window_size}-record windows")
        ref = build_reference(rows, kinds=kind_map, window_size=window_size,
                              target_windows=target_windows, seed=seed, sims=sims,
                              progress=lambda stage, done, total:
                              progress.update(done, total, stage))
        ref.save(output)
    except LrwatchError as exc:
        raise click.ClickException(str(exc)) from exc
    cal = ref.calibration or {}
    click.echo(f"{output}: {ref.records} records, "
               f"{len([f for f in ref.features if f.name != PREDICTION])} features "
               f"({', '.join(f'{f.name}:{f.kind}' for f in ref.features[:8])}"
               f"{', ...' if len(ref.features) > 8 else ''}), prediction "
               f"{describe_prediction_type(ref)}; "
               f"threshold {cal.get('threshold', float('nan')):.3f} per window, "
               f"{cal.get('seq_threshold', float('nan')):.3f} sequential "
               f"(calibrated in {cal.get('seconds', 0):.1f} s)")
    if ref.estimator:
        est = ref.estimator
        click.echo(f"performance estimation: {est.get('n_classes')} classes, fitted on "
                   f"{est.get('reference_rows')} labelled records (reference accuracy "
                   f"{est.get('reference_accuracy', float('nan')):.3f})")
    for note in ref.notes:  # e.g. why accuracy cannot be estimated without labels
        click.echo(note)


@baseline_group.command("recalibrate", epilog=examples(
    "lrwatch baseline recalibrate reference.json",
    "lrwatch baseline recalibrate old.json -o reference.json --window-size 500"))
@click.argument("reference", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Where to write the result (default: REFERENCE itself, replaced atomically).")
@click.option("--window-size", type=click.IntRange(10), default=None,
              help="Window size (default: the reference's calibrated one, else 1000).")
@click.option("--target-windows", type=click.FloatRange(min=1, min_open=True), default=None,
              help="One false alarm per this many windows (default: the reference's, else "
                   "1000).")
@click.option("--no-joint", is_flag=True, help="Calibrate without the joint drift test.")
@click.option("--sims", type=click.IntRange(100), default=None,
              help="Resamples for calibration (default 2000).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the calibration's resamples (a run repeats exactly).")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines on stderr.")
def baseline_recalibrate(reference: str, output: str | None, window_size: int | None,
                         target_windows: float | None, no_joint: bool, sims: int | None,
                         seed: int, quiet: bool) -> None:
    """Calibrate REFERENCE's thresholds again with this lrwatch, from its stored row sample.

    For a reference whose calibration this version cannot use (one built before the joint
    drift test, say): the daemon would recalibrate it at every start, since it never writes
    a --reference file; this does it once. The profile and the performance estimator are kept.
    """
    from ..progress import Progress
    from .calibrate import calibrate
    from .reference import Reference

    try:
        ref = Reference.load(reference)
        old = ref.calibration or {}
        ws = window_size or int(old.get("window_size", 1000))
        tw = target_windows or float(old.get("target_windows", 1000.0))
        progress = Progress("calibrating", enabled=not quiet)
        progress.message(f"calibrating {reference} for {ws}-record windows, one false alarm "
                         f"per {tw:g} windows")
        cal = calibrate(ref, window_size=ws, target_windows=tw, seed=seed, sims=sims,
                        joint=not no_joint,
                        progress=lambda stage, done, total: progress.update(done, total, stage))
        ref.calibration = cal.to_dict()
        ref.save(output or reference)
    except LrwatchError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{output or reference}: threshold {cal.threshold:.3f} per window, "
               f"{cal.seq_threshold:.3f} sequential (calibrated in {cal.seconds:.1f} s)")
