"""The per-step recorder: rows on the device, one transfer at the flush."""

import math

import numpy as np
import torch

from lrwatch.steps import Row, StepRecorder, as_value, materialise


def test_as_value_keeps_scalars_and_says_why_it_drops_the_rest():
    v, why = as_value("loss", torch.tensor([2.5]))
    assert why is None and isinstance(v, torch.Tensor) and v.shape == ()
    assert as_value("acc", 3) == (3.0, None)
    v, why = as_value("loss", torch.ones(2, 2))
    assert v is None and "shape (2, 2)" in why
    v, why = as_value("flag", True)
    assert v is None and "got bool" in why
    # numpy's scalars are numbers (a loss computed with numpy was ignored before)
    assert as_value("loss", np.float32(1.5)) == (1.5, None)
    assert as_value("loss", np.int64(3)) == (3.0, None)
    assert as_value("flag", np.bool_(True))[0] is None
    v, why = as_value("loss", 10 ** 400)          # an int no float can hold: said, not raised
    assert v is None and "not a float" in why


def test_materialise_merges_device_and_host_values_in_step_order():
    rows = [Row(step=1), Row(step=2)]
    rows[0].put("loss", torch.tensor(1.5))
    rows[0].put("grad_norm", torch.tensor(float("inf")))
    rows[0].host.update({"step_time_seconds": 0.5, "_batch": 8.0})
    rows[0].lr = [0.1, 0.01]
    rows[1].put("lr/0", torch.tensor(0.2))
    rows[1].lr = [None]
    rows[1].put("loss", torch.tensor(float("nan")))
    samples, extra = materialise(rows, [torch.tensor(0.75)], torch.device("cpu"), batch_size=4)
    assert [s.step for s in samples] == [1, 2] and extra == [0.75]
    a, b = samples[0].values, samples[1].values
    assert a["loss"] == 1.5 and a["nonfinite_grad"] == 1.0 and a["nonfinite_loss"] == 0.0
    assert a["samples_per_second"] == 16.0 and "_batch" not in a       # per-row batch wins
    assert samples[0].lr_groups == (0.1, 0.01) and a["lr"] == 0.1
    assert math.isclose(b["lr"], 0.2, rel_tol=1e-6) and "lr/0" not in b
    assert b["nonfinite_loss"] == 1.0


def test_recorder_commits_a_row_once_stepped_and_logged():
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    commits = []
    rec = StepRecorder(opt, torch.device("cpu"), on_commit=lambda: commits.append(len(rec.rows)))
    model(torch.ones(2, 3)).sum().backward()
    rec.measure_grads(1, skipped=False)
    row, seconds = rec.finish_step(1)
    assert seconds is None and row.stepped and row.lr == [0.1]
    assert row.host["momentum/0"] == 0.9 and "grad_norm" in row.keys
    assert rec.row_for_log(2) is row        # a log after the step completes its row
    row.logged = True
    rec.commit()
    assert commits == [1] and rec.take() == [row] and rec.rows == []
