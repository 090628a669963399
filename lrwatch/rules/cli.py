"""``lrwatch replay`` and ``lrwatch rules ...``: formatting only; the logic is in ``replay.py``,
``schema.py`` and ``engine.py``. Importing this module never imports torch."""

from __future__ import annotations

import inspect
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import click

from .._cli_help import examples
from ..errors import ConfigError, RuleError
from .detectors import DETECTORS
from .engine import Firing
from .replay import TraceResult, expand_traces, replay_trace
from .layering import Layer, join, join_layers, spec_layer
from .schema import PACKS, SEVERITIES, RuleSet, load_layer, pack_text

__all__ = ["replay_command", "rules_group"]

_RANK = {"info": 0, "warning": 1, "critical": 2}
_PROGRESS_MIN_TRACES = 20   # fewer traces finish before progress would help
_PROGRESS_EVERY_S = 1.0
_PROGRESS_SAMPLES = 50_000   # inside one trace: a line per this many samples (a few seconds)
_MESSAGE_WIDTH = 100


def _fmt_value(v: float | None) -> str:
    if v is None:
        return "-"
    if math.isfinite(v):
        return f"{v:.4g}"
    return str(v)


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    widths[-1] = len(headers[-1])  # the message is last and is not padded
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


def _event_row(res: TraceResult, e: Firing) -> list[str]:
    msg = e.message if len(e.message) <= _MESSAGE_WIDTH else e.message[:_MESSAGE_WIDTH - 1] + "…"
    sev = e.severity if e.kind == "firing" else f"{e.severity} (resolved)"
    return [res.path, str(e.step), e.rule, sev, _fmt_value(e.value),
            ",".join(e.actions) or "-", msg]


@click.command("replay", epilog=examples(
    "lrwatch replay run.trace.jsonl",
    "lrwatch replay runs/ --json --fail-on critical          # for CI: exit 1 on a critical firing",
    "lrwatch replay runs/ --rules training --rules my-rules.yml"))
@click.argument("traces", nargs=-1, required=True,
                type=click.Path(exists=True, file_okay=True, dir_okay=True))
@click.option("--rules", "rules_files", type=click.Path(dir_okay=False), multiple=True,
              help="Rule file to use instead of a default pack, or a pack's name "
                   f"({', '.join(PACKS)}). Repeat it to join several in the order given, as "
                   "Watcher(rules=[...]) does (e.g. --rules training --rules my-rules.yml): a "
                   "later file may refer to the rules of the others and turn off or replace "
                   "(override: true) a rule of an earlier one.")
@click.option("--pack", "packs", type=click.Choice(PACKS), multiple=True,
              default=("training",), show_default=True,
              help="Default rule pack to use when --rules is not given (repeat it to join "
                   "packs: --pack training --pack plateau_cut).")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object per firing on stdout (the replay contract).")
@click.option("--fail-on", type=click.Choice(SEVERITIES), default=None,
              help="Exit 1 if any rule of this severity or higher fires (for CI)  [default: exit "
                   "0 whatever fires].")
@click.option("--lenient", is_flag=True,
              help="Skip malformed trace lines (counted and reported) instead of stopping.")
@click.option("--resolved", "show_resolved", is_flag=True,
              help="Also report resolutions (JSON records then carry \"kind\").")
@click.option("--progress/--no-progress", default=None,
              help=f"Progress on stderr (default: on for {_PROGRESS_MIN_TRACES}+ traces, and "
                   f"every {_PROGRESS_SAMPLES} samples of a long trace).")
@click.option("--jobs", "-j", type=click.IntRange(min=0), default=0, show_default=True,
              help="Processes replaying traces in parallel (0: one per CPU, up to 8, for "
                   f"{_PROGRESS_MIN_TRACES}+ traces; 1: in this process). The output is the "
                   "same, in the same order.")
