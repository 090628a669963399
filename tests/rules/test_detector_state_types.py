"""A detector's saved state is checked before it is restored (sixteenth round): every value
of the kind the detector keeps there, or :class:`~lrwatch.errors.DamagedStateError` naming
it. The states detectors write themselves, after any stream, still load."""

from __future__ import annotations

import json
import random

import pytest

from lrwatch.errors import DamagedStateError
from lrwatch.rules.detectors import DETECTORS

_ARGS = {"threshold": {"above": 1.0}, "staleness": {"seconds": 5.0, "samples": 3},
         "ema_ratio": {"above": 2.0}, "start_ratio": {"above": 2.0}, "rate": {"above": 1.0}}


def _feed(det, rng: random.Random, n: int) -> None:
    for i in range(n):
        x = rng.gauss(0.0, 1.0) * 10.0 ** rng.randint(0, 3)
        r = rng.random()
        x = float("nan") if r < 0.05 else float("inf") if r < 0.08 else \
            1e308 * rng.choice((1, -1)) if r < 0.1 else x
        if det.takes_given:
            det.update_given(x, rng.choice((1.0, float("nan"), None, 0.0)), t=float(i))
        elif rng.random() < 0.05:
            det.miss(float(i))
        else:
            det.update(x, t=float(i))


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_a_detectors_own_states_load_and_a_string_in_one_is_refused(name: str) -> None:
    cls = DETECTORS[name]
    rng = random.Random(16)
    for _ in range(4):
        det = cls(**_ARGS.get(name, {}))
        for _ in range(6):
            _feed(det, rng, 60)
            state = json.loads(json.dumps(det.state_dict()))
            again = cls(**_ARGS.get(name, {}))
            again.load_state_dict(state)
            assert again.state_dict() == state
    for key in det._STATE:
        bad = dict(state, **{key: "x"})
        fresh = cls(**_ARGS.get(name, {}))
        before = fresh.state_dict()
        with pytest.raises(DamagedStateError, match=f"{name} state '{key}' is 'x', not "):
            fresh.load_state_dict(bad)
        assert fresh.state_dict() == before  # all or nothing


def test_a_nan_where_the_detector_never_keeps_one_is_refused() -> None:
    det = DETECTORS["regression"](mode="max")
    for x in (0.9, 0.91, 0.9, 0.92):
        det.update(x)
    state = json.loads(json.dumps(det.state_dict()))
    with pytest.raises(DamagedStateError, match="'best' is 'nan', not a number .NaN"):
        DETECTORS["regression"](mode="max").load_state_dict(dict(state, best="nan"))
    # a count written as a whole float (another writer) is a count; 1.5 is none
    DETECTORS["regression"](mode="max").load_state_dict(dict(state, n=4.0))
    with pytest.raises(DamagedStateError, match="'n' is 1.5, not a whole number"):
        DETECTORS["regression"](mode="max").load_state_dict(dict(state, n=1.5))
