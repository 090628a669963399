"""`lrwatch baseline build` from JSONL and CSV; the daemon command's config errors."""

from __future__ import annotations

import csv
import json
import random

import pytest
from click.testing import CliRunner

from daemon_helpers import make_record
from lrwatch.cli import cli
from lrwatch.daemon import DaemonConfig, Reference
from lrwatch.errors import ConfigError


def _build(tmp_path, *, records, seed, window, sims):
    """Reference data of ``records`` test records and the reference built from it."""
    rng = random.Random(seed)
    data = tmp_path / "ref.jsonl"
    data.write_text("\n".join(json.dumps(make_record(rng, i)) for i in range(records)))
    out = tmp_path / "reference.json"
    res = CliRunner().invoke(cli, ["baseline", "build", str(data), "-o", str(out),
                                   "--window-size", str(window), "--sims", str(sims), "-q"])
    assert res.exit_code == 0, res.output
    return data, out


def test_baseline_build_from_jsonl(tmp_path):
    rng = random.Random(2)
    data = tmp_path / "ref.jsonl"
    data.write_text("\n".join(json.dumps(make_record(rng, i)) for i in range(800)))
    out = tmp_path / "reference.json"
    res = CliRunner().invoke(cli, ["baseline", "build", str(data), "-o", str(out),
                                   "--window-size", "100", "--sims", "200"])
    assert res.exit_code == 0, res.output
    assert "800 records" in res.output and "prediction probability" in res.output
    ref = Reference.load(out)
    kinds = {f.name: f.kind for f in ref.features}
    assert kinds == {"c": "categorical", "x": "numeric", "y": "numeric",
                     "_prediction": "numeric"}
    assert ref.calibration["window_size"] == 100 and ref.calibration["threshold"] > 2


def test_baseline_build_from_csv_with_forced_kind(tmp_path):
    data = tmp_path / "ref.csv"
    rng = random.Random(3)
    with open(data, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["age", "zip", "flag", "prediction"])
        for _ in range(300):
            w.writerow([rng.randint(18, 90), rng.choice([10115, 80331, 20095]),
                        rng.choice([0, 1]), rng.choice(["cat", "dog"])])
    out = tmp_path / "reference.json"
    res = CliRunner().invoke(cli, ["baseline", "build", str(data), "-o", str(out), "--kind",
                                   "zip=categorical", "--window-size", "50", "--sims", "200"])
    assert res.exit_code == 0, res.output
    ref = Reference.load(out)
    assert {f.name: f.kind for f in ref.features} == {
        "age": "numeric", "flag": "binary", "zip": "categorical", "_prediction": "categorical"}
    assert ref.prediction_type == "class"


def test_baseline_build_refuses_a_kind_forced_for_a_feature_the_data_lacks(tmp_path):
    """The fourteenth round's audit: `--kind zpi=categorical` (a typo of `zip`) built the
    reference without a word, with `zip` profiled as numeric: the forced kind was dropped.
    It is an error naming the unknown feature and the nearest name."""
    data = tmp_path / "ref.csv"
    rng = random.Random(3)
    with open(data, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["age", "zip", "prediction"])
        for _ in range(100):
            w.writerow([rng.randint(18, 90), rng.choice([10115, 80331]), rng.random()])
    out = tmp_path / "reference.json"
    res = CliRunner().invoke(cli, ["baseline", "build", str(data), "-o", str(out), "--kind",
                                   "zpi=categorical", "--sims", "100", "-q"])
    assert res.exit_code == 1 and not out.exists(), res.output
    assert "['zpi'], which no reference record has" in res.output
    assert "did you mean 'zip'" in res.output and "(features: age, zip)" in res.output


