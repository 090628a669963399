"""Where does training monitoring make the host wait for the GPU? A sync audit on a CUDA device.

Every configuration trains the same model for ``--steps`` steps twice, without lrwatch and with
it, under ``torch.cuda.set_sync_debug_mode("warn")``. torch then warns at every call that
synchronises the host with the device (``.item()``, a blocking copy to the host, ``nonzero``,
...); the audit catches each warning together with the Python stack at that moment and names the
innermost frame inside the ``lrwatch`` package (or, for syncs not lrwatch's, the innermost frame
outside torch). What lrwatch adds is the difference between the two runs, split into:

* **flush syncs**: at a Watcher flush (one per ``flush_every`` steps, the one intended transfer);
* **other syncs**: anywhere else (a snapshot, an LR read, ...), with the steps they happened at.

Configurations: a plain PyTorch loop with the Watcher's defaults, with a fused AdamW (the default
guard is then on), with ``guard="on"``, with everything on (per-layer norms, update ratio), under
fp16 autocast with a ``GradScaler`` and under bf16 autocast; a Lightning ``Trainer`` with and
without :class:`lrwatch.integrations.lightning.LrwatchCallback`; a Hugging Face ``Trainer`` with
and without :class:`lrwatch.integrations.transformers.LrwatchCallback`; and, as a check that the
audit sees syncs at all, the per-step ``.item()`` style of Lightning's ``grad_norm`` and Composer's
``OptimizerMonitor`` (mirrored in ``benchmarks/overhead.py``).

    python benchmarks/sync_audit.py --json out.json              # needs a CUDA device
    python benchmarks/sync_audit.py --device cpu --steps 30      # harness check only: no syncs
                                                                 # exist on a CPU device

Exit status 1 when lrwatch adds a sync outside a flush in any configuration (``--strict``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

if __package__ in (None, ""):  # run as a script from a checkout: make `lrwatch` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import lrwatch  # noqa: E402
from lrwatch.watch import Watcher  # noqa: E402

try:
    from benchmarks.overhead import MODELS, _composer_style, _lightning_style  # noqa: E402
except ImportError:  # run as a script: benchmarks/ is on sys.path
    from overhead import MODELS, _composer_style, _lightning_style  # type: ignore  # noqa: E402

__all__ = ["SyncLog", "audit", "main"]

#: what torch warns at each synchronising call under set_sync_debug_mode("warn")
SYNC_MESSAGE = "called a synchronizing CUDA operation"
_LRWATCH_DIR = str(Path(lrwatch.__file__).resolve().parent)
_TORCH_DIR = str(Path(torch.__file__).resolve().parent)
_SKIP = (_TORCH_DIR, str(Path(warnings.__file__).resolve()), str(Path(__file__).resolve()))


def _frame(f: traceback.FrameSummary) -> str:
    name = f.filename
    for root, tag in ((_LRWATCH_DIR, "lrwatch"),):
        if name.startswith(root):
            name = tag + name[len(root):]
    return f"{name}:{f.lineno} in {f.name}"


def attribute(stack: Sequence[traceback.FrameSummary]) -> tuple[str, str]:
    """(``"lrwatch"`` or ``"other"``, location) for one synchronising call's stack."""
    for f in reversed(stack):
        if str(Path(f.filename).resolve()).startswith(_LRWATCH_DIR):
            return "lrwatch", _frame(f)
    for f in reversed(stack):
        if not (str(Path(f.filename).resolve()).startswith(_SKIP)
                or Path(f.filename).name == "warnings.py"):
            return "other", _frame(f)
    return "other", _frame(stack[-1]) if stack else "?"


