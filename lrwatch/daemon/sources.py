"""Tailing JSONL files: follows rotation and truncation, resumes from the applied offset.

The tailer reads whole lines only (a partial last line waits for its newline), in chunks, and
hands each raw chunk to :meth:`Daemon.enqueue_file` together with the file identity
``(dev, inode)`` and the offset it ends at (the worker parses it, see :mod:`.columnar`); the worker records that offset only once the lines are applied, and the
snapshot saves it with the state, so a restart resumes exactly after the last applied line.

* **Rotation** (the path now names another inode): the old file is read to its end first (from
  its open descriptor, or found again by inode in the same directory after a restart), then the
  new file from offset 0.
* **Truncation** (the file is shorter than the offset): reading restarts at 0.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, BinaryIO

__all__ = ["FileTailer"]

_log = logging.getLogger("lrwatch.daemon")
# ~900 records of 585 bytes: small batches keep the freshly parsed records in the CPU
# cache while the worker windows them (measurably faster than 4 MiB)
CHUNK = 128 * 1024


@dataclass
class _Position:
    """How far a :class:`FileTailer` is: the file it reads and its ``(dev, inode)``, the offset
    up to which lines were handed over, the partial line read past it, and the bytes of a line
    over the limit dropped so far (not buffered)."""

    fh: BinaryIO | None = None
    dev: int = 0
    ino: int = 0
    offset: int = 0
    buf: bytes = b""
    skipped: int = 0


class FileTailer:
    """Follows one JSONL file for a :class:`~lrwatch.daemon.core.Daemon`."""

    def __init__(self, daemon: Any, path: str, poll: float = 0.2) -> None:
        self.daemon = daemon
        self.path = os.path.abspath(path)
        self.poll = poll
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: why the path cannot be opened now (a ``PROBLEMS`` reason), ``None`` while it can
        self.problem: str | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"lrwatch-tail:{self.path}",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _find_inode(self, dev: int, ino: int) -> str | None:
        d = os.path.dirname(self.path)
        try:
            for e in os.scandir(d):
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                if st.st_dev == dev and st.st_ino == ino and e.is_file():
                    return e.path
        except OSError:
            return None
        return None

    def _run(self) -> None:
        pos = self._resume()
        limit = self.daemon.limits.max_line_bytes
        while not self._stop.is_set():
            try:
                if pos.fh is None and not self._open(pos):
                    self._stop.wait(self.poll)
                    continue
                data = self._read(pos)
                if data:
                    if not self._consume(pos, data, limit):
                        break  # the daemon refused (it is stopping): close the file below
                    continue
                if self._rotated(pos):
                    _log.info("%s was rotated; following the new file", self.path)
                    if not self._flush_partial(pos):
                        break
                    pos.fh.close()
                    pos.fh = None
                    continue
                self._stop.wait(self.poll)
            except OSError:
                self.daemon.metrics.internal_errors.inc()
                _log.exception("tailing %s failed", self.path)
                if pos.fh is not None:
                    pos.fh.close()
                pos.fh = None
                self._stop.wait(max(self.poll, 1.0))
        if pos.fh is not None:
            pos.fh.close()

    def _resume(self) -> _Position:
        """Where the snapshot left this path: its file (found by inode, rotated or not) at the
        applied offset, or nothing yet when that file is gone."""
        pos = _Position()
        saved = self.daemon.files.get(self.path)
        if saved:
            dev, ino, offset = saved
            old = self._find_inode(dev, ino)
            if old is not None:
                pos.fh = open(old, "rb")
                pos.dev, pos.ino, pos.offset = dev, ino, offset
        return pos

    def _open(self, pos: _Position) -> bool:
        """Open the path (``False``: not there yet); a file other than the one the position
        is in is read from its start."""
        try:
            pos.fh = open(self.path, "rb")
        except FileNotFoundError:
            return False
        except OSError as exc:  # a directory, no permission: say so once, retry quietly
            self._cannot_open(exc)
            return False
        if self.problem is not None:
            _log.warning("%s can be read again; following it", self.path)
            self.problem = None
        st = os.fstat(pos.fh.fileno())
        if (st.st_dev, st.st_ino) != (pos.dev, pos.ino):
            pos.dev, pos.ino, pos.offset = st.st_dev, st.st_ino, 0
        pos.buf, pos.skipped = b"", 0
        return True

    def _cannot_open(self, exc: OSError) -> None:
        """The path exists but cannot be read: one log line saying what to do and one count
        per episode (it was a traceback and an internal error every second), then quiet
        retries until a file can be opened there again."""
        if isinstance(exc, (IsADirectoryError, NotADirectoryError)):
            reason, what = "tail_not_a_file", ("is not a file (a directory, or a path through a "
                                               "file)")
        else:
            reason, what = "tail_unreadable", f"cannot be opened ({exc.strerror or exc})"
        if self.problem == reason:
            return
        self.problem = reason
        self.daemon.metrics.problems[reason].inc()
        _log.warning("tailed path %s %s: nothing is read from it until it can be; put the "
                     "JSONL file there (or fix --tail / the config's tail:); retrying every "
                     "%g s without a word", self.path, what, self.poll)

    def _read(self, pos: _Position) -> bytes:
        """The next chunk after what was read (from the start if the file was truncated)."""
        st = os.fstat(pos.fh.fileno())
        if st.st_size < pos.offset + len(pos.buf) + pos.skipped:  # truncated in place
            _log.info("%s was truncated; reading from the start", self.path)
            self._flush_partial(pos)
            pos.offset, pos.buf, pos.skipped = 0, b"", 0
        pos.fh.seek(pos.offset + len(pos.buf) + pos.skipped)
        return pos.fh.read(CHUNK)

    def _consume(self, pos: _Position, data: bytes, limit: int) -> bool:
        """Hand the whole lines ``data`` completes to the daemon, keep the partial last one;
        ``False`` when the daemon refused them (it is stopping)."""
        if pos.skipped:  # inside a line over the limit: drop it up to its newline
            return self._skip_long_line(pos, data)
        pos.buf += data
        if len(pos.buf) > limit and b"\n" not in pos.buf:
            # never buffer (or parse) a line past the limit: one rejection
            _log.warning("%s: a line over %d bytes at offset %d is skipped",
                         self.path, limit, pos.offset)
            pos.skipped, pos.buf = len(pos.buf), b""
            return True
        cut = pos.buf.rfind(b"\n")
        if cut < 0:
            return True
        chunk = pos.buf[:cut]  # whole lines; the worker parses them
        pos.offset += cut + 1
        pos.buf = pos.buf[cut + 1:]
        return bool(self.daemon.enqueue_file(self.path, pos.dev, pos.ino, pos.offset, chunk,
                                             time.time()))

    def _flush_partial(self, pos: _Position) -> bool:
        """The file is done (rotated away or truncated): its last line, which no newline
        ended, goes to the worker as it is, parsed like any line (a whole record is
        accepted, a cut one is ``invalid_json``), so it is counted either way; a long line
        being skipped is counted as ``line_too_long``. Before, it was dropped without a
        count. ``False`` when the daemon refused it (it is stopping)."""
        buf, skipped = pos.buf, pos.skipped
        pos.offset += len(buf) + skipped
        pos.buf, pos.skipped = b"", 0
        if skipped:
            return bool(self.daemon.enqueue_file(self.path, pos.dev, pos.ino, pos.offset, [],
                                                 time.time(), {"line_too_long": 1}))
        if not buf.strip():
            return True
        return bool(self.daemon.enqueue_file(self.path, pos.dev, pos.ino, pos.offset, buf,
                                             time.time()))

    def _skip_long_line(self, pos: _Position, data: bytes) -> bool:
        """Drop ``data`` up to the newline that ends the over-long line, and count the line as
        rejected once it ends; ``False`` when the daemon refused that (it is stopping)."""
        nl = data.find(b"\n")
        if nl < 0:
            pos.skipped += len(data)
            return True
        pos.offset += pos.skipped + nl + 1
        pos.skipped = 0
        return bool(self.daemon.enqueue_file(self.path, pos.dev, pos.ino, pos.offset, [],
                                             time.time(), {"line_too_long": 1}))

    def _rotated(self, pos: _Position) -> bool:
        """Whether the path now names another file than the one being read."""
        try:
            cur = os.stat(self.path)
        except (FileNotFoundError, NotADirectoryError):  # gone: the open file is read on
            return False
        return (cur.st_dev, cur.st_ino) != (pos.dev, pos.ino)
