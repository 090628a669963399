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
>>> run.n_steps, run.series("loss"), [g.points() for g in run.lr_groups]
(2, [3.0, 1.5], [([1, 2], [0.1, 0.1])])
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from array import array
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


#: Points a series keeps exactly; past this many its steps are taken in buckets
#: (:class:`Series`). The figure is about 1,100 pixels wide: a trace of up to this many steps
#: draws exactly as every step's point would, a longer one from each bucket's extremes.
EXACT_POINTS = 10_000


class Series:
    """One metric's measured values in step order, in bounded memory: up to
    :data:`EXACT_POINTS` finite values are kept exactly; past that, consecutive values are
    taken in buckets (of 2, 4, 8, ... values, doubled whenever the buckets would pass that
    many) and each bucket keeps its lowest and its highest value, in step order (the curve's
    envelope: what a line that fills its pixels shows). The steps of non-finite values
    (marked on the plot) are kept the same way, the first of each bucket; the last value and
    whether any was measured are kept exactly. Its memory does not grow with the trace's
    length (``lrwatch report`` on a trace of millions of steps, docs/design.md).

    >>> s = Series()
    >>> for step in (1, 2, 3):
    ...     s.add(step, 1.0 / step)
    >>> s.add(4, float("nan"))
    >>> s.points(), s.nonfinite_steps(), s.last
    (([1, 2, 3], [1.0, 0.5, 0.3333333333333333]), [4], nan)
    """

    __slots__ = ("_xs", "_ys", "_sizes", "_width", "_n", "_lo", "_hi", "_bad", "_bad_n",
                 "_bad_width", "measured", "last")

    def __init__(self) -> None:
        self._xs: list[int] = []    # the buckets' points, flat (steps: any int the trace has)
        self._ys = array("d")
        self._sizes = bytearray()   # points per bucket: 1 or 2
        self._width = 1             # values per bucket
        self._n = 0                 # values in the bucket being filled,
        self._lo = self._hi = (0, 0.0)   # its lowest and highest (step, value)
        self._bad: list[int] = []   # steps of non-finite values, one per bucket
        self._bad_n = 0
        self._bad_width = 1
        self.measured = False
        self.last: float | None = None   # the last value measured (non-finite too)

    def add(self, step: int, value: float) -> None:
        """Take the value measured at ``step`` (steps increase from call to call)."""
        self.measured, self.last = True, value
        if not math.isfinite(value):
            self._add_bad(step)
            return
        p = (step, value)
        if self._n == 0:
            self._lo = self._hi = p
        elif value < self._lo[1]:
            self._lo = p
        elif value > self._hi[1]:
            self._hi = p
        self._n += 1
        if self._n == self._width:
            self._put(self._lo, self._hi)
            self._n = 0
            if len(self._sizes) > EXACT_POINTS:
                self._merge()

    def _add_bad(self, step: int) -> None:
        if self._bad_n == 0:
            self._bad.append(step)
        self._bad_n = (self._bad_n + 1) % self._bad_width
        if self._bad_n == 0 and len(self._bad) > EXACT_POINTS:
            self._bad, self._bad_width = self._bad[::2], self._bad_width * 2

    def _put(self, lo: tuple[int, float], hi: tuple[int, float]) -> None:
        """A bucket of its lowest and highest points (one, when they are the same)."""
        pts = (lo,) if lo is hi or lo == hi else ((lo, hi) if lo[0] <= hi[0] else (hi, lo))
        for x, y in pts:
            self._xs.append(x)
            self._ys.append(y)
        self._sizes.append(len(pts))

    def _merge(self) -> None:
        """Pairs of buckets become one, of twice the values: still their extremes."""
        xs, ys, sizes = self._xs, self._ys, self._sizes
        self._xs, self._ys, self._sizes = [], array("d"), bytearray()
        at, buckets = 0, []
        for n in sizes:
            buckets.append([(xs[i], ys[i]) for i in range(at, at + n)])
            at += n
            if len(buckets) == 2 or at == len(xs):
                pts = [p for b in buckets for p in b]
                lo = min(pts, key=lambda p: p[1])
                hi = max(pts, key=lambda p: p[1])
                self._put(lo, hi)
                buckets = []
        self._width *= 2

    def points(self) -> tuple[list[int], list[float]]:
        """The finite values kept, as steps and values (every one, in a short trace)."""
        xs, ys = list(self._xs), self._ys.tolist()
        if self._n:   # the bucket being filled
            lo, hi = self._lo, self._hi
            for x, y in ((lo,) if lo is hi or lo == hi else
                         ((lo, hi) if lo[0] <= hi[0] else (hi, lo))):
                xs.append(x)
                ys.append(y)
        return xs, ys

    def nonfinite_steps(self) -> list[int]:
        """The steps of the non-finite values kept (every one, in a short trace)."""
        return list(self._bad)


