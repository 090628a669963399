"""The ``transformers`` callback's decisions on plain numbers (``_hf_decisions``): torch-free,
and what the Trainer does."""

from __future__ import annotations

import subprocess
import sys

from lrwatch.integrations._hf_decisions import divides_by_items, loss_world, trainer_position


def test_the_decisions_import_no_torch() -> None:
    code = ("import sys, lrwatch.integrations._hf_decisions; "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_the_loss_over_num_items_is_scaled_by_the_processes_as_the_trainer_does() -> None:
    assert loss_world(4, 1, True) == 4
    assert loss_world(4, 1, False) == 1
    assert loss_world(4, 2, True) == 1          # one process driving several GPUs (DataParallel)
    assert loss_world(None, None, True) == 1
    assert loss_world(0, 0, True) == 1


def test_a_model_divides_by_num_items_when_a_micro_batch_s_loss_is_nearer_1_over_n() -> None:
    assert divides_by_items(0.26, 4)             # about 1/4 of the untrained level
    assert not divides_by_items(0.9, 4)          # its own mean: about the untrained level
    assert not divides_by_items(0.5, 4)          # the boundary, 1/sqrt(4), is the mean's side


def test_the_trainer_resumes_at_its_step_s_epoch_and_batch() -> None:
    # 10 batches, accumulation 3: 4 optimizer steps an epoch (the last one of a batch)
    assert trainer_position(10, 3, 0) == (0, 0, 3)
    assert trainer_position(10, 3, 5) == (1, 3, 3)
    assert trainer_position(10, None, 25) == (2, 5, 1)
    assert trainer_position(0, 0, 3) == (3, 0, 1)   # an empty loader: one step an epoch
