"""How much does watching cost? Step-time overhead of the Watcher, measured A/B in one process.

Every model is trained by several *variants* of the same loop, each with its own copy of the same
initial weights, its own optimizer and scheduler, and the same pre-built batches in the same order,
so every variant does exactly the same numerical work:

``baseline``
    The plain loop: forward, loss, ``zero_grad``, backward, ``opt.step()``, ``sched.step()``.
``lrwatch``
    ``Watcher(model, opt, sched)`` with its defaults, plus ``watch.log(loss=loss)`` every step.
``lrwatch guard-on``
    The defaults with ``recovery={"guard": "on"}``: on a GPU, with this (not fused) AdamW, a
    non-finite gradient is zeroed on the device every step it happens, at the price of one pass
    over the gradients on every step (attribution only; with ``fused=True`` the default guard
    is free). On the CPU it is the default: the verdict is read on the host and a bad step's
    gradients are held back.
``lrwatch guard-off``
    The defaults with ``recovery={"guard": "off"}`` (attribution of the default guard's cost:
    on the CPU, or with ``--fused``, the default guard is on).
``lrwatch lag0``
    The defaults with ``flush_lag=0``: each flush judged at the step that fills it, while the
    device waits (the default on CUDA is ``flush_lag=1``: judged one step later, while the
    device computes; elsewhere the two are the same). Attribution of the lag on a GPU.
``lrwatch measure-only``
    ``Watcher(model, opt, sched, rules=None, recovery=False)``: the on-device statistics, the flush
    and the exporters, without the rules engine and the rollback snapshots (attribution only).
``lrwatch+server``
    The defaults with ``port=0``: the ``/metrics`` HTTP server runs in its thread (unscraped).
``lrwatch all-on``
    ``per_layer=True, update_ratio=True, flush_every=1`` and a JSONL trace written to a temp file.
``lightning-item``
    The per-step host-read style of Lightning's ``lightning.pytorch.utilities.grad_norm``
    (re-implemented from its documentation and behaviour, not copied; see :func:`_lightning_style`).
``composer-item``
    The per-step style of Composer's ``OptimizerMonitor`` callback (see :func:`_composer_style`).

Method: after warm-up, the variants run in *rounds*; in each round every variant runs one block of
``block`` optimizer steps, in an order shuffled per round (seeded), so slow drifts of a shared,
noisy machine hit every variant alike. The block length is a multiple of the Watcher's default
``flush_every`` (25), so every block of the default variant carries exactly one host flush: the
flush cost is measured, not hidden by the median. A variant's step time is the median over rounds
of its per-block mean step time; its ratio is that median over the baseline's. The spread is a
paired bootstrap over rounds (95% percentile interval of the ratio of medians). Targets (issue 2):
``lrwatch`` at most 1.02x and ``lrwatch all-on`` at most 1.10x on the realistically sized models;
the tiny model is reported without a target, for honesty.

``--device cuda`` also runs the sync-debug check: 200 steps with the Watcher on under
``torch.cuda.set_sync_debug_mode("error")`` (see :func:`sync_debug_check`).

Usage::

    python benchmarks/overhead.py              # full run (about 6-8 min on 2 idle CPU cores)
    python benchmarks/overhead.py --quick      # about 1-2 minutes
    python benchmarks/overhead.py --json out.json --device cuda
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import logging
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

if __package__ in (None, ""):  # run as a script from a checkout: make `lrwatch` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lrwatch.demo import CharGRU, StdlibText  # noqa: E402
from lrwatch.watch import Watcher  # noqa: E402

__all__ = ["VARIANTS", "MODELS", "run", "main", "sync_debug_check"]

VARIANTS: tuple[str, ...] = ("baseline", "lrwatch", "lrwatch guard-on", "lrwatch guard-off",
                             "lrwatch lag0", "lrwatch measure-only",
                             "lrwatch+server", "lrwatch all-on", "lightning-item",
                             "composer-item")
TARGETS: dict[str, float] = {"lrwatch": 1.02, "lrwatch+server": 1.02, "lrwatch all-on": 1.10}
DEFAULT_FLUSH_EVERY = 25  # Watcher's default; block lengths are multiples of it
#: ``--fused``: every variant's AdamW is built with ``fused=True`` (then the default non-finite
#: guard is on: the fused step gets the flag and skips itself).
FUSED = False

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --- models ----------------------------------------------------------------------------------------
class CharTransformer(nn.Module):
    """A small causal transformer LM over bytes (pre-norm encoder layers with a causal mask)."""

    def __init__(self, d_model: int = 192, layers: int = 5, heads: int = 4, ctx: int = 32) -> None:
        super().__init__()
        self.tok = nn.Embedding(256, d_model)
        self.pos = nn.Embedding(ctx, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 256)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(ctx),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        h = self.tok(x) + self.pos(torch.arange(t, device=x.device))
        h = self.blocks(h, mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(h))


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits (ships with the package); seeded synthetic data without it."""
    try:
        from sklearn.datasets import load_digits
        x, y = load_digits(return_X_y=True)
        return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y, dtype=torch.long)
    except ImportError:  # pragma: no cover - sklearn is a dev extra
        g = torch.Generator().manual_seed(0)
        x = torch.rand(1797, 64, generator=g)
        return x, (x @ torch.randn(64, 10, generator=g)).argmax(1)


