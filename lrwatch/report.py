"""``lrwatch report``: pictures of a run, drawn from its trace.

People would rather look than read a trace. One figure, steps on the x axis, one panel each for
the loss (training and evaluation), evaluation/training accuracy, the learning rate (every
parameter group), and the gradient norm with the update ratio. What the rules and actions did
is drawn over every panel: firings as dashed lines (critical red, warning orange), a rollback as
the abandoned stretch shaded (from the step it went back to up to the step it was decided), a
restart (a rollback to the start with a warm-up) hatched, stops as solid black lines.
Several traces (runs, or the ranks of one run) are overlaid, one colour each.

The output is a PNG, or an HTML page that embeds the same PNG and adds a table of the runs and
a table of every event. matplotlib is an optional extra (``pip install 'lrwatch[plot]'``);
without it :func:`write_report` raises :class:`ReportError` saying so. The traces are read with
:func:`lrwatch.exporters.trace.iter_trace`, so a malformed line is reported by file and line.

Examples
--------
>>> import io
>>> from lrwatch.exporters.trace import TraceWriter
>>> from lrwatch.samples import Sample
>>> buf = io.StringIO()
>>> with TraceWriter(buf) as w:
...     w.write_many(Sample(step=s, values={"loss": 3.0 / s}, lr_groups=(0.1,)) for s in (1, 2))
>>> run = load_run(io.StringIO(buf.getvalue()), name="demo")
>>> run.steps, run.series("loss"), run.lr_groups
([1, 2], [3.0, 1.5], [[0.1, 0.1]])
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Mapping, Sequence

from .errors import LrwatchError
from .trace import TraceReader

__all__ = ["Run", "ReportError", "load_run", "draw", "render_png", "render_html",
           "write_report", "FORMATS"]

#: Output formats by file suffix.
FORMATS = (".png", ".html")
_INSTALL = "pip install 'lrwatch[plot]'"
_SEVERITY_COLOURS = {"critical": "#d62728", "warning": "#ff7f0e"}
#: The event types that change the run (everything but firings and resolutions).
ACTIONS = ("rollback", "skip", "reduce_lr", "stop", "lr_recover")
_TEXT_WIDTH = 200   # the most characters of one event field on the page


class ReportError(LrwatchError):
    """A report cannot be drawn: no samples, an unknown output format, matplotlib missing."""


@dataclass
class Run:
    """One trace, as columns: ``steps`` and, per metric, its value at each step (``nan`` where
    it was not measured, so that plots leave a gap)."""

    name: str
    steps: list[int] = field(default_factory=list)
    columns: dict[str, list[float]] = field(default_factory=dict)
    lr_groups: list[list[float]] = field(default_factory=list)  # one list per parameter group
    events: list[dict[str, Any]] = field(default_factory=list)
    skipped_lines: int = 0

    def series(self, name: str) -> list[float]:
        return self.columns.get(name, [])

    def has(self, name: str) -> bool:
        """Whether ``name`` was measured at least once (non-finite counts as measured)."""
        return any(not _missing(v) for v in self.series(name))

    def count(self, event_type: str) -> int:
        return sum(1 for e in self.events if e.get("type") == event_type)


#: "Not measured at this step": one NaN object, told apart from a measured NaN by identity (a
#: measured non-finite value is marked on the plot, a missing one is a gap).
_MISSING = float("nan")


def _missing(v: float) -> bool:
    return v is _MISSING


def load_run(source: str | os.PathLike[str] | IO[str], *, name: str | None = None,
             strict: bool = True) -> Run:
    """Read a trace into a :class:`Run`. ``strict=False`` skips (and counts) malformed lines."""
    reader = TraceReader(source, strict=strict)
    run = Run(name=name or (str(source) if isinstance(source, (str, os.PathLike))
                            else getattr(source, "name", "trace")))
    for i, s in enumerate(reader):
        run.steps.append(s.step)
        for k, v in s.values.items():
            if k == "lr":
                continue
            col = run.columns.get(k)
            if col is None:
                col = run.columns[k] = [_MISSING] * i
            col.append(float(v))
        groups = s.lr_groups or ()
        while len(run.lr_groups) < len(groups):
            run.lr_groups.append([_MISSING] * i)
        for g, col in enumerate(run.lr_groups):
            col.append(float(groups[g]) if g < len(groups) else _MISSING)
        for col in run.columns.values():
            if len(col) < i + 1:
                col.append(_MISSING)
        for e in s.events:
            # ``step`` is what the event is about (the step a rule saw); ``line_step`` is the
            # trace line it came with: an action is carried out after that line's flush.
            run.events.append({"step": s.step, **dict(e), "line_step": s.step})
    run.skipped_lines = reader.skipped
    if not run.steps:
        raise ReportError(f"{run.name}: no samples in the trace")
    return run


# --- drawing ---------------------------------------------------------------------------------

def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ReportError(f"lrwatch report draws with matplotlib, which is not installed: "
                          f"{_INSTALL}") from None
    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    return plt


def _panels(runs: Sequence[Run]) -> list[tuple[str, list[str], bool]]:
    """(title, metrics, log scale) of the panels that have something to show."""
    want = [("loss", ["loss", "eval_loss"], True),
            ("accuracy", ["eval_accuracy", "accuracy"], False),
            ("learning rate", ["lr"], True),
            ("gradient norm", ["grad_norm"], True),
            ("update ratio", ["update_ratio"], True)]
    out = []
    for title, metrics, log in want:
        if metrics == ["lr"]:
            if any(r.lr_groups for r in runs):
                out.append((title, metrics, log))
        elif any(r.has(m) for r in runs for m in metrics):
            out.append((title, metrics, log))
    if not out:  # a trace of other metrics only: draw those, up to four
        names = sorted({k for r in runs for k in r.columns if "/" not in k})[:4]
        out = [(n, [n], False) for n in names]
    return out


def _finite(xs: Sequence[int], ys: Sequence[float]) -> tuple[list[int], list[float]]:
    pts = [(x, y) for x, y in zip(xs, ys) if math.isfinite(y)]
    return [p[0] for p in pts], [p[1] for p in pts]


def _plot_metric(ax: Any, run: Run, metric: str, colour: str, style: str, log: bool,
                 label: str) -> None:
    xs, ys = _finite(run.steps, run.series(metric))
    if log:
        xs, ys = [x for x, y in zip(xs, ys) if y > 0], [y for y in ys if y > 0]
    marker = "o" if metric.startswith("eval_") else None
    ax.plot(xs, ys, style, color=colour, label=label, marker=marker, markersize=3, linewidth=1.2)
    bad = [x for x, y in zip(run.steps, run.series(metric)) if not _missing(y) and
           not math.isfinite(y)]
    if bad:  # non-finite values have no place on the axis: mark them along the top
        ax.plot(bad, [1.0] * len(bad), "x", color=colour, transform=ax.get_xaxis_transform(),
                clip_on=False, label=f"{label} non-finite")


def _position(v: Any) -> float | None:
    """An event's step as a place on the x axis, or ``None`` for one that has none: readers
    ignore types they do not know (docs/design.md, events), and a number past the float range
    (an integer such as 10**400) or a non-finite one cannot be drawn."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        x = float(v)
    except OverflowError:
        return None
    return x if math.isfinite(x) else None


