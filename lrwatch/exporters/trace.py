"""Trace format v1: JSON Lines, one object per optimizer step (or serving window).

The format is a contract (see docs/design.md)::

    {"step": 120, "time": 1764300000.5, "lr": 0.001, "loss": 2.31, "grad_norm": 1.2}

``step`` is required and strictly increasing; ``time`` is optional; ``lr`` is a number or a list
with one number per parameter group; every other key is a metric with a number. Non-finite numbers
are written as the strings ``"nan"``, ``"inf"`` and ``"-inf"``; readers also accept bare
``NaN``/``Infinity``. A line may carry ``"events": [...]``.

Examples
--------
>>> import io
>>> from lrwatch.samples import Sample
>>> buf = io.StringIO()
>>> w = TraceWriter(buf)
>>> w.write(Sample(step=1, time=None, values={"lr": 0.1, "loss": float("nan")}, lr_groups=(0.1,)))
>>> buf.getvalue()
'{"step": 1, "lr": 0.1, "loss": "nan"}\\n'
>>> [s.values["loss"] for s in iter_trace(io.StringIO(buf.getvalue()))]
[nan]
"""

from __future__ import annotations

import json
import logging
import os
import time
import weakref
from pathlib import Path
from typing import IO, Callable, Iterable

try:
    import fcntl
except ImportError:   # not POSIX: no advisory locks
    fcntl = None  # type: ignore[assignment]

from ..samples import Sample
from ..trace import TraceReader, encode_sample, iter_trace, read_trace

__all__ = ["TraceWriter", "TraceReader", "iter_trace", "read_trace", "encode_sample"]

# The codec lives in lrwatch.trace (torch-free, exporter-free); re-exported here for callers
# that import it from the exporter, as before.

_log = logging.getLogger("lrwatch")

