"""``lrwatch.lr_find`` against Lightning's ``Tuner.lr_find`` on the family suite.

For each task (one per family of ``benchmarks/families.py``), optimizer and seed, both range
tests run on the same freshly initialised model and the same batches; then the model is trained
from that initial state for the task's 300 steps at a constant rate, once at each suggestion
and once at the family suite's tuned rate (``Task.base_lr``, picked by a grid sweep on seed 0,
which is the reference, not a contender). The table reports the final held-out score
(accuracy for classifiers and language models, 1 - MSE on standardised targets, about R^2, for
regression and autoencoders) and the suggested rates.

```
python benchmarks/lr_find.py                    # 6 tasks x 3 optimizers x 2 seeds (~10 min)
python benchmarks/lr_find.py --quick            # 3 tasks, adam, seed 0 (~1 min)
python benchmarks/lr_find.py --json out.json
```

Results are cached per cell in ``benchmarks/.cache/lr_find/`` (delete it to rerun).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import families as fam  # noqa: E402
import lrwatch  # noqa: E402
from lrwatch.recovery.curve import DEFAULT_FRACTION  # noqa: E402

CACHE = Path(__file__).resolve().parent / ".cache" / "lr_find"
TASKS = ("synth_clf_mlp", "digits_cnn", "chars_gru", "chars_tfm_pre", "friedman_mlp",
         "digits_ae")
OPTS = ("momentum", "adam", "rmsprop")
PROBE_STEPS = 100          # both finders: Lightning's default num_training
FRACTIONS = (0.03, 0.05, 0.1, 0.2, 0.3)
VERSION = 1                # bump when the method changes (invalidates the cache)


def _batches(task: fam.Task, data: fam.Data, seed: int, n: int) -> list[tuple[Any, Any]]:
    """``n`` training batches in the order ``train_run`` would draw them."""
    g = torch.Generator().manual_seed(3000 + seed)
    perm, cursor, out = torch.randperm(data.n_train, generator=g), 0, []
    for _ in range(n):
        if cursor + task.batch > data.n_train:
            perm, cursor = torch.randperm(data.n_train, generator=g), 0
        out.append(data.batch(perm[cursor:cursor + task.batch]))
        cursor += task.batch
    return out


def _score(task: fam.Task, run: dict[str, Any]) -> float:
    if not run["finite"]:
        return math.nan
    _, loss, acc = run["eval"][-1]
    return float(acc) if acc is not None else 1.0 - float(loss)


def _lrwatch_suggestions(task: fam.Task, data: fam.Data, opt: str, seed: int,
                         batches: list[Any]) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = task.build(data)
    optimizer = fam.make_optimizer(opt, model, task.base_lr[opt])
    t0 = time.process_time()
    curve = lrwatch.lr_find(model, optimizer, batches, task.loss, num_steps=PROBE_STEPS,
                            min_lr=1e-7, max_lr=10.0)
    return {"stable": curve.suggestion, "steepest": curve.steepest,
            "largest_stable": curve.largest_stable, "steps": curve.steps,
            "cpu_s": time.process_time() - t0}


def _lightning_suggestion(task: fam.Task, data: fam.Data, opt: str, seed: int,
                          batches: list[Any], workdir: Path) -> dict[str, Any]:
    import lightning as L
    from lightning.pytorch.tuner import Tuner

    class Lit(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(seed)
            self.model = task.build(data)
            self.lr = task.base_lr[opt]

        def training_step(self, batch: Any, idx: int) -> torch.Tensor:
            return task.loss(self.model(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return fam.make_optimizer(opt, self.model, self.lr)

    import contextlib
    import io

    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, max_steps=PROBE_STEPS,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(workdir))
    t0 = time.process_time()
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        finder = Tuner(trainer).lr_find(Lit(), train_dataloaders=loader, min_lr=1e-7,
                                        max_lr=10.0, num_training=PROBE_STEPS,
                                        update_attr=False)
    sug = finder.suggestion() if finder is not None else None
    return {"suggestion": sug, "steps": len(finder.results["lr"]) if finder else 0,
            "cpu_s": time.process_time() - t0}


def cell(task_name: str, opt: str, seed: int) -> dict[str, Any]:
    """One (task, optimizer, seed): both suggestions and the training runs at each (cached)."""
    key = hashlib.sha1(f"{VERSION}/{task_name}/{opt}/{seed}".encode()).hexdigest()[:16]
    path = CACHE / f"{task_name}-{opt}-s{seed}-{key}.json"
    if path.exists():
        return _default_column(json.loads(path.read_text()))
    task = fam.TASKS[task_name]
    data = task.load(seed)
    batches = _batches(task, data, seed, PROBE_STEPS)
    ours = _lrwatch_suggestions(task, data, opt, seed, batches)
    theirs = _lightning_suggestion(task, data, opt, seed, batches, CACHE / "lightning")
    rates = {"lrwatch": ours["stable"], "lrwatch steepest": ours["steepest"],
             "lightning": theirs["suggestion"], "tuned": task.base_lr[opt]}
    for f in FRACTIONS:   # the fraction ablation (0.1 is the default, "lrwatch")
        rates[f"stable x{f:g}"] = (ours["largest_stable"] * f
                                   if ours["largest_stable"] is not None else None)
    scores: dict[str, float] = {}
    done: dict[float, float] = {}
    for name, lr in rates.items():
        if lr is None or not lr > 0:
            scores[name] = math.nan
            continue
        if lr not in done:
            done[lr] = _score(task, fam.train_run(task, opt, float(lr), seed=seed, data=data))
        scores[name] = done[lr]
    out = {"task": task_name, "family": task.family, "optimizer": opt, "seed": seed,
           "rates": rates, "scores": scores, "lrwatch": ours, "lightning": theirs,
           "metric": "accuracy" if task.classification else "1 - mse"}
    CACHE.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out))
    return _default_column(out)


def _default_column(c: dict[str, Any]) -> dict[str, Any]:
    """"lrwatch" is the default suggestion, DEFAULT_FRACTION x the largest stable rate (the
    fraction ablation holds every fraction; a cell cached under another default still has
    the right column)."""
    key = f"stable x{DEFAULT_FRACTION:g}"
    c["rates"]["lrwatch"], c["scores"]["lrwatch"] = c["rates"][key], c["scores"][key]
    return c


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def report(cells: Sequence[dict[str, Any]]) -> str:
    lines = ["| task (family) | optimizer | seed | tuned lr | lrwatch lr | Lightning lr | "
             "score at tuned | lrwatch | Lightning | lrwatch steepest |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        r, s = c["rates"], c["scores"]
        lines.append(f"| {c['task']} ({c['family']}) | {c['optimizer']} | {c['seed']} | "
                     f"{_fmt(r['tuned'], '.3g')} | {_fmt(r['lrwatch'], '.3g')} | "
                     f"{_fmt(r['lightning'], '.3g')} | {_fmt(s['tuned'])} | "
                     f"{_fmt(s['lrwatch'])} | {_fmt(s['lightning'])} | "
                     f"{_fmt(s['lrwatch steepest'])} |")
    lines += ["", "| finder | median gap to tuned (points) | within 2 points of tuned | "
              "worse than tuned by > 10 points or diverged | wins vs the other finder |",
              "|---|---|---|---|---|"]
    for name, other in (("lrwatch", "lightning"), ("lightning", "lrwatch"),
                        ("lrwatch steepest", "lightning")):
        gaps = [100 * (c["scores"][name] - c["scores"]["tuned"]) if not math.isnan(
            c["scores"][name]) else -100.0 for c in cells]
        near = sum(g >= -2 for g in gaps)
        bad = sum(g < -10 for g in gaps)
        wins = sum(1 for c in cells if _nz(c["scores"][name]) > _nz(c["scores"][other]) + 0.005)
        lines.append(f"| {name} | {statistics.median(gaps):+.1f} | {near}/{len(cells)} | "
                     f"{bad}/{len(cells)} | {wins} (vs {other}) |")
    lines += ["", "| family | lrwatch within 2 points | Lightning within 2 points |",
              "|---|---|---|"]
    for f in dict.fromkeys(c["family"] for c in cells):
        sub = [c for c in cells if c["family"] == f]
        n = [sum(_nz(c["scores"][k]) >= c["scores"]["tuned"] - 0.02 for c in sub)
             for k in ("lrwatch", "lightning")]
        lines.append(f"| {f} | {n[0]}/{len(sub)} | {n[1]}/{len(sub)} |")
    lines += ["", "Fraction of the largest stable rate, chosen leave-one-family-out (the fraction "
              "with the most cells within 2 points of tuned on the other families, ties to "
              "the larger median):", "",
              "| held-out family | fraction chosen on the others | within 2 points "
              "(held out) |", "|---|---|---|"]
    fams = list(dict.fromkeys(c["family"] for c in cells))
    total = 0
    for f in fams:
        train = [c for c in cells if c["family"] != f]
        test = [c for c in cells if c["family"] == f]
        best = max(FRACTIONS, key=lambda fr: (_near(train, f"stable x{fr:g}"),
                                              _median_gap(train, f"stable x{fr:g}")))
        n = _near(test, f"stable x{best:g}")
        total += n
        lines.append(f"| {f} | {best:g} | {n}/{len(test)} |")
    lines.append(f"| **all** | | **{total}/{len(cells)}** |")
    lines += ["", "| fraction | within 2 points, all cells | median gap |", "|---|---|---|"]
    for fr in FRACTIONS:
        k = f"stable x{fr:g}"
        lines.append(f"| {fr:g} | {_near(cells, k)}/{len(cells)} | "
                     f"{_median_gap(cells, k):+.1f} |")
    steps = [c["lrwatch"]["steps"] for c in cells]
    lines.append(f"\nlrwatch probe steps: median {statistics.median(steps):.0f} of "
                 f"{PROBE_STEPS} (it stops at the blow-up); CPU s median lrwatch "
                 f"{statistics.median(c['lrwatch']['cpu_s'] for c in cells):.2f}, Lightning "
                 f"{statistics.median(c['lightning']['cpu_s'] for c in cells):.2f}")
    return "\n".join(lines)


def _near(cells: Sequence[dict[str, Any]], key: str) -> int:
    return sum(_nz(c["scores"][key]) >= c["scores"]["tuned"] - 0.02 for c in cells)


def _median_gap(cells: Sequence[dict[str, Any]], key: str) -> float:
    return statistics.median(max(-100.0, 100 * (_nz(c["scores"][key]) - c["scores"]["tuned"]))
                             for c in cells)


def _nz(x: float) -> float:
    return -1e9 if x is None or math.isnan(x) else x


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 tasks, adam, seed 0")
    ap.add_argument("--tasks", nargs="*", default=None)
    ap.add_argument("--optimizers", nargs="*", default=None)
    ap.add_argument("--seeds", type=int, nargs="*", default=None)
    ap.add_argument("--json", default=None, help="write the cells here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    tasks = args.tasks or (TASKS[:3] if args.quick else TASKS)
    opts = args.optimizers or (("adam",) if args.quick else OPTS)
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1])
    cells = []
    for t in tasks:
        for o in opts:
            for s in seeds:
                cells.append(cell(t, o, s))
                c = cells[-1]
                print(f"{t:14s} {o:8s} s{s}  lrwatch {_fmt(c['rates']['lrwatch'], '.3g'):>8s} "
                      f"-> {_fmt(c['scores']['lrwatch'])}   lightning "
                      f"{_fmt(c['rates']['lightning'], '.3g'):>8s} -> "
                      f"{_fmt(c['scores']['lightning'])}   tuned "
                      f"{_fmt(c['scores']['tuned'])}", flush=True)
    print()
    print(report(cells))
    if args.json:
        Path(args.json).write_text(json.dumps(cells, indent=1))


if __name__ == "__main__":
    main()