def replay_command(traces: tuple[str, ...], rules_files: tuple[str, ...],
                   packs: tuple[str, ...], as_json: bool,
                   fail_on: str | None, lenient: bool, show_resolved: bool,
                   progress: bool | None, jobs: int) -> None:
    """Run rules over recorded TRACE files (or directories of *.jsonl and *.jsonl.gz) as
    the live engine would.

    Each trace starts with fresh engine state. Exit status: 0 whether or not rules fire, 1 when
    --fail-on is given and a rule of that severity or higher fired, 2 when a rule file is
    malformed, a trace is (without --lenient) or holds no sample, or no trace is found;
    130 when interrupted (Ctrl-C); 141 when its output pipe closes (`| head`).
    """
    source = click.get_current_context().get_parameter_source("packs")
    if rules_files and source is not None and source.name == "COMMANDLINE":
        # --pack is the default for when --rules is not given: beside it, it was dropped
        raise click.UsageError(f"--pack is not used with --rules; name the packs in --rules, "
                               f"in the order wanted: --rules {' --rules '.join(packs)} "
                               f"--rules {' --rules '.join(rules_files)}")
    specs = rules_files or packs
    rules = _load_rules_or_exit(specs)
    paths = list(expand_traces(traces))
    if not paths:   # a CI job pointed at the wrong folder must not pass on nothing
        click.echo(f"Error: no trace found: {', '.join(map(str, traces))} holds no *.jsonl "
                   f"or *.jsonl.gz file", err=True)
        sys.exit(2)
    show_progress = progress if progress is not None else len(paths) >= _PROGRESS_MIN_TRACES
    out = sys.stdout  # looked up per call: CliRunner and redirections replace it
    rows: list[list[str]] = []
    totals = _Totals()
    last_progress = time.monotonic()
    within = _within_trace if progress is not False else None
    for i, res in enumerate(_replay_all(paths, rules, specs, not lenient, jobs, within), 1):
        _report_trace(res, totals, rows, out, as_json, show_resolved)
        if show_progress and (time.monotonic() - last_progress >= _PROGRESS_EVERY_S
                              or i == len(paths)):
            last_progress = time.monotonic()
            click.echo(f"replay: {i}/{len(paths)} traces, {totals.samples} samples, "
                       f"{totals.fired} firings", err=True)
    _print_report(rows, totals.summary(len(paths)), as_json)
    sys.stdout.flush()
    if totals.errors:
        raise SystemExit(2)
    if fail_on is not None and totals.worst >= _RANK[fail_on]:
        raise SystemExit(1)


def _load_specs(specs: tuple[str, ...]) -> RuleSet:
    """The rule sets ``specs`` names (pack names and rule files) joined in order as layers,
    as the Watcher joins its ``rules=[...]`` list (a pack's name is the pack): references
    across them resolve, and a later one may turn off or replace a rule of an earlier one."""
    # the action parameters too: a file 'rules check' refuses is not replayed
    return join(specs, check_actions=True)


def _load_rules_or_exit(specs: tuple[str, ...]) -> RuleSet:
    """The rule sets of ``specs`` joined; a malformed one prints its errors (a clash of
    names across them, the names) and exits 2."""
    try:
        return _load_specs(specs)
    except RuleError as exc:   # a clash of names across them too, with file and line
        for line in exc.errors:
            click.echo(line, err=True)
        raise SystemExit(2) from None
    except ConfigError as exc:   # pragma: no cover - a join raises RuleError
        click.echo(f"Error: {', '.join(specs)}: {exc}", err=True)
        raise SystemExit(2) from None


@dataclass
class _Totals:
    """What ``replay`` counted over the traces so far."""

    samples: int = 0
    skipped: int = 0
    errors: int = 0
    counts: dict[str, int] = field(default_factory=lambda: {s: 0 for s in SEVERITIES})
    worst: int = -1   # the highest _RANK that fired

    @property
    def fired(self) -> int:
        return sum(self.counts.values())

    def summary(self, n_traces: int) -> str:
        """The last line of the report.

        >>> _Totals(samples=40, skipped=2, counts={"info": 0, "warning": 1}).summary(3)
        '3 trace(s), 40 samples, 1 firing(s) (info: 0, warning: 1), 2 malformed line(s) skipped'
        """
        text = (f"{n_traces} trace(s), {self.samples} samples, {self.fired} firing(s) "
                f"({', '.join(f'{k}: {v}' for k, v in self.counts.items())})")
        if self.skipped:
            text += f", {self.skipped} malformed line(s) skipped"
        if self.errors:
            text += f", {self.errors} trace(s) with errors"
        return text


