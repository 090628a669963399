"""``benchmarks/noise_check.py``'s candidate (the noise-matched proxy drop) and
``benchmarks/noise_outside.py``'s generated families: the statistic stays near 0 on rows like
the reference's and rises with Gaussian noise on the inputs; the families draw what they say.
Its benchmark numbers are not asserted here (docs/performance-estimation.md)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import noise_outside  # noqa: E402
from benchmarks.noise_check import NoiseProxy  # noqa: E402


@pytest.mark.parametrize("family", ["nb", "lda"])
def test_the_proxy_drop_rises_with_noise_and_not_without(family):
    rng = np.random.default_rng(0)

    def draw(n):
        y = rng.integers(0, 3, n)
        centres = np.array([[0, 0, 0, 0], [2, 0, 1, 0], [0, 2, 0, 1]], dtype=float)
        return centres[y] + rng.standard_normal((n, 4)) * 0.6, y

    x, y = draw(1500)
    proxy = NoiseProxy(x, y, 3, family, seed=1)
    clean = [proxy.window(draw(500)[0]) for _ in range(5)]
    noisy = [proxy.window(draw(500)[0] + rng.standard_normal((500, 4)) * 0.8)
             for _ in range(5)]
    assert max(c["z"] for c in clean) < 3 and max(abs(c["rise"]) for c in clean) < 0.02
    assert min(c["z"] for c in noisy) > 5 and min(c["rise"] for c in noisy) > 0.05


@pytest.mark.parametrize("family", noise_outside.FAMILIES)
def test_the_generated_families_draw_fresh_labelled_rows(family):
    rng = np.random.default_rng(2)
    x1, y1 = noise_outside.draw(family, 300, rng)
    x2, _ = noise_outside.draw(family, 200, rng)
    assert x1.shape[0] == 300 and x2.shape == (200, x1.shape[1]) and x1.shape[1] >= 4
    assert len(np.unique(y1)) >= 2 and not np.allclose(x1[:200], x2)