class TraceWriter:
    """Writes samples as trace v1 lines to a path or an open text stream.

    Lines are kept in memory and pushed to the OS by :meth:`flush` (the Watcher calls it once
    per flush, at most once a second), whole lines only. A path is opened for appending with
    ``append=True``. Otherwise it starts empty; what an earlier run wrote there is moved
    aside (``PATH.before``) until the first lines are written or the writer closes, so that
    :meth:`resume`, called before that, can put the earlier run's lines back: a Watcher
    resumed from a checkpoint continues its trace. (A process that dies before it writes
    anything leaves the earlier lines in ``PATH.before``.)

    **Fail open** (for a path): a trace that cannot be opened or written (a read-only
    directory, a full disk) never stops training. A failed write is cut back to the last whole
    line (``ftruncate``), its lines are dropped and counted in :attr:`failures`, and the next
    flush tries again, so the trace has a gap but no broken line. Only the first failure is
    logged, as one line; with ``on_error`` every failure is also reported to it (the Watcher
    counts them in ``lrwatch_internal_errors_total``). Without ``on_error`` the first failure
    is raised once, from the first call after it, so that the caller's own error handling
    sees it; later ones are only counted. A stream target (an open text file you own) is
    written directly and its errors are yours.
    """

    #: Pending bytes above which a flush happens whatever ``min_interval`` says.
    MAX_PENDING = 1 << 20

    def __init__(self, target: str | os.PathLike[str] | IO[str], *, append: bool = False,
                 on_error: Callable[[], object] | None = None) -> None:
        self.lines_written = 0
        #: I/O failures absorbed (a failed open counts once, then once per dropped flush).
        self.failures = 0
        self.on_error = on_error
        self._last_flush = 0.0
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._pending_lines = 0
        self._fd: int | None = None
        self._closer: Callable[[], object] | None = None   # closes _fd, once
        self._stream: IO[str] | None = None
        self._raise: OSError | None = None
        self._logged = False
        self._before: Path | None = None   # an earlier run's lines, until resumed or dropped
        if isinstance(target, (str, os.PathLike)):
            # absolute: a writer opened again on it (a resume, the last line amended at the
            # close) after the process changed directory wrote a second trace there
            self.path: str | None = os.path.abspath(target)
            try:
                path = Path(target)
                if path.parent and not path.parent.exists():
                    path.parent.mkdir(parents=True, exist_ok=True)
                path = Path(os.path.realpath(path))   # a link keeps pointing at the trace
                _not_held(path)
                before = path.with_name(path.name + ".before")
                if not append and path.is_file() and path.stat().st_size > 0:
                    os.replace(path, before)
                    self._before = before
                elif not append and before.is_file():
                    self._before = before   # an earlier open died before it wrote anything
                flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
                self._fd = os.open(path, flags, 0o644)
                # a writer dropped without close() (an exception in a notebook cell) must not
                # hold its file, and the lock on it, until the process ends
                self._closer = weakref.finalize(self, _close_fd, self._fd)
                _OPEN.add(self)   # (see _forget_in_child)
                _hold(self._fd)
                self._good = os.lseek(self._fd, 0, os.SEEK_END)  # the end of the last whole line
            except OSError as exc:
                self._put_back_before()
                self._failed(exc, "open")
        else:
            self._stream = target
            self.path = getattr(target, "name", None)

    def resume(self, step: int) -> int:
        """Continue the file a run wrote before it was resumed at ``step``: put back its lines
        up to that step (the ones after it were trained after the checkpoint, and are trained
        again now; a last line cut short by a crash goes too), and append after them. Only
        before anything was written here (else it does nothing); returns the lines kept."""
        before, self._before = self._before, None
        if self._fd is None or before is None or self.lines_written or self._pending:
            if before is not None:
                _unlink(before)
            return 0
        kept = 0
        try:
            with open(before, "rb") as fh:
                for raw in fh:
                    at = _step_of(raw) if raw.endswith(b"\n") else None
                    if at is None or at > step:
                        break
                    view = memoryview(raw)
                    while view:
                        view = view[os.write(self._fd, view):]
                    self._good += len(raw)
                    kept += 1
        except OSError as exc:
            self._cut_back()   # (a full disk: no half line for the next lines to follow)
            self._failed(exc, "resume")
        _unlink(before)
        return kept

    def _put_back_before(self) -> None:
        """The trace could not be opened after the earlier run's lines were moved aside (no
        inode left on a full disk): they go back to the path, or the close would delete them
        although this run wrote nothing."""
        before, self._before = self._before, None
        if before is not None and self._fd is None:
            try:
                os.replace(before, before.with_name(before.name[:-len(".before")]))
            except OSError:
                pass

    def _drop_before(self) -> None:
        """A run that was not resumed: the earlier run's lines go, as opening the file for
        writing would have dropped them."""
        before, self._before = self._before, None
        if before is not None:
            _unlink(before)

    @property
    def ok(self) -> bool:
        """Whether every write so far reached the OS."""
        return self.failures == 0

    def write(self, sample: Sample) -> None:
        self.write_many((sample,))

    def write_many(self, samples: Iterable[Sample]) -> None:
        lines = [json.dumps(encode_sample(s), allow_nan=False) + "\n" for s in samples]
        if self._stream is not None:
            self._stream.write("".join(lines))
            self.lines_written += len(lines)
            return
        self._raise_pending()
        if self._fd is None:
            return  # could not open: counted at open
        data = "".join(lines).encode("utf-8")
        self._pending.append(data)
        self._pending_bytes += len(data)
        self._pending_lines += len(lines)
        if self._pending_bytes >= self.MAX_PENDING:
            self.flush()

    def flush(self, *, min_interval: float = 0.0) -> None:
        """Push pending lines to the OS; with ``min_interval``, at most that often (seconds)."""
        now = time.monotonic()
        if min_interval and now - self._last_flush < min_interval \
                and self._pending_bytes < self.MAX_PENDING:
            return
        self._last_flush = now
        if self._stream is not None:
            self._stream.flush()
            return
        self._raise_pending()
        if self._fd is None or not self._pending:
            return
        data = b"".join(self._pending)
        lines = self._pending_lines
        self._pending.clear()
        self._pending_bytes = self._pending_lines = 0
        try:
            self._drop_before()
            view = memoryview(data)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError as exc:
            self._cut_back()
            self._failed(exc, f"write {lines} line(s) to")
            self._raise_pending()
            return
        self._good += len(data)
        self.lines_written += lines

    def _cut_back(self) -> None:
        """After a failed write: cut the file back to the last whole line (a reader must never
        meet half a record)."""
        assert self._fd is not None
        try:
            os.ftruncate(self._fd, self._good)
            os.lseek(self._fd, self._good, os.SEEK_SET)  # or the next write leaves a hole
        except OSError:
            pass

    def _failed(self, exc: OSError, what: str) -> None:
        self.failures += 1
        if self.on_error is not None:
            try:
                self.on_error()
            except Exception:
                _log.exception("lrwatch: trace on_error callback failed")
        elif self._raise is None and self.failures == 1:
            self._raise = exc  # the caller hears of the first failure once, and logs it
            return
        if not self._logged:
            self._logged = True
            _log.warning("lrwatch: could not %s the trace %s: %s; training goes on, and further "
                         "trace failures are only counted", what, self.path, exc)

    def _raise_pending(self) -> None:
        exc, self._raise = self._raise, None
        if exc is not None:
            self._logged = True  # the caller logs this one
            raise exc

    def _forget(self) -> None:
        """In a forked child (a DataLoader worker): let go of the inherited file without
        writing or unlocking it (the lock is the parent's, and stays while the parent keeps
        its descriptor)."""
        self._fd, self._before = None, None
        self._pending, self._pending_bytes, self._pending_lines = [], 0, 0
        if self._closer is not None:
            self._closer()

    def close(self) -> None:
        if self._stream is not None:
            try:
                self._stream.flush()
            finally:
                self._stream = None
            return
        try:
            self.flush()
            self._drop_before()
        finally:
            if self._fd is not None:
                self._fd = None
                if self._closer is not None:
                    self._closer()   # closes the fd, once
                _OPEN.discard(self)

    def __enter__(self) -> "TraceWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _step_of(raw: bytes) -> int | None:
    """The ``step`` of one trace line, or ``None`` when it holds none (a broken line)."""
    try:
        step = json.loads(raw).get("step")
    except (ValueError, AttributeError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


#: the writers holding a file, for :func:`_forget_in_child`
_OPEN: "weakref.WeakSet[TraceWriter]" = weakref.WeakSet()


def _forget_in_child() -> None:
    """A process forked while a writer holds its trace (DataLoader workers, forked after
    the Watcher opened it) inherited the descriptor and with it the advisory lock: alive
    after the writer closed (persistent workers), they kept the next writer of the path,
    in this process, from writing anything. The child closes its copies."""
    for writer in list(_OPEN):
        writer._forget()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


def _close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def _hold(fd: int) -> None:
    """Mark the trace as written by this writer (an advisory lock, released when the file is
    closed or the process ends), so that a second writer of the same path finds it held."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pass   # a file system without locks: nothing to mark


def _not_held(path: Path) -> None:
    """Raise ``OSError`` when another live writer holds the trace at ``path`` (two Watchers
    on one path would interleave or drop each other's lines)."""
    if fcntl is None or not path.is_file():
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise OSError(f"another writer (a Watcher in this or another process) is writing "
                      f"{path}; give each run its own trace path") from None
    except OSError:
        pass
    finally:
        os.close(fd)   # (releases the probe's lock)
