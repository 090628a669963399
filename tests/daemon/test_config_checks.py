"""Settings that would make the daemon run in a way nobody asked for are refused at start,
with an error that says what to fix (and never a traceback)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from lrwatch.daemon import DaemonConfig
from lrwatch.errors import ConfigError


def _daemon_cli(*args: str) -> subprocess.CompletedProcess:
    """``lrwatch daemon ARGS`` in a process of its own; one that starts serving instead of
    failing is stopped (a daemon that runs was the bug) and reported as such."""
    proc = subprocess.Popen([sys.executable, "-m", "lrwatch", "daemon", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the daemon started instead of refusing the settings: {err[-500:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("content", [b"", b"\n", b"  \t\n"])
def test_an_empty_token_file_is_refused_not_read_as_no_authentication(tmp_path, content,
                                                                      reference_path):
    token = tmp_path / "token"
    token.write_bytes(content)
    res = _daemon_cli("--reference", reference_path, "--port", "0",
                      "--token-file", str(token))
    assert res.returncode == 1 and "is empty" in res.stderr and "Traceback" not in res.stderr
    with pytest.raises(ConfigError, match="is empty"):
        DaemonConfig.from_mapping({"auth": {"token_file": "token"}}, base_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="token is empty"):
        DaemonConfig(token=content.decode())


@pytest.mark.parametrize("mapping, message", [
    ({"state_dir": 5}, "state_dir must be a file path"),
    ({"rules": 5}, "rules must be a rule file or pack name"),
    ({"reference": {"path": ["a"]}}, "reference.path must be a file path"),
    ({"http": {"tls_certfile": 5, "tls_keyfile": "k"}}, "tls_certfile must be a file path"),
    ({"listen": {"host": 5}}, "listen.host must be text"),
    ({"alerts": {"alertmanager": 5}}, "alerts.alertmanager must be an http"),
    ({"alerts": {"alertmanager": [5, None]}}, "alerts.alertmanager must be an http"),
    ({"alerts": {"webhook": {"a": 1}}}, "alerts.webhook must be an http"),
    ({"alerts": {"alertmanager": "localhost:9093"}}, "is not an http:// or https:// URL"),
    ({"hook": {"argv": ["x"], "rules": "data_drift"}}, "hook.rules must be a list"),
    ({"labels": {"horizon_seconds": 1e308}}, "label horizon must be at most"),
    ({"snapshot_interval": 0}, "snapshot_interval must be a positive"),
    ({"snapshot_interval": -5}, "snapshot_interval must be a positive"),
    ({"alerts": {"resend_interval": 0}}, "resend_interval must be a positive"),
    ({"hook": {"argv": ["x"], "timeout": -1}}, "hook_timeout must be a positive"),
    ({"hook": {"argv": ["x"], "cooldown": -1}}, "hook cooldown must be >= 0"),
    ({"drift": {"min_effect": -1}}, "min_effect must be >= 0"),
    ({"drift": {"calibration_sims": -5}}, "calibration_sims must be an integer >= 100"),
    ({"reference": {"live_records": 5}}, "live_records must be at least 10"),
    ({"window": {"size": 100, "seconds": 5}}, "not both"),
    ({"window": {"seconds": 1e-9}}, "window seconds must be at least 0.001"),
])
def test_config_values_that_make_no_sense_are_config_errors(mapping, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        DaemonConfig.from_mapping(mapping)


def test_a_config_or_token_file_that_is_not_utf8_is_a_config_error(tmp_path, reference_path):
    cfg = tmp_path / "lrwatch.yml"
    cfg.write_bytes(b"state_dir: /tmp/\xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        DaemonConfig.load(str(cfg))
    token = tmp_path / "token"
    token.write_bytes(b"\xff\xfe secret")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        DaemonConfig.from_mapping({"auth": {"token_file": str(token)}})
    for args in (["--config", str(cfg)], ["--token-file", str(token)]):
        res = _daemon_cli("--reference", reference_path, "--port", "0", *args)
        assert res.returncode == 1 and "not UTF-8 text" in res.stderr
        assert "Traceback" not in res.stderr


def test_hook_rules_must_name_rules_of_the_pack(reference_path):
    from lrwatch.daemon import Daemon

    with pytest.raises(ConfigError, match=r"hook rules \['no_such_rule'\] are not rules"):
        Daemon(DaemonConfig(reference=reference_path, hook_argv=["true"],
                            hook_rules=["no_such_rule", "data_drift"], log_alerts=False))


def test_a_url_list_or_the_reference_path_written_out_as_null_is_its_default():
    """The fourteenth round's audit: `alerts: {alertmanager: null}` and `reference: {path:
    null}` were refused ("must be an http:// or https:// URL", "must be a file path") where
    every other optional key takes null as its default. Null is none now; a wrong value is
    still refused."""
    cfg = DaemonConfig.from_mapping({"alerts": {"alertmanager": None, "webhook": None},
                                     "reference": {"path": None}})
    assert cfg.alertmanager == [] and cfg.webhook == [] and cfg.reference is None
    with pytest.raises(ConfigError, match="alertmanager"):
        DaemonConfig.from_mapping({"alerts": {"alertmanager": "localhost:9093"}})
    with pytest.raises(ConfigError, match="reference.path must be a file path"):
        DaemonConfig.from_mapping({"reference": {"path": 3}})


def test_hook_rules_written_out_as_its_default_null_is_accepted():
    """The fourteenth round's audit: docs/daemon.md's config gives every key with its default,
    and `hook: {rules: null}` (the default: every rule whose actions include hook) was refused
    ("hook.rules must be a list of rule names, got None") although the top-level `rules: null`
    and `tls_certfile: null` are accepted. A list is still required when one is given."""
    cfg = DaemonConfig.from_mapping({"hook": {"argv": ["x"], "rules": None}})
    assert cfg.hook_rules is None and cfg.hook_argv == ["x"]
    with pytest.raises(ConfigError, match="hook.rules must be a list"):
        DaemonConfig.from_mapping({"hook": {"argv": ["x"], "rules": "data_drift"}})