def _mark_events(ax: Any, run: Run, colour: str) -> None:
    for e in run.events:
        kind, step = e.get("type"), _position(e.get("step"))
        if step is None:
            continue
        line_step = _position(e.get("line_step"))
        end = step if line_step is None else max(step, line_step)
        severity = e.get("severity")
        if kind == "firing" and isinstance(severity, str) and severity in _SEVERITY_COLOURS:
            ax.axvline(step, color=_SEVERITY_COLOURS[severity], linestyle="--",
                       linewidth=0.9, alpha=0.8)
        elif kind in ("rollback", "skip") and _position(e.get("to_step")) is not None:
            # Abandoned: every step after the target up to the flush that carried it out.
            restart = kind == "rollback" and bool(e.get("restart") or e.get("warmup"))
            ax.axvspan(_position(e["to_step"]), end, color=colour, alpha=0.13,
                       hatch="//" if restart else None, linewidth=0)
            ax.axvline(end, color=colour, linewidth=1.0, alpha=0.7)
        elif kind == "stop":
            ax.axvline(end, color="black", linewidth=1.6)


def draw(runs: Sequence[Run], *, title: str | None = None) -> Any:
    """The figure of ``runs`` (a matplotlib ``Figure``; close it with ``plt.close(fig)``)."""
    plt = _pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    panels = _panels(runs)
    fig, axes = plt.subplots(len(panels), 1, sharex=True, squeeze=False,
                             figsize=(11, 1.2 + 2.3 * len(panels)))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    many = len(runs) > 1
    for ax, (ptitle, metrics, log) in zip(axes[:, 0], panels):
        for i, run in enumerate(runs):
            colour = colours[i % len(colours)]
            prefix = f"{Path(run.name).name}: " if many else ""
            if metrics == ["lr"]:
                for g, col in enumerate(run.lr_groups):
                    xs, ys = _finite(run.steps, col)
                    ax.plot(xs, ys, ["-", "--", ":", "-."][g % 4], color=colour, linewidth=1.2,
                            label=f"{prefix}group {g}" if len(run.lr_groups) > 1 or many
                            else "lr")
            else:
                for j, m in enumerate(metrics):
                    if run.has(m):
                        _plot_metric(ax, run, m, colour, ["-", "--"][j % 2], log, prefix + m)
            _mark_events(ax, run, colour)
        if log and ax.has_data() and any(line.get_xydata().size for line in ax.get_lines()):
            ax.set_yscale("log")
        ax.set_ylabel(ptitle)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper right", fontsize=7, ncol=2)
    axes[-1, 0].set_xlabel("step")
    legend = [Line2D([], [], color=_SEVERITY_COLOURS["critical"], linestyle="--",
                     label="critical firing"),
              Line2D([], [], color=_SEVERITY_COLOURS["warning"], linestyle="--",
                     label="warning firing"),
              Patch(alpha=0.25, color="grey", label="rolled back (abandoned steps)"),
              Patch(alpha=0.25, color="grey", hatch="//", label="restart"),
              Line2D([], [], color="black", linewidth=1.6, label="stop")]
    fig.legend(handles=legend, loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.suptitle(title or ", ".join(Path(r.name).name for r in runs), fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    return fig


def render_png(runs: Sequence[Run], *, dpi: int = 100) -> bytes:
    """The PNG bytes of :func:`draw`."""
    plt = _pyplot()
    fig = draw(runs)
    try:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi)
        return buf.getvalue()
    finally:
        plt.close(fig)


def _text(v: Any, spec: str = "") -> str:
    """An event field for the page: a number formatted with ``spec``, anything else (text, a
    number past the float range) as it is, cut short. Event fields are whatever the trace
    holds: a field of an unexpected type is shown, never a reason to fail the report."""
    if spec and isinstance(v, (int, float)) and not isinstance(v, bool):
        try:
            return format(float(v), spec)
        except OverflowError:
            pass
    text = str(v)
    return text if len(text) <= _TEXT_WIDTH else text[:_TEXT_WIDTH - 1] + "\u2026"


def _event_detail(e: Mapping[str, Any]) -> str:
    parts = []
    if e.get("type") in ACTIONS and e.get("line_step", e.get("step")) != e.get("step"):
        parts.append(f"carried out after step {_text(e['line_step'])}")
    if "to_step" in e:
        parts.append(f"to step {_text(e['to_step'])}")
    if "lr_factor" in e:
        parts.append(f"lr x{_text(e['lr_factor'], '.3g')}")
    if "warmup" in e:
        parts.append(f"warm-up {_text(e['warmup'])} steps")
    if e.get("type") == "lr_recover" and "factor" in e:
        parts.append(f"lr x{_text(e['factor'], '.3g')} back over "
                     f"{_text(e.get('steps', '?'))} steps")
    if e.get("actions"):
        acts = e["actions"]
        parts.append("actions: " + (", ".join(map(_text, acts)) if isinstance(acts, list)
                                    else _text(acts)))
    for key in ("reason", "message"):
        if e.get(key):
            parts.append(_text(e[key]))
    return "; ".join(parts)


def _summary_row(run: Run) -> list[str]:
    def last(metric: str) -> str:
        vals = [v for v in run.series(metric) if not _missing(v)]
        return f"{vals[-1]:.4g}" if vals else ""

    return [Path(run.name).name, str(len(run.steps)), f"{run.steps[0]}..{run.steps[-1]}",
            last("loss"), last("eval_accuracy"), str(run.count("firing")),
            str(run.count("rollback")), str(run.count("stop"))]


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], cls: str) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "\n".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                     for row in rows)
    return f'<table class="{cls}">\n<tr>{th}</tr>\n{body}\n</table>'


