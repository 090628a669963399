"""Interface checks of the detection benchmark's model/task families (benchmarks/families.py).

Per task: data loads, a model builds deterministically, one forward/backward works, loss and
accuracy have the right shapes, corrupt() and subset() keep their contracts. No training.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import families as fam  # noqa: E402

TASK_NAMES = sorted(fam.TASKS)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _rows(y: torch.Tensor) -> list:
    """The rows of ``y`` as a sorted list (a multiset)."""
    return sorted(tuple(r) if isinstance(r, list) else (r,) for r in y.tolist())


def test_suite_shape() -> None:
    assert fam.FAMILIES == ("mlp_clf", "cnn", "rnn_lm", "transformer_lm", "regression",
                            "autoencoder")
    assert len(fam.TASKS) == 12
    for f in fam.FAMILIES:
        assert sum(t.family == f for t in fam.TASKS.values()) == 2
    for name, t in fam.TASKS.items():
        assert t.name == name and t.steps == 300 and t.batch > 0
        assert set(t.base_lr) == set(fam.OPTIMIZERS)
        assert all(0 < v < 10 for v in t.base_lr.values())


@pytest.mark.parametrize("name", TASK_NAMES)
def test_task_interface(name: str) -> None:
    task = fam.TASKS[name]
    data = task.load(0)
    lm = task.family in ("rnn_lm", "transformer_lm")
    clf = task.family in ("mlp_clf", "cnn") or lm
    assert data.n_train > 0
    assert (data.n_classes >= 2) if clf else (data.n_classes == 0)

    # determinism: same seed -> same split and init
    again = task.load(0)
    xe, ye = data.eval_set()
    assert 0 < len(xe) <= 2048 and len(xe) == len(ye)
    assert torch.equal(xe, again.eval_set()[0]) and torch.equal(ye, again.eval_set()[1])
    if not lm:
        assert not torch.equal(xe, task.load(1).eval_set()[0])
    torch.manual_seed(0)
    model = task.build(data)
    torch.manual_seed(0)
    twin = task.build(again)
    for (k, a), (_, b) in zip(model.state_dict().items(), twin.state_dict().items()):
        assert torch.equal(a, b), k

    # one forward/backward
    idx = torch.arange(8)
    xb, yb = data.batch(idx)
    assert len(xb) == len(yb) == 8
    out = model(xb)
    loss = task.loss(out, yb)
    assert loss.shape == () and math.isfinite(float(loss.detach()))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    acc = task.accuracy(out, yb)
    if clf:
        assert acc is not None and acc.shape == () and 0.0 <= float(acc) <= 1.0
        assert int(yb.max()) < data.n_classes
    else:
        assert acc is None
    if lm:
        assert xb.shape == yb.shape and out.shape == (*yb.shape, data.n_classes)
    with torch.no_grad():
        model.eval()
        eo = model(xe)
        assert task.loss(eo, ye).shape == ()

    # corrupt(): shuffle keeps the batch's multiset and leaves unmasked rows alone
    xb, yb = data.batch(torch.arange(16))
    mask = torch.zeros(16, dtype=torch.bool)
    mask[::2] = True
    g = torch.Generator().manual_seed(0)
    ys = data.corrupt(yb, mask, g, "shuffle")
    assert ys.shape == yb.shape and ys.dtype == yb.dtype
    assert _rows(ys) == _rows(yb)
    assert torch.equal(ys[~mask], yb[~mask])
    ys_all = data.corrupt(yb, torch.ones(16, dtype=torch.bool), g, "shuffle")
    assert _rows(ys_all) == _rows(yb)
    # systematic: every masked row changes, no unmasked one
    before = yb.clone()
    yc = data.corrupt(yb, mask, g, "systematic")
    assert torch.equal(yb, before)                      # a copy, input untouched
    changed = (yc != yb).reshape(16, -1).any(1)
    assert torch.equal(changed, mask)
    if clf:
        assert torch.equal(yc[mask], (yb[mask] + 1) % data.n_classes)
    else:
        assert torch.equal(yc[mask], -yb[mask])
    assert torch.equal(data.corrupt(yb, torch.zeros(16, dtype=torch.bool), g, "systematic"), yb)

    # subset(): two non-empty, disjoint, proper halves covering the training set
    s0, s1 = data.subset(0), data.subset(1)
    assert 0 < len(s0) < data.n_train and 0 < len(s1) < data.n_train
    assert len(s0) + len(s1) == data.n_train
    assert len(set(s0.tolist()) & set(s1.tolist())) == 0
    x0, y0 = data.batch(s0[:32])
    if task.family in ("mlp_clf", "cnn"):
        assert int(y0.max()) < max(1, data.n_classes // 2)


def _curve(f, n: int = 300) -> list:
    from lrwatch.samples import Sample
    return [Sample(step=i + 1, values={"loss": f(i)}) for i in range(n)]


def test_stuck_above_onset_is_when_the_run_got_stuck_after_it_last_learned() -> None:
    import random

    from benchmarks import family_runs as fr

    rng = random.Random(0)
    # bounces between 2x and 20x its untrained loss from step 20 on: stuck from step 20,
    # not from its last dip below 1.5x
    lab = fr.label_natural(_curve(lambda i: 2.3 if i < 20 else 2.3 * (2 + 18 * rng.random())))
    assert lab["kind"] == "stuck_above" and 20 <= lab["onset"] <= 25, lab
    # learned to half its untrained loss, then jumped to 3x at step 150
    lab = fr.label_natural(_curve(lambda i: 2.3 * (1 - 0.5 * min(i, 100) / 100)
                                  if i < 150 else 2.3 * 3))
    assert lab["kind"] == "stuck_above" and 150 <= lab["onset"] <= 155, lab
    # swings by orders of magnitude: a 5-step dip at the end is not "learning"
    swings = [2.3 if i < 25 else 2.3 * (0.01 if (i // 5) % 3 == 0 else 20.0) for i in range(300)]
    lab = fr.label_natural(_curve(lambda i: swings[i]))
    assert lab["kind"] == "stuck_above" and lab["onset"] <= 30, lab


def test_labels_judge_against_the_measured_untrained_loss() -> None:
    from lrwatch.samples import Sample

    from benchmarks import detection_runs as dr
    from benchmarks import family_runs as fr

    # an unlucky first batch (0.74) where the untouched model's median batch loss is 1.0: a
    # run that ends at 0.6 learned (0.6x its untrained loss), which against the first batch
    # alone it had not (0.81x, above the 0.8x a healthy label needs)
    def run(final: float, untrained: float | None) -> list:
        out = _curve(lambda i: 0.74 if i == 0 else 1.0 + (final - 1.0) * min(i, 100) / 100)
        if untrained is not None:
            out[0] = Sample(step=1, values={**out[0].values, "untrained_loss": untrained})
        return out

    assert dr.untrained_level(run(0.6, 1.0), [0.74]) == 1.0
    assert dr.untrained_level(run(0.6, None), [0.74]) == 0.74
    assert dr.untrained_level(run(0.6, float("nan")), [0.74]) == 0.74
    assert fr.label_natural(run(0.6, 1.0))["label"] == "healthy"
    assert fr.label_natural(run(0.6, None))["label"] == "ambiguous"


def test_a_run_no_better_than_a_constant_prediction_never_learned() -> None:
    from lrwatch.samples import Sample

    from benchmarks import family_runs as fr

    # a regression whose loss fell from 0.42 (untrained) to 0.19 -- "learned" against the
    # untrained loss -- while one fitted constant output scores 0.177: it learned nothing
    def run(final: float, const: float | None) -> list:
        out = _curve(lambda i: 0.42 + (final - 0.42) * min(i, 60) / 60)
        extra = {"untrained_loss": 0.42} if const is None else \
            {"untrained_loss": 0.42, "constant_loss": const}
        out[0] = Sample(step=1, values={**out[0].values, **extra})
        return out

    lab = fr.label_natural(run(0.19, 0.177))
    assert (lab["label"], lab["kind"], lab["onset"]) == ("diverged", "never_learned", 1), lab
    assert fr.label_natural(run(0.15, 0.177))["label"] == "healthy"   # below it: learned
    assert fr.label_natural(run(0.19, None))["label"] == "healthy"    # not measured: as before
    # far above both levels is stuck above, not never learned
    assert fr.label_natural(run(0.9, 0.177))["kind"] == "stuck_above"


def test_the_recorder_measures_the_untrained_loss_without_touching_the_run(tmp_path) -> None:
    import json

    from benchmarks import family_runs as fr

    spec = fr.RunSpec(task="digits_cnn", optimizer="adam", schedule="constant", lr_mult=1.0,
                      seed=0)
    rec = fr._Recorder(spec)
    want, constant = rec.start_levels()
    fr.record_run(spec, tmp_path / "a.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert rows[0]["untrained_loss"] == pytest.approx(want, rel=1e-6)
    # ten digit classes in near-equal shares: the constant prediction scores about log(10)
    assert constant is not None and rows[0]["constant_loss"] == pytest.approx(constant, rel=1e-6)
    assert 2.1 < constant < 2.31
    assert all("untrained_loss" not in r and "constant_loss" not in r for r in rows[1:])
    # the recorded run is the one recorded without measuring: same first losses as a recorder
    # that skips the measurement
    plain = fr._Recorder(spec)
    plain.start_levels = lambda: (float("nan"), None)  # type: ignore[method-assign]
    got = [plain.step(s)["loss"] for s in range(1, 6)]
    assert got == pytest.approx([r["loss"] for r in rows[:5]], rel=0, abs=0)