@pytest.mark.parametrize("label, kind, says", [
    (lambda rng, p: round(min(1.0, max(0.0, p + rng.gauss(0, 0.05))), 4), "regression",
     "prediction regression (outputs in [0, 1], but the labels are values"),
    (lambda rng, p: int(rng.random() < p), "probability",
     "prediction probability (the labels are 0/1"),
])
def test_baseline_build_reports_the_prediction_kind_its_labels_chose(tmp_path, label, kind,
                                                                     says):
    """A CSV of a click-through-rate regression (a share as its label) or of a binary
    classifier with the same outputs (a 0/1 label): the label column tells them apart."""
    rng = random.Random(5)
    data = tmp_path / "ref.csv"
    with open(data, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["x", "prediction", "label"])
        for _ in range(300):
            x = rng.gauss(0, 1)
            p = round(0.05 + 0.4 * rng.random(), 6)
            w.writerow([x, p, label(rng, p)])
    out = tmp_path / "reference.json"
    res = CliRunner().invoke(cli, ["baseline", "build", str(data), "-o", str(out),
                                   "--window-size", "50", "--sims", "200", "-q"])
    assert res.exit_code == 0, res.output
    assert says in res.output
    ref = Reference.load(out)
    assert ref.prediction_type == kind and ref.prediction_basis == "labels"


def test_bad_inputs_name_the_problem(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"features": {"x": 1}}\n{"nope": 1}\n')
    res = CliRunner().invoke(cli, ["baseline", "build", str(bad), "-o", str(tmp_path / "r")])
    assert res.exit_code != 0 and "bad.jsonl:2" in res.output
    cfg = tmp_path / "c.yml"
    cfg.write_text("window: {size: 10}\nwindoww: 3\n")
    res = CliRunner().invoke(cli, ["daemon", "--config", str(cfg)])
    assert res.exit_code != 0 and "windoww" in res.output


def test_broken_reference_data_names_the_line_and_never_a_traceback(tmp_path):
    rng = random.Random(4)
    rows = [make_record(rng, i) for i in range(40)]
    out = str(tmp_path / "r.json")

    def build(path):
        return CliRunner().invoke(cli, ["baseline", "build", str(path), "-o", out,
                                        "--window-size", "10", "--sims", "100", "-q"])

    big = tmp_path / "big.jsonl"   # an integer no float holds (it overflowed in profiling)
    lines = [json.dumps(r) for r in rows]
    lines[4] = lines[4].replace(json.dumps(rows[4]["features"]["y"]), "9" * 400)
    big.write_text("\n".join(lines))
    res = build(big)
    assert res.exit_code == 1 and "big.jsonl:5" in res.output and "finite" in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    ragged = tmp_path / "ragged.csv"   # a short row (a TypeError before)
    ragged.write_text("x,y,prediction\n" + "\n".join(
        f"{r['features']['x']},{r['features']['y']},{r['prediction']}" for r in rows[:20])
        + "\n1.0\n")
    res = build(ragged)
    assert res.exit_code == 1 and "ragged.csv:22: 1 columns, expected 3" in res.output
    empty = tmp_path / "empty_col.jsonl"   # a feature never set: left out, and said
    empty.write_text("\n".join(json.dumps({**r, "features": {**r["features"], "z": None}})
                               for r in rows))
    res = build(empty)
    assert res.exit_code == 0 and "left out: 'z'" in res.output
    assert "z" not in {f.name for f in Reference.load(out).features}


def test_a_reference_of_the_wrong_shape_is_an_error_naming_the_part(tmp_path):
    data, good = _build(tmp_path, records=60, seed=5, window=10, sims=100)
    d = json.loads(good.read_text())
    numeric = next(i for i, f in enumerate(d["features"]) if f["kind"] == "numeric")
    no_edges = json.loads(json.dumps(d))
    del no_edges["features"][numeric]["edges"]
    cases = {"a reference is a JSON object, got a list": [1, 2],
             "'features' must be a list of objects": {**d, "features": ["x"]},
             "'calibration' must be an object": {**d, "calibration": "garbage"},
             "'sample' must be an object": {**d, "sample": [1, 2]},
             "needs 'edges' and 'counts'": no_edges}
    for i, (said, value) in enumerate(cases.items()):
        path = tmp_path / f"bad{i}.json"
        path.write_text(json.dumps(value))
        with pytest.raises(ConfigError, match=said):
            Reference.load(path)
        res = CliRunner().invoke(cli, ["baseline", "recalibrate", str(path), "-q"])
        assert res.exit_code != 0 and said.split("'")[0] in res.output, res.output
    with pytest.raises(ConfigError, match="baseline build"):   # the data, not a reference
        Reference.load(data)