def _report_trace(res: TraceResult, totals: _Totals, rows: list[list[str]], out: Any,
                  as_json: bool, show_resolved: bool) -> None:
    """Count one trace's result into ``totals`` and report it, in this order: its error and
    skipped lines on stderr, then each firing (and resolution, with ``show_resolved``) as a
    JSON line on ``out`` or as a row of ``rows`` for the table."""
    totals.samples += res.samples
    totals.skipped += res.skipped
    if res.error:
        totals.errors += 1
        click.echo(f"error: {res.error}", err=True)
    if res.skipped:
        click.echo(f"warning: {res.path}: skipped {res.skipped} malformed line(s); first: "
                   f"{res.bad_lines[0] if res.bad_lines else '?'}", err=True)
    for e in res.events:
        if e.kind == "firing":
            totals.counts[e.severity] = totals.counts.get(e.severity, 0) + 1
            totals.worst = max(totals.worst, _RANK.get(e.severity, 0))
        elif not show_resolved:
            continue
        if as_json:
            rec: dict[str, Any] = e.to_json(res.path)
            if show_resolved:
                rec["kind"] = e.kind
            out.write(json.dumps(rec, allow_nan=False) + "\n")
        else:
            rows.append(_event_row(res, e))


def _print_report(rows: list[list[str]], summary: str, as_json: bool) -> None:
    """The table (or "no rule fired") and the summary on stdout; with ``as_json`` the firings
    were written already and the summary goes to stderr."""
    if as_json:
        click.echo(summary, err=True)
        return
    if rows:
        click.echo(_table(rows, ["TRACE", "STEP", "RULE", "SEVERITY", "VALUE", "ACTIONS",
                                 "MESSAGE"]))
    else:
        click.echo("no rule fired")
    click.echo(summary)


_WORKER_RULES: dict[str, RuleSet] = {}   # per worker process: the rules, loaded once


def _worker_init(specs: tuple[str, ...]) -> None:
    _WORKER_RULES["rules"] = _load_specs(specs)


def _worker_replay(job: tuple[str, bool]) -> TraceResult:
    path, strict = job
    return replay_trace(path, _WORKER_RULES["rules"], strict=strict)


def _within_trace(path: str, samples: int) -> None:
    """Progress inside one long trace (a line per trace came only at its end: a trace of
    millions of steps replayed for minutes in silence, ``--progress`` or not)."""
    click.echo(f"replay: {path}: {samples} samples so far", err=True)


