"""Durability: atomic snapshots plus a write-ahead journal of accepted HTTP payloads.

* An HTTP payload is appended to the journal *before* the client gets its answer (an ``O_APPEND``
  write: once it returns, the bytes are in the page cache and survive ``kill -9``).
* The worker applies journal entries (and tailed file lines) in order and, at most every
  ``snapshot_interval`` seconds, writes a snapshot of everything it holds (counters, the open
  window, pending labels, detector and rule state, journal position and file offsets) with
  :func:`atomic_write`: temporary file, ``fsync``, ``rename``, ``fsync`` of the directory.
* On start the snapshot is loaded and the journal is replayed from the snapshot's position; a
  torn last entry (a write cut by the kill, never acknowledged) is cut off. So nothing that was
  acknowledged is lost, and nothing is applied twice.
* A snapshot that cannot be read or is no state (every field the loader reads is checked
  first, :mod:`.state_check`) is renamed ``state.json.bad-<time>`` and the whole journal
  rebuilds the state, while the journal still starts at its first segment
  (:func:`load_checked_snapshot`).

Journal entry: ``b"<kind> <length> <time>\\n" + payload + b"\\n"``; segments
``journal-000001.log``, ... are deleted once a snapshot has moved past them.

A full or failing disk: a write that fails (``ENOSPC``, ``EIO``, ...) raises, and the caller
answers 503 (the payload was not acknowledged, so it is not counted). Whatever part of the entry
reached the file is cut off again at once (``ftruncate`` to the last whole entry); if even that
fails, the next append cuts it before it writes. So no entry is ever written after a partial
one, and the journal holds only whole entries followed, at worst, by one torn tail (a crash
between the partial write and the cut), which replay removes. :attr:`Journal.error` is the last
failure (``None`` once a write succeeds or :meth:`Journal.probe` finds space again): the
daemon's ``/healthz`` is not ok meanwhile.
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Any, Callable, Iterator

from ..errors import ConfigError
from .records import dumps_bytes, loads
from .state_check import newer_version, snapshot_problem

__all__ = ["atomic_write", "Journal", "load_snapshot", "load_checked_snapshot", "save_snapshot"]

_log = logging.getLogger("lrwatch.daemon")

_SEGMENT = re.compile(r"^journal-(\d{6})\.log$")
SNAPSHOT = "state.json"


def atomic_write(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves either the old or the new file."""
    path = os.fspath(path)
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:  # a full disk: do not leave a half-written file holding the space
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def save_snapshot(directory: str, state: dict[str, Any]) -> None:
    # orjson when installed: the snapshot holds the open window and up to 100,000 pending
    # labels, and is written every couple of seconds
    atomic_write(os.path.join(directory, SNAPSHOT), dumps_bytes(state))


def load_snapshot(directory: str) -> dict[str, Any] | None:
    """The saved state, ``None`` when there is none; ``ValueError`` when the file is not a
    state (empty, truncated, garbage)."""
    try:
        with open(os.path.join(directory, SNAPSHOT), "rb") as fh:
            d = loads(fh.read())
    except FileNotFoundError:
        return None
    if not isinstance(d, dict):
        raise ValueError(f"not a JSON object but a {type(d).__name__}")
    return d


def load_checked_snapshot(directory: str, version: int, segments: list[int],
                          on_set_aside: Callable[[], Any]) -> dict[str, Any] | None:
    """The saved state, checked (:func:`.state_check.snapshot_problem`) before anything is
    restored; ``None`` when there is none. One that cannot be read (empty, truncated, garbage)
    or is no state of ``version`` (``{}``, a counter ``"x"``) is set aside and ``None``
    returned, so that the whole journal rebuilds the state, while the journal's ``segments``
    still start at the first; else a ConfigError says what to do, as for a state of a newer
    lrwatch (never silently downgraded)."""
    where = os.path.join(directory, SNAPSHOT)
    try:
        snap = load_snapshot(directory)
    except ValueError as exc:
        return _set_aside(where, str(exc), segments, on_set_aside)
    if snap is None:
        return None
    if newer_version(snap, version):
        raise ConfigError(f"{where} was written by a newer lrwatch (state version "
                          f"{snap['version']}, this one reads {version}): run that version, "
                          f"or move {directory} away to start afresh")
    problem = snapshot_problem(snap, version)
    if problem is None:
        return snap
    return _set_aside(where, f"no state of version {version}: {problem}", segments,
                      on_set_aside)


