"""Model/task families from outside the repository, for the detection and recovery benchmarks.

    python benchmarks/detection.py --tasks-from my_tasks.py --record-only   # record + label
    python benchmarks/detection.py --tasks-from my_tasks.py --no-lofo       # score the pack
    python benchmarks/recovery.py --families --tasks-from my_tasks.py --seeds 0

A *task file* is a Python file that defines

``TASKS``
    A sequence of :class:`benchmarks.families.Task`. Subclass it to bring your own data, model
    and loss (override ``load``, ``build``, ``loss``, ``accuracy`` and ``classification``; see
    ``benchmarks/families.py``), or reuse the suite's data and models under a new name. Each
    task needs a tuned rate (``base_lr``) for every optimizer the protocol draws from: tune it
    with ``families.sweep_base_lr`` (the suite's rule) or as you would for a real run.
``OPTIMIZERS`` (optional)
    The optimizers the protocol draws from, a subset of ``family_runs.OPTIMIZERS``. Default:
    those every task has a rate for, in the suite's order.

Tune the rates with ``python benchmarks/external.py my_tasks.py --sweep`` (the suite's rule,
``families.sweep_base_lr``; the file may hold placeholder rates meanwhile) and paste what it
prints into the file. A recorded run is cached under a hash of its settings and rates, not of
the task's code: after changing a task's data, model or loss without changing its rates,
record again with ``--rebuild`` (``detection.py``), or the old traces are served. What the
protocol assumes of a task:

* a classifier (``classification`` true) returns one logit per class, also for two classes
  (``[0, s]`` for a single score ``s`` gives the same cross-entropy as a sigmoid), and its
  targets are class indices: the held-out drop fault takes the argmax, the label-corruption
  faults shift classes, and a dead classifier is judged against the majority class's share;
  it reports an accuracy (``Task.accuracy``): the recovery benchmark scores classifiers by it
  and stops with an error on one that reports none (make ``classification`` false to be
  scored by the held-out loss instead, with ``loss`` overridden to keep its cross-entropy);
* a regression or autoencoder target is a float tensor of shape ``(n, k)``; corruption
  negates it, so a loss that is unbounded below for negated targets needs its own ``Data``
  subclass with a ``corrupt`` that keeps targets valid;
* the recovery benchmark's poisoned batch multiplies every float input and target by 1000
  (``Data.poison``); a task whose float inputs or targets hold indices (node ids, a class
  column) overrides ``poison`` in its ``Data`` subclass to keep them valid, or the benchmark
  stops at that fault with an error naming the task;
* ``families.split_idx``, ``standardise``, ``pc1`` and ``mlp`` are the suite's own building
  blocks (split, scaling, the subset key of ``Data``, a plain MLP).

A family none of whose tuned-rate base runs is healthy gets no injected faults (the
benchmark prints "skipped: ... no healthy base run"); check the labels before scoring.

The suite's own tasks are set aside: the benchmark records, labels and scores only the file's
tasks, with the suite's protocol (seeds, schedules, batch sizes, rate multipliers, injected
faults, labels, deadlines), into a cache of its own (``benchmarks/.cache/<benchmark>-<file
stem>``). That is how the blind sets of docs/detection.md are run: families nobody tuned the
pack on, whose files stay outside the repository so that nobody can tune on them later.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):            # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import families as fam  # noqa: E402
from benchmarks import family_runs as fr  # noqa: E402

__all__ = ["SUITE_OPTIMIZERS", "TaskFileError", "load", "restore", "cache_dir", "sweep"]

#: the suite's optimizers, before any task file restricts ``family_runs.OPTIMIZERS``
SUITE_OPTIMIZERS: tuple[str, ...] = tuple(fr.OPTIMIZERS)
_LOADED: dict[str, tuple[list[fam.Task], tuple[str, ...]]] = {}
_SUITE = (dict(fam.TASKS), fam.FAMILIES, tuple(fr.OPTIMIZERS))


class TaskFileError(ValueError):
    """A task file that cannot be used; the message says what to fix."""


def cache_dir(benchmark: str, path: str | Path) -> Path:
    """The default cache of ``benchmark`` ("detection", "recovery") for a task file."""
    return Path(__file__).resolve().parent / ".cache" / f"{benchmark}-{Path(path).stem}"


def _import(path: Path) -> object:
    name = f"lrwatch_bench_tasks_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise TaskFileError(f"{path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module          # Task subclasses (dataclasses) look their module up
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise TaskFileError(f"{path}: importing it failed: {exc!r}") from exc
    return module


def _check(path: Path, tasks: Sequence[object],
           optimizers: Sequence[str] | None) -> tuple[list[fam.Task], tuple[str, ...]]:
    if not tasks:
        raise TaskFileError(f"{path}: TASKS is empty; list at least one benchmarks.families.Task")
    bad = [t for t in tasks if not isinstance(t, fam.Task)]
    if bad:
        raise TaskFileError(f"{path}: TASKS must hold benchmarks.families.Task objects, got "
                            f"{type(bad[0]).__name__}")
    names = [t.name for t in tasks]            # type: ignore[attr-defined]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise TaskFileError(f"{path}: task names must be unique; repeated: {', '.join(dup)}")
    out: list[fam.Task] = list(tasks)          # type: ignore[arg-type]
    for t in out:          # the base class knows the suite's families only
        if t.family in _SUITE[1]:
            continue
        missing = [m for m in ("load", "build", "classification")
                   if getattr(type(t), m) is getattr(fam.Task, m)]
        if missing:
            raise TaskFileError(
                f"{path}: task {t.name!r} is of a new family ({t.family!r}), so its class must "
                f"define {', '.join(missing)} (benchmarks.families.Task knows only "
                f"{', '.join(_SUITE[1])}; `classification` says whether it is scored by "
                "cross-entropy and accuracy)")
    if optimizers is None:
        opts = tuple(o for o in SUITE_OPTIMIZERS if all(o in t.base_lr for t in out))
        if not opts:
            raise TaskFileError(f"{path}: no optimizer of {', '.join(SUITE_OPTIMIZERS)} has a "
                                "tuned rate (base_lr) in every task")
    else:
        opts = tuple(optimizers)
        unknown = [o for o in opts if o not in SUITE_OPTIMIZERS]
        if unknown or not opts:
            raise TaskFileError(f"{path}: OPTIMIZERS must be a non-empty subset of "
                                f"{', '.join(SUITE_OPTIMIZERS)}; got {list(opts)}")
        for t in out:
            missing = [o for o in opts if o not in t.base_lr]
            if missing:
                raise TaskFileError(f"{path}: task {t.name!r} has no tuned rate (base_lr) for "
                                    f"{', '.join(missing)}")
    return out, opts


def _tasks_of(path: Path) -> list[fam.Task]:
    module = _import(path)
    tasks = list(getattr(module, "TASKS", []))
    bad = [t for t in tasks if not isinstance(t, fam.Task)]
    if not tasks or bad:
        raise TaskFileError(f"{path}: TASKS must be a non-empty sequence of "
                            "benchmarks.families.Task")
    return tasks


def sweep(path: str | Path, optimizers: Sequence[str]) -> dict[str, dict[str, float]]:
    """Tuned rates for every task of a task file, by the suite's rule (``sweep_base_lr``: 300
    steps at a constant rate on seed 0 over a half-decade grid, extended upwards until it stops
    training; the largest rate within 3% of the best final held-out loss whose x3 neighbour
    still trains). The file's own rates are ignored. Prints one line per rate tried."""
    p = Path(path).resolve()
    if not p.is_file():
        raise TaskFileError(f"{path}: no such file")
    tasks = _tasks_of(p)
    unknown = [o for o in optimizers if o not in fam.OPTIMIZERS]
    if unknown:
        raise TaskFileError(f"unknown optimizer(s) {', '.join(unknown)}; valid: "
                            f"{', '.join(fam.OPTIMIZERS)}")
    out: dict[str, dict[str, float]] = {}
    try:
        for t in tasks:
            fam.TASKS.clear()
            fam.TASKS[t.name] = t
            out[t.name] = fam.sweep_base_lr(t.name, optimizers=tuple(optimizers))
    finally:
        restore()
    return out