def test_a_config_of_the_wrong_shape_is_an_error(tmp_path):
    target = tmp_path / "preds.jsonl"
    target.write_text("")
    one = DaemonConfig.from_mapping({"tail": "preds.jsonl"}, base_dir=str(tmp_path))
    assert one.tail == [str(target)]   # one path, not its characters
    for value, said in (([str(tmp_path)], "is a directory"), (3, "file path")):
        with pytest.raises(ConfigError, match=said):
            DaemonConfig.from_mapping({"tail": value}, base_dir=str(tmp_path))
    for text, said in (("- 1\n", "mapping of keys"),
                       ("a: " + "[" * 3000 + "]" * 3000 + "\n", "nested too deeply")):
        cfg = tmp_path / "c.yml"
        cfg.write_text(text)
        res = CliRunner().invoke(cli, ["daemon", "--config", str(cfg)])
        assert res.exit_code != 0 and said in res.output, res.output
        assert isinstance(res.exception, SystemExit)


def test_config_file_sections(tmp_path):
    (tmp_path / "token").write_text("abc\n")
    cfg = DaemonConfig.from_mapping({
        "listen": {"port": 0}, "auth": {"token_file": "token"},
        "window": {"seconds": 30}, "drift": {"target_windows": 500},
        "hook": {"argv": ["/bin/true"], "cooldown": 10}, "tail": ["a.jsonl"],
        "alerts": {"alertmanager": "http://127.0.0.1:9093"}}, base_dir=str(tmp_path))
    assert cfg.token == "abc" and cfg.window_seconds == 30 and cfg.target_windows == 500
    assert cfg.tail == [str(tmp_path / "a.jsonl")] and cfg.alertmanager == ["http://127.0.0.1:9093"]
    assert cfg.hook_argv == ["/bin/true"] and cfg.hook_cooldown == 10


def test_baseline_build_fits_the_estimator_from_a_label_column(tmp_path):
    data = tmp_path / "ref.csv"
    rng = random.Random(4)
    with open(data, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["x", "prediction", "label"])
        for _ in range(400):
            p = rng.random()
            w.writerow([round(rng.gauss(0, 1), 4), round(p, 4), int(rng.random() < p)])
    out = tmp_path / "reference.json"
    res = CliRunner().invoke(cli, ["baseline", "build", str(data), "-o", str(out),
                                   "--window-size", "50", "--sims", "200"])
    assert res.exit_code == 0, res.output
    assert "performance estimation: 2 classes, fitted on 400 labelled records" in res.output
    ref = Reference.load(out)
    assert ref.estimator is not None and [f.name for f in ref.features] == ["x", "_prediction"]


def test_baseline_build_without_labels_says_how_to_estimate(tmp_path):
    rng = random.Random(5)
    data = tmp_path / "ref.jsonl"
    data.write_text("\n".join(json.dumps(make_record(rng, i)) for i in range(200)))
    res = CliRunner().invoke(cli, ["baseline", "build", str(data), "-o",
                                   str(tmp_path / "r.json"), "--window-size", "50",
                                   "--sims", "200"])
    assert res.exit_code == 0, res.output
    (line,) = [ln for ln in res.output.splitlines() if "performance estimation" in ln]
    assert "no labels" in line and '"label"' in line


