"""Drift detection benchmark: lrwatch's calibrated detector against what users pick instead.

Streams are resampled from scikit-learn's bundled breast-cancer data (30 numeric features plus
one categorical feature built from the target and the radius: 31 features). The data has only
569 distinct rows, so every resampled numeric value is **jittered** (a smoothed bootstrap: each
value gets Gaussian noise of ``--jitter`` times its feature's standard deviation, default 0.1):
without it, a shift moves every atom off the reference atoms and exact KS tests catch even tiny
shifts from the atoms alone. All detectors see the same jittered data, reference included.
Shift sizes are in units of the jittered feature's standard deviation.

Reference: 5000 resampled rows; windows of 1000 rows. Variants: no shift; covariate shift by
selection (rows with a large mean radius twice as likely); a 0.25-sigma and a 0.1-sigma mean
shift in one feature (stream ``s`` shifts numeric feature ``s mod 30``); a 1.5x scale change of
one feature (rotating likewise); changed category frequencies; 10% missing values in one
feature (rotating). Each shifted stream starts with 2 unshifted windows, then shifts for
``--windows - 2`` windows (default 20: 20,000 shifted records).

Methods, on the same windows:
  lrwatch        calibrated per-window tests + sequential evidence (target: 1 per 1000 windows)
  ks_bonferroni  scipy ks_2samp per numeric feature + chi-square for the categorical, p < 0.05/31
                 (alibi-detect's default)
  evidently_rule Evidently's documented default per column: ref > 1000 rows, so normed
                 Wasserstein > 0.1 (numeric), Jensen-Shannon distance > 0.1 (categorical);
                 alarm when any column drifts (re-implemented)
  psi            PSI > 0.2 on 10 reference-quantile bins, any feature
  adwin, kswin   river's ADWIN and KSWIN (defaults), one detector per feature (the category as
                 its integer code), warmed up on the reference rows, then fed the stream record
                 by record; a window alarms when any detector fires inside it. They run in a
                 separate interpreter that has river installed (``--river-python``); river is
                 never a project dependency. KSWIN (one scipy KS test per record and feature) is
                 run on a few windows only.

Run: ``python benchmarks/drift_detection.py [--references N] [--null-windows N] [--streams N]
[--river-python /tmp/rivervenv/bin/python]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import tempfile
import time
from typing import Any, Callable

import numpy as np

N_REF = 5000
WINDOW = 1000
VARIANTS = ["selection", "mean_0.25", "mean_0.1", "scale", "category", "missing"]


def dataset() -> tuple[np.ndarray, np.ndarray, list[str]]:
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    x = d.data.astype(np.float64)
    cat = np.array(["abcd"[int(t) * 2 + int(r > 14.0)] for t, r in zip(d.target, x[:, 0])])
    return x, cat, [f"f{j:02d}" for j in range(x.shape[1])]


def make_window(x, cat, rng, n, variant, jitter, feat=3):
    """``n`` jittered rows of ``variant`` (shifts in jittered standard deviations)."""
    p = None
    if variant == "selection":
        w = np.where(x[:, 0] > np.median(x[:, 0]), 2.0, 1.0)
        p = w / w.sum()
    if variant == "category":
        w = np.where(cat == "a", 3.0, 1.0)
        p = w / w.sum()
    idx = rng.choice(len(x), n, p=p)
    sd0 = x.std(axis=0)
    xs = x[idx] + rng.standard_normal((n, x.shape[1])) * (jitter * sd0)
    cs = cat[idx].copy()
    sd = sd0[feat] * math.sqrt(1.0 + jitter ** 2)
    if variant == "mean_0.25":
        xs[:, feat] += 0.25 * sd
    elif variant == "mean_0.1":
        xs[:, feat] += 0.1 * sd
    elif variant == "scale":
        m = x[:, feat].mean()
        xs[:, feat] = m + 1.5 * (xs[:, feat] - m)
    elif variant == "missing":
        xs[rng.random(n) < 0.10, feat] = np.nan
    return xs, cs


class Anchors:
    """The per-window anchors, sharing the reference columns."""

    def __init__(self, xr: np.ndarray, cr: np.ndarray) -> None:
        self.xr = xr
        self.cr = cr
        self.cats = sorted(set(cr))
        self.sd = xr.std(axis=0)
        self.edges = [np.quantile(xr[:, j], np.linspace(0, 1, 11)[1:-1])
                      for j in range(xr.shape[1])]

    def _cat_counts(self, c):
        return np.array([(c == k).sum() for k in self.cats], dtype=float)

    def ks_bonferroni(self, xw, cw) -> bool:
        from scipy import stats

        f = xw.shape[1] + 1
        for j in range(xw.shape[1]):
            col = xw[:, j]
            col = col[~np.isnan(col)]
            if stats.ks_2samp(self.xr[:, j], col).pvalue < 0.05 / f:
                return True
        table = np.stack([self._cat_counts(self.cr), self._cat_counts(cw)])
        return stats.chi2_contingency(table)[1] < 0.05 / f

    def evidently_rule(self, xw, cw) -> bool:
        from scipy import stats

        for j in range(xw.shape[1]):
            col = xw[:, j]
            col = col[~np.isnan(col)]
            if stats.wasserstein_distance(self.xr[:, j], col) / self.sd[j] > 0.1:
                return True
        a = self._cat_counts(self.cr)
        b = self._cat_counts(cw)
        from scipy.spatial.distance import jensenshannon
        return bool(jensenshannon(a / a.sum(), b / b.sum()) > 0.1)

    def psi(self, xw, cw) -> bool:
        for j in range(xw.shape[1]):
            col = xw[:, j]
            col = col[~np.isnan(col)]
            a = np.bincount(np.searchsorted(self.edges[j], self.xr[:, j]),
                            minlength=10) / len(self.xr)
            b = np.bincount(np.searchsorted(self.edges[j], col), minlength=10) / max(len(col), 1)
            a, b = np.maximum(a, 1e-4), np.maximum(b, 1e-4)
            if ((b - a) * np.log(b / a)).sum() > 0.2:
                return True
        a = np.maximum(self._cat_counts(self.cr) / len(self.cr), 1e-4)
        b = np.maximum(self._cat_counts(cw) / len(cw), 1e-4)
        return bool(((b - a) * np.log(b / a)).sum() > 0.2)


# --- river anchors (run in an interpreter that has river) ------------------------------------
def river_worker(path: str, kswin_windows: int, kswin_streams: int) -> dict[str, Any]:
    """ADWIN / KSWIN per feature over the saved streams of one reference."""
    from river import drift

    d = np.load(path)
    ref = d["ref"]
    out: dict[str, Any] = {}
    for name, make, null_limit, stream_limit in (
            ("adwin", lambda j: drift.ADWIN(), None, None),
            ("kswin", lambda j: drift.KSWIN(seed=j), kswin_windows, kswin_streams)):
        res: dict[str, Any] = {"null_alarms": 0, "null_windows": 0, "seconds": 0.0,
                               "windows_timed": 0, "hits": {}}

        def run(windows: np.ndarray, shift_at: int | None) -> tuple[list[bool], float]:
            dets = [make(j) for j in range(ref.shape[1])]
            # warm-up on the reference (KSWIN keeps only its last 100 values, and tests on each
            # one: it gets the last 100 reference rows)
            warm = ref if name == "adwin" else ref[-100:]
            for j, det in enumerate(dets):
                for v in warm[:, j].tolist():
                    if v == v:
                        det.update(v)
            alarms = []
            t0 = time.perf_counter()
            for w in windows:
                hit = False
                for j, det in enumerate(dets):
                    for v in w[:, j].tolist():
                        if v != v:
                            continue  # missing: a per-feature detector sees nothing
                        det.update(v)
                        if det.drift_detected:
                            hit = True
                alarms.append(hit)
            return alarms, time.perf_counter() - t0

        null = d["null"][:null_limit] if null_limit is not None else d["null"]
        if len(null):
            alarms, sec = run(null, None)
            res["null_alarms"] += int(sum(alarms))
            res["null_windows"] += len(alarms)
            res["seconds"] += sec
            res["windows_timed"] += len(alarms)
        for v in VARIANTS:
            streams = d[f"streams_{v}"]
            if stream_limit is not None:
                streams = streams[:stream_limit]
            hits = []
            for st in streams:
                alarms, sec = run(st, 2)
                res["seconds"] += sec
                res["windows_timed"] += len(alarms)
                first = next((k for k in range(2, len(alarms)) if alarms[k]), None)
                hits.append(None if first is None else (first - 1) * WINDOW)
            res["hits"][v] = hits
        out[name] = res
    return out


def evidently_worker(path: str) -> dict[str, Any]:
    """Time Evidently's ``DataDriftPreset`` (its defaults) on saved windows."""
    import warnings

    import pandas as pd
    from evidently import Report
    from evidently.presets import DataDriftPreset

    warnings.filterwarnings("ignore")
    d = np.load(path)
    cols = [f"f{j:02d}" for j in range(d["ref"].shape[1])]

    def frame(xw: np.ndarray, cw: np.ndarray) -> pd.DataFrame:
        f = pd.DataFrame(xw, columns=cols)
        f["cat"] = cw
        return f

    ref = frame(d["ref"], d["ref_cat"])
    secs, alarms = [], 0
    for xw, cw in zip(d["null"], d["null_cat"]):
        t0 = time.perf_counter()
        out = Report([DataDriftPreset()]).run(frame(xw, cw), ref).dict()
        secs.append(time.perf_counter() - t0)
        count = out["metrics"][0]["value"]["count"]
        alarms += count > 0
    import evidently

    return {"version": evidently.__version__, "seconds": secs, "windows": len(secs),
            "any_column_drifted": int(alarms)}


