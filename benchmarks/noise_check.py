"""A candidate for the noise drops that neither the confidences nor the input disagreement see
(issue 14; docs/performance-estimation.md, "Noise-matched proxy drop (seventeenth round)").

Noisier inputs (a degraded sensor) widen the inputs' spread. The labelled reference says how
much a classifier's accuracy falls when its inputs get that much wider: a **proxy** classifier
fitted on the reference's standardised inputs and labels is scored on held-out reference rows,
clean and with Gaussian noise of the variance the window added per input (the window's variance
minus the reference's, floored at 0). The proxy's fall in accuracy is the predicted drop::

    e_j = max(0, var_window(z_j) - var_b(z_j))                   (per standardised input j)
    drop_b = acc_b(oob rows) - acc_b(oob rows + N(0, diag(e)))   (bag b, its out-of-bag rows)
    rise = mean_b drop_b                                          (the predicted drop)
    s_b = mean_j log(var_window(z_j) / var_b(z_j))                (the spread's inflation)
    z = mean_b s_b / sqrt(var_b s_b + 2/n)

over :data:`BAGS` Poisson-bootstrap refits, each with the variances of its own bootstrap sample
(the bags' spread carries the reference's uncertainty about its own spread; ``2/n``, one
input's log-variance in a window of ``n``, bounds the window's share from above), with the
same noise draws for every window (common random numbers: the predicted drop moves smoothly
with ``e``). The candidate fires when ``z >= Z`` and ``rise >= R``. Proxies: ``nb`` (diagonal
Gaussian per class: quadratic, so it follows radial classes) and ``lda`` (the input
disagreement's shrunk discriminant). Pure numpy.

``disagreement_check.py --active agreement,noise_nb,noise_lda`` records them next to the
confidence rule and the shipped input disagreement on the benchmark's windows; this script's
``--summary`` chooses the proxy, ``z`` and rise floor leave-one-dataset-out (the most noise drops
within 2 windows on the other datasets with at most :data:`FA_BUDGET` added alarms per 100 of
their unshifted windows) and scores the held-out dataset; ``--outside`` runs it on generated
streams that are not in the benchmark, written under ``--outside-dir``.

    python benchmarks/disagreement_check.py --mode disjoint --active agreement,noise_nb,noise_lda \\
        --out /tmp/noise_disjoint.json
    python benchmarks/noise_check.py --summary /tmp/noise_disjoint.json /tmp/noise_shared.json
    python benchmarks/noise_check.py --outside --outside-dir /tmp/srv17_out/outside
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):            # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

BAGS = 8
EVAL_ROWS = 400          # out-of-bag rows each bag scores (at most)
VAR_FLOOR = 0.05         # the naive Bayes proxy's variance floor (standardised units)
#: the stated false-alarm budget: added alarms per 100 unshifted windows of the tuning datasets
FA_BUDGET = 0.1
#: ``z`` thresholds the leave-one-dataset-out choice may pick: from 3.09, one-sided 1 in 1000
#: for a standard normal (the stated rate). A first grid from 2.0 picked z 2 for the held-out
#: wine, which then alarmed on 7.6 of its 100 unshifted windows (``--z-grid 2,3,4,5,6``).
Z_GRID = (3.09, 4.0, 5.0, 6.0)
RISE_GRID = (0.0, 0.01, 0.02, 0.03, 0.05)
AGREEMENT_Z = 4.0        # the serving pack's input_disagreement_rise


def _fit_nb(z: np.ndarray, y: np.ndarray, w: np.ndarray, k: int) -> Callable:
    counts = np.bincount(y, weights=w, minlength=k)
    sums = np.zeros((k, z.shape[1]))
    sq = np.zeros((k, z.shape[1]))
    np.add.at(sums, y, w[:, None] * z)
    np.add.at(sq, y, w[:, None] * z * z)
    c = np.maximum(counts, 1e-12)[:, None]
    mus = sums / c
    var = np.maximum(sq / c - mus ** 2, 0.0) + VAR_FLOOR
    var = np.where(counts[:, None] > 1, var, 1.0 + VAR_FLOOR)
    iv = 1.0 / var
    b = -0.5 * (mus ** 2 * iv).sum(1) + 0.5 * np.log(iv).sum(1) + np.log(counts + 1.0)
    return lambda q: (-0.5 * (q ** 2) @ iv.T + q @ (mus * iv).T + b).argmax(1)


def _fit_lda(z: np.ndarray, y: np.ndarray, w: np.ndarray, k: int) -> Callable:
    from lrwatch.daemon.agreement import _fit_lda as fit

    coef, off = fit(z, y, w, k)
    return lambda q: (q @ coef + off).argmax(1)


PROXIES = {"nb": _fit_nb, "lda": _fit_lda}


class NoiseProxy:
    """The noise-matched proxy drop of one proxy family, fitted on a labelled reference."""

    def __init__(self, x: np.ndarray, y: np.ndarray, k: int, family: str = "nb",
                 seed: int = 0) -> None:
        x = np.asarray(x, dtype=np.float64)
        self.mean = x.mean(0)
        sd = x.std(0)
        self.scale = np.where(sd > 1e-12, sd, 1.0)
        z = (x - self.mean) / self.scale
        rng = np.random.default_rng(seed + 4242)
        self.bags = []
        m = len(y)
        for _ in range(BAGS):
            w = rng.poisson(1.0, m).astype(np.float64)
            oob = np.flatnonzero(w == 0)
            if len(oob) > EVAL_ROWS:
                oob = rng.choice(oob, EVAL_ROWS, replace=False)
            proxy = PROXIES[family](z, y, w, k)
            mu = (w[:, None] * z).sum(0) / w.sum()
            var = (w[:, None] * (z - mu) ** 2).sum(0) / w.sum()
            zo, yo = z[oob], y[oob]
            self.bags.append((proxy, var, zo, yo, float((proxy(zo) == yo).mean()),
                              rng.standard_normal(zo.shape)))
        self.oob_rows = sum(len(b[3]) for b in self.bags)

    def window(self, x: np.ndarray) -> dict[str, float]:
        z = (np.asarray(x, dtype=np.float64) - self.mean) / self.scale
        vw = z.var(0)
        drops, infl = [], []
        for proxy, var, zo, yo, acc, eps in self.bags:
            e = np.maximum(vw - var, 0.0)
            drops.append(acc - float((proxy(zo + eps * np.sqrt(e)) == yo).mean()))
            infl.append(float(np.mean(np.log(np.maximum(vw, 1e-12) / np.maximum(var, 1e-12)))))
        d, s = np.array(drops), np.array(infl)
        rise = float(d.mean())
        floor = 1.0 / self.oob_rows     # one row of the bags' scored rows, squared scale
        # the spread's inflation in standard errors: the bags' spread (the reference's
        # uncertainty) and a window's, 2/n for one input's log-variance (an upper bound for
        # the mean over correlated inputs)
        z_infl = float(s.mean()) / math.sqrt(float(s.var(ddof=1)) + 2.0 / max(len(z), 2))
        return {"rise": rise, "z": z_infl,
                "z_bags": rise / math.sqrt(float(d.var(ddof=1)) + floor)}


# --- summary on disagreement_check.py's rows ------------------------------------------------------
def _lr(r: dict[str, Any]) -> bool:
    from benchmarks.disagreement_check import lr_fires

    return lr_fires(r)


def _base(r: dict[str, Any]) -> bool:
    """What ships: the confidence rule or the input disagreement above the pack's z."""
    return _lr(r) or r["signals"]["agreement"]["z"] > AGREEMENT_Z


