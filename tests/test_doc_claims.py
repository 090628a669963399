"""The numbers the docs quote agree with the stored results they come from.

The seventeenth round's audit traced the headline numbers of README.md and docs/*.md to
``benchmarks/results/*.json`` and found several that a rerun of a benchmark had left behind (a
first run's band coverage in docs/performance-estimation.md, a guard cost that mixed two
measures, a healing range whose low end was a count, not a share). Each test here reads the
stored result and checks that the doc states what it holds, so that the next rerun that moves a
number fails here until the doc follows. Torch-free and fast: JSON and text only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def _doc(name: str) -> str:
    """The doc's text with its line breaks and indentation folded to single spaces."""
    return re.sub(r"\s+", " ", (ROOT / name).read_text(encoding="utf-8"))


def _result(name: str) -> dict:
    return json.loads((RESULTS / name).read_text(encoding="utf-8"))


def test_performance_estimation_doc_quotes_the_stored_run() -> None:
    doc = _doc("docs/performance-estimation.md")
    modes = _result("performance_estimation.json")["modes"]
    shared, disjoint = modes["shared"], modes["disjoint"]
    # The band's coverage at the module's scale, per mode.
    for mode, name in ((shared, "shared"), (disjoint, "disjoint")):
        cov = mode["band_coverage"]["module_scale_coverage"]
        assert (f"{name} none {cov['none']:.3f}, selection {cov['selection']:.3f}, "
                f"hard {cov['hard']:.3f}") in doc, name
    # The scale chosen leave-one-dataset-out in the shared mode.
    scales = {v["scale"] for v in shared["band_coverage"]["by_dataset"].values()}
    if len(scales) == 1:
        assert f"the scale is {scales.pop():g} (shared, every dataset)" in doc
    # The band under the biased variants.
    low = min(m["band_coverage"]["module_scale_coverage"][v]
              for m in (shared, disjoint) for v in ("hard_errors", "noise"))
    high = max(m["band_coverage"]["module_scale_coverage"][v]
               for m in (shared, disjoint) for v in ("hard_errors", "noise"))
    assert f"the band covers {100 * low:.0f}–{100 * high:.0f}%" in doc
    # The median delay on noise drops, shared.
    assert shared["detection_noise"]["lrwatch"]["median_delay"] == 1.0
    assert "1 window (hard selection, and noise in the shared mode)" in doc
    # Iris against its oracle, disjoint.
    iris = disjoint["mae_by_dataset"]["iris/multiclass"]
    assert f"iris {iris['lrwatch']:.2f} vs {iris['oracle']:.2f}" in doc
    # Multiclass, shared hard_errors: whoever is closer is the one the doc names.
    he = shared["mae_real_by_variant"]["hard_errors/multiclass"]
    assert f"({he['lrwatch']:.2f} vs {he['nannyml']:.2f}" in doc
    if he["lrwatch"] > he["nannyml"]:
        assert "better or level everywhere but `hard_errors`, shared" in doc
    # The oracle's error on noise drops.
    noise = [m["mae_real_by_variant"][f"noise/{k}"]["oracle"]
             for m in (shared, disjoint) for k in ("binary", "multiclass")]
    assert f"the oracle's: {min(noise):.1f}–{max(noise):.1f} points" in doc
    # Per model: the SVC (multiclass) and logistic regression (binary), both modes.
    real = {mode: modes[mode]["mae_by_model_real"] for mode in ("shared", "disjoint")}
    svc, svc_d = real["shared"]["svc/multiclass"], real["disjoint"]["svc/multiclass"]
    assert (f"SVC multiclass {svc['lrwatch']:.2f} vs {svc['nannyml']:.2f}, "
            f"{svc_d['lrwatch']:.2f} vs {svc_d['nannyml']:.2f}") in doc
    lr, lr_d = real["shared"]["logreg/binary"], real["disjoint"]["logreg/binary"]
    assert f"logistic regression ({lr['lrwatch']:.2f} vs {lr['nannyml']:.2f})" in doc
    assert f"logistic regression {lr_d['lrwatch']:.2f} vs {lr_d['nannyml']:.2f}" in doc
    assert lr["lrwatch"] < lr["nannyml"] and lr_d["lrwatch"] > lr_d["nannyml"]


