"""Input-space drop signals against lrwatch's confidence-based drop rule, on the cases and
windows of ``benchmarks/performance_estimation.py`` (issue 14's open gap: accuracy drops caused
by noisier inputs, which leave the model confident).

The daemon has each record's features and a labelled reference, so it could fit small
auxiliary classifiers on the reference's inputs and labels and watch how often they disagree
with the served model's decision (Jiang et al. 2022, "Assessing generalization of SGD via
disagreement"; Baek et al. 2022, "Agreement-on-the-line"): disagreement that rises above its
level on held-out reference rows would flag a drop the confidences miss. Auxiliaries (numpy,
on the reference's standardised inputs): ``lda`` (shrunk pooled covariance), ``nb`` (diagonal
Gaussian), ``centroid`` (nearest class mean), ``knn`` (7 neighbours' vote); and ``knn_acc``, a
local-accuracy estimate (the served model's correctness on the 7 nearest reference rows).
Each signal's null level is cross-fitted on the reference (5 folds); a window's statistic is
``z = (d - d0) / sqrt(d0 (1 - d0) (1/n + 1/m))`` and the rise ``d - d0`` (for ``knn_acc``, the
fall of the local accuracy).

Writes every window's statistics to ``--out`` (JSON); ``--summary`` reads such files and
prints detection within 2 windows of the ``drop_noise`` and ``drop`` streams and alarms per
100 unshifted windows, with each rule's threshold chosen leave-one-dataset-out.

    python benchmarks/disagreement_check.py --mode disjoint --out /tmp/dis_disjoint.json
    python benchmarks/disagreement_check.py --summary /tmp/dis_disjoint.json /tmp/dis_shared.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):            # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from benchmarks import performance_estimation as pe  # noqa: E402

AUX = ("lda", "nb", "centroid", "knn")
SIGNALS = AUX + ("knn_acc",)
BAGGED = ("lda", "nb", "centroid")
BAGS = 8
K_NEIGHBOURS = 7
FOLDS = 5
VARIANTS = ("none", "selection", "hard", "noise")


# --- auxiliary models (fit on standardised reference inputs, predict class indices) -------------
def _standardiser(x: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    mu, sd = x.mean(0), x.std(0)
    sd = np.where(sd > 1e-9, sd, 1.0)
    return lambda z: (z - mu) / sd


def fit_lda(x: np.ndarray, y: np.ndarray, k: int, shrink: float = 0.2):
    mus = np.stack([x[y == c].mean(0) if (y == c).any() else x.mean(0) for c in range(k)])
    r = x - mus[y]
    s = r.T @ r / max(len(y) - k, 1)
    s = (1 - shrink) * s + shrink * np.trace(s) / len(s) * np.eye(len(s))
    w = np.linalg.solve(s, mus.T)
    prior = np.log(np.bincount(y, minlength=k) + 1.0)
    b = -0.5 * np.sum(mus * w.T, 1) + prior
    return lambda z: (z @ w + b).argmax(1)


def fit_nb(x: np.ndarray, y: np.ndarray, k: int):
    mus = np.stack([x[y == c].mean(0) if (y == c).any() else x.mean(0) for c in range(k)])
    var = np.stack([x[y == c].var(0) if (y == c).sum() > 1 else x.var(0) for c in range(k)])
    iv = 1.0 / (var + 0.05)
    prior = np.log(np.bincount(y, minlength=k) + 1.0)
    b = -0.5 * (mus ** 2 * iv).sum(1) + 0.5 * np.log(iv).sum(1) + prior
    # the Gaussian log-likelihood expanded into two products (no (n, k, d) array)
    return lambda z: (-0.5 * (z ** 2) @ iv.T + z @ (mus * iv).T + b).argmax(1)


def fit_centroid(x: np.ndarray, y: np.ndarray, k: int):
    mus = np.stack([x[y == c].mean(0) if (y == c).any() else np.full(x.shape[1], 1e9)
                    for c in range(k)])
    return lambda z: (2 * z @ mus.T - (mus ** 2).sum(1)).argmax(1)


def neighbours(ref: np.ndarray, z: np.ndarray, k: int = K_NEIGHBOURS) -> np.ndarray:
    d = (z ** 2).sum(1)[:, None] - 2 * z @ ref.T + (ref ** 2).sum(1)[None]
    return np.argpartition(d, k - 1, axis=1)[:, :k]


def fit_knn(x: np.ndarray, y: np.ndarray, k: int):
    def pred(z):
        votes = y[neighbours(x, z)]
        counts = np.stack([(votes == c).sum(1) for c in range(k)], 1)
        return counts.argmax(1)
    return pred


def fit_knn_acc(x: np.ndarray, correct: np.ndarray):
    return lambda z: correct[neighbours(x, z)].mean(1)


FITTERS = {"lda": fit_lda, "nb": fit_nb, "centroid": fit_centroid, "knn": fit_knn}


def decision(p: np.ndarray) -> np.ndarray:
    return (p >= 0.5).astype(int) if p.ndim == 1 else p.argmax(1)


class Signals:
    """Every auxiliary fitted on a reference, with its cross-fitted null level, and the
    cheap ones also bagged (``*_bag``: :data:`BAGS` Poisson-bootstrap refits, each with its
    out-of-bag disagreement as its own null; their spread is the reference's uncertainty)."""

    def __init__(self, x: np.ndarray, p: np.ndarray, y: np.ndarray, k: int, seed: int,
                 active: tuple[str, ...] = SIGNALS):
        self.std = _standardiser(x)
        z, dec = self.std(x), decision(p)
        self.dec_ref = dec
        correct = (dec == y).astype(float)
        fitters = {n: f for n, f in FITTERS.items() if n in active}
        self.models = {n: f(z, y, k) for n, f in fitters.items()}
        if "knn_acc" in active:
            self.models["knn_acc"] = fit_knn_acc(z, correct)
        self.m = len(y)
        folds = np.random.default_rng(seed).permutation(len(y)) % FOLDS
        held: dict[str, list[np.ndarray]] = {n: [] for n in self.models}
        for f in range(FOLDS):
            tr, te = folds != f, folds == f
            for n, fit in fitters.items():
                held[n].append(fit(z[tr], y[tr], k)(z[te]) != dec[te])
            if "knn_acc" in active:
                held["knn_acc"].append(fit_knn_acc(z[tr], correct[tr])(z[te]))
        self.null = {n: float(np.concatenate(v).mean()) for n, v in held.items()}
        # smoothed (add-one) for the variance: a null of 0 on 49 rows is no certainty
        self.null_s = {n: (float(np.concatenate(v).sum()) + 1) / (self.m + 2)
                       for n, v in held.items()}
        self.shipped = None
        if "agreement" in active:
            from lrwatch.daemon.agreement import InputDisagreement

            self.shipped = InputDisagreement.fit([str(i) for i in range(x.shape[1])], x, p, y,
                                                 k, seed)
        self.noise = {}
        for fam in ("nb", "lda"):   # benchmarks/noise_check.py's candidate
            if "noise_" + fam in active:
                from benchmarks.noise_check import NoiseProxy

                self.noise["noise_" + fam] = NoiseProxy(x, y, k, fam, seed)
        rng = np.random.default_rng(seed + 1)
        self.bags: dict[str, list[tuple[Any, float]]] = {}
        for n in (n for n in BAGGED if n in fitters):
            self.bags[n] = []
            for _ in range(BAGS):
                w = rng.poisson(1.0, len(y))
                idx, oob = np.repeat(np.arange(len(y)), w), w == 0
                model = fitters[n](z[idx], y[idx], k)
                self.bags[n].append((model, float((model(z[oob]) != dec[oob]).mean())
                                     if oob.any() else self.null[n]))

    def window(self, x: np.ndarray, p: np.ndarray) -> dict[str, dict[str, float]]:
        z, dec, n = self.std(x), decision(p), len(p)
        out = {}
        for name, model in self.models.items():
            d0, ds = self.null[name], self.null_s[name]
            if name == "knn_acc":
                rise = d0 - float(model(z).mean())
            else:
                rise = float((model(z) != dec).mean()) - d0
            v = ds * (1 - ds) * (1 / n + 1 / self.m)
            out[name] = {"rise": rise, "z": rise / np.sqrt(v)}
        if self.shipped is not None:   # the daemon's own (lrwatch.daemon.agreement)
            t0 = time.perf_counter()
            r = self.shipped.window(x, p)
            out["agreement"] = {"rise": r["disagreement_rise"], "z": r["disagreement_z"],
                                "ms": 1000 * (time.perf_counter() - t0)}
        for name, proxy in self.noise.items():
            t0 = time.perf_counter()
            out[name] = dict(proxy.window(x), ms=1000 * (time.perf_counter() - t0))
        for name, bag in self.bags.items():
            rises = np.array([float((m(z) != dec).mean()) - d for m, d in bag])
            ds = self.null_s[name]
            v = max(ds * (1 - ds) / n + rises.var(ddof=1), ds * (1 - ds) * (1 / n + 1 / self.m))
            out[name + "_bag"] = {"rise": float(rises.mean()),
                                  "z": float(rises.mean() / np.sqrt(v))}
        return out


def run(mode: str, datasets: list[str], models: list[str], windows: int,
        active: tuple[str, ...] = SIGNALS) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for ds, mn, seed, case, rng, est in pe.fitted_cases(mode, datasets, models):
        sig = Signals(case.ref_x, case.ref_proba, case.ref_y, case.k, case.seed, active)
        lvl = pe.noise_level(case, rng)
        s = pe.drop_strength(case)
        meta = {"dataset": ds, "model": mn, "seed": seed, "k": case.k, "mode": mode,
                "null": sig.null}
        plan = [(v, i, pe.weights(case, v), lvl if v == "noise" else 0.0)
                for v in VARIANTS if not (v == "noise" and lvl is None)
                for i in range(windows)]
        for variant, ok in (("drop", s is not None), ("drop_noise", lvl is not None)):
            w = pe.weights(case, "hard", s) if variant == "drop" and ok else None
            plan += [(variant, i, None if i < pe.PRE_WINDOWS else w,
                      lvl if variant == "drop_noise" and i >= pe.PRE_WINDOWS else 0.0)
                     for i in range(pe.PRE_WINDOWS + pe.DROP_WINDOWS if ok else 0)]
        for variant, i, w, noise in plan:
            x, p, y = pe.window_x(case, rng, w, noise)
            r = est.estimate(p, share_test=False)
            t0 = time.perf_counter()
            stats = sig.window(x, p)
            rows.append(dict(meta, variant=variant, window=i, realised=pe.realised(p, y),
                             drop_z=r["drop_z"], accuracy_drop=r["accuracy_drop"],
                             share_outside=pe.share_stats(est, p)["outside"],
                             ms=1000 * (time.perf_counter() - t0), signals=stats,
                             features=x.shape[1]))
    return rows


# --- summary -----------------------------------------------------------------------------------
#: Whether the summary scores the estimator with the share test on (``--share-test``): a
#: window it flags is withheld, so the confidence rule cannot fire on it
SHARE_TEST = False


def lr_fires(r: dict[str, Any]) -> bool:
    if SHARE_TEST and r.get("share_outside"):
        return False
    return bool(r["drop_z"] >= pe.RULE_Z and r["accuracy_drop"] >= pe.RULE_MIN_DROP)


def sig_fires(r: dict[str, Any], name: str, z: float, rise: float) -> bool:
    s = r["signals"][name]
    return bool(s["z"] >= z and s["rise"] >= rise)


def evaluate(rows: list[dict[str, Any]], fire: Callable[[dict], bool],
             drop_variant: str) -> dict[str, float]:
    """Share of qualifying drop streams flagged within 2 windows, alarms per 100 unshifted
    windows (``none`` and the streams before onset) and per 100 ``selection`` windows."""
    streams: dict[tuple, list[dict]] = {}
    base: dict[tuple, list[float]] = {}
    null, sel = [], []
    for r in rows:
        key = (r["mode"], r["dataset"], r["model"], r["seed"])
        if r["variant"] == drop_variant:
            streams.setdefault(key, []).append(r)
        if r["variant"] == "none":
            base.setdefault(key, []).append(r["realised"])
            null.append(r)
        if r["variant"] in ("drop", "drop_noise") and r["window"] < pe.PRE_WINDOWS:
            null.append(r)
        if r["variant"] == "selection":
            sel.append(r)
    hits = []
    for key, st in streams.items():
        post = [r for r in st if r["window"] >= pe.PRE_WINDOWS]
        if np.mean(base[key]) - np.mean([r["realised"] for r in post]) < 0.03:
            continue
        hits.append(any(fire(r) for r in post[:2]))
    return {"streams": len(hits), "within_2": 100 * float(np.mean(hits)) if hits else np.nan,
            "fa": 100 * float(np.mean([fire(r) for r in null])),
            "sel": 100 * float(np.mean([fire(r) for r in sel]))}


GRID = [(n, z, rise) for n in SIGNALS + tuple(b + "_bag" for b in BAGGED) + ("agreement",)
        for z in (3.0, 4.0, 5.0, 6.0, 8.0)
        for rise in (0.0, 0.02, 0.03, 0.05)]
#: Within the 5 ms budget at 10 classes / 31 features (kNN against a 2000-row reference is not)
CHEAP = ("lda", "nb", "centroid", "lda_bag", "nb_bag", "centroid_bag")


def _or(g: tuple[str, float, float]) -> Callable[[dict], bool]:
    return lambda r: lr_fires(r) or sig_fires(r, *g)


def _both(rows: list[dict[str, Any]], fire: Callable[[dict], bool], variant: str
          ) -> list[dict[str, float]]:
    return [evaluate([r for r in rows if r["mode"] == m], fire, variant)
            for m in sorted({r["mode"] for r in rows})]


def choose(rows: list[dict[str, Any]], signals: tuple[str, ...]) -> tuple[str, float, float]:
    """The signal and thresholds that catch the most noise drops within 2 windows (OR'd with
    lrwatch's rule; the mean over the modes) adding no alarm on the unshifted windows of
    ``rows`` (the tuning datasets, both modes)."""
    base = _both(rows, lr_fires, "drop_noise")
    best, best_score = None, -1.0
    for g in (g for g in GRID if g[0] in signals):
        e = _both(rows, _or(g), "drop_noise")
        if all(a["fa"] <= b["fa"] for a, b in zip(e, base)):
            score = float(np.mean([a["within_2"] for a in e]))
            if score > best_score:
                best, best_score = g, score
    assert best is not None  # the strictest thresholds add no alarm on these windows
    return best


def summary(paths: list[str], signals: tuple[str, ...]) -> None:
    rows = [r for p in paths for r in json.loads(Path(p).read_text())]
    datasets = sorted({r["dataset"] for r in rows})
    print("Leave-one-dataset-out: the rule for dataset D is chosen on the other datasets (both "
          "modes); D's windows alone are scored.")
    print("| mode | held out | chosen (signal, z, rise) | noise drops within 2: lrwatch | "
          "+ signal | hard drops within 2: lrwatch | + signal | alarms/100 unshifted: "
          "lrwatch | + signal | fires/100 selection: lrwatch | + signal |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for ds in datasets:
        g = choose([r for r in rows if r["dataset"] != ds], signals)
        for mode in sorted({r["mode"] for r in rows}):
            held = [r for r in rows if r["dataset"] == ds and r["mode"] == mode]
            for r in held:
                r["_or"] = _or(g)(r)
            a, b = evaluate(held, lr_fires, "drop_noise"), evaluate(held, _or(g), "drop_noise")
            ha, hb = evaluate(held, lr_fires, "drop"), evaluate(held, _or(g), "drop")
            print(f"| {mode} | {ds} | {g[0]}, {g[1]:g}, {g[2]:g} | {a['within_2']:.1f} "
                  f"({a['streams']}) | {b['within_2']:.1f} | {ha['within_2']:.1f} "
                  f"({ha['streams']}) | {hb['within_2']:.1f} | {a['fa']:.2f} | {b['fa']:.2f} "
                  f"| {a['sel']:.1f} | {b['sel']:.1f} |")
    for mode in sorted({r["mode"] for r in rows}):
        mr = [r for r in rows if r["mode"] == mode]
        flagged = {v: sum(bool(r.get("share_outside")) for r in mr if r["variant"] == v)
                   for v in sorted({r["variant"] for r in mr})}
        print(f"{mode}: windows the share test flags, by variant: {flagged}")
        fire_lodo = (lambda r: r["_or"])
        a, b = evaluate(mr, lr_fires, "drop_noise"), evaluate(mr, fire_lodo, "drop_noise")
        ha, hb = evaluate(mr, lr_fires, "drop"), evaluate(mr, fire_lodo, "drop")
        print(f"| {mode} | **all, each held out** | | {a['within_2']:.1f} ({a['streams']}) | "
              f"{b['within_2']:.1f} | {ha['within_2']:.1f} ({ha['streams']}) | "
              f"{hb['within_2']:.1f} | {a['fa']:.2f} | {b['fa']:.2f} | {a['sel']:.1f} | "
              f"{b['sel']:.1f} |")
        ms = np.array([r["ms"] for r in mr])
        big = ms[[r["k"] == 10 for r in mr]]
        print(f"\n{mode}: all signals together per window: median {np.median(ms):.2f} ms, "
              f"10 classes median {np.median(big):.2f} ms")
        own = [r["signals"]["agreement"]["ms"] for r in mr if r["k"] == 10
               and "agreement" in r["signals"]]
        if own:
            print(f"{mode}: lrwatch.daemon.agreement alone, 10 classes / 64 features: median "
                  f"{np.median(own):.3f} ms, p95 {np.percentile(own, 95):.3f} ms")


def timing(features: int = 31, classes: int = 10, reference: int = 2000,
           repeats: int = 200) -> dict[str, float]:
    """Milliseconds per window of :data:`pe.WINDOW` rows: the shipped signal
    (``lrwatch.daemon.agreement``) and the confidence-based estimate beside it, on a
    ``make_classification`` reference of ``features`` inputs and ``classes`` classes."""
    from sklearn.datasets import make_classification
    from sklearn.linear_model import LogisticRegression

    from lrwatch.daemon.agreement import InputDisagreement
    from lrwatch.daemon.estimation import PerformanceEstimator

    x, y = make_classification(reference + pe.WINDOW, features, n_informative=12,
                               n_classes=classes, random_state=0)
    p = LogisticRegression(max_iter=2000).fit(x[:reference], y[:reference]).predict_proba(x)
    mon = InputDisagreement.fit([str(i) for i in range(features)], x[:reference],
                                p[:reference], y[:reference], classes)
    est = PerformanceEstimator.fit(p[:reference], y[:reference])
    out = {}
    for name, fn in (("agreement", lambda: mon.window(x[reference:], p[reference:])),
                     ("estimate", lambda: est.estimate(p[reference:]))):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
        out[name + "_median_ms"] = float(np.median(times))
        out[name + "_p95_ms"] = float(np.percentile(times, 95))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    pe.add_case_arguments(ap, "disjoint")
    ap.add_argument("--active", default=",".join(SIGNALS),
                    help="the auxiliaries to fit (the cheap ones are also bagged)")
    ap.add_argument("--out", default="/tmp/disagreement.json")
    ap.add_argument("--summary", nargs="*", help="summarise these output files instead")
    ap.add_argument("--signals", default=",".join(CHEAP),
                    help="the signals the leave-one-dataset-out choice may pick")
    ap.add_argument("--share-test", action="store_true",
                    help="summarise with the estimator's share test on (flagged windows "
                         "withheld)")
    ap.add_argument("--timing", action="store_true",
                    help="time the shipped signal per window (10 classes, 31 and 300 inputs)")
    a = ap.parse_args(argv)
    if a.timing:
        for f in (31, 300):
            print(f"{f} features, 10 classes:", timing(features=f))
        return
    if a.summary:
        global SHARE_TEST
        SHARE_TEST = a.share_test
        summary(a.summary, tuple(a.signals.split(",")))
        return
    rows = run(a.mode, a.datasets.split(","), a.models.split(","), a.windows,
               tuple(a.active.split(",")))
    Path(a.out).write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
