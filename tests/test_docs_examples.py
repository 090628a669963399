"""The examples and settings of docs/*.md agree with what lrwatch accepts.

README.md's examples run as pasted in ``tests/test_readme.py``. The docs hold fragments (a
rule added to a pack, a config with the host's own paths) that cannot run as pasted; this test
checks what they promise instead (the fourteenth round's audit of the user-facing docs):

- every rule-file example of docs/rules.md validates (a fragment inside a ``rules:`` list, a
  layering example joined after the pack it names);
- the config file of docs/daemon.md loads, with its paths pointed at a scratch directory, and
  holds every key the daemon accepts (none accepted and undocumented, none documented and
  refused), and every ``section.key`` the daemon and performance-estimation docs name is one
  the daemon accepts;
- docs/lr-find.md's ``mytask.py`` is a target `lrwatch lr-find` tests.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from lrwatch.cli import cli
from lrwatch.daemon.config import DaemonConfig
from lrwatch.errors import ConfigError
from lrwatch.rules import load_pack
from lrwatch.rules.layering import join

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
_FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.S | re.M)


def blocks(doc: str, lang: str) -> list[tuple[int, str]]:
    text = (DOCS / doc).read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 1, m.group(2)) for m in _FENCE.finditer(text)
            if m.group(1).strip() == lang]


@pytest.mark.parametrize("line, code", blocks("rules.md", "yaml"),
                         ids=[f"rules.md:{n}" for n, _ in blocks("rules.md", "yaml")])
def test_every_rule_file_example_validates(tmp_path: Path, line: int, code: str) -> None:
    if code.startswith("  - "):           # a rule as it sits in a file's `rules:` list
        code = "rules:\n" + code
    f = tmp_path / "example.yml"
    f.write_text(code, encoding="utf-8")
    after = re.search(r'rules=\["(\w+)", ', code.splitlines()[0])   # used after a pack
    joined = join([after.group(1), str(f)]) if after else join([str(f)])
    assert joined.rules, f"docs/rules.md:{line}"
    if after:
        assert len(joined.rules) >= len(load_pack(after.group(1)).rules) - 1


def _valid(mapping: dict) -> list[str] | None:
    """The keys the daemon's config loader accepts there, as its own error lists them (None
    where the value is not a mapping of keys)."""
    with pytest.raises(ConfigError) as err:
        DaemonConfig.from_mapping(mapping)
    m = re.search(r"valid(?: keys)?: (.*)$", str(err.value))
    return re.split(r",\s*", m.group(1).strip()) if m else None


def _accepted() -> set[str]:
    top = _valid({"no_such_key": 1}) or []
    keys = set(top)
    for section in top:
        inner = _valid({section: {"no_such_key": 1}})
        keys |= {f"{section}.{k}" for k in inner or ()}
    return keys


def _named_in(block: str) -> set[str]:
    """The keys a config example names: in its YAML, and in the comments beside a section
    (`window: {size: 1000}  # or {seconds: 60} ... max_records: 100000`)."""
    named: set[str] = set()
    for key, value in (yaml.safe_load(block) or {}).items():
        named.add(key)
        named |= {f"{key}.{k}" for k in value} if isinstance(value, dict) else set()
    section = ""
    for line in block.splitlines():
        m = re.match(r"^(\w+):", line)
        section = m.group(1) if m else section
        comment = re.sub(r'"[^"]*"', "", line.split("#", 1)[1]) if "#" in line else ""
        if section:
            for pair in re.findall(r"\{(\w+):|\b(\w+): (?=[-\d\[{]|true\b|false\b|null\b)",
                                   comment):
                named.add(f"{section}.{''.join(pair)}")
    return named


def test_the_daemon_config_example_loads_and_names_every_accepted_key(tmp_path: Path) -> None:
    [(line, block)] = blocks("daemon.md", "yaml")
    accepted, named = _accepted(), _named_in(block)
    assert not accepted - named, (f"accepted by the daemon, not in docs/daemon.md:{line}: "
                                  f"{sorted(accepted - named)}")
    refused = {k for k in named - accepted if k.split(".")[0] in accepted}
    assert not refused, f"in docs/daemon.md:{line}, refused by the daemon: {sorted(refused)}"
    # and it loads as written, its host paths pointed here
    cfg = yaml.safe_load(block)
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    cfg["auth"] = {"token_file": str(token)}
    cfg["state_dir"] = str(tmp_path / "state")
    cfg["tail"] = [str(tmp_path / "predictions.jsonl")]
    cfg["reference"] = {"path": str(tmp_path / "reference.json")}
    DaemonConfig.from_mapping(cfg, base_dir=str(tmp_path))


@pytest.mark.parametrize("doc", ["daemon.md", "performance-estimation.md"])
def test_every_config_key_the_docs_name_is_accepted(doc: str) -> None:
    accepted = _accepted()
    sections = {k.split(".")[0] for k in accepted if "." in k}
    text = (DOCS / doc).read_text(encoding="utf-8")
    named = {m for m in re.findall(r"`((\w+)\.\w+)`", text)}
    bad = sorted(k for k, section in named if section in sections and k not in accepted
                 and not k.endswith((".md", ".py", ".json", ".jsonl"))
                 and k not in ("reference.notes", "http.client"))   # a status key, a module
    assert not bad, f"docs/{doc} names config keys the daemon refuses: {bad}"


def test_the_lr_find_target_of_the_docs_runs(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    [(line, code)] = [(n, c) for n, c in blocks("lr-find.md", "python") if "def make" in c]
    (tmp_path / "mytask.py").write_text(code, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(cli, ["lr-find", "mytask.py:make", "--steps", "30", "-q"])
    assert res.exit_code in (0, 1), (f"docs/lr-find.md:{line}", res.output)
    assert "range test: 30 steps" in res.output
