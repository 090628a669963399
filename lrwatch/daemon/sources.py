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
from typing import Any

__all__ = ["FileTailer"]

_log = logging.getLogger("lrwatch.daemon")
# ~900 records of 585 bytes: small batches keep the freshly parsed records in the CPU
# cache while the worker windows them (measurably faster than 4 MiB)
CHUNK = 128 * 1024


class FileTailer:
    """Follows one JSONL file for a :class:`~lrwatch.daemon.core.Daemon`."""

    def __init__(self, daemon: Any, path: str, poll: float = 0.2) -> None:
        self.daemon = daemon
        self.path = os.path.abspath(path)
        self.poll = poll
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

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
        saved = self.daemon.files.get(self.path)
        fh = None
        dev = ino = 0
        offset = 0
        if saved:
            dev, ino, offset = saved
            old = self._find_inode(dev, ino)
            if old is not None:
                fh = open(old, "rb")
            else:
                dev = ino = offset = 0
        buf = b""
        skipped = 0  # bytes of a line over the limit read so far (not buffered)
        limit = self.daemon.limits.max_line_bytes
        while not self._stop.is_set():
            try:
                if fh is None:
                    try:
                        fh = open(self.path, "rb")
                    except FileNotFoundError:
                        self._stop.wait(self.poll)
                        continue
                    st = os.fstat(fh.fileno())
                    if (st.st_dev, st.st_ino) != (dev, ino):
                        dev, ino, offset = st.st_dev, st.st_ino, 0
                    buf, skipped = b"", 0
                st = os.fstat(fh.fileno())
                if st.st_size < offset:  # truncated in place
                    _log.info("%s was truncated; reading from the start", self.path)
                    offset, buf, skipped = 0, b"", 0
                fh.seek(offset + len(buf) + skipped)
                data = fh.read(CHUNK)
                if data:
                    if skipped:  # inside a line over the limit: drop it up to its newline
                        nl = data.find(b"\n")
                        if nl < 0:
                            skipped += len(data)
                            continue
                        offset += skipped + nl + 1
                        skipped = 0
                        if not self.daemon.enqueue_file(self.path, dev, ino, offset, [],
                                                        time.time(), {"line_too_long": 1}):
                            return
                        continue
                    buf += data
                    if len(buf) > limit and b"\n" not in buf:
                        # never buffer (or parse) a line past the limit: one rejection
                        _log.warning("%s: a line over %d bytes at offset %d is skipped",
                                     self.path, limit, offset)
                        skipped, buf = len(buf), b""
                        continue
                    cut = buf.rfind(b"\n")
                    if cut >= 0:
                        chunk = buf[:cut]  # whole lines; the worker parses them
                        offset += cut + 1
                        buf = buf[cut + 1:]
                        if not self.daemon.enqueue_file(self.path, dev, ino, offset, chunk,
                                                        time.time()):
                            return
                    continue
                # at the end: has the path been rotated to a new file?
                try:
                    cur = os.stat(self.path)
                    rotated = (cur.st_dev, cur.st_ino) != (dev, ino)
                except FileNotFoundError:
                    rotated = False
                if rotated:
                    _log.info("%s was rotated; following the new file", self.path)
                    fh.close()
                    fh = None
                    continue
                self._stop.wait(self.poll)
            except OSError:
                self.daemon.metrics.internal_errors.inc()
                _log.exception("tailing %s failed", self.path)
                if fh is not None:
                    fh.close()
                fh = None
                self._stop.wait(max(self.poll, 1.0))
        if fh is not None:
            fh.close()