def render_html(runs: Sequence[Run]) -> str:
    """A self-contained page: the PNG embedded, a table of the runs and one of every event."""
    png = base64.b64encode(render_png(runs)).decode("ascii")
    names = ", ".join(Path(r.name).name for r in runs)
    summary = _table(["trace", "steps", "step range", "last loss", "last eval_accuracy",
                      "firings", "rollbacks", "stops"], [_summary_row(r) for r in runs], "runs")
    rows = [[Path(r.name).name, _text(e.get("step", "")), _text(e.get("type", "")),
             _text(e.get("rule", "")), _text(e.get("severity", "")), _event_detail(e)]
            for r in runs for e in r.events]
    events = (_table(["trace", "step", "event", "rule", "severity", "details"], rows, "events")
              if rows else '<p class="events">No rule fired and no action was taken.</p>')
    skipped = sum(r.skipped_lines for r in runs)
    note = (f"<p>{skipped} malformed trace line(s) skipped.</p>" if skipped else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>lrwatch report: {html.escape(names)}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:left;font-size:90%}}
img{{max-width:100%}}</style></head>
<body><h1>lrwatch report</h1>
{summary}
{note}<img alt="loss, learning rate and gradient norm against steps" src="data:image/png;base64,{png}">
<h2>Events</h2>
{events}
</body></html>
"""


def write_report(traces: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], *,
                 strict: bool = True) -> Path:
    """Read ``traces`` and write the report to ``out`` (``.png`` or ``.html``)."""
    out = Path(out)
    if out.suffix.lower() not in FORMATS:
        raise ReportError(f"cannot tell the format of {str(out)!r} from its suffix; use one of "
                          f"{', '.join(FORMATS)}")
    if not traces:
        raise ReportError("no trace given")
    _pyplot()  # say what is missing before reading anything
    folder = out.resolve().parent
    if not folder.is_dir():
        raise ReportError(f"cannot write {str(out)!r}: the folder {folder} does not exist")
    runs = [load_run(t, strict=strict) for t in traces]
    if not _panels(runs):
        raise ReportError("nothing to draw: the traces hold no loss, evaluation, learning "
                          "rate, gradient norm or update ratio")
    try:
        if out.suffix.lower() == ".png":
            out.write_bytes(render_png(runs))
        else:
            out.write_text(render_html(runs), encoding="utf-8")
    except OSError as exc:
        raise ReportError(f"cannot write {str(out)!r}: {exc.strerror or exc}") from exc
    return out