def _mlp(hidden: int, depth: int) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(64, hidden), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(hidden, hidden), nn.ReLU()]
    layers.append(nn.Linear(hidden, 10))
    return nn.Sequential(*layers)


def _digit_batches(batch: int, n: int) -> list[Batch]:
    x, y = _digits()
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        out.append((x[idx], y[idx]))
    return out


def _text_batches(batch: int, seq_len: int, n: int) -> list[Batch]:
    data = StdlibText(seq_len=seq_len, batch_size=batch, max_bytes=1_000_000, seed=0)
    return [data.batch() for _ in range(n)]


def _lm_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    build: Callable[[], nn.Module]
    batches: Callable[[], list[Batch]]
    loss: LossFn
    lr: float
    block: int  # optimizer steps per block; a multiple of DEFAULT_FLUSH_EVERY
    realistic: bool  # the 1.02x / 1.10x targets apply


MODELS: dict[str, ModelSpec] = {
    "mlp": ModelSpec("mlp", "MLP 64-1024-1024-1024-10, sklearn digits, batch 128",
                     lambda: _mlp(1024, 3), lambda: _digit_batches(128, 16),
                     nn.functional.cross_entropy, 1e-3, 25, True),
    "transformer": ModelSpec("transformer",
                             "byte-level causal transformer d=192, 5 layers, stdlib source, "
                             "batch 8 x 32 tokens",
                             lambda: CharTransformer(192, 5, 4, 32), lambda: _text_batches(8, 32, 16),
                             _lm_loss, 1e-3, 25, True),
    "gru": ModelSpec("gru", "lrwatch demo CharGRU hidden 512, 2 layers, stdlib source, "
                     "batch 8 x 32 bytes",
                     lambda: CharGRU(hidden=512, layers=2), lambda: _text_batches(8, 32, 16),
                     _lm_loss, 3e-3, 25, True),
    # GPU-bound sizes (a step takes milliseconds on a GPU, seconds on a CPU): on a GPU the host
    # runs ahead of the device unless something makes it wait, which is what these show.
    "mlp-gpu": ModelSpec("mlp-gpu", "MLP 64-4096x4-10 (50M parameters), sklearn digits, "
                         "batch 1024", lambda: _mlp(4096, 4), lambda: _digit_batches(1024, 16),
                         nn.functional.cross_entropy, 1e-4, 25, True),
    "transformer-gpu": ModelSpec("transformer-gpu",
                                 "byte-level causal transformer d=512, 8 layers (25M "
                                 "parameters), stdlib source, batch 32 x 128 tokens",
                                 lambda: CharTransformer(512, 8, 8, 128),
                                 lambda: _text_batches(32, 128, 16), _lm_loss, 3e-4, 25, True),
    "tiny": ModelSpec("tiny", "MLP 64-128-10, sklearn digits, batch 64",
                      lambda: _mlp(128, 1), lambda: _digit_batches(64, 16),
                      nn.functional.cross_entropy, 1e-3, 100, False),
}
DEFAULT_MODELS = ("mlp", "transformer", "tiny")


