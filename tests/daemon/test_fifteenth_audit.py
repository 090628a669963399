"""Defects found by the fifteenth round's audit (6 December), each reproduced on real daemons
(in process, and over HTTP on loopback ports the tests pick)."""

from __future__ import annotations

import csv
import json
import random
from typing import Any

from daemon_helpers import WINDOW, assert_balanced, make_record
from lrwatch.daemon import Daemon, DaemonConfig, build_reference


def _daemon(reference: str, **kw: Any) -> Daemon:
    kw.setdefault("window_size", WINDOW)
    return Daemon(DaemonConfig(reference=reference, port=0, log_alerts=False, **kw))


# --- a reference file that starts with a UTF-8 byte order mark ---------------------------------
def test_a_reference_file_with_a_byte_order_mark_names_its_first_feature_as_sent(
        tmp_path: Any) -> None:
    """Excel's "CSV UTF-8" and pandas' ``to_csv(encoding="utf-8-sig")`` start the file with a
    byte order mark. It stayed part of the first column's name (``"\\ufeffx"``), a feature no
    live record has: the first window found it missing in every record and drifted, while the
    live ``x`` was an unknown key. A JSONL file with one was refused on line 1."""
    from lrwatch.daemon.reference import read_data

    rng = random.Random(150)
    rows = [make_record(rng, i) for i in range(3000)]
    path = tmp_path / "reference.csv"
    with open(path, "w", newline="", encoding="utf-8-sig") as fh:
        w = csv.writer(fh)
        w.writerow(["x", "y", "c", "prediction"])
        for r in rows:
            f = r["features"]
            w.writerow([f["x"], f["y"], f["c"], r["prediction"]])
    read = read_data(str(path))
    assert set(read[0]["features"]) == {"x", "y", "c"}
    jsonl = tmp_path / "reference.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows[:20]), encoding="utf-8-sig")
    assert read_data(str(jsonl))[0]["features"] == rows[0]["features"]

    ref = build_reference(read, window_size=WINDOW, sims=300, seed=0)
    assert {f.name for f in ref.features} == {"x", "y", "c", "_prediction"}
    saved = str(tmp_path / "reference.json")
    ref.save(saved)
    d = _daemon(saved)
    d.start()
    try:
        body = "\n".join(json.dumps(make_record(rng, i)) for i in range(WINDOW))
        assert d.submit("predictions", body.encode())[0] == 200
        assert d.drain() and d.counters["windows"] == 1
        assert d.last["values"]["missing_ratio"] == 0.0
        assert "x" not in d.last["drifted_features"]
        assert_balanced(d)
    finally:
        d.stop()


# --- a key written twice in the config file -----------------------------------------------------
def test_a_config_key_written_twice_is_refused_not_silently_dropped(tmp_path: Any) -> None:
    """PyYAML keeps the last of two equal keys without a word: a config with ``auth`` set at
    the top and an ``auth: {}`` added further down ran with no authentication at all (and two
    ``limits:`` blocks lost the first one's limits). Rule files already refuse duplicates."""
    import pytest

    from lrwatch.daemon.config import DaemonConfig as Config
    from lrwatch.errors import ConfigError

    cfg = tmp_path / "lrwatch.yml"
    cfg.write_text("auth: {token: s3cret}\nlisten: {port: 0}\nauth: {}\n")
    with pytest.raises(ConfigError, match=r"lrwatch.yml:3: key 'auth' is written twice"):
        Config.load(str(cfg))
    cfg.write_text("limits: {max_body_bytes: 1000, max_body_bytes: 2000}\n")
    with pytest.raises(ConfigError, match="'max_body_bytes' is written twice"):
        Config.load(str(cfg))
    # a merge key (<<) that the mapping overrides is no duplicate
    cfg.write_text("limits: {<<: {max_body_bytes: 1000}, max_body_bytes: 2000}\n"
                   "auth: {token: s3cret}\n")
    loaded = Config.load(str(cfg))
    assert loaded.max_body_bytes == 2000 and loaded.token == "s3cret"