def _cand(g: tuple[str, float, float]) -> Callable[[dict], bool]:
    name, z, rise = g
    return lambda r: _base(r) or (r["signals"][name]["z"] >= z
                                  and r["signals"][name]["rise"] >= rise)


def choose(rows: list[dict[str, Any]], names: tuple[str, ...]) -> tuple[str, float, float]:
    """The proxy and thresholds catching the most noise drops within 2 windows (mean over the
    modes) on ``rows`` with at most :data:`FA_BUDGET` added alarms per 100 unshifted windows in
    each mode; the strictest grid point when none keeps the budget."""
    from benchmarks.disagreement_check import _both

    base = _both(rows, _base, "drop_noise")
    best, best_score = (names[0], Z_GRID[-1], RISE_GRID[-1]), -1.0
    for g in ((n, z, r) for n in names for z in Z_GRID for r in RISE_GRID):
        e = _both(rows, _cand(g), "drop_noise")
        if all(a["fa"] - b["fa"] <= FA_BUDGET + 1e-9 for a, b in zip(e, base)):
            score = float(np.mean([a["within_2"] for a in e]))
            if score > best_score:
                best, best_score = g, score
    return best


def summary(paths: list[str], names: tuple[str, ...]) -> dict[str, Any]:
    from benchmarks.disagreement_check import evaluate

    rows = [r for p in paths for r in json.loads(Path(p).read_text())]
    datasets = sorted({r["dataset"] for r in rows})
    out: dict[str, Any] = {"by_dataset": {}, "all": {}}
    print(f"Leave-one-dataset-out, budget {FA_BUDGET} added alarms per 100 unshifted windows "
          f"of the tuning datasets; shipped = confidence rule or agreement z > {AGREEMENT_Z:g}")
    print("| mode | held out | chosen | noise drops within 2: shipped | + candidate | hard drops:"
          " shipped | + candidate | alarms/100 unshifted: shipped | + candidate | fires/100 "
          "selection: shipped | + candidate |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for ds in datasets:
        g = choose([r for r in rows if r["dataset"] != ds], names)
        for mode in sorted({r["mode"] for r in rows}):
            held = [r for r in rows if r["dataset"] == ds and r["mode"] == mode]
            for r in held:
                r["_cand"] = _cand(g)(r)
            res = [evaluate(held, f, v) for v in ("drop_noise", "drop")
                   for f in (_base, _cand(g))]
            out["by_dataset"][f"{mode}/{ds}"] = {"chosen": list(g), "noise": res[:2],
                                                 "hard": res[2:]}
            a, b, ha, hb = res
            print(f"| {mode} | {ds} | {g[0]}, {g[1]:g}, {g[2]:g} | {a['within_2']:.1f} "
                  f"({a['streams']}) | {b['within_2']:.1f} | {ha['within_2']:.1f} "
                  f"({ha['streams']}) | {hb['within_2']:.1f} | {a['fa']:.2f} | {b['fa']:.2f} | "
                  f"{a['sel']:.1f} | {b['sel']:.1f} |")
    for mode in sorted({r["mode"] for r in rows}):
        mr = [r for r in rows if r["mode"] == mode]
        res = [evaluate(mr, f, v) for v in ("drop_noise", "drop")
               for f in (_base, lambda r: r["_cand"])]
        out["all"][mode] = {"noise": res[:2], "hard": res[2:]}
        a, b, ha, hb = res
        print(f"| {mode} | **all, each held out** | | {a['within_2']:.1f} ({a['streams']}) | "
              f"{b['within_2']:.1f} | {ha['within_2']:.1f} ({ha['streams']}) | "
              f"{hb['within_2']:.1f} | {a['fa']:.2f} | {b['fa']:.2f} | {a['sel']:.1f} | "
              f"{b['sel']:.1f} |")
    g = choose(rows, names)
    out["chosen_on_all"] = list(g)
    print(f"chosen on every dataset: {g}")
    return out


def main(argv: list[str] | None = None) -> None:
    global Z_GRID
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--summary", nargs="*", help="disagreement_check.py output files")
    ap.add_argument("--proxies", default="noise_nb,noise_lda")
    ap.add_argument("--z-grid", default=",".join(str(z) for z in Z_GRID))
    ap.add_argument("--json", default=None, help="write the summary here")
    ap.add_argument("--outside", action="store_true",
                    help="generated streams outside the benchmark (benchmarks/noise_outside.py)")
    ap.add_argument("--outside-dir", default="/tmp/noise_outside")
    ap.add_argument("--rule", action="append", default=[],
                    help="NAME:Z:RISE, a candidate rule for --outside (noise_nb or noise_lda)")
    a = ap.parse_args(argv)
    Z_GRID = tuple(float(z) for z in a.z_grid.split(","))
    if a.outside:
        from benchmarks import noise_outside

        rules = {r.split(":")[0]: (float(r.split(":")[1]), float(r.split(":")[2]))
                 for r in a.rule}
        res = noise_outside.main_run(a.outside_dir, rules or None)
    else:
        res = summary(a.summary, tuple(a.proxies.split(",")))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
