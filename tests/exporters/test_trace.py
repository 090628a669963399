"""Trace format v1: round trips (nan and inf included) and clear errors for bad lines."""

from __future__ import annotations

import gc
import io
import json
import math

import pytest

from lrwatch.errors import TraceFormatError
from lrwatch.exporters.trace import TraceReader, TraceWriter, encode_sample, read_trace
from lrwatch.samples import Sample


def test_round_trip_with_nonfinite_values_and_groups(tmp_path) -> None:  # type: ignore[no-untyped-def]
    samples = [
        Sample(step=1, time=1764300000.5, values={"lr": 0.1, "loss": 2.5, "grad_norm": 1.25},
               lr_groups=(0.1, 0.01)),
        Sample(step=2, time=None, values={"lr": 0.1, "loss": math.nan, "grad_norm": math.inf,
                                          "custom": -math.inf}, lr_groups=(0.1, 0.01),
               events=({"type": "firing", "rule": "nonfinite"},)),
        Sample(step=5, values={"lr": 0.05, "eval_accuracy": 0.91}, lr_groups=(0.05,)),
    ]
    path = tmp_path / "t.jsonl"
    with TraceWriter(path) as w:
        w.write_many(samples)
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    assert raw[1]["loss"] == "nan" and raw[1]["grad_norm"] == "inf"
    assert raw[1]["custom"] == "-inf"
    assert raw[0]["lr"] == [0.1, 0.01] and raw[2]["lr"] == 0.05
    assert "time" not in raw[1]
    back = read_trace(path)
    assert [s.step for s in back] == [1, 2, 5]
    assert back[0].values == samples[0].values and back[0].lr_groups == (0.1, 0.01)
    assert math.isnan(back[1].values["loss"]) and back[1].values["grad_norm"] == math.inf
    assert back[1].values["custom"] == -math.inf
    assert back[1].events == ({"type": "firing", "rule": "nonfinite"},)
    assert back[2].values == {"lr": 0.05, "eval_accuracy": 0.91}


def test_reader_accepts_bare_nan_and_infinity() -> None:
    text = '{"step": 1, "loss": NaN, "grad_norm": Infinity, "x": -Infinity, "lr": 1e-3}\n'
    (s,) = read_trace(io.StringIO(text))
    assert math.isnan(s.values["loss"]) and s.values["grad_norm"] == math.inf
    assert s.values["x"] == -math.inf and s.lr_groups == (1e-3,)


@pytest.mark.parametrize("line, message", [
    ("not json", "Expecting value"),
    ("[1, 2]", "expected a JSON object"),
    ('{"loss": 1.0}', "missing required key 'step'"),
    ('{"step": "3"}', "key 'step': expected an integer"),
    ('{"step": 1.5}', "key 'step': expected an integer"),
    ('{"step": 3, "loss": "high"}', "key 'loss'"),
    ('{"step": 3, "loss": true}', "key 'loss': expected a number, got a boolean"),
    ('{"step": 3, "lr": []}', "key 'lr': empty list"),
    ('{"step": 3, "loss": {"a": 1}}', "key 'loss': expected a number, got dict"),
    ('{"step": 3, "events": "x"}', "key 'events'"),
])
def test_malformed_lines_name_file_line_and_key(line: str, message: str) -> None:
    stream = io.StringIO('{"step": 1, "loss": 1.0}\n' + line + "\n")
    stream.name = "run.jsonl"
    with pytest.raises(TraceFormatError) as info:
        read_trace(stream)
    assert info.value.line == 2 and info.value.path == "run.jsonl"
    assert str(info.value).startswith("run.jsonl:2: ") and message in str(info.value)


def test_steps_must_increase() -> None:
    with pytest.raises(TraceFormatError, match="does not increase"):
        read_trace(io.StringIO('{"step": 2}\n{"step": 2}\n'))