def _set_aside(where: str, why: str, segments: list[int],
               on_set_aside: Callable[[], Any]) -> None:
    """Rename a snapshot that is no state out of the way (kept for a look, never deleted) so
    that the whole journal rebuilds it, or say what to do when the journal no longer holds
    every record."""
    if not (segments and segments[0] == 1):
        raise ConfigError(f"{where} cannot be read ({why}) and the journal no longer holds "
                          f"every record (its oldest segment is "
                          f"{segments[0] if segments else 'gone'}): restore the file from a "
                          f"backup, or move {os.path.dirname(where)} away to start afresh")
    stem = aside = f"{where}.bad-{time.strftime('%Y%m%dT%H%M%S')}"
    n = 1
    while os.path.exists(aside):
        n += 1
        aside = f"{stem}.{n}"
    os.replace(where, aside)
    on_set_aside()
    _log.warning("%s cannot be restored (%s): moved to %s, and the state is rebuilt from the "
                 "whole journal (nothing acknowledged is lost); look at the moved file, delete "
                 "it when done", where, why, aside)
    return None


class Journal:
    """Append-only segments of ``(kind, time, payload)`` entries in ``directory``."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        segs = self.segments()
        self.segment = segs[-1] if segs else 1
        self._fd = -1
        self.size = 0  # bytes of whole entries in the open segment
        #: the last write failure (``None`` while the journal can be written)
        self.error: OSError | None = None
        self._torn = False  # a failed write may have left part of an entry after ``size``

    def segments(self) -> list[int]:
        out = []
        for name in os.listdir(self.directory):
            m = _SEGMENT.match(name)
            if m:
                out.append(int(m.group(1)))
        return sorted(out)

    def path(self, seg: int) -> str:
        return os.path.join(self.directory, f"journal-{seg:06d}.log")

    def open(self) -> None:
        """Open the newest segment for appending (after :meth:`replay` cut any torn tail)."""
        self._fd = os.open(self.path(self.segment), os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                           0o644)
        self.size = os.fstat(self._fd).st_size

    def append(self, kind: bytes, t: float, payload: bytes) -> tuple[int, int]:
        """Write one entry; returns ``(segment, offset after it)``. Caller holds the lock.

        Raises ``OSError`` when the entry could not be written whole; the file then ends
        after the last whole entry (or is cut there before the next write)."""
        data = b"%s %d %.6f\n" % (kind, len(payload), t) + payload + b"\n"
        try:
            if self._torn:
                self._cut()
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as exc:
            self.error = exc
            self._torn = True
            try:
                self._cut()
            except OSError:
                pass  # cut before the next write (see above)
            raise
        self.size += len(data)
        self.error = None
        return self.segment, self.size

    def _cut(self) -> None:
        os.ftruncate(self._fd, self.size)
        self._torn = False

    def probe(self, free_bytes: int = 1 << 20) -> bool:
        """After a failure: cut any partial entry, and clear :attr:`error` once the file system
        has ``free_bytes`` again (so health recovers without waiting for a client). Caller
        holds the lock. Returns whether the journal looks writable."""
        if self.error is None:
            return True
        try:
            if self._torn:
                self._cut()
            st = os.statvfs(self.directory)
            if st.f_bavail * st.f_frsize < free_bytes:
                return False
        except OSError:
            return False
        self.error = None
        return True

    def roll(self) -> None:
        """Start a new segment (caller holds the lock). If the new file cannot be created
        (a full disk), the current segment stays open and ``OSError`` is raised."""
        fd = os.open(self.path(self.segment + 1), os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                     0o644)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd
        self.segment += 1
        self.size = 0
        self._torn = False

    def prune(self, keep_from: int) -> None:
        """Delete segments older than ``keep_from``."""
        for seg in self.segments():
            if seg < keep_from:
                try:
                    os.unlink(self.path(seg))
                except FileNotFoundError:
                    pass

    def replay(self, seg: int, offset: int) -> Iterator[tuple[int, int, bytes, float, bytes]]:
        """Entries after ``(seg, offset)``: ``(segment, end offset, kind, time, payload)``.

        A torn entry at the end of the newest segment is truncated away.
        """
        for s in self.segments():
            if s < seg:
                continue
            start = offset if s == seg else 0
            with open(self.path(s), "rb") as fh:
                data = fh.read()
            pos = start
            while pos < len(data):
                nl = data.find(b"\n", pos)
                ok = nl >= 0
                if ok:
                    try:
                        kind, length, t = data[pos:nl].split(b" ")
                        end = nl + 1 + int(length)
                        ok = end < len(data) and data[end:end + 1] == b"\n"
                    except ValueError:
                        ok = False
                if not ok:  # torn: never acknowledged, so never counted
                    with open(self.path(s), "r+b") as fh:
                        fh.truncate(pos)
                    break
                yield s, end + 1, kind, float(t), data[nl + 1:end]
                pos = end + 1

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
