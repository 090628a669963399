"""The ``transformers`` callback's checkpoints (a mixin of
:class:`lrwatch.integrations.transformers.LrwatchCallback`, whose attributes it uses).

lrwatch's state is written to ``lrwatch_state.json`` (:data:`STATE_FILE`) in each checkpoint
folder the Trainer saves (``on_save``) and read back when the Trainer resumes from that
checkpoint (:meth:`CheckpointSide._saved_state`). With it goes the pass of the data the
checkpoint was saved in (``data_pass``: the ``SkipSampler``'s drops, the Trainer's epoch and
the step the pass began at), so that a resumed run trains the batches the run would have
trained next although rollbacks' skip windows dropped some (:func:`_resume_pass`).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping

from ._common import note_pending, skip_sampler_of
from ._hf_decisions import trainer_position

__all__ = ["CheckpointSide", "STATE_FILE"]

#: The file lrwatch writes into every checkpoint folder.
STATE_FILE = "lrwatch_state.json"


class CheckpointSide:
    """lrwatch's state in the Trainer's checkpoints, and the data pass it was saved in (a
    mixin; the callback provides the rest)."""

    # provided by the callback
    watcher: Any
    resume_from: str | None
    _sampler: Any   # the SkipSampler under the Trainer's dataloader, or None
    #: its pass: the Trainer's epoch, the step it began at, the step the next one goes on
    #: from (a resumed pass), epochs of copies to drop before it (on_epoch_begin)
    _pass: dict[str, Any] | None

    def _saved_state(self, args: Any, state: Any) -> dict[str, Any] | None:
        folder = self.resume_from
        if folder is None and state.global_step > 0:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        path = os.path.join(folder, STATE_FILE) if folder else None
        if path is None or not os.path.isfile(path):
            if path is not None:   # the Trainer resumes, or resume_from names a folder
                logging.getLogger("lrwatch").warning(
                    "lrwatch: the Trainer resumes at step %d, but %s holds no lrwatch state "
                    "(the Trainer does not tell callbacks which checkpoint it resumed from): "
                    "the rollback budget, the rate's scale and the detectors start afresh; "
                    "pass resume_from=<that checkpoint folder> to LrwatchCallback",
                    state.global_step, folder)
            return None
        with open(path, encoding="utf-8") as fh:
            saved = json.load(fh)
        if int(saved.get("step", state.global_step)) != int(state.global_step):
            # (resume_from names another checkpoint than the one the Trainer resumes from, or
            # the Trainer starts afresh): lrwatch's step must stay the Trainer's global step
            logging.getLogger("lrwatch").warning(
                "lrwatch: %s holds lrwatch's state at step %s, but the Trainer starts at step "
                "%d: not loaded, lrwatch starts afresh at the Trainer's step; pass "
                "resume_from=<the checkpoint folder the Trainer resumes from>",
                path, saved.get("step"), state.global_step)
            return None
        return saved

    def _start_pass(self, args: Any, state: Any, loader: Any,
                    saved: Mapping[str, Any] | None) -> None:
        """At the start of training: the ``SkipSampler`` under ``loader``, and the pass it is
        in (the Trainer's epoch and the step it begins at; a resumed one as ``saved`` says)."""
        self._sampler = skip_sampler_of(loader)
        self._pass = None
        if self._sampler is not None:   # (the Trainer's epoch and the step it begins at)
            start, pad = None, 0
            if saved is not None and saved.get("data_pass"):
                start, pad = _resume_pass(self._sampler, saved["data_pass"], args, state,
                                          loader)
            self._pass = {"epoch": _trainer_position(args, state, loader)[0] - 1,
                          "start": None, "armed": start, "pad": pad}

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """The pass a checkpoint describes (``data_pass``): the Trainer's epoch, and the step
        it began at (a resumed pass replayed: the step the checkpoint's began at)."""
        p = self._pass
        if p is None:
            return
        p["epoch"] += 1
        if p["pad"]:   # copies for the Trainer to drop: no step runs in this epoch
            p["pad"] -= 1
            return
        p["start"] = state.global_step if p["armed"] is None else p["armed"]
        p["armed"] = None

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.watcher is None or not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(folder):
            return
        note_pending(self)   # the step's loss and evaluation, logged at the next boundary
        saved = self.watcher.state_dict()
        if self._sampler is not None and self._pass is not None:   # (_resume_pass)
            saved["data_pass"] = {**self._sampler.pass_state(), "start": self._pass["start"],
                                  "epoch": self._pass["epoch"] + self._sampler.epoch_shift}
        tmp = os.path.join(folder, STATE_FILE + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(saved, fh, allow_nan=True)
        os.replace(tmp, os.path.join(folder, STATE_FILE))

    def state_dict(self) -> dict[str, Any]:
        return self.watcher.state_dict() if self.watcher is not None else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.watcher is not None:
            self.watcher.load_state_dict(state)


def _trainer_position(args: Any, state: Any, loader: Any) -> tuple[int, int, int]:
    """Where the Trainer resumes at ``state.global_step``: the epoch, the batches it
    fast-forwards into it, and the accumulation (:func:`~._hf_decisions.trainer_position`)."""
    return trainer_position(len(loader), getattr(args, "gradient_accumulation_steps", 1),
                            int(state.global_step))


def _resume_pass(sampler: Any, carried: Mapping[str, Any], args: Any, state: Any,
                 loader: Any) -> tuple[int | None, int]:
    """The Trainer resumes (see :func:`_trainer_position`) counting optimizer steps; the
    batches a rollback's skip window dropped are none, so it would land that many batches
    early and train them. The checkpoint's pass is replayed instead
    (:meth:`SkipSampler.resume`: its batches dropped and yielded as they were, not counted
    again), and the fast-forward is met where it lands: where batches dropped in an
    earlier epoch moved the pass's start, as many more of the pass's first batches are
    passed by as it falls short; where it goes further into its epoch than the pass had
    got (skips worth an epoch or more: the Trainer resumes an epoch behind the run), that
    epoch is a pass of copies for it to drop, and the pass goes on in its next; and the
    Trainer's epoch numbers are shifted to the run's (``SkipSampler.epoch_shift``: the
    sampler's order is the run's). So the resumed run trains the batches the run would
    have trained next. Not with ``ignore_data_skip``; said, not corrected, where the
    Trainer would resume in a later epoch than the run's (not seen). Returns the step the
    pass began at, where it goes on, and the epochs that are copies to drop (0 or 1)."""
    epoch, forward, acc = _trainer_position(args, state, loader)
    pass_epoch, start = carried.get("epoch"), carried.get("start")
    drops, earlier = list(carried.get("drops", ())), int(carried.get("earlier", 0))
    sampler.earlier = earlier + len(drops)
    if pass_epoch is None or start is None or getattr(args, "ignore_data_skip", False):
        return None, 0
    trained = (int(state.global_step) - int(start)) * acc   # this pass's batches trained
    yielded = int(carried.get("yielded", 0))
    fresh = bool(carried.get("done")) and trained >= yielded   # the pass is over
    real = int(pass_epoch) + fresh
    trained = 0 if fresh else trained
    pad = int(forward > trained)   # the Trainer's first epoch: copies to drop
    if real - epoch - pad < 0 or trained > yielded:
        logging.getLogger("lrwatch").warning(
            "lrwatch: rollbacks' skip windows dropped %d batch(es) before the checkpoint: the "
            "Trainer resumes in epoch %d, %d batch(es) in, where the run was %d batch(es) "
            "into epoch %d: the resumed run does not train the batches the run would have "
            "trained next (not corrected; docs/integrations.md)", sampler.earlier, epoch,
            forward, trained, real)
        return None, 0
    sampler.epoch_shift = real - epoch - pad   # the Trainer's epoch e is the run's e + shift
    if fresh:
        sampler.resume({"earlier": sampler.earlier, "early": carried.get("early", ())},
                       pad=forward if pad else 0)
        return None, pad
    sampler.resume(carried, hide=trained - forward * (1 - pad), pad=forward if pad else 0)
    return int(start), pad
