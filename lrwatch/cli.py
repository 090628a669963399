"""The ``lrwatch`` command line. Formatting lives here; the logic lives in the modules it calls."""

from __future__ import annotations

import os
import sys

import click

from ._cli_help import examples
from ._version import __version__

#: The shell's exit status for a command ended by Ctrl-C (SIGINT): 128 + 2.
INTERRUPTED = 130
#: ... and for one whose output pipe was closed (SIGPIPE): 128 + 13.
CLOSED_PIPE = 141


class _Group(click.Group):
    """The command group; a Ctrl-C that a command does not handle itself ends with status 130
    and one line on stderr. (click's own "Aborted!" exits 1, which ``replay --fail-on`` uses
    for "a rule fired": a CI job that interrupted a replay read it as a failed check.)"""

    def invoke(self, ctx: click.Context) -> object:
        try:
            out = super().invoke(ctx)
            sys.stdout.flush()   # a closed pipe shows here, not at the interpreter's exit
            return out
        except KeyboardInterrupt:
            name = " ".join(filter(None, ("lrwatch", ctx.invoked_subcommand)))
            click.echo(f"\n{name}: interrupted", err=True)
            ctx.exit(INTERRUPTED)
        except BrokenPipeError:
            # `lrwatch replay --json ... | head`: the reader went away. click's own handling
            # exits 1, the status `replay --fail-on` gives for "a rule fired"; a shell's
            # command killed by SIGPIPE exits 128 + 13. Nothing more can reach that stdout.
            try:
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            except (OSError, ValueError):   # a stdout without a descriptor (tests)
                pass
            ctx.exit(CLOSED_PIPE)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lrwatch")
def cli() -> None:
    """lrwatch watches models while they train and serve, and acts when something goes wrong.

    \b
    Training:  add lrwatch.Watcher (or the Lightning / HF callback) to your loop.
    Serving:   run `lrwatch daemon` next to your model server.
    Try it:    `lrwatch demo` (add `--inject nan` to see a fault caught).
    """


@cli.command(epilog=examples(
    "lrwatch demo --inject nan-burst               # a fault caught and rolled back",
    "lrwatch demo --inject blowup --linger 120     # /metrics kept up 2 minutes after it",
    "lrwatch demo --port 0 --trace run.jsonl --snapshot-dir snaps"))
@click.option("--steps", type=click.IntRange(1), default=300, show_default=True,
              help="Length of the learning-rate schedule, in optimizer steps (a rollback "
                   "repeats part of it, so more steps may run).")
@click.option("--port", type=click.IntRange(0, 65535), default=9400, show_default=True,
              help="Port for /metrics (0 picks a free one).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind /metrics to.")
@click.option("--trace", "trace", type=click.Path(dir_okay=False), default="lrwatch-demo.trace.jsonl",
              show_default=True, help="Where to write the JSONL trace ('' for none).")
@click.option("--flush-every", type=click.IntRange(1), default=10, show_default=True,
              help="Steps between device-to-host flushes.")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True,
              help="Sequences of 64 bytes per training batch.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the model's initialisation and of the batches (a run repeats "
                   "exactly).")
@click.option("--linger", type=click.FloatRange(0), default=0.0, show_default=True,
              help="Keep serving /metrics this many seconds after training (for a scrape).")
@click.option("--inject", type=click.Choice(["nan", "nan-burst", "blowup", "lr-bug"]),
              default=None,
              help="Inject a fault to see it detected and acted on: nan (a poisoned batch: the "
                   "non-finite step is dropped on the device), nan-burst (three in a row: the "
                   "repeat rolls back), blowup (one step with a 1000x learning rate), lr-bug "
                   "(base learning rates x100).  [default: none]")
@click.option("--inject-at", type=click.IntRange(1), default=None,
              help="Step of the injected fault [default: 60% into the run].")
@click.option("--snapshot-dir", type=click.Path(file_okay=False), default=None,
              help="Keep rollback snapshots on disk here instead of in memory "
                   "[default: in memory].")
def demo(steps: int, port: int, host: str, trace: str, flush_every: int, batch_size: int,
         seed: int, linger: float, inject: str | None, inject_at: int | None,
         snapshot_dir: str | None) -> None:
    """Train a small real model with the Watcher on and watch it.

    A byte-level GRU learns the Python standard library's own source code (no download).
    Progress is printed as steps are flushed: `step N  schedule S/T` shows the steps run and the
    schedule's position apart (after a rollback the run repeats part of its schedule), and
    every warning or critical firing, its resolution and every action get one line, in step
    order. /metrics is served
    while it trains and a trace is written in trace format v1 (`lrwatch report` draws it).
    """
    from .demo import DemoConfig, run_demo
    from .errors import ConfigError

    if inject_at is not None and inject is None:   # it would train the run with no fault
        raise click.UsageError(f"--inject-at needs --inject FAULT (one of nan, nan-burst, "
                               f"blowup, lr-bug); without it step {inject_at} is not touched")
    cfg = DemoConfig(steps=steps, port=port, host=host, trace=trace or None,
                     flush_every=flush_every, batch_size=batch_size, seed=seed, linger=linger,
                     inject=inject, inject_at=inject_at, snapshot_dir=snapshot_dir)
    try:
        summary = run_demo(cfg)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    if summary["exit_status"]:
        raise SystemExit(int(summary["exit_status"]))


@cli.command("report", epilog=examples(
    "lrwatch report run.trace.jsonl --out run.png",
    "lrwatch report run.trace.jsonl other.trace.jsonl --out runs.html   # overlaid, with events"))
@click.argument("traces", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--out", "out", type=click.Path(dir_okay=False), default="lrwatch-report.png",
              show_default=True, help="Where to write: a .png picture, or an .html page with the "
                                      "picture and a table of every event.")
@click.option("--lenient", is_flag=True,
              help="Skip malformed trace lines instead of failing (the HTML page says how many).")
def report_command(traces: tuple[str, ...], out: str, lenient: bool) -> None:
    """Draw runs from their traces: loss and evaluations, learning rate, gradient norm and
    update ratio against steps, with firings, rollbacks (the abandoned steps shaded), restarts
    and stops marked. Several traces (runs, or the ranks of one run) are overlaid.

    Needs matplotlib: pip install 'lrwatch[plot]'.
    """
    from .errors import LrwatchError
    from .report import write_report

    try:
        path = write_report(list(traces), out, strict=not lenient)
    except LrwatchError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(str(path))


from .rules.cli import replay_command, rules_group  # noqa: E402  (registered below)

cli.add_command(replay_command)
cli.add_command(rules_group)


from .daemon.cli import baseline_group, daemon_command  # noqa: E402  (registered below)

cli.add_command(daemon_command)
cli.add_command(baseline_group)


from .stack.cli import dashboards_group, stack_command  # noqa: E402  (registered below)

cli.add_command(stack_command)
cli.add_command(dashboards_group)


from .recovery.lr_find_cli import lr_find_command  # noqa: E402  (registered below)

cli.add_command(lr_find_command)


def main() -> None:
    cli(prog_name="lrwatch")


if __name__ == "__main__":  # pragma: no cover
    main()