def load(path: str | Path) -> tuple[list[str], tuple[str, ...]]:
    """Import the task file and make its tasks the suite's only ones.

    Returns the task names and the optimizers. Registers the tasks in ``families.TASKS`` (the
    same dict as ``family_runs.TASKS``) in the file's order, replacing the suite's, sets the
    families and optimizers the protocol draws from, and forgets cached chance levels. A file
    is imported once per process. Raises :class:`TaskFileError`.
    """
    p = Path(path).resolve()
    if str(p) not in _LOADED:
        if not p.is_file():
            raise TaskFileError(f"{path}: no such file")
        module = _import(p)
        if not hasattr(module, "TASKS"):
            raise TaskFileError(f"{path}: defines no TASKS (a sequence of "
                                "benchmarks.families.Task)")
        _LOADED[str(p)] = _check(p, list(getattr(module, "TASKS")),
                                 getattr(module, "OPTIMIZERS", None))
    tasks, opts = _LOADED[str(p)]
    fam.TASKS.clear()
    fam.TASKS.update({t.name: t for t in tasks})
    if fr.TASKS is not fam.TASKS:
        fr.TASKS.clear()
        fr.TASKS.update(fam.TASKS)
    fam.FAMILIES = fr.FAMILIES = tuple(dict.fromkeys(t.family for t in tasks))
    fr.OPTIMIZERS = opts
    fr._CHANCE.clear()
    return [t.name for t in tasks], opts


def restore() -> None:
    """Put the suite's own tasks, families and optimizers back (after :func:`load`)."""
    tasks, families, opts = _SUITE
    fam.TASKS.clear()
    fam.TASKS.update(tasks)
    if fr.TASKS is not fam.TASKS:
        fr.TASKS.clear()
        fr.TASKS.update(tasks)
    fam.FAMILIES = fr.FAMILIES = families
    fr.OPTIMIZERS = opts
    fr._CHANCE.clear()


def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    import json

    import torch

    ap = argparse.ArgumentParser(
        description="Check a task file for benchmarks/detection.py and recovery.py "
                    "(--tasks-from), or tune its rates (--sweep).")
    ap.add_argument("file", help="the task file (defines TASKS; see this module's doc)")
    ap.add_argument("--sweep", action="store_true",
                    help="tune every task's rate per optimizer by the suite's rule and print "
                         "the base_lr mappings to paste into the file")
    ap.add_argument("--optimizers", default="momentum,adam,rmsprop",
                    help="comma-separated, for --sweep (default: momentum,adam,rmsprop)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    try:
        if args.sweep:
            rates = sweep(args.file, args.optimizers.split(","))
            print(json.dumps(rates, indent=1))
            return 0
        names, opts = load(args.file)
    except TaskFileError as exc:
        ap.error(str(exc))
    print(f"{args.file}: ok ({len(names)} task(s): {', '.join(names)}; families "
          f"{', '.join(fr.FAMILIES)}; optimizers {', '.join(opts)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