# --- the per-step ".item()" styles we compare with ------------------------------------------------
def _lightning_style(model: nn.Module, sink: list[dict[str, float]]) -> None:
    """Mirrors Lightning's ``grad_norm(module, norm_type=2)`` utility as its docs recommend using
    it, in ``on_before_optimizer_step``: ``self.log_dict(grad_norm(self, norm_type=2))``.

    ``grad_norm`` computes ``p.grad.data.norm(2)`` for every parameter that has a gradient, then
    the total norm by building a *host* tensor from the list of per-parameter norms (which reads
    every norm to the host, i.e. one ``.item()``-like read per parameter, every step), and returns
    a dict ``grad_2.0_norm/<name>`` plus ``grad_2.0_norm_total``. The values are then logged as
    Python floats (``sink`` stands in for the logger). Lightning's own ``log_dict`` bookkeeping is
    *not* included, so this is a lower bound on its cost.
    """
    norms = {f"grad_2.0_norm/{name}": p.grad.data.norm(2.0)
             for name, p in model.named_parameters() if p.grad is not None}
    if norms:
        norms["grad_2.0_norm_total"] = torch.tensor(
            [float(v) for v in norms.values()]).norm(2.0)  # per-parameter host reads
    sink.append({k: v.item() for k, v in norms.items()})


def _composer_style(model: nn.Module, sink: list[dict[str, float]]) -> None:
    """Mirrors Composer's ``OptimizerMonitor`` callback at ``batch_end`` (after the optimizer
    step; gradients are still there), logging every batch.

    For every parameter with a gradient it computes ``torch.linalg.vector_norm(p.grad)`` (key
    ``l2_norm/grad/<name>``) and accumulates the squared norms into a device scalar; the global
    norm ``l2_norm/grad/global`` is its square root. The dict goes to ``logger.log_metrics``; a
    logger destination that records numbers (console, MLflow, W&B, ...) turns each value into a
    Python float, which we do here with ``.item()`` per key. The optimizer-specific metrics
    (``report_per_parameter_metrics`` of Composer's own optimizers) do not exist for torch's
    AdamW and are not mirrored. Newer Composer releases log every ``interval`` batches; logging
    every batch is the per-step style the issue asks us to compare with.
    """
    metrics: dict[str, torch.Tensor] = {}
    total: torch.Tensor | float = 0.0
    for name, p in model.named_parameters():
        if p.grad is not None and p.requires_grad:
            n = torch.linalg.vector_norm(p.grad)
            metrics[f"l2_norm/grad/{name}"] = n
            total = total + n ** 2
    metrics["l2_norm/grad/global"] = torch.as_tensor(total) ** 0.5
    sink.append({k: v.item() for k, v in metrics.items()})


# Rules engine and rollback snapshots off, where this Watcher has them (it grew them over time).
_MEASURE_ONLY: dict[str, Any] = {
    k: v for k, v in (("rules", None), ("recovery", False))
    if k in inspect.signature(Watcher.__init__).parameters}


# --- one variant: its own model copy, optimizer, scheduler and monitor -----------------------------
def _warmup_lambda(step: int) -> float:
    return min(1.0, (step + 1) / 50)


