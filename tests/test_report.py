"""``lrwatch report``: pictures of real recorded runs (a Watcher run with a rollback, a two-rank
run), checked as images and as HTML, through the click command."""

from __future__ import annotations

import base64
import html.parser
import json
import math
import struct
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

import lrwatch
from lrwatch.cli import cli
from lrwatch.exporters.trace import read_trace
from lrwatch.report import EXACT_POINTS, load_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_MAGIC, "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _record_run(path: Path, *, nan_at: int | None, steps: int = 120, seed: int = 0,
                groups: int = 1) -> Path:
    """A real Watcher run over a tiny regression; a NaN loss at ``nan_at`` forces a rollback."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    params = list(model.parameters())
    param_groups = ([{"params": params}] if groups == 1 else
                    [{"params": params[:2]}, {"params": params[2:], "lr": 0.01}])
    opt = torch.optim.SGD(param_groups, lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=40, gamma=0.5)
    w = torch.randn(8, 1)
    with lrwatch.Watcher(model, opt, sched, trace=str(path), flush_every=5,
                         update_ratio=True, recovery={"guard": "off",
                                                      "good_after": 10, "min_interval": 5}) as watch:
        for x in watch.batches(torch.randn(10_000, 32, 8)):
            if sched.last_epoch >= steps:
                break
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), x @ w)
            if nan_at is not None and sched.last_epoch == nan_at:
                loss = loss * float("nan")
                nan_at = None  # once: the rolled-back run passes this step healthily
            loss.backward()
            opt.step()
            sched.step()
            metrics = {"loss": loss.detach()}
            if sched.last_epoch % 20 == 0:
                with torch.no_grad():
                    metrics["eval_loss"] = torch.nn.functional.mse_loss(model(x), x @ w)
            watch.log(**metrics)
    return path


@pytest.fixture(scope="module")
def faulty_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _record_run(tmp_path_factory.mktemp("runs") / "faulty.jsonl", nan_at=70)


@pytest.fixture(scope="module")
def healthy_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _record_run(tmp_path_factory.mktemp("runs") / "healthy.jsonl", nan_at=None, seed=1,
                       groups=2)


class _Page(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None
        self._table = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "img":
            self.images.append(a.get("src") or "")
        elif tag == "table":
            self._table = a.get("class") or ""
        elif tag == "tr" and self._table == "events":
            self.rows.append([])
        elif tag == "td" and self._table == "events":
            self._cell = []

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None:
            self.rows[-1].append("".join(self._cell))
            self._cell = None


def test_recorded_trace_has_a_rollback(faulty_trace: Path) -> None:
    # The report is only worth testing on a run that really did something.
    run = load_run(faulty_trace)
    kinds = [e["type"] for e in run.events]
    assert "firing" in kinds and "rollback" in kinds, kinds
    rb = next(e for e in run.events if e["type"] == "rollback")
    assert rb["to_step"] < rb["step"]
    assert run.has("loss") and run.has("grad_norm") and run.has("eval_loss")
    steps = [s.step for s in read_trace(faulty_trace)]
    assert (run.n_steps, run.first_step, run.last_step) == (len(steps), steps[0], steps[-1])
    assert run.columns["loss"].points()[0] == [
        s.step for s in read_trace(faulty_trace) if math.isfinite(s.values.get("loss", math.nan))]


def test_png_is_a_sane_image(faulty_trace: Path, tmp_path: Path) -> None:
    out = tmp_path / "run.png"
    result = CliRunner().invoke(cli, ["report", str(faulty_trace), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(out)
    data = out.read_bytes()
    width, height = _png_size(data)
    assert 800 <= width <= 2000 and 600 <= height <= 3000, (width, height)
    assert len(data) > 20_000  # lines drawn, not an empty canvas


def test_html_embeds_the_picture_and_tables_every_event(faulty_trace: Path,
                                                         healthy_trace: Path,
                                                         tmp_path: Path) -> None:
    out = tmp_path / "runs.html"
    result = CliRunner().invoke(cli, ["report", str(faulty_trace), str(healthy_trace),
                                      "-o", str(out)])
    assert result.exit_code == 0, result.output
    page = _Page()
    page.feed(out.read_text(encoding="utf-8"))
    assert len(page.images) == 1 and page.images[0].startswith("data:image/png;base64,")
    width, _ = _png_size(base64.b64decode(page.images[0].split(",", 1)[1]))
    assert width >= 800
    events = [e for r in (load_run(faulty_trace), load_run(healthy_trace)) for e in r.events]
    rows = [r for r in page.rows if r]
    assert len(rows) == len(events) > 0
    rollback = next(r for r in rows if r[2] == "rollback")
    rb = next(e for e in events if e["type"] == "rollback")
    assert rollback[0] == "faulty.jsonl" and rollback[1] == str(rb["step"])
    assert f"to step {rb['to_step']}" in rollback[5] and "lr x" in rollback[5]


def test_two_parameter_groups_draw_one_line_each(healthy_trace: Path) -> None:
    run = load_run(healthy_trace)
    assert len(run.lr_groups) == 2
    assert run.lr_groups[1].points()[1][0] == pytest.approx(0.01)
    from lrwatch.report import draw
    import matplotlib.pyplot as plt

    fig = draw([run])
    try:
        lr_axis = next(ax for ax in fig.axes if ax.get_ylabel() == "learning rate")
        assert len(lr_axis.get_lines()) == 2
    finally:
        plt.close(fig)


_RANK_WORKER = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist, lrwatch
    rank, world, store, trace = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    w = lrwatch.Watcher(model, opt, trace=trace, export="all", flush_every=5)
    g = torch.Generator().manual_seed(rank)
    for step in range(40):
        x = torch.randn(16, 8, generator=g)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
        loss.backward()
        opt.step()
        w.log(loss=loss)
    w.close()
    dist.barrier()
    dist.destroy_process_group()
    # DDP's reducer may still hold the group; its gloo threads torn down during interpreter
    # finalization can abort the process (see tests/distributed_workers.py: finish). The trace
    # is closed and written, so skip finalization.
    sys.stdout.flush()
    os._exit(0)
""")