def test_lenient_reader_skips_and_counts_bad_lines_without_losing_good_ones() -> None:
    text = '{"step": 1, "loss": 1}\ngarbage\n{"step": 2, "loss": "x"}\n\n{"step": 3, "loss": 3}\n'
    reader = TraceReader(io.StringIO(text), strict=False)
    got = list(reader)
    assert [s.step for s in got] == [1, 3]
    assert reader.skipped == 2 and reader.lines == 4
    assert len(reader.errors) == 2 and ":2:" in reader.errors[0] and ":3:" in reader.errors[1]


def test_encode_keeps_unknown_metric_names() -> None:
    rec = encode_sample(Sample(step=7, values={"my_metric": 3.0, "lr": 0.2}))
    assert rec == {"step": 7, "lr": 0.2, "my_metric": 3.0}


def test_a_line_that_is_not_utf8_is_malformed_not_decoded_into_another_key(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A stray byte in a key used to be decoded as U+FFFD: "lo\\xffss" became a metric of its
    own and the NaN in it was never judged as the loss. UTF-8 that is valid stays readable."""
    path = tmp_path / "run.jsonl"
    path.write_bytes(b'{"step": 1, "loss": 1.0}\n{"step": 2, "lo\xffss": "nan"}\n'
                     + '{"step": 3, "lo\u00dfs": 2.0}\n'.encode("utf-8"))
    with pytest.raises(TraceFormatError) as info:
        read_trace(path)
    assert str(info.value) == f"{path}:2: not valid UTF-8"
    reader = TraceReader(path, strict=False)
    assert [s.values for s in reader] == [{"loss": 1.0}, {"lo\u00dfs": 2.0}]
    assert reader.skipped == 1 and reader.errors == [f"{path}:2: not valid UTF-8"]


def test_a_writer_starts_empty_and_a_resume_puts_the_earlier_lines_back(tmp_path):
    path = tmp_path / "t.jsonl"
    before = tmp_path / "t.jsonl.before"
    old = "".join(json.dumps(encode_sample(Sample(step=i, time=None, values={"loss": 1.0})))
                  + "\n" for i in range(1, 6))
    path.write_text(old)
    w = TraceWriter(path)
    # the path starts empty, as it always did; the earlier lines wait aside for a resume
    assert path.read_text() == "" and before.read_text() == old
    w.write(Sample(step=1, time=None, values={"loss": 2.0}))
    w.flush()                                # not resumed: the earlier lines are gone
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1]
    assert not before.exists()
    w.close()
    path.write_text(old)
    TraceWriter(path).close()                # a run that wrote nothing leaves an empty file
    assert path.read_text() == "" and not before.exists()
    # resumed at step 3: lines 1-3 back, 4-5 (trained after the checkpoint) and a line cut
    # short by a crash dropped, and the run appends after step 3
    path.write_text(old + '{"v":1,"step":6,"lo')
    w = TraceWriter(path)
    assert w.resume(3) == 3 and w.resume(3) == 0     # once, before anything is written
    assert not before.exists()
    w.write(Sample(step=4, time=None, values={"loss": 3.0}))
    w.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4] and lines[-1]["loss"] == 3.0


def test_a_device_file_is_a_trace_target_as_before():
    w = TraceWriter("/dev/null")
    w.write(Sample(step=1, time=None, values={"loss": 2.0}))
    w.close()
    assert w.ok and w.lines_written == 1


def test_a_linked_trace_stays_a_link_and_an_orphaned_before_file_is_adopted(tmp_path):
    real, link = tmp_path / "real.jsonl", tmp_path / "link.jsonl"
    old = "".join(json.dumps(encode_sample(Sample(step=i, time=None, values={"loss": 1.0})))
                  + "\n" for i in range(1, 6))
    real.write_text(old)
    link.symlink_to(real)
    w = TraceWriter(link)
    w.write(Sample(step=1, time=None, values={"loss": 2.0}))
    w.close()
    assert link.is_symlink() and [json.loads(x)["step"] for x in real.read_text().splitlines()] == [1]
    # an open that died before writing left the lines in PATH.before and the path empty: the
    # next open (a resume) still finds them
    real.write_text(old)
    dead = TraceWriter(real)                 # dies: never written, never closed
    assert dead._fd is not None
    del dead                                 # (its file and lock go with it, as with the
    gc.collect()                             # process; an os.close here is closed again)
    assert real.read_text() == ""
    w = TraceWriter(real)
    assert w.resume(3) == 3
    w.close()
    assert [json.loads(x)["step"] for x in real.read_text().splitlines()] == [1, 2, 3]


def test_a_second_writer_of_a_trace_being_written_writes_nothing_and_says_why(tmp_path):
    path = tmp_path / "same.jsonl"
    first = TraceWriter(path)
    first.write(Sample(step=1, time=None, values={"loss": 1.0}))
    first.flush()
    errors = []
    second = TraceWriter(path, on_error=lambda: errors.append(1))
    second.write(Sample(step=1, time=None, values={"loss": 9.0}))
    second.close()
    first.write(Sample(step=2, time=None, values={"loss": 1.0}))
    first.close()
    assert errors and not second.ok
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]
    assert not (tmp_path / "same.jsonl.before").exists()


def test_a_writer_dropped_without_close_lets_the_next_one_write(tmp_path):
    """A Watcher dropped without close() (an exception in a notebook cell, and the cell run
    again) held its trace's lock until the process ended: the next writer wrote nothing."""
    path = tmp_path / "t.jsonl"
    dropped = TraceWriter(path)
    dropped.write(Sample(step=1, time=None, values={"loss": 1.0}))
    dropped.flush()
    del dropped
    gc.collect()
    errors = []
    w = TraceWriter(path, on_error=lambda: errors.append(1))
    w.write(Sample(step=1, time=None, values={"loss": 2.0}))
    w.close()
    w.close()
    assert not errors and w.ok
    assert [json.loads(x)["loss"] for x in path.read_text().splitlines()] == [2.0]


def test_a_process_forked_while_a_trace_is_written_does_not_keep_it_locked(tmp_path):
    """DataLoader workers forked after the Watcher opened its trace inherited the file and its
    lock: still alive once the writer closed (persistent workers), they kept the next writer
    of the path in this process (a second fit, a cell run again) from writing anything."""
    import multiprocessing

    path = tmp_path / "t.jsonl"
    first = TraceWriter(path)
    first.write(Sample(step=1, time=None, values={"loss": 1.0}))
    ctx = multiprocessing.get_context("fork")
    ready, done = ctx.Event(), ctx.Event()

    def work() -> None:   # a worker: up and running, alive until the end
        ready.set()
        done.wait(30)

    worker = ctx.Process(target=work)
    worker.start()
    try:
        assert ready.wait(30)
        first.close()
        errors = []
        second = TraceWriter(path, on_error=lambda: errors.append(1))
        second.write(Sample(step=1, time=None, values={"loss": 2.0}))
        second.close()
    finally:
        done.set()
        worker.join(30)
    assert not errors and second.ok
    assert [json.loads(x)["loss"] for x in path.read_text().splitlines()] == [2.0]


def test_a_last_line_cut_short_says_so_and_what_to_do(tmp_path):  # type: ignore[no-untyped-def]
    """A run that stopped while it wrote its last line (fourteenth round's audit, docs/rules.md)
    was refused with only json's "Unterminated string starting at: line 1 column 13", which
    neither says why nor what to do; a whole bad line elsewhere keeps json's message alone."""
    path = tmp_path / "crashed.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.9}\n{"step": 3, "lo')
    with pytest.raises(TraceFormatError, match=r"crashed.jsonl:3: the last line is cut short, "
                                               r"without its newline .*--lenient skips it"):
        read_trace(path)
    reader = TraceReader(path, strict=False)
    assert [s.step for s in reader] == [1, 2] and reader.skipped == 1
    path.write_text('{"step": 1, "lo\n{"step": 2, "loss": 1.9}\n')
    with pytest.raises(TraceFormatError) as info:
        read_trace(path)
    assert "cut short" not in str(info.value) and ":1: " in str(info.value)