@dataclass
class SyncLog:
    """Collects the synchronising calls torch warns about while it is entered.

    ``step`` is set by the training loop (or a callback) before each step; ``flushing`` by the
    Watcher's ``flush`` wrapper, so a sync inside a flush is told apart from one on the step path.
    """

    step: int = 0
    flushing: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)
    other_warnings: int = 0

    def _show(self, message: Any, category: Any, filename: str, lineno: int, file: Any = None,
              line: Any = None) -> None:
        if SYNC_MESSAGE not in str(message):  # torch's other warnings (one names this mode)
            self.other_warnings += 1
            return
        stack = traceback.extract_stack()[:-1]
        who, where = attribute(stack)
        self.events.append({"step": self.step, "who": who, "where": where,
                            "flush": self.flushing > 0,
                            "stack": [_frame(f) for f in stack[-8:]]})

    def __enter__(self) -> "SyncLog":
        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("always")
        warnings.showwarning = self._show  # type: ignore[assignment]
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc: Any) -> None:
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("default")
        self._cm.__exit__(*exc)

    def summary(self, steps: int) -> dict[str, Any]:
        mine = [e for e in self.events if e["who"] == "lrwatch"]
        off_flush = [e for e in mine if not e["flush"]]
        return {
            "syncs": len(self.events), "per_step": len(self.events) / max(steps, 1),
            "lrwatch_syncs": len(mine),
            "lrwatch_flush_syncs": len(mine) - len(off_flush),
            "lrwatch_other_syncs": len(off_flush),
            "lrwatch_other_steps": sorted({e["step"] for e in off_flush})[:50],
            "where": Counter(e["where"] for e in self.events).most_common(12),
            "lrwatch_other_where": Counter(e["where"] for e in off_flush).most_common(12),
            "example_stacks": [e["stack"] for e in off_flush[:3]],
            "other_warnings": self.other_warnings,
        }


def _watch_flushes(watch: Watcher, log: SyncLog) -> None:
    """Mark the Watcher's flushes in ``log`` (an instance attribute shadows the method)."""
    original = watch.flush

    def flush(*args: Any, **kwargs: Any) -> Any:
        log.flushing += 1
        try:
            return original(*args, **kwargs)
        finally:
            log.flushing -= 1

    watch.flush = flush  # type: ignore[method-assign]


# --- plain PyTorch loops -------------------------------------------------------------------------
PLAIN: dict[str, dict[str, Any]] = {
    "no monitor": {},
    "lrwatch defaults": {"watch": {}},
    "lrwatch measure-only": {"watch": {"rules": None, "recovery": False}},
    "lrwatch defaults + fused AdamW": {"watch": {}, "fused": True},
    "lrwatch guard=on": {"watch": {"recovery": {"guard": "on"}}},
    "lrwatch all-on": {"watch": {"per_layer": True, "update_ratio": True,
                                 "update_ratio_every": 1}},
    "lrwatch defaults + fp16 GradScaler": {"watch": {}, "amp": torch.float16},
    "lrwatch defaults + fp16 GradScaler + fused AdamW": {"watch": {}, "amp": torch.float16,
                                                         "fused": True},
    "lrwatch defaults + bf16 autocast": {"watch": {}, "amp": torch.bfloat16},
    "lightning grad_norm .item() style": {"item": _lightning_style},
    "composer OptimizerMonitor .item() style": {"item": _composer_style},
}


def plain_run(name: str, spec_name: str, steps: int, device: torch.device) -> dict[str, Any]:
    cfg = PLAIN[name]
    spec = MODELS[spec_name]
    torch.manual_seed(0)
    model = spec.build().to(device).train()
    batches = [(x.to(device), y.to(device)) for x, y in spec.batches()]
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01,
                            **({"fused": True} if cfg.get("fused") else {}))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
    amp = cfg.get("amp")
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    log = SyncLog()
    watch = None
    if "watch" in cfg:
        watch = Watcher(model, opt, sched, scaler=scaler, **cfg["watch"])
        _watch_flushes(watch, log)
    sink: list[dict[str, float]] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    with log:
        for i in range(steps):
            log.step = i + 1
            x, y = batches[i % len(batches)]
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss = spec.loss(model(x), y)
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
            else:
                loss.backward()
            if "item" in cfg:
                cfg["item"](model, sink)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            sched.step()
            if watch is not None:
                watch.log(loss=loss)
        log.step = steps + 1
        if watch is not None:
            watch.close()
    seconds = time.perf_counter() - t0
    out = {"config": name, "framework": "torch", "model": spec_name, "steps": steps,
           "seconds": round(seconds, 3), **log.summary(steps)}
    if watch is not None:
        out["flushes"] = watch.flushes
        out["internal_errors"] = watch.registry.get_sample_value("lrwatch_internal_errors_total")
        store = getattr(watch, "store", None)
        out["snapshots"] = getattr(store, "taken", None) if store is not None else None
        out["state_bytes"] = _state_bytes(model, opt)
        if device.type == "cuda" and hasattr(torch.cuda, "host_memory_stats"):
            out["host_memory_stats"] = {k: v for k, v in torch.cuda.host_memory_stats().items()
                                        if "bytes" in k and isinstance(v, int)}
    return out