@pytest.mark.slow
def test_two_rank_run_is_overlaid(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(_RANK_WORKER)
    trace = tmp_path / "ddp.jsonl"
    procs = [subprocess.Popen([sys.executable, str(script), str(r), "2", str(tmp_path / "store"),
                               str(trace)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for r in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out
    ranks = sorted(tmp_path.glob("ddp*.jsonl"))   # ddp.jsonl (rank 0), ddp.rank1.jsonl
    assert len(ranks) == 2, ranks
    out = tmp_path / "ddp.png"
    result = CliRunner().invoke(cli, ["report", *map(str, ranks), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert _png_size(out.read_bytes())[0] >= 800
    from lrwatch.report import draw
    import matplotlib.pyplot as plt

    fig = draw([load_run(r) for r in ranks])
    try:
        loss_axis = next(ax for ax in fig.axes if ax.get_ylabel() == "loss")
        labels = [line.get_label() for line in loss_axis.get_lines()]
        assert {f"{r.name}: loss" for r in ranks} <= set(labels), labels
    finally:
        plt.close(fig)


def test_bad_input_gets_a_clear_error(faulty_trace: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(cli, ["report", str(faulty_trace), "--out", str(tmp_path / "x.svg")])
    assert r.exit_code != 0 and ".png, .html" in r.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": "two"}\n')
    r = runner.invoke(cli, ["report", str(bad), "--out", str(tmp_path / "b.png")])
    assert r.exit_code != 0 and f"{bad}:2" in r.output and "'loss'" in r.output
    r = runner.invoke(cli, ["report", str(bad), "--lenient", "--out", str(tmp_path / "b.png")])
    assert r.exit_code == 0, r.output
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    r = runner.invoke(cli, ["report", str(empty), "--out", str(tmp_path / "e.png")])
    assert r.exit_code != 0 and "no samples" in r.output


def test_event_fields_of_odd_types_are_shown_not_fatal(tmp_path: Path) -> None:
    """Readers ignore types they do not know: an event step of 10**400 crashed the drawing
    (OverflowError from axvline) and a non-numeric lr_recover factor the HTML page
    (ValueError from a format spec)."""
    import json
    trace = tmp_path / "odd.jsonl"
    events = [{"type": "firing", "step": 10**400, "severity": "critical"},
              {"type": "firing", "step": 1, "severity": ["critical"]},
              {"type": "rollback", "step": "x", "to_step": 0},
              {"type": "rollback", "step": 1, "to_step": 10**400, "lr_factor": 10**400},
              {"type": "lr_recover", "step": 1, "factor": "x", "steps": [3]},
              {"type": "stop", "step": float("inf"), "reason": "r" * 5000}]
    trace.write_text(json.dumps({"step": 1, "loss": 1.0, "events": events}) + "\n"
                     + json.dumps({"step": 2, "loss": 0.5}) + "\n")
    runner = CliRunner()
    for out in ("o.png", "o.html"):
        r = runner.invoke(cli, ["report", str(trace), "--out", str(tmp_path / out)])
        assert r.exit_code == 0, r.output
    page = (tmp_path / "o.html").read_text()
    assert "lr xx back over [3] steps" in page
    assert "lr x1" + "0" * 198 + "\u2026" in page   # cut short, not a float
    assert "r" * 199 + "\u2026" in page and "r" * 201 not in page


def test_missing_matplotlib_names_the_extra(faulty_trace: Path, tmp_path: Path) -> None:
    # A Python where importing matplotlib fails, as on an install without the extra.
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from lrwatch.cli import main; sys.argv = ['lrwatch', 'report', sys.argv[1], "
            "'--out', sys.argv[2]]; main()")
    proc = subprocess.run([sys.executable, "-c", code, str(faulty_trace),
                           str(tmp_path / "r.png")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "pip install 'lrwatch[plot]'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "r.png").exists()


def test_rollback_shades_every_abandoned_step(faulty_trace: Path) -> None:
    """From the step it went back to, up to the flush after which it was carried out."""
    from lrwatch.report import draw
    import matplotlib.pyplot as plt

    run = load_run(faulty_trace)
    rb = next(e for e in run.events if e["type"] == "rollback")
    assert rb["line_step"] >= rb["step"]
    fig = draw([run])
    try:
        loss_axis = next(ax for ax in fig.axes if ax.get_ylabel() == "loss")
        spans = [(p.get_x(), p.get_x() + p.get_width()) for p in loss_axis.patches]
        assert (rb["to_step"], rb["line_step"]) in spans, spans
    finally:
        plt.close(fig)


def _long_trace(path: Path, steps: int, spike_at: int) -> Path:
    """A generated trace: a loss that falls, one spike, a NaN stretch, an evaluation every
    100 steps, two parameter groups' rates."""
    with open(path, "w", encoding="utf-8") as f:
        for s in range(1, steps + 1):
            loss = 50.0 if s == spike_at else 3.0 / math.sqrt(s)
            rec = {"step": s, "lr": [1e-3, 1e-4], "grad_norm": 1.0 + (s % 7) / 10,
                   "loss": "nan" if steps // 2 <= s < steps // 2 + 5 else loss}
            if s % 100 == 0:
                rec["eval_loss"] = loss
            f.write(json.dumps(rec) + "\n")
    return path


def _peak_bytes_reading(path: Path) -> tuple[int, Any]:
    tracemalloc.start()
    try:
        run = load_run(path)
        return tracemalloc.get_traced_memory()[1], run
    finally:
        tracemalloc.stop()


def test_report_reads_a_long_trace_in_bounded_memory(tmp_path: Path) -> None:
    """``lrwatch report`` held every sample in memory (272 MB resident for 100,000 steps;
    sixteenth round's audit). It streams now: a trace five times as long takes about the
    same memory to read (benchmarks/report_memory.py measures the command's resident set),
    and what it keeps of a long series still holds its extremes (a one-step spike is drawn),
    its last value and every step count; a short trace is drawn from every value."""
    short_peak, short = _peak_bytes_reading(_long_trace(tmp_path / "a.jsonl", 20_000, 7_777))
    long_peak, run = _peak_bytes_reading(_long_trace(tmp_path / "b.jsonl", 100_000, 77_777))
    assert long_peak < 2 * short_peak, (short_peak, long_peak)   # (it grew 4.7x)
    assert (run.n_steps, run.first_step, run.last_step) == (100_000, 1, 100_000)
    xs, ys = run.columns["loss"].points()
    assert len(xs) <= 2 * EXACT_POINTS + 2 and xs == sorted(xs)
    assert max(ys) == 50.0 and xs[ys.index(50.0)] == 77_777        # the spike is kept
    assert min(ys) == pytest.approx(3.0 / math.sqrt(100_000))    # so is the lowest value
    assert run.columns["loss"].nonfinite_steps() == list(range(50_000, 50_005))
    assert run.columns["loss"].last == pytest.approx(3.0 / math.sqrt(100_000))
    assert run.columns["eval_loss"].points()[0] == list(range(100, 100_001, 100))  # 1,000: all
    assert [g.points()[1][-1] for g in run.lr_groups] == [1e-3, 1e-4]
    few = _long_trace(tmp_path / "c.jsonl", 500, 250)
    assert load_run(few).columns["grad_norm"].points() == (
        list(range(1, 501)), [1.0 + (s % 7) / 10 for s in range(1, 501)])