def test_the_gpu_guards_cost_is_what_the_stored_h200_run_measured() -> None:
    """`guard="on"`'s pass over the gradients, over the Watcher's defaults, as a share of the
    unwatched step: one measure for both models (the sixteenth round's text gave the MLP's
    share over the defaults and the transformer's over the unwatched loop, "2.9-4.4%")."""
    shares, extra = [], {}
    for row in _result("overhead_cuda_h200_guard.json")["results"]:
        v = row["variants"]
        base, watched, guarded = (v[k]["median_ms"] for k in ("baseline", "lrwatch", "lrwatch guard-on"))
        shares.append((guarded - watched) / base)
        # as the tables print them: each variant's overhead over the baseline, in whole µs
        extra[row["model"]] = (round(v["lrwatch guard-on"]["wall"]["overhead_us"])
                               - round(v["lrwatch"]["wall"]["overhead_us"]))
    claim = f"{100 * min(shares):.1f}-{100 * max(shares):.1f}% of an H200 step"
    for doc in ("README.md", "docs/overhead.md", "docs/recovery.md"):
        assert claim in _doc(doc), doc
    assert f"costs {100 * min(shares):.1f}-{100 * max(shares):.1f}% of a GPU step" in _doc("docs/design.md")
    text = _doc("docs/recovery.md")
    assert f"+{extra['mlp-gpu']} µs ({100 * shares[0]:.1f}% of the step) over the Watcher's defaults" in text


#: The recovery benchmark's would-diverge rows of each blind set scored since the start
#: check's gate (ninth round), with the defaults of its round: file, where the rows are, arm.
_BLIND_WOULD_DIVERGE = {
    "AC": ("recovery_blind_ac_gate.json", "rows", "fixed"),
    "AD": ("recovery_blind_ad.json", "rows", "fixed"),
    "AE": ("recovery_blind_ae.json", "rows", "fixed"),
    "AF": ("recovery_sudden_hold_blind_af.json", "wd", "hold"),
    "AG": ("recovery_sudden_hold_blind_ag.json", "wd", "hold"),
    "AH": ("recovery_blind_ah.json", "wd", "default"),
    "AI": ("recovery_blind_ai.json", "wd", "defaults"),
    "AJ": ("recovery_blind_aj.json", "wd", "defaults"),
    "AK": ("recovery_blind_ak_wd.json", "wd", "defaults"),
    "AL": ("recovery_blind_al.json", "wd", "now"),
    "AM": ("recovery_blind_am_wd.json", "wd", "defaults"),
}


def _healed(blind: str) -> tuple[int, int]:
    name, part, arm = _BLIND_WOULD_DIVERGE[blind]
    rows = [r for r in _result(name)[part] if part == "wd" or r.get("diverged")]
    return sum(bool(r[arm]["ok"]) for r in rows), len(rows)


def test_the_open_lists_healing_range_is_the_blind_sets_shares() -> None:
    """docs/design.md's Open list gave "39-82%": 39 was a count (AJ's 39/65, AH's 39/71)."""
    shares = {b: _healed(b) for b in _BLIND_WOULD_DIVERGE}
    low = min(shares, key=lambda b: shares[b][0] / shares[b][1])
    high = max(shares, key=lambda b: shares[b][0] / shares[b][1])
    pct = {b: round(100 * k / n) for b, (k, n) in shares.items()}
    doc = _doc("docs/design.md")
    assert (f"healed {pct[low]}-{pct[high]}% on the blind sets scored since the start check's "
            f"gate ({low} {shares[low][0]}/{shares[low][1]} to {high} "
            f"{shares[high][0]}/{shares[high][1]}") in doc


def _pct(k: int, n: int) -> str:
    return "100%" if k == n else f"{100 * k / n:.1f}%"


def test_the_suites_lofo_tables_and_anchors_are_the_stored_run() -> None:
    """docs/detection.md's "headline" LOFO table and its anchors table, and the README's
    SpikeDetection line, were the run before the tenth round's data fix (93.6%, 131 healthy
    runs) while the status table quoted the stored rerun (94.8%, 132)."""
    run = _result("detection_suite_lofo.json")
    pooled = run["lofo"]["all"]
    doc = _doc("docs/detection.md")
    section = doc.split("### Leave-one-family-out (the headline)", 1)[1].split("Before the data fix", 1)[0]
    assert (f"**pooled held-out** | **{_pct(pooled['caught'], pooled['faults'])} "
            f"({pooled['caught']}/{pooled['faults']})**") in section
    for family, a in run["lofo"]["by_family"].items():
        assert (f"| {family} | {_pct(a['caught'], a['faults'])} ({a['caught']}/{a['faults']}) | "
                f"{_pct(a['warned'], a['nonfinite_runs'])} ({a['warned']}/{a['nonfinite_runs']}) |"
                ) in section, family
    anchors = doc.split("### Against the anchors, pooled over all families", 1)[1].split(
        "Before the data fix", 1)[0]
    for anchor in run["anchors"].values():
        a = anchor["all"]
        assert (f"| {anchor['name']} | {_pct(a['caught'], a['faults'])} ({a['caught']}/{a['faults']}) |"
                ) in anchors, anchor["name"]
        assert f"({a['false_alarms_healthy']}/{a['healthy']}) |" in anchors, anchor["name"]
    spike = run["anchors"]["lightning_spike_detection"]["all"]
    assert (f"Lightning's SpikeDetection on the suite: {_pct(spike['caught'], spike['faults'])} "
            f"caught, {spike['false_alarms_healthy']} of {spike['healthy']} healthy runs") in _doc("README.md")



