"""The daemon's rules joined as layers, as the Watcher's and `lrwatch replay`'s are
(docs/rules.md, "Layering rule sets"): `rules:` in the config and `--rules` on the command
line take pack names and files, one or a list, joined in order; a file layered on the
serving pack may refer to its rules, turn one off or replace one."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lrwatch.daemon import Daemon, DaemonConfig
from lrwatch.errors import ConfigError, LrwatchError

LAYER = """version: 1
rules:
  - name: low_label_coverage
    enabled: false
  - name: drift_and_accuracy
    when: {all: [data_drift, estimated_accuracy_drop]}
    severity: critical
    actions: [alert]
    annotations:
      summary: "drift and an accuracy drop together in window {step}"
      description: "an escalation over two serving-pack rules"
"""


def _layer(tmp_path) -> str:
    p = tmp_path / "my.yml"
    p.write_text(LAYER)
    return str(p)


def test_a_config_joins_a_file_on_the_serving_pack(tmp_path, reference_path):
    cfg = DaemonConfig.from_mapping({"rules": ["serving", "my.yml"]}, base_dir=str(tmp_path))
    _layer(tmp_path)
    d = Daemon(cfg.replace(reference=reference_path, log_alerts=False, port=0))
    try:
        names = d.rules.names
        assert "drift_and_accuracy" in names and "low_label_coverage" not in names
        assert "data_drift" in names             # the rest of the pack is kept
    finally:
        d.stop()


def test_the_file_alone_names_the_pack_it_needs(tmp_path, reference_path):
    cfg = DaemonConfig.from_mapping({"rules": "my.yml"}, base_dir=str(tmp_path))
    _layer(tmp_path)
    with pytest.raises(LrwatchError, match="is a rule of pack 'serving': join the pack first"):
        Daemon(cfg.replace(reference=reference_path, log_alerts=False, port=0))


def test_rules_must_be_text_or_a_list_of_text(tmp_path):
    with pytest.raises(ConfigError, match="rules must be"):
        DaemonConfig.from_mapping({"rules": ["serving", 3]}, base_dir=str(tmp_path))


def test_the_command_line_takes_rules_more_than_once(tmp_path, reference_path):
    layer = _layer(tmp_path)
    out = subprocess.run([sys.executable, "-m", "lrwatch", "daemon", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert "--rules" in out.stdout and "repeat" in out.stdout.lower()
    # a pack name that is not a file, then the file: accepted by the option parser, and the
    # daemon reads them in order: the missing file is the error it stops on
    bad = subprocess.run([sys.executable, "-m", "lrwatch", "daemon", "--reference",
                          reference_path, "--rules", "serving", "--rules", layer,
                          "--rules", str(tmp_path / "missing.yml"), "--port", "0"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "missing.yml" in bad.stderr