def _state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """Bytes of the tensors a snapshot copies (model state and optimizer state)."""
    tensors = list(model.state_dict().values())
    tensors += [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


# --- Lightning -----------------------------------------------------------------------------------
def lightning_run(with_lrwatch: bool, spec_name: str, steps: int,
                  device: torch.device) -> dict[str, Any]:
    import lightning.pytorch as pl

    spec = MODELS[spec_name]
    log = SyncLog()

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = spec.build()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            log.step = self.trainer.global_step + 1
            x, y = batch
            return spec.loss(self.net(x), y)

        def configure_optimizers(self) -> Any:
            opt = torch.optim.AdamW(self.parameters(), lr=spec.lr, weight_decay=0.01)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    batches = spec.batches()
    loader = torch.utils.data.DataLoader(_ListDataset(batches), batch_size=None, shuffle=False)
    callbacks: list[Any] = []
    cb = None
    if with_lrwatch:
        from lrwatch.integrations.lightning import LrwatchCallback
        cb = LrwatchCallback()
        callbacks.append(cb)
    trainer = pl.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
                         max_steps=steps, max_epochs=-1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callbacks,
                         num_sanity_val_steps=0, limit_val_batches=0)
    module = Module()
    t0 = time.perf_counter()
    with log:
        if cb is not None:
            _hook_callback_flushes(cb, log)
        trainer.fit(module, train_dataloaders=loader)
    out = {"config": "lightning Trainer" + (" + LrwatchCallback" if with_lrwatch else ""),
           "framework": "lightning", "model": spec_name, "steps": trainer.global_step,
           "seconds": round(time.perf_counter() - t0, 3), **log.summary(trainer.global_step)}
    if cb is not None and cb.watcher is not None:
        out["flushes"] = cb.watcher.flushes
        out["internal_errors"] = cb.watcher.registry.get_sample_value(
            "lrwatch_internal_errors_total")
    return out


class _ListDataset(torch.utils.data.Dataset):
    """Cycles through pre-built batches (``batch_size=None``: each item is a whole batch)."""

    def __init__(self, batches: list[Any], length: int = 100_000) -> None:
        self.batches, self.length = batches, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> Any:
        return self.batches[i % len(self.batches)]


def _hook_callback_flushes(cb: Any, log: SyncLog) -> None:
    """The callbacks build their Watcher lazily: wrap its flush as soon as it exists."""
    cls = type(cb)

    class Hooked(cls):  # type: ignore[misc, valid-type]
        def __getattribute__(self, name: str) -> Any:
            value = object.__getattribute__(self, name)
            w = object.__getattribute__(self, "__dict__").get("watcher")
            if w is not None and "flush" not in w.__dict__:
                _watch_flushes(w, log)
            return value

    cb.__class__ = Hooked


# --- Hugging Face --------------------------------------------------------------------------------
def hf_run(with_lrwatch: bool, steps: int, device: torch.device, tmp: str) -> dict[str, Any]:
    from transformers import (GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback,
                              TrainingArguments)

    log = SyncLog()

    class StepMark(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            log.step = state.global_step + 1

    class Seqs(torch.utils.data.Dataset):
        def __init__(self, n: int) -> None:
            g = torch.Generator().manual_seed(0)
            self.starts = torch.randint(0, 256, (n,), generator=g)

        def __len__(self) -> int:
            return len(self.starts)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            ids = (self.starts[i] + torch.arange(64)) % 256
            return {"input_ids": ids, "labels": ids.clone()}

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=64, n_embd=256, n_layer=4,
                                       n_head=4))
    args = TrainingArguments(output_dir=os.path.join(tmp, "hf"), per_device_train_batch_size=16,
                             learning_rate=1e-3, max_steps=steps, logging_steps=50,
                             report_to=[], save_strategy="no", use_cpu=device.type != "cuda",
                             disable_tqdm=True, seed=0, lr_scheduler_type="linear",
                             warmup_steps=10, dataloader_num_workers=0)
    callbacks: list[Any] = [StepMark()]
    cb = None
    if with_lrwatch:
        from lrwatch.integrations.transformers import LrwatchCallback
        cb = LrwatchCallback()
        callbacks.append(cb)
    trainer = Trainer(model=model, args=args, train_dataset=Seqs(100_000), callbacks=callbacks)
    t0 = time.perf_counter()
    with log:
        if cb is not None:
            _hook_callback_flushes(cb, log)
        trainer.train()
    gs = trainer.state.global_step
    out = {"config": "transformers Trainer" + (" + LrwatchCallback" if with_lrwatch else ""),
           "framework": "transformers", "model": "gpt2 d=256 4 layers", "steps": gs,
           "seconds": round(time.perf_counter() - t0, 3), **log.summary(gs)}
    if cb is not None and cb.watcher is not None:
        out["flushes"] = cb.watcher.flushes
        out["internal_errors"] = cb.watcher.registry.get_sample_value(
            "lrwatch_internal_errors_total")
    return out