def test_the_seventeenth_rounds_lofo_folds_are_the_stored_run() -> None:
    """The seventeenth round reran the suite's LOFO search with its pack, fold by fold within
    its time (``benchmarks/lofo_folds.py``); the status table's LOFO cell and the headline
    section quote each finished fold, and the pooled row only when every fold ran."""
    run = _result("detection_suite_lofo_seventeenth.json")
    doc = _doc("docs/detection.md")
    section = doc.split("**The seventeenth round's pack, fold by fold**", 1)[1].split("The stored run", 1)[0]
    cell = doc.split("| faults caught >= 0.92 | ", 1)[1].split(" | ", 1)[0]
    for family in run["held_out_done"]:
        a = run["lofo"]["by_family"][family]
        assert (f"| {family} | {_pct(a['caught'], a['faults'])} ({a['caught']}/{a['faults']}) | "
                f"{_pct(a['warned'], a['nonfinite_runs'])} ({a['warned']}/{a['nonfinite_runs']}) |"
                ) in section, family
        assert f"{family} {a['caught']}/{a['faults']}" in cell, family
    pooled = run["lofo"]["all"]
    claim = f"**{_pct(pooled['caught'], pooled['faults'])}** ({pooled['caught']}/{pooled['faults']}"
    assert (claim in cell) == run["complete"], "the pooled LOFO number belongs to a complete run"


def test_the_sync_audit_table_is_the_stored_runs() -> None:
    """docs/overhead.md's sync table, before and after the fixes, against the stored audits."""
    doc = _doc("docs/overhead.md")
    table = doc.split("### Where the host waited for the GPU (the sync audit)", 1)[1].split("\n\n", 1)[0]
    before = {r["config"]: r for r in _result("sync_audit_h200_before.json")["runs"]}
    after = {r["config"]: r for r in _result("sync_audit_h200.json")["runs"]}
    rows = {  # the doc's row -> the audit's configuration
        "no monitor": "no monitor",
        "lrwatch defaults": "lrwatch defaults",
        "`guard=\"on\"`": "lrwatch guard=on",
        "Lightning `Trainer` + `LrwatchCallback`": "lightning Trainer + LrwatchCallback",
        "transformers `Trainer` + `LrwatchCallback`": "transformers Trainer + LrwatchCallback",
    }
    for row, config in rows.items():
        cells = table.split(f"| {row} | ", 1)[1].split(" | ")
        first = int(cells[0].split()[0].replace(",", ""))
        second = int(cells[1].strip("*").replace(",", ""))
        assert (first, second) == (before[config]["syncs"], after[config]["syncs"]), row


def _blind_sets(prefix: str) -> list[str]:
    """The letters of the blind sets with a stored result, oldest first (AC < ... < AM)."""
    names = [p.stem[len(prefix):] for p in RESULTS.glob(f"{prefix}*.json")]
    return sorted({n.split("_")[0].upper() for n in names if re.fullmatch(r"[a-z]{2}(_\w+)?", n)},
                  key=lambda s: (len(s), s))


def test_the_readme_quotes_the_newest_blind_sets() -> None:
    """README's detection and recovery summaries called AJ "the newest set" after AK, AL and
    (detection) AM had been read: each blind set's stored headline is quoted there."""
    readme = _doc("README.md").replace("**", "")
    detection = readme.split("[`docs/detection.md`](docs/detection.md): default rules", 1)[1].split(
        "- [`docs/recovery.md`]", 1)[0]
    for blind in _blind_sets("detection_blind_"):
        a = _result(f"detection_blind_{blind.lower()}.json")["shipped"]["all"]
        assert f"{100 * a['caught_ratio']:.1f}% of {a['faults']}" in detection, blind
    newest = _blind_sets("detection_blind_")[-1]
    assert f"On the newest set, scored once blind (seventeenth round, {newest}:" in detection
    recovery = readme.split("- [`docs/recovery.md`](docs/recovery.md): self-healing", 1)[1].split(
        "- [`docs/lr-find.md`]", 1)[0]
    for blind, (name, part, arm) in _BLIND_WOULD_DIVERGE.items():
        if part == "wd" and blind >= "AH":       # the sets whose would-diverge part is stored alone
            ok, n = _healed(blind)
            assert f"{ok} of {n}" in recovery, blind
    assert "On the newest set of five families, scored once (seventeenth round, AM:" in recovery