def _replay_all(paths: list[str], rules: RuleSet, specs: tuple[str, ...], strict: bool,
                jobs: int, within: Callable[[str, int], None] | None = None
                ) -> Iterator[TraceResult]:
    """Each trace's result, in order; in worker processes when that pays (many traces).
    ``within(path, samples)`` is told the progress inside each trace replayed in this
    process."""
    if jobs == 0:
        jobs = min(os.cpu_count() or 1, 8) if len(paths) >= _PROGRESS_MIN_TRACES else 1
    if jobs <= 1 or len(paths) < 2:
        for path in paths:
            tell = None if within is None else (lambda n, p=path: within(p, n))
            yield replay_trace(path, rules, strict=strict, on_progress=tell,
                               progress_every=_PROGRESS_SAMPLES)
        return
    # workers load the rules themselves (a RuleSet holds read-only mappings, not picklable)
    with ProcessPoolExecutor(jobs, initializer=_worker_init,
                             initargs=(specs,)) as ex:
        chunk = max(1, min(16, len(paths) // (4 * jobs)))
        yield from ex.map(_worker_replay, [(p, strict) for p in paths], chunksize=chunk)


@click.group("rules")
def rules_group() -> None:
    """Validate rule files, print the default packs, list detectors."""


@rules_group.command("check", epilog=examples(
    "lrwatch rules check my-rules.yml",
    "lrwatch rules check my-additions.yml --with training    # a file of additions to the pack"))
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--with", "with_sets", multiple=True, metavar="PACK|FILE",
              help="Check each FILE as it will be joined after this rule set: a pack's name "
                   f"({', '.join(PACKS)}) or a rule file. Repeat it to join several, in order "
                   "(--with training --with team.yml), as Watcher(rules=[...]) and replay "
                   "--rules join them.")
def check_command(files: tuple[str, ...], with_sets: tuple[str, ...]) -> None:
    """Validate rule FILES; every error is printed on stderr as FILE:LINE: key 'KEY':
    message, with the count of files with errors last (exit 1); a good file's "FILE: ok"
    line goes to stdout.

    With --with, each FILE is checked joined after those rule sets: its 'when' rules may
    refer to their rules, and it may turn one off ({name: X, enabled: false}) or replace it
    (override: true).
    """
    bad = 0
    shown: set[str] = set()   # a --with set's own errors, printed once
    for f in files:
        try:
            # {stop: {restore: ...}}, {reduce_lr: {factor: ...}} too, with the other errors
            layers = [spec_layer(s) for s in with_sets] + [load_layer(f)]
            rs = join_layers(layers, check_actions=True)
        except RuleError as exc:
            bad += 1
            for line in exc.errors:
                if line not in shown:   # on stderr with the summary, as replay's errors
                    click.echo(line, err=True)
                    shown.add(line)
            continue
        click.echo(f"{f}: ok ({_check_summary(f, rs, layers[-1], with_sets)})")
    if bad:
        click.echo(f"{bad} of {len(files)} file(s) have errors", err=True)
        raise SystemExit(1)


def _check_summary(path: str, rs: RuleSet, layer: Layer, with_sets: tuple[str, ...]) -> str:
    """What a checked file holds: ``3 rules`` alone; with --with also what it replaces and
    turns off of the sets before it, and the size of the join."""
    n = sum(1 for e in layer.entries if e.kind == "rule" and e.enabled)
    text = f"{n} rule{'s' if n != 1 else ''}"
    if not with_sets:
        return text
    replaced = sum(1 for e in layer.entries if e.override and e.kind == "rule" and e.enabled)
    off = sum(1 for e in layer.entries if e.kind == "disable" or (e.override and not e.enabled))
    return (f"{text}, {replaced} replacing and {off} turning off a rule of "
            f"{', '.join(with_sets)}; {len(rs)} rules joined")


@rules_group.command("show", epilog=examples(
    "lrwatch rules show training > my-rules.yml"))
@click.argument("pack", type=click.Choice(PACKS))
def show_command(pack: str) -> None:
    """Print the default rule PACK (a starting point for your own rule file)."""
    try:
        click.echo(pack_text(pack), nl=False)
    except ConfigError as exc:  # pragma: no cover - click.Choice already checks the name
        raise click.BadParameter(str(exc)) from None


@rules_group.command("detectors", epilog=examples("lrwatch rules detectors"))
def detectors_command() -> None:
    """List the detectors, their parameters (with their defaults, as a rule file writes them)
    and which take the rule key 'given'."""
    for name, cls in DETECTORS.items():
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        click.echo(f"{name}: {doc}")
        defaults = inspect.signature(cls.__init__).parameters
        for pname, p in cls.PARAMS.items():
            default = defaults[pname].default if pname in defaults else inspect.Parameter.empty
            shown = "" if default is inspect.Parameter.empty else f" [default: {_yaml(default)}]"
            click.echo(f"    {pname}: {p.describe()} - {p.doc}{shown}")
        if cls.takes_given:
            click.echo("    (takes the rule key 'given: METRIC': sees that metric's latest value)")


def _yaml(value: object) -> str:
    """A default as a rule file writes it: ``null``, ``true``/``false``, numbers, words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
