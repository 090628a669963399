"""Average Thresholded Confidence (ATC; Garg et al., ICLR 2022) against lrwatch's label-free
accuracy estimate, on the cases and windows of ``benchmarks/performance_estimation.py``.

ATC picks a threshold on a confidence score such that the share of labelled reference rows
below it equals the reference's error, and estimates a window's accuracy as the share of its
rows above it. It is reported to track accuracy under natural corruptions better than an
average of calibrated confidences; issue 14's open gap is exactly there (drops caused by
noisier inputs, docs/performance-estimation.md). Two scores: the top-class probability
(``mc``) and the negative entropy (``ne``). Prints the mean absolute error, in points, per
variant and binary/multiclass; nothing is chosen here.

    python benchmarks/atc_check.py --mode shared      # ~10 min on two busy cores
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):            # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from benchmarks import performance_estimation as pe  # noqa: E402

VARIANTS = ("none", "selection", "hard", "noise")


def _columns(p: np.ndarray) -> np.ndarray:
    return np.stack([1 - p, p], 1) if p.ndim == 1 else p


def score(p: np.ndarray, kind: str) -> np.ndarray:
    """Per row: the top-class probability (``mc``) or the negative entropy (``ne``)."""
    q = np.clip(_columns(p), 1e-12, 1.0)
    return q.max(1) if kind == "mc" else (q * np.log(q)).sum(1)


def atc_threshold(p: np.ndarray, y: np.ndarray, kind: str) -> float:
    """The score below which the reference's share of rows equals its error."""
    acc = float((_columns(p).argmax(1) == y).mean())
    return float(np.quantile(score(p, kind), 1.0 - acc))


def run(mode: str, datasets: list[str], models: list[str], windows: int) -> dict[Any, Any]:
    errs: dict[tuple[str, str], dict[str, list[float]]] = {}
    for _ds, _mn, _seed, case, rng, est in pe.fitted_cases(mode, datasets, models):
        t = {k: atc_threshold(case.ref_proba, case.ref_y, k) for k in ("mc", "ne")}
        lvl = pe.noise_level(case, rng)
        for v in VARIANTS:
            if v == "noise" and lvl is None:
                continue
            w = pe.weights(case, v)
            for _ in range(windows):
                p, y = pe.window(case, rng, w, lvl if v == "noise" else 0.0)
                real = pe.realised(p, y)
                got = {"lrwatch": est.estimate(p)["accuracy"], "naive": pe.naive(p),
                       **{f"atc_{k}": float((score(p, k) > t[k]).mean()) for k in t}}
                d = errs.setdefault((v, "binary" if case.k == 2 else "multiclass"), {})
                for name, val in got.items():
                    d.setdefault(name, []).append(abs(val - real))
    return errs


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    pe.add_case_arguments(ap, "shared")
    a = ap.parse_args(argv)
    errs = run(a.mode, a.datasets.split(","), a.models.split(","), a.windows)
    names = ("lrwatch", "atc_mc", "atc_ne", "naive")
    print("| variant | kind | windows | " + " | ".join(names) + " |")
    print("|---|---|---:|" + "---:|" * len(names))
    for (v, k), d in sorted(errs.items(), key=lambda x: (VARIANTS.index(x[0][0]), x[0][1])):
        cells = " | ".join(f"{100 * float(np.mean(d[n])):.2f}" for n in names)
        print(f"| {v} | {k} | {len(d['lrwatch'])} | {cells} |")


if __name__ == "__main__":
    main()
