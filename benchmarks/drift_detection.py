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
feature (rotating); and two **decorrelation** variants that keep every marginal: ``decor_1``
permutes one feature's column within the window (rotating), ``decor_3`` three features spread
a third of the features apart, each independently, so they lose their relation to the rest and
to each other. Each shifted stream starts with 2 unshifted windows, then shifts for
``--windows - 2`` windows (default 20: 20,000 shifted records).

``--dataset`` picks the data: ``breast_cancer`` (default) is the family the joint test's knobs
were chosen on; ``wine``, ``diabetes`` and ``digits`` (its 20 highest-variance pixels) are held
out. ``--target-windows`` sets lrwatch's false-alarm target, ``--no-joint`` switches its joint
test off (the "before"), ``--json OUT`` writes every number.

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
  nannyml_dre    NannyML's DataReconstructionDriftCalculator with its defaults (PCA keeping 65%
                 of the variance, alert outside the reference chunks' mean +- 3 sd), one chunk
                 per window, in a separate interpreter (``--nannyml-python``); judged like the
                 per-window anchors on the first 3 shifted windows of the decorrelation streams.

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
VARIANTS = ["selection", "mean_0.25", "mean_0.1", "scale", "category", "missing", "decor_1",
            "decor_3"]
#: variants that hit one rotating feature (decorrelation: that one, or three spread apart)
ROTATING = ("mean_0.25", "mean_0.1", "scale", "missing", "decor_1", "decor_3")
#: judged on "caught within 3 windows" (the joint test's target) rather than 2 for the anchors
JOINT_VARIANTS = ("decor_1", "decor_3")
DATASETS = ("breast_cancer", "wine", "diabetes", "digits")


def dataset(name: str = "breast_cancer") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Numeric features and one constructed categorical (target x first feature) of one of
    scikit-learn's bundled data sets. ``breast_cancer`` is the tuning family; ``wine`` (13
    features), ``diabetes`` (10) and ``digits`` (the 20 highest-variance pixels) are held out."""
    from sklearn import datasets

    d = getattr(datasets, f"load_{name}")()
    x = d.data.astype(np.float64)
    if name == "breast_cancer":
        cat = np.array(["abcd"[int(t) * 2 + int(r > 14.0)] for t, r in zip(d.target, x[:, 0])])
        return x, cat, [f"f{j:02d}" for j in range(x.shape[1])]
    if name == "digits":
        x = x[:, np.sort(np.argsort(-x.std(axis=0), kind="stable")[:20])]
    t = np.asarray(d.target, dtype=np.float64)
    hi_t, hi_x = t > np.median(t), x[:, 0] > np.median(x[:, 0])
    cat = np.array(["abcd"[int(a) * 2 + int(b)] for a, b in zip(hi_t, hi_x)])
    return x, cat, [f"f{j:02d}" for j in range(x.shape[1])]


def decor_features(feat: int, variant: str, nfeat: int) -> list[int]:
    """The features a decorrelation variant permutes: ``feat``, and for ``decor_3`` two more
    spread a third of the features apart."""
    if variant == "decor_1":
        return [feat]
    step = max(nfeat // 3, 1)
    return sorted({feat % nfeat, (feat + step) % nfeat, (feat + 2 * step) % nfeat})


def make_window(x, cat, rng, n, variant, jitter, feat=3):
    """``n`` jittered rows of ``variant`` (shifts in jittered standard deviations;
    decorrelation permutes the chosen columns independently within the window, so every
    marginal is kept and only their relation to the other columns is lost)."""
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
    elif variant in JOINT_VARIANTS:
        for j in decor_features(feat, variant, x.shape[1]):
            xs[:, j] = xs[rng.permutation(n), j]
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
        for v in [k[len("streams_"):] for k in d.files if k.startswith("streams_")]:
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


def nannyml_worker(path: str) -> dict[str, Any]:
    """NannyML's ``DataReconstructionDriftCalculator`` with its defaults (PCA keeping 65% of
    the variance, alert outside mean +- 3 sd of the reference chunks' errors) over the saved
    windows of one reference, one chunk per window."""
    import warnings

    import nannyml as nml
    import pandas as pd

    warnings.filterwarnings("ignore")
    d = np.load(path)
    cols = [f"f{j:02d}" for j in range(d["ref"].shape[1])]

    def frame(xs: np.ndarray, cs: np.ndarray) -> pd.DataFrame:
        f = pd.DataFrame(xs.reshape(-1, xs.shape[-1]), columns=cols)
        f["cat"] = cs.reshape(-1)
        return f

    calc = nml.DataReconstructionDriftCalculator(column_names=cols + ["cat"],
                                                 chunk_size=WINDOW)
    calc.fit(frame(d["ref"], d["ref_cat"]))
    secs: list[float] = []

    def alarms(xs: np.ndarray, cs: np.ndarray) -> list[bool]:
        t0 = time.perf_counter()
        res = calc.calculate(frame(xs, cs)).filter(period="analysis").to_df()
        secs.append((time.perf_counter() - t0) / len(xs))
        return [bool(a) for a in res[("reconstruction_error", "alert")].tolist()]

    out: dict[str, Any] = {"version": nml.__version__, "null": alarms(d["null"], d["null_cat"])
                           if len(d["null"]) else [], "hits": {}}
    for v in [k[len("streams_"):] for k in d.files if k.startswith("streams_")]:
        hits = []
        for xs, cs in zip(d[f"streams_{v}"], d[f"cats_{v}"]):
            a = alarms(xs, cs)
            first = next((k for k in range(2, len(a)) if a[k]), None)
            hits.append(None if first is None else (first - 1) * WINDOW)
        out["hits"][v] = hits
    out["seconds_per_window"] = float(np.median(secs)) if secs else None
    return out


def run_worker(python: str, flag: str, path: str, *extra: str) -> dict[str, Any]:
    """Run this script's ``flag`` worker on ``path`` in another interpreter."""
    cmd = [python, os.path.abspath(__file__), flag, path, *extra]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{flag} failed in {python}: {r.stderr[-2000:]}")
    return json.loads(r.stdout)


