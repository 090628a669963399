"""Delayed labels: a bounded store of predictions waiting for their ground truth.

Predictions that carry an ``id`` wait in :class:`PendingLabels` (oldest evicted first when the
store is full, and counted); a label with that id joins them, and :func:`score` turns the pair
into correct/incorrect (classification) or an absolute error (regression).

Examples
--------
>>> p = PendingLabels(max_pending=2)
>>> p.add("a", 0.9, 10.0), p.add("b", 0.2, 11.0), p.add("c", 0.7, 12.0)
(0, 0, 1)
>>> p.join("a") is None, p.join("b")
(True, (0.2, 11.0, None))
>>> p.add_many(["d", "e"], [0.1, 0.6], [13.0, 14.0], window=3), len(p)
(1, 2)
>>> p.join("e")
(0.6, 14.0, 3)
>>> p.add("f", [0.1, 0.7, 0.2], 15.0), p.join("f")   # class probabilities: only the class waits
(0, (1, 15.0, None))
>>> score(0.9, 1, "probability"), score("cat", "dog", "class"), score(2.5, 3.0, "regression")
(1.0, 0.0, 0.5)
"""

from __future__ import annotations

from collections import OrderedDict, deque
from itertools import repeat
from typing import Any, Mapping

from .reference import cat_key

__all__ = ["EarlyLabels", "PendingLabels", "score", "is_classification"]


def is_classification(prediction_type: str) -> bool:
    return prediction_type in ("class", "probability", "probabilities")


def score(prediction: Any, label: Any, prediction_type: str) -> float | None:
    """1.0/0.0 for a right/wrong classification, the absolute error for regression, or
    ``None`` when the pair cannot be scored (a class name against a numeric label, say)."""
    if prediction_type == "regression":
        if type(prediction) in (int, float) and type(label) in (int, float):
            return abs(float(prediction) - float(label))
        return None
    if isinstance(prediction, list):
        best = max(range(len(prediction)), key=prediction.__getitem__)
        return 1.0 if cat_key(best) == cat_key(label) else 0.0
    if prediction_type == "probability" and type(prediction) is float:
        return 1.0 if (prediction >= 0.5) == (cat_key(label) == "1") else 0.0
    return 1.0 if cat_key(prediction) == cat_key(label) else 0.0


_SCALARS = frozenset({int, float, str, bool, type(None)})


def _predicted_class(p: list[Any]) -> int | None:
    return max(range(len(p)), key=p.__getitem__) if p else None


class EarlyLabels:
    """Labels that came before their prediction (a label pipeline racing the prediction log),
    by id: held at most ``hold_seconds`` (by arrival time) and at most ``max_labels`` of them,
    oldest given up first. ``hold_seconds == 0`` holds none.

    Every method that gives labels up returns how many, for the caller to count as unmatched.

    The ids joined in the last ``hold_seconds`` are remembered too (at most ``max_joined``,
    while labels are held at all): a label re-sent for a prediction already joined
    (at-least-once delivery) is a duplicate, not a label whose prediction is on its way, and
    must not be held for a later prediction that reuses the id (:meth:`was_joined`).

    >>> e = EarlyLabels(max_labels=2, hold_seconds=60.0)
    >>> e.hold("a", 1, 5.0, 10.0), e.hold("b", 0, 6.0, 11.0), e.hold("c", 1, 7.0, 12.0)
    (0, 0, 1)
    >>> e.take("a") is None, e.take("b"), len(e)
    (True, (0, 6.0), 1)
    >>> e.expire(71.0), e.expire(72.5), len(e)
    (0, 1, 0)
    >>> e.joined("p", 80.0); e.was_joined("p"), e.was_joined("q")
    (True, False)
    >>> e.predicted(["p"]); e.was_joined("p")   # a new prediction with that id: live again
    False
    """

    def __init__(self, max_labels: int = 10_000, hold_seconds: float = 300.0,
                 max_joined: int = 100_000) -> None:
        if max_labels < 0 or not hold_seconds >= 0 or max_joined < 0:
            raise ValueError(f"max_labels, hold_seconds and max_joined must be >= 0, got "
                             f"{max_labels}, {hold_seconds}, {max_joined}")
        self.max_labels = max_labels
        self.hold_seconds = float(hold_seconds)
        self.max_joined = max_joined
        # id -> (label, label time, arrival time), in arrival order
        self._items: OrderedDict[str, tuple[Any, float, float]] = OrderedDict()
        # id -> arrival time of its join, in that order
        self._joined: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def enabled(self) -> bool:
        """Whether labels are held at all."""
        return bool(self.max_labels and self.hold_seconds)

    def hold(self, id_: str, label: Any, t_label: float, t_arrival: float) -> int:
        """Hold a label whose prediction has not come; returns how many labels were given up
        (this one when nothing is held, a re-sent id's older label, the oldest when full)."""
        if not self.enabled:
            return 1
        items = self._items
        given_up = 0
        if items.pop(id_, None) is not None:
            given_up += 1  # a re-sent label: the newest wins
        items[id_] = (label, t_label, t_arrival)
        while len(items) > self.max_labels:
            items.popitem(last=False)
            given_up += 1
        return given_up

    def joined(self, id_: str, t_arrival: float) -> None:
        """A label of this id met its prediction (remembered while labels are held)."""
        if not self.enabled or not self.max_joined:
            return
        joined = self._joined
        joined.pop(id_, None)
        joined[id_] = t_arrival
        if len(joined) > self.max_joined:
            joined.popitem(last=False)

    def was_joined(self, id_: str) -> bool:
        """Whether a label of this id was joined in the last ``hold_seconds`` (and no
        prediction with the id came since): another label for it is a duplicate."""
        return id_ in self._joined

    def predicted(self, ids: list[str]) -> None:
        """Predictions with these ids came: a label for one of them is no duplicate."""
        joined = self._joined
        if joined and not joined.keys().isdisjoint(ids):
            for id_ in ids:
                joined.pop(id_, None)

    def trim(self) -> int:
        """Give up the oldest labels over ``max_labels`` (all of them when none are held: a
        state saved under larger limits); how many."""
        items = self._items
        keep = self.max_labels if self.enabled else 0
        k = max(len(items) - keep, 0)
        for _ in range(k):
            items.popitem(last=False)
        return k

    def expire(self, now: float) -> int:
        """Give up the labels held longer than ``hold_seconds`` at ``now``; how many. Joined
        ids older than that are forgotten too."""
        limit = now - self.hold_seconds
        joined = self._joined
        while joined and next(iter(joined.values())) < limit:
            joined.popitem(last=False)
        items = self._items
        k = 0
        while items:
            first = next(iter(items.values()))
            if first[2] >= limit:
                break
            items.popitem(last=False)
            k += 1
        return k

    def any_of(self, ids: list[str]) -> bool:
        """Whether a label is held for any of ``ids`` (one C-level pass: the common answer
        is no, and a batch then skips the per-record look-up)."""
        return bool(self._items) and not self._items.keys().isdisjoint(ids)

    def take(self, id_: str) -> tuple[Any, float] | None:
        """The ``(label, label time)`` held for this id (and forget it), or ``None``."""
        hit = self._items.pop(id_, None)
        return None if hit is None else (hit[0], hit[1])

    def state_dict(self) -> dict[str, Any]:
        return {"items": [[k, lab, t, a] for k, (lab, t, a) in self._items.items()],
                "joined": [[k, a] for k, a in self._joined.items()]}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        # snapshots before the joined ids were remembered have no "joined"
        self._items = OrderedDict((str(it[0]), (it[1], float(it[2]), float(it[3])))
                                  for it in (state or {}).get("items", []))
        self._joined = OrderedDict((str(it[0]), float(it[1]))
                                   for it in (state or {}).get("joined", []))


