"""The batches a rollback after a bad batch trains on again.

A sudden failure in a healthy run (a NaN batch, a batch of garbage) is the data's fault, not the
model's or the rate's: the policy goes back to the newest snapshot before the failure and keeps
the rate (:class:`~lrwatch.recovery.policy.RecoveryPolicy`). Going on with *new* batches from
there would leave out the good batches between the snapshot and the failure and change the
run's data order, which on small tasks alone moves the final accuracy by about a point. So
``watch.batches()`` holds on to the batches it yields (references, no copies), and after such a
rollback yields again the ones drawn since the snapshot, except those in the failure's window
(the policy's ``replay_drop``: the non-finite step itself, or the steps from the rules' ``for:``
margin before the firing up to it), before it draws new ones.

What is held is bounded by :attr:`ReplayBuffer.max_bytes` (the tensors' sizes; other objects
count as nothing) and by the oldest snapshot a sudden rollback can go back to. No batch is
copied: a loader that hands out the same memory again (a reused output buffer, as some
pipelines do) is noticed from the first tensor's address, and from then on nothing is held or
replayed (the rollback goes on with new batches); a loop that changes its batch *in place*
would replay the changed batch. Torch-free: sizes and addresses are read by duck typing
(``nelement()``, ``element_size()``, ``data_ptr()``).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Mapping

__all__ = ["ReplayBuffer", "batch_bytes", "first_pointer"]


def batch_bytes(batch: Any, _depth: int = 0) -> int:
    """The bytes of the tensors in ``batch`` (nested tuples, lists and mappings; else 0)."""
    if _depth > 8:
        return 0
    if hasattr(batch, "nelement") and hasattr(batch, "element_size"):
        try:
            return int(batch.nelement()) * int(batch.element_size())
        except Exception:
            return 0
    if isinstance(batch, Mapping):
        return sum(batch_bytes(v, _depth + 1) for v in batch.values())
    if isinstance(batch, (tuple, list)):
        return sum(batch_bytes(v, _depth + 1) for v in batch)
    return 0


def first_pointer(batch: Any, _depth: int = 0) -> int | None:
    """The memory address of the first tensor in ``batch`` (``data_ptr()``), or ``None``."""
    if _depth > 8:
        return None
    if hasattr(batch, "data_ptr") and hasattr(batch, "nelement"):
        try:
            return int(batch.data_ptr()) if batch.nelement() else None
        except Exception:
            return None
    items = batch.values() if isinstance(batch, Mapping) else (
        batch if isinstance(batch, (tuple, list)) else ())
    for v in items:
        p = first_pointer(v, _depth + 1)
        if p is not None:
            return p
    return None


class ReplayBuffer:
    """The batches yielded since the oldest snapshot a rollback may go back to, each with the
    step it was trained at, within ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._held: deque[tuple[int, Any, int, int | None]] = deque()  # step, batch, bytes, ptr
        self._bytes = 0
        self._queue: deque[Any] = deque()                    # what is to be replayed next
        self._pointers: set[int] = set()
        #: The loader hands out the same memory again (a reused output buffer): a held batch
        #: would be overwritten, so nothing is held or replayed any more.
        self.reused = False

    def __len__(self) -> int:
        return len(self._held)

    @property
    def held_bytes(self) -> int:
        return self._bytes

    def hold(self, step: int, batch: Any, oldest_target: int | None = None) -> None:
        """Keep ``batch``, trained at ``step``; forget what no rollback can replay: batches at or
        before ``oldest_target`` (the oldest snapshot a sudden rollback may restore) and the
        oldest ones past the byte limit."""
        if self.max_bytes <= 0 or self.reused:
            return
        ptr = first_pointer(batch)
        if ptr is not None and ptr in self._pointers:
            self.reused = True
            self.forget()
            return
        size = batch_bytes(batch)
        self._held.append((step, batch, size, ptr))
        self._bytes += size
        if ptr is not None:
            self._pointers.add(ptr)
        while self._held and (self._bytes > self.max_bytes or (
                oldest_target is not None and self._held[0][0] <= oldest_target)):
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        _, _, size, ptr = self._held.popleft()
        self._bytes -= size
        self._pointers.discard(ptr)  # type: ignore[arg-type]

    def replayable(self, after: int, drop: tuple[int, int]) -> list[Any]:
        """The held batches trained after step ``after``, in order, less those whose step lies
        in ``drop`` (inclusive)."""
        lo, hi = drop
        return [b for s, b, _, _ in self._held if s > after and not lo <= s <= hi]

    def begin(self, after: int, drop: tuple[int, int] | None,
              agree: Callable[[int], int] | None = None) -> str:
        """A rollback to step ``after``: queue what it replays (``drop``: the policy's
        ``replay_drop``; ``None``: nothing, the held batches are forgotten) and return the log
        line's words. ``agree(n)`` gives the number every rank can replay (the fewest held), so
        that all ranks stay in lock-step; every rank calls it, whatever it holds."""
        if drop is None:
            self.forget()
            return ""
        reused = self.reused
        batches = [] if reused else self.replayable(after, drop)
        if agree is not None:
            n = agree(len(batches))
            batches = batches[len(batches) - n:]
        self.start(batches)
        if reused:
            return "; no replay: the loader hands out the same batch memory again"
        lo, hi = drop
        dropped = f"step {lo}" if lo == hi else f"steps {lo}-{hi}"
        return (f"; replaying {len(batches)} batch(es) drawn since step {after}, "
                f"without those of {dropped}")

    def start(self, batches: list[Any]) -> None:
        """Replay ``batches`` next; the abandoned trajectory's batches are forgotten (the
        replayed ones are held again as they are trained on)."""
        self._held.clear()
        self._pointers.clear()
        self._bytes = 0
        self._queue = deque(batches)

    def forget(self) -> None:
        """A rollback without replay: the batches since its target belong to an abandoned
        trajectory (and what was still queued is dropped)."""
        self._held.clear()
        self._pointers.clear()
        self._bytes = 0
        self._queue.clear()

    def next(self) -> tuple[bool, Any]:
        """``(True, batch)`` for the next batch to replay, ``(False, None)`` when none is due."""
        if self._queue:
            return True, self._queue.popleft()
        return False, None

    @property
    def pending(self) -> int:
        return len(self._queue)