def run_river(python: str, files: list[str], kswin_windows: int,
              kswin_streams: int) -> dict[str, Any]:
    agg: dict[str, Any] = {}
    for i, f in enumerate(files):
        r = run_worker(python, "--river-worker", f,
                       "--kswin-windows", str(kswin_windows if i == 0 else 0),
                       "--kswin-streams", str(kswin_streams if i == 0 else 0))
        for name, res in r.items():
            a = agg.setdefault(name, {"null_alarms": 0, "null_windows": 0, "seconds": 0.0,
                                      "windows_timed": 0, "hits": {}})
            for k in ("null_alarms", "null_windows", "seconds", "windows_timed"):
                a[k] += res[k]
            for v, hits in res["hits"].items():
                a["hits"].setdefault(v, []).extend(hits)
    return agg


def run_nannyml(python: str, files: list[str]) -> dict[str, Any]:
    agg: dict[str, Any] = {"null_alarms": 0, "null_windows": 0, "hits": {}, "seconds": []}
    for f in files:
        r = run_worker(python, "--nannyml-worker", f)
        agg["version"] = r["version"]
        agg["null_alarms"] += int(sum(r["null"]))
        agg["null_windows"] += len(r["null"])
        if r["seconds_per_window"] is not None:
            agg["seconds"].append(r["seconds_per_window"])
        for v, hits in r["hits"].items():
            agg["hits"].setdefault(v, []).extend(hits)
    return agg


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", choices=DATASETS, default="breast_cancer",
                    help="breast_cancer is the tuning family; the others are held out")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="comma-separated shift variants to run")
    ap.add_argument("--target-windows", type=float, default=1000.0,
                    help="lrwatch's false-alarm target: one per this many unshifted windows")
    ap.add_argument("--no-joint", action="store_true",
                    help="switch lrwatch's joint (multivariate) test off (the 'before')")
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
    ap.add_argument("--nannyml-python", default=None,
                    help="an interpreter with nannyml installed, for its data-reconstruction "
                         "drift (decorrelation variants and unshifted windows)")
    ap.add_argument("--nannyml-references", type=int, default=2)
    ap.add_argument("--nannyml-null-windows", type=int, default=200, help="per reference")
    ap.add_argument("--nannyml-streams", type=int, default=10,
                    help="per decorrelation variant and reference")
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--evidently-python", default=None,
                    help="an interpreter with evidently installed, to time DataDriftPreset")
    ap.add_argument("--evidently-windows", type=int, default=3)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--speed-features", type=int, default=None,
                    help="only time DriftDetector.update, joint off and on, at this many "
                         "numeric features (30: breast cancer; else synthetic)")
    ap.add_argument("--speed-windows", type=int, default=100)
    ap.add_argument("--river-worker", help=argparse.SUPPRESS)
    ap.add_argument("--evidently-worker", help=argparse.SUPPRESS)
    ap.add_argument("--nannyml-worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variants {bad}; choose from {VARIANTS}")
    return args