class PendingLabels:
    """Predictions waiting for labels, by id; at most ``max_pending``, oldest evicted first.

    Each remembers its prediction, its time and the index of the window it joined (the label
    is scored against that window's estimate, see :mod:`.estimate_tracking`). Labels that came
    first wait in :attr:`early` (an :class:`EarlyLabels`), saved with this store."""

    def __init__(self, max_pending: int = 100_000, early: EarlyLabels | None = None) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.max_pending = max_pending
        self._items: OrderedDict[str, tuple[Any, float, int | None]] = OrderedDict()
        self.early = early if early is not None else EarlyLabels()

    def __len__(self) -> int:
        return len(self._items)

    def add(self, id_: str, prediction: Any, t: float, window: int | None = None) -> int:
        """Remember a prediction; returns how many old ones were evicted (0 or 1)."""
        if type(prediction) is list:
            prediction = _predicted_class(prediction)
        items = self._items
        if id_ in items:
            del items[id_]  # a re-sent id: the newest prediction wins
        items[id_] = (prediction, t, window)
        if len(items) > self.max_pending:
            items.popitem(last=False)
            return 1
        return 0

    def add_many(self, ids: list[str], predictions: list[Any], times: list[float],
                 window: int | None = None) -> int:
        """:meth:`add` for a batch of one window (one C-level ``update`` when no id repeats);
        returns how many old predictions were evicted."""
        items = self._items
        if not _SCALARS.issuperset(map(type, predictions)):
            # class probabilities: a label is scored against the predicted class only, and
            # 100,000 waiting lists of k floats would hold k times the memory
            predictions = [_predicted_class(p) if type(p) is list else p for p in predictions]
        if len(set(ids)) != len(ids) or not items.keys().isdisjoint(ids):
            return sum(self.add(i, p, t, window) for i, p, t in zip(ids, predictions, times))
        items.update(zip(ids, zip(predictions, times, repeat(window))))
        over = len(items) - self.max_pending
        if over <= 0:
            return 0
        deque(map(items.popitem, repeat(False, over)), maxlen=0)  # the oldest, in C
        return over

    def trim(self) -> tuple[int, int]:
        """Forget the oldest predictions over ``max_pending``, and give up the oldest early
        labels over their limit (a state saved under larger limits: restored whole, the store
        stayed over its bound, and :meth:`add` evicts one per prediction); how many of
        each."""
        items = self._items
        k = max(len(items) - self.max_pending, 0)
        for _ in range(k):
            items.popitem(last=False)
        return k, self.early.trim()

    def join(self, id_: str) -> tuple[Any, float, int | None] | None:
        """The ``(prediction, time, window)`` waiting for this id (and forget it), or
        ``None``."""
        return self._items.pop(id_, None)

    def state_dict(self) -> dict[str, Any]:
        return {"items": [[k, p, t, w] for k, (p, t, w) in self._items.items()],
                "early": self.early.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        # snapshots before the window index was kept hold [id, prediction, time]; before
        # early labels were held, no "early"
        self.early.load_state_dict(state.get("early"))
        self._items = OrderedDict(
            (str(it[0]), (it[1], float(it[2]), int(it[3]) if len(it) > 3 and it[3] is not None
                          else None)) for it in state.get("items", []))