def run_river(python: str, files: list[str], kswin_windows: int,
              kswin_streams: int) -> dict[str, Any]:
    agg: dict[str, Any] = {}
    for i, f in enumerate(files):
        cmd = [python, os.path.abspath(__file__), "--river-worker", f,
               "--kswin-windows", str(kswin_windows if i == 0 else 0),
               "--kswin-streams", str(kswin_streams if i == 0 else 0)]
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        for name, res in r.items():
            a = agg.setdefault(name, {"null_alarms": 0, "null_windows": 0, "seconds": 0.0,
                                      "windows_timed": 0, "hits": {v: [] for v in VARIANTS}})
            for k in ("null_alarms", "null_windows", "seconds", "windows_timed"):
                a[k] += res[k]
            for v in VARIANTS:
                a["hits"][v] += res["hits"][v]
    return agg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--streams", type=int, default=40, help="shifted streams per variant")
    ap.add_argument("--windows", type=int, default=22, help="windows per shifted stream")
    ap.add_argument("--null-windows", type=int, default=8000,
                    help="unshifted windows for the false-alarm rate (lrwatch), all references")
    ap.add_argument("--anchor-null-windows", type=int, default=500)
    ap.add_argument("--references", type=int, default=4,
                    help="independent references (false alarms depend on the reference draw)")
    ap.add_argument("--jitter", type=float, default=0.1,
                    help="noise added to resampled values, in feature standard deviations")
    ap.add_argument("--river-python", default=None,
                    help="an interpreter with river installed, for the ADWIN/KSWIN anchors")
    ap.add_argument("--river-references", type=int, default=2)
    ap.add_argument("--river-null-windows", type=int, default=40, help="per river reference")
    ap.add_argument("--river-streams", type=int, default=5, help="per variant and reference")
    ap.add_argument("--kswin-windows", type=int, default=4)
    ap.add_argument("--kswin-streams", type=int, default=0)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--evidently-python", default=None,
                    help="an interpreter with evidently installed, to time DataDriftPreset")
    ap.add_argument("--evidently-windows", type=int, default=3)
    ap.add_argument("--river-worker", help=argparse.SUPPRESS)
    ap.add_argument("--evidently-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.evidently_worker:
        print(json.dumps(evidently_worker(args.evidently_worker)))
        return
    if args.river_worker:
        print(json.dumps(river_worker(args.river_worker, args.kswin_windows,
                                      args.kswin_streams)))
        return
    from lrwatch.daemon.detector import DriftDetector
    from lrwatch.daemon.baseline import build_reference

    x, cat, names = dataset()
    methods = ["lrwatch", "ks_bonferroni", "evidently_rule", "psi"]
    null_alarms = {m: 0 for m in methods}
    null_windows = {m: 0 for m in methods}
    per_ref_alarms: list[tuple[int, int]] = []
    times: dict[str, list[float]] = {m: [] for m in methods}
    det_rate = {(v, m): [] for v in VARIANTS for m in methods}
    first_window_rate: dict[str, list[bool]] = {v: [] for v in VARIANTS}
    cal_seconds = []
    river_files: list[str] = []
    evidently_res: dict[str, Any] | None = None
    tmp = tempfile.mkdtemp(prefix="lrwatch-drift-")
    nfeat = x.shape[1]
    for r in range(args.references):
        rng = np.random.default_rng(args.seed + r)
        xr, cr = make_window(x, cat, rng, N_REF, "none", args.jitter)
        rows = [{"features": {**{n: float(v) for n, v in zip(names, row)}, "cat": str(c)}}
                for row, c in zip(xr, cr)]
        ref = build_reference(rows, window_size=WINDOW, seed=r)
        cal_seconds.append(ref.calibration["seconds"])
        det = DriftDetector(ref)
        prof = det.profile
        order = [names.index(n) for n in prof.num_names]
        anchors = Anchors(xr, cr)
        fns: dict[str, Callable] = {"ks_bonferroni": anchors.ks_bonferroni,
                                    "evidently_rule": anchors.evidently_rule, "psi": anchors.psi}
        river = args.river_python is not None and r < args.river_references
        codes = {c: i for i, c in enumerate(sorted(set(cat)))}

        def for_river(xw, cw):
            return np.concatenate([xw, np.array([codes[c] for c in cw], float)[:, None]],
                                  axis=1).astype(np.float32)

        def ours(xw, cw):
            t0 = time.perf_counter()
            res = det.update(xw[:, order], [prof.encode(0, list(cw))])
            times["lrwatch"].append(time.perf_counter() - t0)
            return res

        # false alarms: one long unshifted stream per reference (sequential state carries on)
        det.reset()
        nulls = []
        for w in range(args.null_windows // args.references):
            xw, cw = make_window(x, cat, rng, WINDOW, "none", args.jitter)
            a = ours(xw, cw).detected
            null_alarms["lrwatch"] += a
            null_windows["lrwatch"] += 1
            if w < args.anchor_null_windows // args.references:
                for m, fn in fns.items():
                    t0 = time.perf_counter()
                    null_alarms[m] += fn(xw, cw)
                    times[m].append(time.perf_counter() - t0)
                    null_windows[m] += 1
            if river and w < args.river_null_windows:
                nulls.append(for_river(xw, cw))
        per_ref_alarms.append((null_alarms["lrwatch"] - sum(a for a, _ in per_ref_alarms),
                               args.null_windows // args.references))
        saved: dict[str, Any] = {}
        for v in VARIANTS:
            kept = []
            for s in range(args.streams // args.references):
                feat = (r * 7 + s) % nfeat if v in ("mean_0.25", "mean_0.1", "scale",
                                                    "missing") else 3
                det.reset()
                hit = {m: None for m in methods}
                stream = []
                for w in range(args.windows):
                    shifted = w >= 2
                    xw, cw = make_window(x, cat, rng, WINDOW, v if shifted else "none",
                                         args.jitter, feat=feat)
                    if river and s < args.river_streams:
                        stream.append(for_river(xw, cw))
                    res = ours(xw, cw)
                    if shifted and res.detected and hit["lrwatch"] is None:
                        hit["lrwatch"] = (w - 1) * WINDOW
                    if w == 2:
                        first_window_rate[v].append(res.detected)
                    if shifted and w < 4:  # anchors are per-window: judge their first 2 windows
                        for m, fn in fns.items():
                            if hit[m] is None and fn(xw, cw):
                                hit[m] = (w - 1) * WINDOW
                for m in methods:
                    det_rate[(v, m)].append(hit[m])
                if stream:
                    kept.append(np.stack(stream))
            if river:
                saved[f"streams_{v}"] = np.stack(kept) if kept else np.zeros((0, 0, 0, 0))
        if args.evidently_python and r == 0:
            ev = [make_window(x, cat, rng, WINDOW, "none", args.jitter)
                  for _ in range(args.evidently_windows)]
            path = os.path.join(tmp, "evidently.npz")
            np.savez(path, ref=xr, ref_cat=cr, null=np.stack([a for a, _ in ev]),
                     null_cat=np.stack([b for _, b in ev]))
            evidently_res = json.loads(subprocess.run(
                [args.evidently_python, os.path.abspath(__file__), "--evidently-worker", path],
                check=True, capture_output=True, text=True).stdout)
        if river:
            path = os.path.join(tmp, f"river-{r}.npz")
            np.savez(path, ref=for_river(xr, cr), null=np.stack(nulls) if nulls
                     else np.zeros((0, WINDOW, nfeat + 1), np.float32), **saved)
            river_files.append(path)
        print(f"reference {r}: {per_ref_alarms[-1][0]} false alarms in "
              f"{per_ref_alarms[-1][1]} unshifted windows; calibration {cal_seconds[-1]:.1f} s",
              flush=True)
    river_res: dict[str, Any] = {}
    if river_files:
        river_res = run_river(args.river_python, river_files, args.kswin_windows,
                              args.kswin_streams)
    report(args, methods, null_alarms, null_windows, times, det_rate, first_window_rate,
           cal_seconds, river_res)
    if evidently_res is not None:
        secs = evidently_res["seconds"]
        print(f"\nEvidently {evidently_res['version']} DataDriftPreset (its defaults), same "
              f"reference and unshifted windows: {np.median(secs):.2f} s per window (median of "
              f"{len(secs)}); a column drifted in {evidently_res['any_column_drifted']} of them")


def _rate_interval(k: int, n: int) -> tuple[float, float]:
    """Exact (Garwood) 95% interval of a Poisson rate: ``k`` events in ``n`` windows."""
    from scipy import stats

    lo = stats.chi2.ppf(0.025, 2 * k) / 2 / n if k else 0.0
    hi = stats.chi2.ppf(0.975, 2 * k + 2) / 2 / n
    return lo, min(hi, 1.0)


def report(args, methods, null_alarms, null_windows, times, det_rate, first_window_rate,
           cal_seconds, river_res) -> None:
    print(f"\nreference {N_REF} rows, windows of {WINDOW}, 31 features, jitter "
          f"{args.jitter} sd, {args.references} references; calibration "
          f"{np.mean(cal_seconds):.1f} s per reference (mean)\n")
    print("false alarms per unshifted window (lrwatch target 0.001, band 0.0005-0.0015)")
    for m in methods:
        k, n = null_alarms[m], max(null_windows[m], 1)
        lo, hi = _rate_interval(k, n)
        print(f"  {m:15s} {k / n:.5f}  ({k}/{n}; 95% interval {lo:.5f}-{hi:.5f})")
    for m, res in river_res.items():
        k, n = res["null_alarms"], max(res["null_windows"], 1)
        print(f"  {m:15s} {k / n:.5f}  ({k}/{n})")
    print("\nstatistics time per 1000-record window, 31 features (median / mean)")
    for m in methods:
        t = np.array(times[m]) * 1e3
        print(f"  {m:15s} {np.median(t):7.2f} / {t.mean():7.2f} ms")
    for m, res in river_res.items():
        print(f"  {m:15s} {res['seconds'] / max(res['windows_timed'], 1) * 1e3:7.1f} ms "
              f"(mean of {res['windows_timed']} windows)")
    shifted = args.windows - 2
    print(f"\ndetection rate and median delay in records after the shift (lrwatch, adwin, "
          f"kswin: {shifted} shifted windows; per-window anchors: first 2)")
    cols = methods + list(river_res)
    print(f"  {'variant':12s} " + " ".join(f"{m:>22s}" for m in cols))
    for v in VARIANTS:
        cells = []
        for m in cols:
            hits = det_rate[(v, m)] if m in methods else river_res[m]["hits"][v]
            if not hits:
                cells.append("-".rjust(22))
                continue
            got = [h for h in hits if h is not None]
            med = f"{int(np.median(got))}" if got else "-"
            cells.append(f"{len(got) / len(hits):4.0%} {med:>6s} (n={len(hits)})".rjust(22))
        print(f"  {v:12s} " + " ".join(cells))
    print("\nlrwatch: caught in the first shifted window / within 20,000 records")
    for v in VARIANTS:
        hits = det_rate[(v, "lrwatch")]
        within = [h is not None and h <= 20_000 for h in hits]
        print(f"  {v:12s} {np.mean(first_window_rate[v]):6.1%}  {np.mean(within):6.1%}  "
              f"(n={len(hits)})")


if __name__ == "__main__":
    main()