def speed(features: int, windows: int, seed: int = 0) -> dict[str, Any]:
    """Whole ``DriftDetector.update`` per 1000-record window with the joint test off and on,
    alternately on the same windows (so that a shared machine's load hits both alike).
    ``features`` numeric columns (breast cancer when 30, else synthetic with ``features // 10``
    latent factors) plus one categorical. The calibration is made cheap here (fewer resamples,
    copula draws and null streams): it does not change the per-window cost."""
    import importlib

    from lrwatch.daemon.baseline import build_reference
    from lrwatch.daemon.detector import DriftDetector

    rng = np.random.default_rng(seed)
    if features == 30:
        x, cat, names = dataset()
        xr, cr = make_window(x, cat, rng, N_REF, "none", 0.1)
        wins = [make_window(x, cat, rng, WINDOW, "none", 0.1) for _ in range(windows)]
    else:
        load = np.random.default_rng(seed + 1).standard_normal((features, max(features // 10, 2)))

        def synth(n: int) -> np.ndarray:
            return rng.standard_normal((n, load.shape[1])) @ load.T + \
                rng.standard_normal((n, features))
        names = [f"f{j:03d}" for j in range(features)]
        xr, cr = synth(N_REF), rng.choice(list("abcd"), N_REF)
        wins = [(synth(WINDOW), rng.choice(list("abcd"), WINDOW)) for _ in range(windows)]
    rows = [{"features": {**{n: float(v) for n, v in zip(names, r)}, "cat": str(c)}}
            for r, c in zip(xr, cr)]
    ref = build_reference(rows, window_size=WINDOW, calibrate=False)
    cal = importlib.import_module("lrwatch.daemon.calibrate")  # the module, not the function
    saved = cal._COPULA_DRAWS, cal._STREAMS
    cal._COPULA_DRAWS, cal._STREAMS = 20_000, 500
    try:
        dets = {j: DriftDetector(ref, window_size=WINDOW, joint=j, sims=200)
                for j in (False, True)}
    finally:
        cal._COPULA_DRAWS, cal._STREAMS = saved
    prof = dets[True].profile
    order = [names.index(n) for n in prof.num_names]
    ts: dict[bool, list[float]] = {False: [], True: []}
    for xw, cw in wins:
        xo = np.ascontiguousarray(xw[:, order])
        codes = [prof.encode(0, list(cw))]
        for j in (False, True):
            t0 = time.perf_counter()
            dets[j].update(xo, codes)
            ts[j].append(time.perf_counter() - t0)
    out = {"features": features + 1, "windows": windows, "load_average": os.getloadavg()[0]}
    for j in (False, True):
        t = np.array(ts[j]) * 1e3
        out["joint_on" if j else "joint_off"] = {
            "median_ms": float(np.median(t)), "p10_ms": float(np.quantile(t, 0.1)),
            "p90_ms": float(np.quantile(t, 0.9))}
    return out


class Tally:
    """What the runs measured, per method and variant."""

    def __init__(self, methods: list[str], variants: list[str]) -> None:
        self.methods = methods
        self.variants = variants
        self.null_alarms = {m: 0 for m in methods}
        self.null_windows = {m: 0 for m in methods}
        self.null_sources = {"per_feature": 0, "joint": 0, "both": 0}
        self.per_ref: list[tuple[int, int]] = []
        self.times: dict[str, list[float]] = {m: [] for m in methods}
        self.hits: dict[tuple[str, str], list[int | None]] = {
            (v, m): [] for v in variants for m in methods}
        self.first_window: dict[str, list[bool]] = {v: [] for v in variants}
        self.cal_seconds: list[float] = []


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.evidently_worker:
        print(json.dumps(evidently_worker(args.evidently_worker)))
        return None
    if args.river_worker:
        print(json.dumps(river_worker(args.river_worker, args.kswin_windows,
                                      args.kswin_streams)))
        return None
    if args.nannyml_worker:
        print(json.dumps(nannyml_worker(args.nannyml_worker)))
        return None
    if args.speed_features:
        res = speed(args.speed_features, args.speed_windows, args.seed)
        print(json.dumps(res, indent=1))
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(res, fh, indent=1)
        return res
    x, cat, names = dataset(args.dataset)
    tally = Tally(["lrwatch", "ks_bonferroni", "evidently_rule", "psi"], args.variants)
    river_files: list[str] = []
    nannyml_files: list[str] = []
    evidently_res: dict[str, Any] | None = None
    tmp = tempfile.mkdtemp(prefix="lrwatch-drift-")
    for r in range(args.references):
        files = run_reference(args, r, x, cat, names, tally, tmp)
        if "river" in files:
            river_files.append(files["river"])
        if "nannyml" in files:
            nannyml_files.append(files["nannyml"])
        if "evidently" in files:
            evidently_res = run_worker(args.evidently_python, "--evidently-worker",
                                       files["evidently"])
    river_res = run_river(args.river_python, river_files, args.kswin_windows,
                          args.kswin_streams) if river_files else {}
    nannyml_res = run_nannyml(args.nannyml_python, nannyml_files) if nannyml_files else None
    out = report(args, tally, river_res, nannyml_res)
    if evidently_res is not None:
        secs = evidently_res["seconds"]
        print(f"\nEvidently {evidently_res['version']} DataDriftPreset (its defaults), same "
              f"reference and unshifted windows: {np.median(secs):.2f} s per window (median of "
              f"{len(secs)}); a column drifted in {evidently_res['any_column_drifted']} of them")
        out["evidently"] = evidently_res
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1,
                      default=lambda o: o.item() if hasattr(o, "item") else str(o))
    return out


def run_reference(args: argparse.Namespace, r: int, x: np.ndarray, cat: np.ndarray,
                  names: list[str], tally: Tally, tmp: str) -> dict[str, str]:
    """One reference: its unshifted stream, then every variant's shifted streams. Returns the
    files saved for the anchors that run in other interpreters."""
    from lrwatch.daemon.baseline import build_reference
    from lrwatch.daemon.detector import DriftDetector

    rng = np.random.default_rng(args.seed + r)
    xr, cr = make_window(x, cat, rng, N_REF, "none", args.jitter)
    rows = [{"features": {**{n: float(v) for n, v in zip(names, row)}, "cat": str(c)}}
            for row, c in zip(xr, cr)]
    ref = build_reference(rows, window_size=WINDOW, seed=r, target_windows=args.target_windows,
                          calibrate=False)
    t0 = time.perf_counter()
    det = DriftDetector(ref, window_size=WINDOW, target_windows=args.target_windows, seed=r,
                        joint=not args.no_joint)
    tally.cal_seconds.append(time.perf_counter() - t0)
    prof = det.profile
    order = [names.index(n) for n in prof.num_names]
    anchors = Anchors(xr, cr)
    fns: dict[str, Callable] = {"ks_bonferroni": anchors.ks_bonferroni,
                                "evidently_rule": anchors.evidently_rule, "psi": anchors.psi}
    river = args.river_python is not None and r < args.river_references
    nanny = args.nannyml_python is not None and r < args.nannyml_references
    codes = {c: i for i, c in enumerate(sorted(set(cat)))}

    def for_river(xw, cw):
        return np.concatenate([xw, np.array([codes[c] for c in cw], float)[:, None]],
                              axis=1).astype(np.float32)

    def ours(xw, cw):
        t0 = time.perf_counter()
        res = det.update(xw[:, order], [prof.encode(0, list(cw))])
        tally.times["lrwatch"].append(time.perf_counter() - t0)
        return res

    # false alarms: one long unshifted stream per reference (sequential state carries on)
    det.reset()
    nulls, nanny_null = [], []
    k0 = tally.null_alarms["lrwatch"]
    per_ref = args.null_windows // args.references
    for w in range(per_ref):
        xw, cw = make_window(x, cat, rng, WINDOW, "none", args.jitter)
        res = ours(xw, cw)
        a = res.detected
        tally.null_alarms["lrwatch"] += a
        tally.null_windows["lrwatch"] += 1
        if a:
            feat = any(n != "_prediction" for n in res.drifted_features)
            key = "both" if feat and res.joint_detected else "joint" if res.joint_detected \
                else "per_feature"
            tally.null_sources[key] += 1
        if w < args.anchor_null_windows // args.references:
            for m, fn in fns.items():
                t0 = time.perf_counter()
                tally.null_alarms[m] += fn(xw, cw)
                tally.times[m].append(time.perf_counter() - t0)
                tally.null_windows[m] += 1
        if river and w < args.river_null_windows:
            nulls.append(for_river(xw, cw))
        if nanny and w < args.nannyml_null_windows:
            nanny_null.append((xw, cw))
    tally.per_ref.append((tally.null_alarms["lrwatch"] - k0, per_ref))
    saved, nanny_saved = shifted_streams(args, r, x, cat, tally, det, ours, fns, rng,
                                         for_river if river else None, nanny)
    files: dict[str, str] = {}
    if args.evidently_python and r == 0:
        ev = [make_window(x, cat, rng, WINDOW, "none", args.jitter)
              for _ in range(args.evidently_windows)]
        files["evidently"] = os.path.join(tmp, "evidently.npz")
        np.savez(files["evidently"], ref=xr, ref_cat=cr, null=np.stack([a for a, _ in ev]),
                 null_cat=np.stack([b for _, b in ev]))
    if river:
        files["river"] = os.path.join(tmp, f"river-{r}.npz")
        np.savez(files["river"], ref=for_river(xr, cr), null=np.stack(nulls) if nulls
                 else np.zeros((0, WINDOW, x.shape[1] + 1), np.float32), **saved)
    if nanny:
        files["nannyml"] = os.path.join(tmp, f"nannyml-{r}.npz")
        np.savez(files["nannyml"], ref=xr, ref_cat=cr,
                 null=np.stack([a for a, _ in nanny_null]) if nanny_null
                 else np.zeros((0, WINDOW, x.shape[1])),
                 null_cat=np.stack([b for _, b in nanny_null]) if nanny_null
                 else np.zeros((0, WINDOW), dtype="<U1"), **nanny_saved)
    print(f"reference {r}: {tally.per_ref[-1][0]} false alarms in {per_ref} unshifted "
          f"windows; calibration {tally.cal_seconds[-1]:.1f} s", flush=True)
    return files


def shifted_streams(args, r, x, cat, tally, det, ours, fns, rng, for_river, nanny):
    """Every variant's shifted streams of reference ``r``: lrwatch on all windows, the
    per-window anchors on the first 2 shifted windows (3 for decorrelation)."""
    nfeat = x.shape[1]
    saved: dict[str, np.ndarray] = {}
    nanny_saved: dict[str, np.ndarray] = {}
    for v in args.variants:
        kept, nk, nc = [], [], []
        judged = 3 if v in JOINT_VARIANTS else 2
        for s in range(args.streams // args.references):
            feat = (r * 7 + s) % nfeat if v in ROTATING else 3
            det.reset()
            hit: dict[str, int | None] = {m: None for m in tally.methods}
            stream, nstream = [], []
            for w in range(args.windows):
                shifted = w >= 2
                xw, cw = make_window(x, cat, rng, WINDOW, v if shifted else "none",
                                     args.jitter, feat=feat)
                if for_river is not None and s < args.river_streams:
                    stream.append(for_river(xw, cw))
                if nanny and v in JOINT_VARIANTS and s < args.nannyml_streams and w < 2 + judged:
                    nstream.append((xw, cw))
                res = ours(xw, cw)
                if shifted and res.detected and hit["lrwatch"] is None:
                    hit["lrwatch"] = (w - 1) * WINDOW
                if w == 2:
                    tally.first_window[v].append(res.detected)
                if shifted and w < 2 + judged:  # anchors are per-window
                    for m, fn in fns.items():
                        if hit[m] is None and fn(xw, cw):
                            hit[m] = (w - 1) * WINDOW
            for m in tally.methods:
                tally.hits[(v, m)].append(hit[m])
            if stream:
                kept.append(np.stack(stream))
            if nstream:
                nk.append(np.stack([a for a, _ in nstream]))
                nc.append(np.stack([b for _, b in nstream]))
        if for_river is not None:
            saved[f"streams_{v}"] = np.stack(kept) if kept else np.zeros((0, 0, 0, 0))
        if nk:
            nanny_saved[f"streams_{v}"] = np.stack(nk)
            nanny_saved[f"cats_{v}"] = np.stack(nc)
    return saved, nanny_saved


def _rate_interval(k: int, n: int) -> tuple[float, float]:
    """Exact (Garwood) 95% interval of a Poisson rate: ``k`` events in ``n`` windows."""
    from scipy import stats

    lo = stats.chi2.ppf(0.025, 2 * k) / 2 / n if k else 0.0
    hi = stats.chi2.ppf(0.975, 2 * k + 2) / 2 / n
    return lo, min(hi, 1.0)


def _hits_summary(hits: list[int | None], within: int) -> dict[str, Any]:
    got = [h for h in hits if h is not None]
    return {"n": len(hits), "caught": len(got) / len(hits) if hits else None,
            "within": sum(h <= within for h in got) / len(hits) if hits else None,
            "median_delay": float(np.median(got)) if got else None}


def report(args, tally: Tally, river_res, nannyml_res) -> dict[str, Any]:
    """Print the tables; return everything as a JSON-ready dict."""
    target = 1.0 / args.target_windows
    nfeat = dataset(args.dataset)[0].shape[1] + 1
    out: dict[str, Any] = {
        "dataset": args.dataset, "tuning_family": "breast_cancer",
        "held_out": args.dataset != "breast_cancer", "features": nfeat,
        "joint": not args.no_joint, "target_rate": target, "references": args.references,
        "window": WINDOW, "reference_rows": N_REF, "jitter": args.jitter,
        "calibration_seconds": {"mean": float(np.mean(tally.cal_seconds)),
                                "min": float(np.min(tally.cal_seconds)),
                                "max": float(np.max(tally.cal_seconds))},
        "false_alarms": {}, "per_reference_false_alarms": tally.per_ref,
        "false_alarm_sources": tally.null_sources, "ms_per_window": {}, "detection": {}}
    print(f"\n{args.dataset} ({'held out' if out['held_out'] else 'tuning family'}): "
          f"reference {N_REF} rows, windows of {WINDOW}, {nfeat} features, jitter "
          f"{args.jitter} sd, {args.references} references, joint test "
          f"{'off' if args.no_joint else 'on'}; calibration {np.mean(tally.cal_seconds):.1f} s "
          f"per reference (mean)\n")
    print(f"false alarms per unshifted window (lrwatch target {target:g}, band "
          f"{target / 2:g}-{target * 1.5:g})")
    rows = [(m, tally.null_alarms[m], tally.null_windows[m]) for m in tally.methods]
    rows += [(m, res["null_alarms"], res["null_windows"]) for m, res in river_res.items()]
    if nannyml_res is not None:
        rows.append(("nannyml_dre", nannyml_res["null_alarms"], nannyml_res["null_windows"]))
    for m, k, n in rows:
        if n == 0:
            continue
        lo, hi = _rate_interval(k, n)
        out["false_alarms"][m] = {"alarms": k, "windows": n, "rate": k / n, "lo95": lo,
                                  "hi95": hi}
        print(f"  {m:15s} {k / n:.5f}  ({k}/{n}; 95% interval {lo:.5f}-{hi:.5f})")
    print(f"  lrwatch alarms by source: {tally.null_sources}")
    print(f"\nstatistics time per {WINDOW}-record window, {nfeat} features (median / mean)")
    for m in tally.methods:
        t = np.array(tally.times[m]) * 1e3
        if not len(t):
            continue
        out["ms_per_window"][m] = {"median": float(np.median(t)), "mean": float(t.mean())}
        print(f"  {m:15s} {np.median(t):7.2f} / {t.mean():7.2f} ms")
    for m, res in river_res.items():
        print(f"  {m:15s} {res['seconds'] / max(res['windows_timed'], 1) * 1e3:7.1f} ms "
              f"(mean of {res['windows_timed']} windows)")
    if nannyml_res is not None and nannyml_res["seconds"]:
        ms = float(np.median(nannyml_res["seconds"])) * 1e3
        out["ms_per_window"]["nannyml_dre"] = {"median": ms}
        print(f"  {'nannyml_dre':15s} {ms:7.1f} ms (median over its runs, per window)")
    _detection_table(args, tally, river_res, nannyml_res, out)
    return out


def _detection_table(args, tally: Tally, river_res, nannyml_res, out) -> None:
    shifted = args.windows - 2
    print(f"\ndetection rate and median delay in records after the shift (lrwatch, adwin, "
          f"kswin: {shifted} shifted windows; per-window anchors: first 2, decorrelation: "
          f"first 3; nannyml: first 3)")
    cols = tally.methods + list(river_res) + (["nannyml_dre"] if nannyml_res else [])
    print(f"  {'variant':12s} " + " ".join(f"{m:>22s}" for m in cols))
    for v in tally.variants:
        cells = []
        out["detection"][v] = {}
        for m in cols:
            if m in tally.methods:
                hits = tally.hits[(v, m)]
            elif m == "nannyml_dre":
                hits = nannyml_res["hits"].get(v, [])
            else:
                hits = river_res[m]["hits"].get(v, [])
            if not hits:
                cells.append("-".rjust(22))
                continue
            summ = _hits_summary(hits, 3 * WINDOW)
            out["detection"][v][m] = summ
            med = f"{int(summ['median_delay'])}" if summ["median_delay"] is not None else "-"
            cells.append(f"{summ['caught']:4.0%} {med:>6s} (n={len(hits)})".rjust(22))
        print(f"  {v:12s} " + " ".join(cells))
    print("\nlrwatch: caught in the first shifted window / within 3 windows / within 20,000 "
          "records")
    for v in tally.variants:
        hits = tally.hits[(v, "lrwatch")]
        if not hits:
            continue
        within3 = np.mean([h is not None and h <= 3 * WINDOW for h in hits])
        within = np.mean([h is not None and h <= 20_000 for h in hits])
        first = float(np.mean(tally.first_window[v]))
        out["detection"][v]["lrwatch"].update(first_window=first, within_3=float(within3),
                                              within_20000=float(within))
        print(f"  {v:12s} {first:6.1%}  {within3:6.1%}  {within:6.1%}  (n={len(hits)})")


if __name__ == "__main__":
    main()