def test_config_sections_of_the_model_outputs(tmp_path):
    cfg = DaemonConfig.from_mapping({"labels": {"horizon_seconds": 600},
                                     "estimation": {"enabled": False, "min_window_labels": 50},
                                     "drift": {"joint": False}})
    assert (cfg.label_horizon_seconds, cfg.estimation, cfg.estimation_min_window_labels,
            cfg.joint_drift) == (600, False, 50, False)
    for bad, word in (({"labels": {"horizon_seconds": 0}}, "label_horizon_seconds"),
                      ({"estimation": {"enabled": "yes"}}, "estimation.enabled"),
                      ({"labels": {"horizon": 1}}, "horizon_seconds")):
        try:
            DaemonConfig.from_mapping(bad)
        except Exception as exc:  # ConfigError naming the key
            assert word in str(exc), exc
        else:
            raise AssertionError(f"{bad} was accepted")


def test_baseline_recalibrate_brings_an_old_reference_up_to_date(tmp_path):
    """A reference calibrated before the joint drift test is recalibrated by the daemon at
    every start (it never writes a --reference file); `baseline recalibrate` does it once,
    keeping the profile and the window size."""
    from lrwatch.daemon.calibrate import calibrate
    from lrwatch.daemon.detector import DriftDetector

    data, out = _build(tmp_path, records=600, seed=4, window=100, sims=200)
    ref = Reference.load(out)
    old = calibrate(ref, window_size=100, sims=200, joint=False).to_dict()
    old.pop("joint_features", None)   # as an lrwatch without the joint test wrote it
    ref.calibration = old
    ref.save(out)
    det = DriftDetector(Reference.load(out), sims=200)
    assert det.calibration.joint_features == ["x", "y", "c=a", "c=b"]  # recalibrated
    res = CliRunner().invoke(cli, ["baseline", "recalibrate", str(out), "--sims", "200", "-q"])
    assert res.exit_code == 0, res.output
    assert "threshold" in res.output
    new = Reference.load(out)
    assert new.calibration["window_size"] == 100 and new.calibration["joint_features"] == [
        "x", "y", "c=a", "c=b"]
    assert [f.name for f in new.features] == [f.name for f in ref.features]
    assert DriftDetector(new, sims=200).calibration.to_dict() == new.calibration  # used as is
    res = CliRunner().invoke(cli, ["baseline", "recalibrate", str(tmp_path / "nope.json")])
    assert res.exit_code != 0


def test_config_numbers_are_checked_and_exponent_text_is_a_number(tmp_path):
    # YAML 1.1 reads 1e3 and 1e-2 as text; the config reads them as the numbers they spell
    cfg_file = tmp_path / "c.yml"
    cfg_file.write_text("drift: {target_windows: 1e3, min_effect: 1e-2}\n"
                        "window: {size: 1e3}\nlabels: {horizon_seconds: 1.0e4}\n")
    cfg = DaemonConfig.load(str(cfg_file))
    assert (cfg.target_windows, cfg.min_effect, cfg.window_size, cfg.label_horizon_seconds) == (
        1000.0, 0.01, 1000, 10000.0)
    assert isinstance(cfg.window_size, int)
    # a value of the wrong type is a ConfigError naming the key, never a TypeError later
    for bad, words in (({"drift": {"target_windows": "many"}},
                        "drift.target_windows must be a number"),
                       ({"window": {"size": 10.5}}, "window.size must be an integer"),
                       ({"hook": {"cooldown": "soon"}}, "hook.cooldown must be a number"),
                       ({"alerts": {"resend_interval": "x"}}, "alerts.resend_interval"),
                       ({"drift": {"sequential": "yes"}}, "drift.sequential must be true or false"),
                       ({"listen": {"port": True}}, "listen.port must be an integer"),
                       ({"seed": "a"}, "seed must be an integer")):
        with pytest.raises(ConfigError, match=words):
            DaemonConfig.from_mapping(bad)
    bad_file = tmp_path / "bad.yml"
    bad_file.write_text("drift: {target_windows: lots}\n")
    res = CliRunner().invoke(cli, ["daemon", "--config", str(bad_file)])
    assert res.exit_code != 0 and "drift.target_windows must be a number" in res.output
    assert "Traceback" not in res.output