class _Runner:
    def __init__(self, variant: str, spec: ModelSpec, init: nn.Module, batches: list[Batch],
                 device: torch.device, tmpdir: str) -> None:
        self.variant = variant
        self.model = copy.deepcopy(init).to(device).train()
        self.batches = batches
        self.loss_fn = spec.loss
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=spec.lr, weight_decay=0.01,
                                     **({"fused": True} if FUSED else {}))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _warmup_lambda)
        self.i = 0
        self.sink: list[dict[str, float]] = []
        self.watch: Watcher | None = None
        if variant == "lrwatch":
            self.watch = Watcher(self.model, self.opt, self.sched)
        elif variant == "lrwatch guard-on":
            self.watch = Watcher(self.model, self.opt, self.sched, recovery={"guard": "on"})
        elif variant == "lrwatch guard-off":
            self.watch = Watcher(self.model, self.opt, self.sched, recovery={"guard": "off"})
        elif variant == "lrwatch lag0":
            self.watch = Watcher(self.model, self.opt, self.sched, flush_lag=0)
        elif variant == "lrwatch measure-only":
            self.watch = Watcher(self.model, self.opt, self.sched, **_MEASURE_ONLY)
        elif variant == "lrwatch+server":
            self.watch = Watcher(self.model, self.opt, self.sched, port=0)
        elif variant == "lrwatch all-on":
            self.watch = Watcher(self.model, self.opt, self.sched, per_layer=True,
                                 update_ratio=True, flush_every=1,
                                 trace=os.path.join(tmpdir, f"{spec.name}.trace.jsonl"))
        elif variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")

    def steps(self, n: int) -> None:
        model, opt, sched, watch, loss_fn = self.model, self.opt, self.sched, self.watch, \
            self.loss_fn
        for _ in range(n):
            x, y = self.batches[self.i % len(self.batches)]
            self.i += 1
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if self.variant == "lightning-item":
                _lightning_style(model, self.sink)
            opt.step()
            sched.step()
            if watch is not None:
                watch.log(loss=loss)
            elif self.variant == "lightning-item":
                self.sink[-1]["loss"] = loss.item()
            elif self.variant == "composer-item":
                _composer_style(model, self.sink)
                self.sink[-1]["loss"] = loss.item()
        if len(self.sink) > 1000:  # a logger would ship these; keep memory flat
            del self.sink[:-1]

    def close(self) -> dict[str, Any]:
        info: dict[str, Any] = {}
        if self.watch is not None:
            self.watch.close()
            info["internal_errors"] = self.watch.registry.get_sample_value(
                "lrwatch_internal_errors_total")
            info["flushes"] = self.watch.flushes
            store = getattr(self.watch, "store", None)
            if store is not None:  # rollback snapshots taken (their cost is in the step time)
                info["snapshots"] = getattr(store, "taken", None)
                info["snapshot_seconds"] = getattr(store, "seconds", None)
        return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- statistics ------------------------------------------------------------------------------------
def _ratio_stats(var: Sequence[float], base: Sequence[float], rng: random.Random,
                 n_boot: int = 2000) -> dict[str, float]:
    """Ratio of medians, its paired bootstrap 95% interval, and the per-round paired ratios'
    median and IQR."""
    ratio = statistics.median(var) / statistics.median(base)
    k = len(var)
    boots = []
    for _ in range(n_boot):
        idx = [rng.randrange(k) for _ in range(k)]
        boots.append(statistics.median(var[i] for i in idx) /
                     statistics.median(base[i] for i in idx))
    boots.sort()
    paired = sorted(v / b for v, b in zip(var, base))
    q = statistics.quantiles(paired, n=4) if len(paired) >= 2 else [paired[0]] * 3
    return {"ratio": ratio, "ci_low": boots[int(0.025 * n_boot)],
            "ci_high": boots[min(n_boot - 1, int(0.975 * n_boot))],
            "paired_median": statistics.median(paired), "paired_q1": q[0], "paired_q3": q[2]}