# --- the audit -----------------------------------------------------------------------------------
def audit(device: torch.device, steps: int, models: Sequence[str], frameworks: Sequence[str],
          configs: Sequence[str] | None = None,
          progress: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []

    def attempt(label: str, fn: Callable[[], dict[str, Any]]) -> None:
        progress(f"{label} ...")
        try:
            r = fn()
        except Exception as exc:  # one broken configuration must not hide the others
            r = {"config": label, "error": "".join(traceback.format_exception(exc))[-3000:]}
        runs.append(r)
        progress(f"  {_line(r)}")

    if "torch" in frameworks:
        for m in models:
            for name in configs or PLAIN:
                attempt(f"{name} [{m}]", lambda n=name, m=m: plain_run(n, m, steps, device))
    if "lightning" in frameworks:
        for with_lw in (False, True):
            attempt(f"lightning lrwatch={with_lw}",
                    lambda w=with_lw: lightning_run(w, models[0], steps, device))
    if "transformers" in frameworks:
        with tempfile.TemporaryDirectory() as tmp:
            for with_lw in (False, True):
                attempt(f"transformers lrwatch={with_lw}",
                        lambda w=with_lw: hf_run(w, steps, device, tmp))
    return {"benchmark": "sync_audit", "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "torch": torch.__version__, "python": sys.version.split()[0], "steps": steps,
            "runs": runs}


def _line(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{r['config']}: ERROR {r['error'].splitlines()[-1]}"
    extra = ""
    if "flushes" in r:
        extra = (f"; lrwatch: {r['lrwatch_flush_syncs']} at {r['flushes']} flushes, "
                 f"{r['lrwatch_other_syncs']} elsewhere (steps {r['lrwatch_other_steps'][:8]}), "
                 f"internal errors {r.get('internal_errors')}")
    return (f"{r['config']} [{r.get('model')}]: {r['syncs']} syncs in {r['steps']} steps "
            f"({r['per_step']:.2f}/step){extra}")


def markdown(report: dict[str, Any]) -> str:
    rows = ["| configuration | model | steps | syncs (all) | per step | lrwatch at flushes "
            "(flushes) | lrwatch elsewhere | where (lrwatch, elsewhere) |",
            "|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        if "error" in r:
            rows.append(f"| {r['config']} | | | error | | | | |")
            continue
        lw = (f"{r['lrwatch_flush_syncs']} ({r.get('flushes', '-')})" if "flushes" in r else "-")
        where = "; ".join(f"{w} x{n}" for w, n in r["lrwatch_other_where"][:3]) or "-"
        rows.append(f"| {r['config']} | {r.get('model')} | {r['steps']} | {r['syncs']} | "
                    f"{r['per_step']:.2f} | {lw} | "
                    f"{r['lrwatch_other_syncs'] if 'flushes' in r else '-'} | {where} |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--models", default="transformer",
                   help=f"comma-separated, from {', '.join(MODELS)} (the first one also runs "
                        "under Lightning)")
    p.add_argument("--frameworks", default="torch,lightning,transformers")
    p.add_argument("--configs", default=None,
                   help=f"plain-loop configurations, comma-separated, from: {', '.join(PLAIN)}")
    p.add_argument("--json", metavar="OUT")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 when lrwatch syncs outside a flush anywhere")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device here; --device cpu checks the harness only (no syncs exist)")
    configs = a.configs.split(",") if a.configs else None
    for c in configs or ():
        if c not in PLAIN:
            p.error(f"unknown configuration {c!r}; choose from {', '.join(PLAIN)}")
    logging.getLogger("lightning").setLevel(logging.WARNING)
    report = audit(device, a.steps, a.models.split(","), a.frameworks.split(","), configs,
                   progress=lambda m: print(m, file=sys.stderr, flush=True))
    print(markdown(report))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2) + "\n")
    bad = [r for r in report["runs"] if "error" in r or r.get("lrwatch_other_syncs")]
    return 1 if (a.strict and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
