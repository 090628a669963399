"""Traces kept gzip-compressed, and a trace whose first line starts with a byte-order mark, are
read as the traces they hold (fourteenth round's audit, docs/rules.md). Both were refused at
line 1 ("not valid UTF-8", "Unexpected UTF-8 BOM"): strict replay exited 2, and --lenient lost
the first (or every) sample."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
from click.testing import CliRunner

from lrwatch.cli import cli
from lrwatch.errors import TraceFormatError
from lrwatch.trace import TraceReader, read_trace

LINES = b"".join(b'{"step": %d, "loss": 2.0}\n' % i for i in range(1, 400)) + \
    b'{"step": 400, "loss": "nan"}\n'


def test_a_gzip_compressed_trace_replays_as_the_trace_it_holds(tmp_path: Path) -> None:
    plain, packed = tmp_path / "run.jsonl", tmp_path / "run.jsonl.gz"
    plain.write_bytes(LINES)
    packed.write_bytes(gzip.compress(LINES))
    assert read_trace(packed) == read_trace(plain)
    runner = CliRunner()
    want = runner.invoke(cli, ["replay", "--json", str(plain)])
    got = runner.invoke(cli, ["replay", "--json", str(packed)])
    assert got.exit_code == want.exit_code == 0, got.output
    assert got.stdout.replace(str(packed), str(plain)) == want.stdout
    assert '"rule": "nonfinite", "step": 400' in got.stdout


def test_a_compressed_trace_cut_short_keeps_the_lines_before_the_cut(tmp_path: Path) -> None:
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(LINES)[:-40])   # a copy still being written
    with pytest.raises(TraceFormatError, match="cut short or corrupt"):
        read_trace(cut)
    reader = TraceReader(cut, strict=False)
    samples = list(reader)
    assert reader.skipped == 1 and "gzip-compressed trace is cut short" in reader.errors[0]
    assert samples and [s.step for s in samples] == list(range(1, len(samples) + 1))
    res = CliRunner().invoke(cli, ["replay", str(cut)])
    assert res.exit_code == 2 and "cut short or corrupt" in res.stderr
    assert "the rules failed" not in res.stderr


def test_a_byte_order_mark_before_the_first_line_is_not_part_of_it(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + LINES)
    samples = read_trace(path)
    assert len(samples) == 400 and samples[0].step == 1
    res = CliRunner().invoke(cli, ["replay", "--json", str(path)])
    assert res.exit_code == 0 and '"step": 400' in res.stdout
    # only at the start of the file: a mark inside a line is still a bad line
    path.write_bytes(b'{"step": 1, "loss": 2.0}\n\xef\xbb\xbf{"step": 2, "loss": 2.0}\n')
    with pytest.raises(TraceFormatError, match=":2:"):
        read_trace(path)


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "gzip"])
def test_a_trace_read_from_a_pipe_keeps_every_line(tmp_path: Path, packed: bool) -> None:
    """`lrwatch replay /dev/stdin < run.jsonl`, `<(zcat run.jsonl.gz)`: the reader opened the
    path once to look for gzip's magic bytes and again to read it, and from a pipe the first
    open had read the data away: "no samples in the trace" (or a trace starting mid-line)."""
    import os
    import threading

    plain = tmp_path / "run.jsonl"
    plain.write_bytes(LINES)
    data = gzip.compress(LINES) if packed else LINES
    r, w = os.pipe()

    def feed() -> None:
        with os.fdopen(w, "wb") as fh:
            fh.write(data)

    writer = threading.Thread(target=feed)
    writer.start()
    try:
        got = read_trace(f"/dev/fd/{r}")
    finally:
        writer.join(timeout=10)
        os.close(r)
    assert got == read_trace(plain) and len(got) == 400