# --- the benchmark ---------------------------------------------------------------------------------
def bench_model(spec: ModelSpec, variants: Sequence[str], rounds: int, warmup_blocks: int,
                device: torch.device, seed: int = 0, block: int | None = None,
                clock_primary: str = "wall",
                progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Interleaved A/B/C... measurement of one model; returns per-variant block times and ratios."""
    block = block or spec.block
    torch.manual_seed(seed)
    init = spec.build()
    batches = [(x.to(device), y.to(device)) for x, y in spec.batches()]
    n_params = sum(p.numel() for p in init.parameters())
    times: dict[str, list[float]] = {v: [] for v in variants}
    cpu_times: dict[str, list[float]] = {v: [] for v in variants}
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="lrwatch-overhead-") as tmpdir:
        runners = {v: _Runner(v, spec, init, batches, device, tmpdir) for v in variants}
        try:
            for r in range(warmup_blocks + rounds):
                order = list(variants)
                rng.shuffle(order)
                for v in order:
                    runner = runners[v]
                    _sync(device)
                    t0, c0 = time.perf_counter(), time.process_time()
                    runner.steps(block)
                    _sync(device)
                    dt = (time.perf_counter() - t0) / block
                    dc = (time.process_time() - c0) / block
                    if r >= warmup_blocks:
                        times[v].append(dt)
                        cpu_times[v].append(dc)
                if r >= warmup_blocks:
                    progress(f"  {spec.name}: round {r - warmup_blocks + 1}/{rounds}  "
                             + "  ".join(f"{v}={times[v][-1] * 1e3:.2f}ms" for v in variants))
        finally:
            infos = {v: runner.close() for v, runner in runners.items()}
    result: dict[str, Any] = {
        "model": spec.name, "description": spec.description, "params": n_params,
        "param_tensors": sum(1 for _ in init.parameters()), "block_steps": block,
        "rounds": rounds, "warmup_blocks": warmup_blocks, "realistic": spec.realistic,
        "clock": clock_primary, "variants": {}}
    stat_rng = random.Random(seed + 1)
    for v in variants:
        entry: dict[str, Any] = dict(infos[v])
        for clock, data in (("wall", times), ("cpu", cpu_times)):
            c: dict[str, Any] = {"block_ms": [t * 1e3 for t in data[v]],
                                 "median_ms": statistics.median(data[v]) * 1e3}
            if "baseline" in data:
                c.update(_ratio_stats(data[v], data["baseline"], stat_rng))
                c["overhead_us"] = (c["median_ms"] - statistics.median(data["baseline"]) * 1e3) \
                    * 1e3
            entry[clock] = c
        primary = entry[clock_primary]
        entry["median_ms"] = primary["median_ms"]
        if "ratio" in primary:
            for k in ("ratio", "ci_low", "ci_high"):
                entry[k] = primary[k]
            target = TARGETS.get(v) if spec.realistic else None
            entry["target"] = target
            if target is not None:
                entry["met"] = entry["ratio"] <= target
                entry["met_with_ci"] = entry["ci_high"] <= target
        result["variants"][v] = entry
    return result


class _NoStep(torch.optim.Optimizer):
    """An optimizer whose step does nothing; torch still runs its step pre/post hooks."""

    def __init__(self, params: Any) -> None:
        super().__init__(params, {"lr": 1e-3})

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        return None


_ISOLATED: dict[str, Callable[[str], dict[str, Any]]] = {
    "lrwatch": lambda tmp: {},
    "lrwatch guard-on": lambda tmp: {"recovery": {"guard": "on"}},
    "lrwatch guard-off": lambda tmp: {"recovery": {"guard": "off"}},
    "lrwatch measure-only": lambda tmp: dict(_MEASURE_ONLY),
    "lrwatch all-on": lambda tmp: {"per_layer": True, "update_ratio": True, "flush_every": 1,
                                   "trace": os.path.join(tmp, "isolated.trace.jsonl")},
}


def isolated_cost(spec: ModelSpec, device: torch.device, steps: int = 300,
                  seed: int = 0) -> dict[str, float]:
    """Monitoring cost alone, in CPU microseconds per step: the Watcher's hooks and ``log`` on a
    fixed set of real gradients, with an optimizer whose step does nothing (torch still runs the
    step hooks), minus the same loop without a Watcher. Far less noisy than the A/B ratio, but it
    misses the cache effects of interleaving the monitor's memory passes with real training.
    """
    torch.manual_seed(seed)
    model = spec.build().to(device)
    x, y = spec.batches()[0]
    loss = spec.loss(model(x.to(device)), y.to(device))
    loss.backward()
    loss = loss.detach()
    out: dict[str, float] = {}

    def timed(watch: Watcher | None, opt: torch.optim.Optimizer) -> float:
        for _ in range(20):
            opt.step()
            if watch is not None:
                watch.log(loss=loss)
        _sync(device)
        c0 = time.process_time()
        for _ in range(steps):
            opt.step()
            if watch is not None:
                watch.log(loss=loss)
        _sync(device)
        return (time.process_time() - c0) / steps * 1e6

    with tempfile.TemporaryDirectory(prefix="lrwatch-overhead-") as tmp:
        base_opt = _NoStep(model.parameters())
        base = min(timed(None, base_opt) for _ in range(3))
        for name, kwargs in _ISOLATED.items():
            opt = _NoStep(model.parameters())
            watch = Watcher(model, opt, None, **kwargs(tmp))
            try:
                out[name] = max(0.0, min(timed(watch, opt) for _ in range(3)) - base)
            finally:
                watch.close()
    return out


def sync_debug_check(spec: ModelSpec, device: torch.device, steps: int = 200,
                     seed: int = 0) -> dict[str, Any]:
    """Train ``steps`` steps under ``torch.cuda.set_sync_debug_mode("error")``.

    Three runs, each on fresh copies:

    1. ``baseline``: the plain loop, to show the harness itself never syncs.
    2. ``watcher``: the Watcher with everything on (per-layer norms, update ratio) and
       ``flush_every`` larger than ``steps``, so the step path alone is checked. The flush, the one
       intended host transfer, runs after the mode is reset. The Watcher fails open, so a sync
       error inside its hooks would be swallowed: its ``lrwatch_internal_errors_total`` and
       logged warnings are checked too.
    3. ``watcher-default``: ``Watcher(model, opt, sched)`` with default flushing, under ``"warn"``:
       counts the synchronising calls (expected: about one flush per ``flush_every`` steps).
    """
    if device.type != "cuda" or not torch.cuda.is_available():
        return {"ran": False, "reason": f"needs a CUDA device (device is {device.type}, "
                                        f"cuda available: {torch.cuda.is_available()})"}
    torch.manual_seed(seed)
    init = spec.build()
    batches = [(x.to(device), y.to(device)) for x, y in spec.batches()]
    torch.cuda.synchronize(device)
    out: dict[str, Any] = {"ran": True, "model": spec.name, "steps": steps,
                           "device": torch.cuda.get_device_name(device)}

    class _Capture(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.WARNING)
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage() + (
                f" [{record.exc_info[1]!r}]" if record.exc_info else ""))

    def one(kind: str, mode: str) -> dict[str, Any]:
        model = copy.deepcopy(init).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01,
                                **({"fused": True} if FUSED else {}))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_lambda)
        watch: Watcher | None = None
        if kind == "watcher":
            watch = Watcher(model, opt, sched, per_layer=True, update_ratio=True,
                            flush_every=steps + 1)
        elif kind == "watcher-default":
            watch = Watcher(model, opt, sched)
        cap = _Capture()
        logging.getLogger("lrwatch").addHandler(cap)
        res: dict[str, Any] = {"mode": mode}
        done = 0
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode(mode)
                try:
                    for i in range(steps):
                        x, y = batches[i % len(batches)]
                        loss = spec.loss(model(x), y)
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        sched.step()
                        if watch is not None:
                            watch.log(loss=loss)
                        done += 1
                except RuntimeError as exc:
                    res["error"] = f"step {done + 1}: {exc}"
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            # torch's own warning about this debug mode also says "synchronizing": count
            # only the warning it gives at each synchronising call
            res["sync_warnings"] = sum("called a synchronizing CUDA operation" in str(w.message)
                                       for w in caught)
        finally:
            if watch is not None:
                watch.close()  # the flush happens here, outside the debug mode
                res["internal_errors"] = watch.registry.get_sample_value(
                    "lrwatch_internal_errors_total")
                res["flushes"] = watch.flushes
            logging.getLogger("lrwatch").removeHandler(cap)
        res["steps_done"] = done
        res["lrwatch_warnings"] = cap.messages[:5]
        res["ok"] = (done == steps and "error" not in res and not res.get("internal_errors")
                     and (mode != "error" or res["sync_warnings"] == 0))
        return res

    out["baseline"] = one("baseline", "error")
    out["watcher"] = one("watcher", "error")
    out["watcher-default"] = one("watcher-default", "warn")
    out["ok"] = out["baseline"]["ok"] and out["watcher"]["ok"]
    return out


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "device": str(device)}
    try:
        info["loadavg_start"] = os.getloadavg()
    except OSError:  # pragma: no cover
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:  # pragma: no cover
        pass
    if device.type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _fmt_ratio(e: dict[str, Any]) -> str:
    return (f"{e['ratio']:.3f} [{e['ci_low']:.3f}, {e['ci_high']:.3f}] "
            f"{e['overhead_us']:+.0f} µs")


def _verdict(result: dict[str, Any], clock: str) -> str:
    parts = []
    for v, target in TARGETS.items():
        e = result["variants"].get(v)
        if e is None or not result["realistic"] or "ratio" not in e[clock]:
            continue
        c = e[clock]
        mark = ("yes" if c["ci_high"] <= target else
                "yes (CI overlaps)" if c["ratio"] <= target else "NO")
        parts.append(f"{v} ≤{target:.2f}: {mark}")
    return "; ".join(parts) if parts else "n/a (no target)"


def markdown_table(results: Sequence[dict[str, Any]], variants: Sequence[str],
                   clock: str = "wall") -> str:
    """One row per model: baseline ms/step and each variant's ratio [95% CI], on ``clock``."""
    shown = [v for v in variants if v != "baseline"]
    head = ["model", "params", f"baseline ms/step ({clock})"] + [f"{v} ×" for v in shown] + \
        ["targets met"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        base = r["variants"].get("baseline")
        params = (f"{r['params'] / 1e6:.2f}M" if r["params"] >= 1e5 else f"{r['params']:,}")
        row = [r["model"], f"{params} ({r['param_tensors']} tensors)",
               f"{base[clock]['median_ms']:.2f}" if base else "-"]
        for v in shown:
            c = r["variants"][v][clock]
            row.append(_fmt_ratio(c) if "ratio" in c else f"{c['median_ms']:.2f} ms")
        row.append(_verdict(r, clock))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def isolated_table(results: Sequence[dict[str, Any]]) -> str:
    """Isolated monitoring cost: CPU µs per step, and as a share of the baseline CPU step."""
    names = list(_ISOLATED)
    lines = ["| model | " + " | ".join(f"{n} µs/step (share of step)" for n in names) + " |",
             "|" + "---|" * (len(names) + 1)]
    for r in results:
        base = r["variants"].get("baseline", {}).get("cpu", {}).get("median_ms")
        cells = []
        for n in names:
            us = r["isolated_us"][n]
            cells.append(f"{us:.0f}" + (f" ({us / (base * 1e3):.1%})" if base else ""))
        lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(models: Sequence[str], variants: Sequence[str], rounds: int, warmup_blocks: int,
        device: torch.device, seed: int = 0, block: int | None = None, sync_debug: bool = True,
        clock: str | None = None, isolated_steps: int = 300,
        verbose: bool = True) -> dict[str, Any]:
    """Benchmark ``models``; the report's ``table`` uses ``clock`` (``"cpu"`` on a CPU device,
    ``"wall"`` otherwise, by default) and ``table_other`` the other clock."""
    clock = clock or ("cpu" if device.type == "cpu" else "wall")
    other = "wall" if clock == "cpu" else "cpu"
    def progress(msg: str) -> None:
        if verbose:
            print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    report: dict[str, Any] = {
        "benchmark": "overhead", "machine": machine_info(device),
        "config": {"models": list(models), "variants": list(variants), "rounds": rounds,
                   "warmup_blocks": warmup_blocks, "block": block, "seed": seed,
                   "clock": clock, "targets": TARGETS},
        "results": []}
    for name in models:
        spec = MODELS[name]
        progress(f"{name}: {spec.description}")
        res = bench_model(spec, variants, rounds, warmup_blocks, device, seed=seed, block=block,
                          clock_primary=clock, progress=progress)
        res["isolated_us"] = isolated_cost(spec, device, steps=isolated_steps, seed=seed)
        report["results"].append(res)
    if sync_debug:
        progress("sync-debug check ...")
        report["sync_debug"] = sync_debug_check(MODELS[models[0]], device)
    else:
        report["sync_debug"] = {"ran": False, "reason": "disabled (--no-sync-debug)"}
    try:
        report["machine"]["loadavg_end"] = os.getloadavg()
    except OSError:  # pragma: no cover
        pass
    report["seconds"] = time.perf_counter() - t0
    report["table"] = markdown_table(report["results"], variants, clock)
    report["table_other"] = markdown_table(report["results"], variants, other)
    report["table_isolated"] = isolated_table(report["results"])
    return report


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer rounds (about 1-2 minutes)")
    p.add_argument("--smoke", action="store_true",
                   help="minimal run for tests: tiny model, 2 rounds (timings meaningless)")
    p.add_argument("--models", default=None,
                   help=f"comma-separated, from {', '.join(MODELS)} "
                        f"(default {','.join(DEFAULT_MODELS)})")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--rounds", type=int, default=None, help="measured rounds per model")
    p.add_argument("--warmup", type=int, default=None, help="warm-up rounds per model")
    p.add_argument("--block", type=int, default=None,
                   help="steps per block (default per model; keep a multiple of 25)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads on CPU (default 1: see docs/overhead.md)")
    p.add_argument("--clock", choices=("cpu", "wall"), default=None,
                   help="step time for the main table: process CPU time (default on CPU: robust "
                        "to other jobs on a shared machine) or wall clock (default on CUDA)")
    p.add_argument("--no-sync-debug", action="store_true",
                   help="skip the CUDA set_sync_debug_mode check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fused", action="store_true",
                   help="AdamW(fused=True) in every variant (the default guard is then on)")
    p.add_argument("--json", metavar="OUT", help="also write the full results as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-round progress")
    a = p.parse_args(argv)
    global FUSED
    FUSED = a.fused

    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda requested but torch.cuda.is_available() is False")
    models = a.models.split(",") if a.models else (["tiny"] if a.smoke else list(DEFAULT_MODELS))
    variants = a.variants.split(",")
    for m in models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    for v in variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    if "baseline" in variants:  # baseline first in the table
        variants = ["baseline"] + [v for v in variants if v != "baseline"]
    rounds = a.rounds or (2 if a.smoke else 4 if a.quick else 20)
    warmup = a.warmup if a.warmup is not None else (1 if (a.smoke or a.quick) else 2)
    block = a.block or (25 if a.smoke else None)
    if device.type == "cpu":
        # One intra-op thread: on a small shared machine, OpenMP threads that wait on a busy core
        # make step times many times slower and far noisier (docs/overhead.md).
        torch.set_num_threads(a.threads or 1)
        torch.set_flush_denormal(True)  # converged nets must not wander into slow denormals

    report = run(models, variants, rounds, warmup, device, seed=a.seed, block=block,
                 sync_debug=not a.no_sync_debug, clock=a.clock,
                 isolated_steps=50 if a.smoke else 300, verbose=not a.quiet)
    m = report["machine"]
    clock = report["config"]["clock"]
    other = "wall" if clock == "cpu" else "cpu"
    names = {"cpu": "process CPU time", "wall": "wall-clock time"}
    print(f"\nlrwatch overhead: {m.get('cpu', platform.processor())}, {m['cpu_count']} cores, "
          f"torch {m['torch']} ({m['torch_threads']} threads), device {m['device']}; "
          f"{rounds} rounds after {warmup} warm-up; median of per-block mean step time, "
          f"ratio to baseline [paired bootstrap 95% CI]\n\n{names[clock]} per step:\n")
    print(report["table"])
    print(f"\n{names[other]} per step (cross-check):\n")
    print(report["table_other"])
    print("\nisolated monitoring cost (hooks + log on fixed gradients, no-op optimizer step; "
          "CPU time):\n")
    print(report["table_isolated"])
    sd = report["sync_debug"]
    if sd.get("ran"):
        print(f"\nsync-debug ({sd['steps']} steps, {sd['model']}, {sd['device']}): "
              f"baseline {'ok' if sd['baseline']['ok'] else 'FAILED'}, "
              f"watcher all-on under 'error' {'ok' if sd['watcher']['ok'] else 'FAILED'}, "
              f"default watcher under 'warn': {sd['watcher-default']['sync_warnings']} "
              f"synchronising calls in {sd['watcher-default']['steps_done']} steps")
        for k in ("baseline", "watcher"):
            if not sd[k]["ok"]:
                print(f"  {k}: {json.dumps(sd[k])}")
    else:
        print(f"\nsync-debug check: not run ({sd['reason']})")
    print(f"\n{report['seconds']:.0f} s")
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