@dataclass
class Run:
    """One trace, read once: per metric a :class:`Series` of its values (memory bounded
    whatever the trace's length), the learning rate of each parameter group likewise, the
    step count and range, and every event."""

    name: str
    n_steps: int = 0
    first_step: int = 0
    last_step: int = 0
    columns: dict[str, Series] = field(default_factory=dict)
    lr_groups: list[Series] = field(default_factory=list)  # one per parameter group
    events: list[dict[str, Any]] = field(default_factory=list)
    skipped_lines: int = 0

    def series(self, name: str) -> list[float]:
        """The finite values of ``name`` kept (every one, in a trace of up to
        :data:`EXACT_POINTS` steps)."""
        col = self.columns.get(name)
        return col.points()[1] if col is not None else []

    def has(self, name: str) -> bool:
        """Whether ``name`` was measured at least once (non-finite counts as measured)."""
        col = self.columns.get(name)
        return col is not None and col.measured

    def count(self, event_type: str) -> int:
        return sum(1 for e in self.events if e.get("type") == event_type)


def load_run(source: str | os.PathLike[str] | IO[str], *, name: str | None = None,
             strict: bool = True) -> Run:
    """Read a trace into a :class:`Run`, one line at a time (memory bounded whatever its
    length). ``strict=False`` skips (and counts) malformed lines."""
    reader = TraceReader(source, strict=strict)
    run = Run(name=name or (str(source) if isinstance(source, (str, os.PathLike))
                            else getattr(source, "name", "trace")))
    for s in reader:
        if not run.n_steps:
            run.first_step = s.step
        run.n_steps += 1
        run.last_step = s.step
        for k, v in s.values.items():
            if k == "lr" or "/" in k:
                continue
            col = run.columns.get(k)
            if col is None:
                col = run.columns[k] = Series()
            col.add(s.step, float(v))
        groups = s.lr_groups or ()
        while len(run.lr_groups) < len(groups):
            run.lr_groups.append(Series())
        for g, x in enumerate(groups):
            run.lr_groups[g].add(s.step, float(x))
        for e in s.events:
            # ``step`` is what the event is about (the step a rule saw); ``line_step`` is the
            # trace line it came with: an action is carried out after that line's flush.
            run.events.append({"step": s.step, **dict(e), "line_step": s.step})
    run.skipped_lines = reader.skipped
    if not run.n_steps:
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


def _plot_metric(ax: Any, run: Run, metric: str, colour: str, style: str, log: bool,
                 label: str) -> None:
    col = run.columns[metric]
    xs, ys = col.points()
    if log:
        xs, ys = [x for x, y in zip(xs, ys) if y > 0], [y for y in ys if y > 0]
    marker = "o" if metric.startswith("eval_") else None
    ax.plot(xs, ys, style, color=colour, label=label, marker=marker, markersize=3, linewidth=1.2)
    bad = col.nonfinite_steps()
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
                    xs, ys = col.points()
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
        col = run.columns.get(metric)
        return f"{col.last:.4g}" if col is not None and col.last is not None else ""

    return [Path(run.name).name, str(run.n_steps), f"{run.first_step}..{run.last_step}",
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
