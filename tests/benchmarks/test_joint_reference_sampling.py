"""A known defect of the joint drift test, kept as a strict expected failure until it is fixed.

One wine reference of the drift benchmark (its 5,000 rows resampled from wine's 178 with
numpy seed 1090, as `benchmarks/drift_detection.py --seed 1050` builds its reference 40) makes
the joint test fire on about 45% of unshifted windows at a target of 1 per 1000, through
feature f07 (docs/drift-joint.md, "Wine at 1/1000, rerun with more references"). The likely
cause is that the joint regression is fitted on about 178 distinct rows while its variance
takes the 5,000. When a fix makes this pass, `strict` turns the pass into a failure: remove
the marker then.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

np = pytest.importorskip("numpy")
pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.drift_detection import N_REF, WINDOW, dataset, make_window  # noqa: E402
from lrwatch.daemon.baseline import build_reference  # noqa: E402
from lrwatch.daemon.detector import DriftDetector  # noqa: E402


@pytest.mark.xfail(strict=True, raises=AssertionError, reason="joint test not calibrated against reference sampling "
                                       "error (docs/drift-joint.md); remove when fixed")
def test_an_unlucky_resampled_reference_keeps_the_false_alarm_rate() -> None:
    x, cat, names = dataset("wine")
    rng = np.random.default_rng(1090)
    xr, cr = make_window(x, cat, rng, N_REF, "none", 0.1)
    rows = [{"features": {**{n: float(v) for n, v in zip(names, row)}, "cat": str(c)}}
            for row, c in zip(xr, cr)]
    ref = build_reference(rows, window_size=WINDOW, seed=40, target_windows=1000,
                          calibrate=False)
    det = DriftDetector(ref, window_size=WINDOW, target_windows=1000, seed=40)
    order = [names.index(n) for n in det.profile.num_names]
    det.reset()
    alarms = 0
    for _ in range(200):
        xw, cw = make_window(x, cat, rng, WINDOW, "none", 0.1)
        alarms += det.update(xw[:, order], [det.profile.encode(0, list(cw))]).detected
    # 200 windows at a target of 1 per 1000: 0.2 expected; 5 or more has probability < 1e-5
    assert alarms < 5, f"{alarms} false alarms in 200 unshifted windows"