def test_the_readmes_stall_false_call_rates_are_the_stored_rows() -> None:
    """The README quoted the independent-noise rows only (4.7-5.1%) as the stall test's
    false-call rate; the same stored run has 5.6% and 11.6% with autocorrelated noise."""
    rows = [r for r in _result("stall_calibration.json")["rows"]
            if abs(r["improvement_per_window"] - 0.01) < 1e-3]
    iid = sorted(r["rate"] for r in rows if r["noise"] == "iid")
    ar1 = sorted(r["rate"] for r in rows if r["noise"] == "ar1")
    readme = _doc("README.md")
    assert f"stalled on {100 * iid[0]:.1f}-{100 * iid[-1]:.1f}% of decisions with independent noise" in readme
    assert f"{100 * ar1[0]:.1f}% and {100 * ar1[-1]:.1f}% under autocorrelated noise" in readme


def test_the_status_tables_numbers_with_the_shipped_pack_are_the_rescored_ones() -> None:
    """docs/detection.md's status table quotes each blind set's read and, where this round's
    pack scores it otherwise, "with this round's pack": every rescored count is in its cell
    (the sixteenth round's table left out AH's healthy runs, 3/51 and 4/51 now)."""
    table = [ln for ln in (ROOT / "docs/detection.md").read_text(encoding="utf-8").splitlines()
             if ln.startswith("| ")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.strip("|").split("|")] for r in table[2:9]}
    sets = _result("detection_shipped_pack_audit17.json")["sets"]
    for name, run in sets.items():
        col = next((i for i, h in enumerate(header) if re.search(rf"\bblind set {name}\b", h)), None)
        if col is None:
            continue
        a = run["all"]
        cell = {k: v[col] for k, v in rows.items()}
        assert f"{a['caught']}/{a['faults']}" in cell["faults caught >= 0.92"], name
        assert f"{a['warned']}/{a['nonfinite_runs']}" in cell[
            "every run that reaches a non-finite value warned before it"], name
        fa = cell["no critical false alarm on healthy runs / before an onset"]
        assert f"{a['false_alarms_healthy']}/{a['healthy']}" in fa, name
        assert f"{a['false_alarms_before_onset']}/{a['faults']}" in fa, name
        assert f"{a['warned_healthy']}/{a['healthy']}" in cell["warnings on healthy runs <= 5%"], name
        delay = cell["median delay <= 2 steps (<= 1 evaluation)"].replace("*", "")
        assert f"{a['median_delay']:g}, {a['median_delay_evals']:g}" in delay, name
        drops = run["eval_drop"]
        assert f"{drops['caught']}/{drops['faults']}" in cell["silent evaluation drops within 3 evaluations"], name


def test_the_scheduled_stall_cut_numbers_are_the_stored_run() -> None:
    """With warm-up + cosine: the defaults against the cut on every stall (`plateau_cut`)."""
    rows = [r for r in _result("recovery_families_warmup.json")["rows"] if r.get("diverged")]
    fixed = sum(bool(r["fixed"]["ok"]) for r in rows)
    cut = sum(bool(r["plateau_cut"]["ok"]) for r in rows)
    assert (f"with warm-up + cosine the cut healed {cut} of {len(rows)} instead of {fixed}"
            ) in _doc("README.md")
    assert (f"the defaults **{fixed} of {len(rows)}**, the cut on every stall **{cut} of "
            f"{len(rows)}**") in _doc("docs/recovery.md")


def test_the_estimation_speed_target_quotes_the_stored_timing() -> None:
    ms = _result("performance_estimation.json")["timing"]["ms_per_window"]
    assert f"| ≤ 5 ms per window, 10 classes | {ms:.2f} ms (the stored run" in _doc(
        "docs/performance-estimation.md")


def test_the_long_run_stall_table_is_the_stored_one() -> None:
    doc = _doc("docs/recovery.md")
    for row in _result("stall_calibration.json")["long"]:
        first = "" if row["first_median"] is None else f" {row['first_median']}"
        assert (f"| {100 * row['improvement_per_window']:.0f}%{' (the threshold)' if row['mean'] > 5 else ''} | "
                f"{'0' if row['mean'] == 0 else format(row['mean'], '.1f')}, {row['max']} | {row['runs_with_any']}/10 |{first} |") in doc, row
