"""Families from a task file outside the repository (`benchmarks/external.py`): the detection
benchmark records, labels and scores only them, with the suite's protocol; a broken task file
gets an error that says what to fix. The benchmark's numbers are not asserted here."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import detection as bench  # noqa: E402
from benchmarks import external  # noqa: E402
from benchmarks import families as fam  # noqa: E402
from benchmarks import family_runs as fr  # noqa: E402

TASK_FILE = '''
import torch
from torch import nn
from benchmarks import families as fam


class Blobs(fam.Task):
    """Three Gaussian blobs in 2-D, a small tanh MLP (generated data)."""

    def load(self, seed):
        g = torch.Generator().manual_seed(1000 + seed)
        y = torch.randint(0, 3, (600,), generator=g)
        centres = torch.tensor([[0.0, 2.0], [1.7, -1.0], [-1.7, -1.0]])
        x = centres[y] + torch.randn(600, 2, generator=g)
        tr, te = slice(0, 480), slice(480, 600)
        return fam.Data(480, 3, "clf", x[tr], y[tr], x[te], y[te], y[tr].float(), 1.0)

    def build(self, data):
        return nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 3))

    @property
    def classification(self):
        return True


TASKS = [Blobs("ext_blobs", "ext_blobs", 32, 300, {"adam": 0.01, "momentum": 0.1})]
'''


@pytest.fixture()
def task_file(tmp_path: Path):
    path = tmp_path / "my_tasks.py"
    path.write_text(TASK_FILE)
    yield path
    external.restore()


def test_load_makes_the_files_tasks_the_only_ones(task_file: Path) -> None:
    suite_tasks = set(fam.TASKS)
    names, opts = external.load(task_file)
    assert names == ["ext_blobs"] and opts == ("momentum", "adam")
    assert list(fam.TASKS) == ["ext_blobs"] and fr.TASKS is fam.TASKS
    assert fr.FAMILIES == ("ext_blobs",) and fr.OPTIMIZERS == ("momentum", "adam")
    external.restore()
    assert set(fam.TASKS) == suite_tasks and fr.OPTIMIZERS == external.SUITE_OPTIMIZERS


@pytest.mark.parametrize("body, says", [
    ("X = 1\n", "defines no TASKS"),
    ("TASKS = []\n", "TASKS is empty"),
    ("TASKS = [1]\n", "benchmarks.families.Task objects"),
    ("from benchmarks import families as fam\n"
     "TASKS = [fam.Task('a', 'mlp_clf', 8, 300, {'adam': 0.1}), fam.Task('a', 'mlp_clf', 8, 300, {})]\n",
     "repeated: a"),
    ("from benchmarks import families as fam\n"
     "TASKS = [fam.Task('a', 'mlp_clf', 8, 300, {'adam': 0.1})]\nOPTIMIZERS = ('sgd',)\n",
     r"no tuned rate \(base_lr\) for sgd"),
    ("from benchmarks import families as fam\n"
     "TASKS = [fam.Task('a', 'mlp_clf', 8, 300, {'lbfgs': 0.1})]\n", "no optimizer of"),
    ("raise RuntimeError('boom')\n", "importing it failed"),
    ("from benchmarks import families as fam\n"
     "TASKS = [fam.Task('a', 'new_family', 8, 300, {'adam': 0.1})]\n",
     "must define load, build, classification"),
])
def test_a_broken_task_file_says_what_to_fix(tmp_path: Path, body: str, says: str) -> None:
    path = tmp_path / f"bad_{abs(hash(body))}.py"
    path.write_text(textwrap.dedent(body))
    with pytest.raises(external.TaskFileError, match=says):
        external.load(path)
    with pytest.raises(SystemExit):          # the benchmark's command line: an error, exit 2
        bench.main(["--tasks-from", str(path), "--record-only", "--cache", str(tmp_path)])


def test_detection_records_and_scores_only_the_files_families(task_file: Path,
                                                              tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    assert bench.main(["--tasks-from", str(task_file), "--quick", "--record-only",
                       "--cache", str(cache), "--jobs", "1"]) == 0
    runs = json.loads((cache / "labels-quick.json").read_text())["runs"]
    assert runs and {r["family"] for r in runs} == {"ext_blobs"}
    assert {r["spec"]["optimizer"] for r in runs} <= {"momentum", "adam"}
    assert any(r["spec"]["fault"] for r in runs)          # faults injected into a base run
    assert not (cache / "results-quick.json").exists()    # --record-only scores nothing
    out = tmp_path / "results.json"
    assert bench.main(["--tasks-from", str(task_file), "--quick", "--no-lofo",
                       "--cache", str(cache), "--jobs", "1", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["families"] == ["ext_blobs"] and doc["config"]["tasks"] == ["ext_blobs"]
    assert doc["shipped"]["all"]["faults"] + doc["shipped"]["all"]["healthy"] > 0


def test_sweep_tunes_the_files_rates_by_the_suites_rule(task_file: Path, capsys) -> None:
    suite_tasks = set(fam.TASKS)
    assert external.main([str(task_file), "--sweep", "--optimizers", "adam"]) == 0
    out = capsys.readouterr().out
    rates = json.loads(out[out.rindex("\n{") + 1:])    # the JSON after the per-rate lines
    assert set(rates) == {"ext_blobs"} and set(rates["ext_blobs"]) == {"adam"}
    assert 1e-5 <= rates["ext_blobs"]["adam"] <= 10.0
    assert set(fam.TASKS) == suite_tasks               # the suite's tasks are back


def test_check_a_task_file_from_the_command_line(task_file: Path, capsys) -> None:
    assert external.main([str(task_file)]) == 0
    assert "ok (1 task(s): ext_blobs" in capsys.readouterr().out

