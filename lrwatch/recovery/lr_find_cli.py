"""``lrwatch lr-find``: the range test from the command line (formatting and loading only)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import sys
import sysconfig
import traceback
from pathlib import Path
from typing import Any, Callable, Mapping, NoReturn

import click

from .._cli_help import examples
from ..errors import ConfigError
from ..progress import Progress
from .curve import SUGGEST_RULES, LRCurve

__all__ = ["lr_find_command", "load_target", "render_curve", "plot_curve", "save_plot"]

_LRWATCH_DIR = str(Path(__file__).resolve().parent.parent)
_STDLIB_DIR = sysconfig.get_paths()["stdlib"]
_KEYS = ("model", "optimizer", "loader", "loss_fn", "batch_loss", "scheduler", "scaler")


def load_target(spec: str) -> Mapping[str, Any]:
    """Call ``module:function`` or ``path/to/file.py:function``; it returns a mapping (or an
    object with attributes) with ``model``, ``optimizer``, ``loader`` and ``loss_fn`` or
    ``batch_loss`` (optionally ``scheduler``, ``scaler``).

    A target that cannot be imported or whose function raises is a :class:`ConfigError` that
    names the exception and where in the user's code it was raised (the CLI's exit status 2).
    """
    mod_name, sep, func = spec.rpartition(":")
    if not sep or not mod_name or not func:
        raise ConfigError(f"TARGET must be 'module:function' or 'file.py:function', got {spec!r}")
    module = _import_target(mod_name, func)
    factory = getattr(module, func, None)
    if not callable(factory):
        raise ConfigError(f"{mod_name} has no callable {func!r}")
    try:
        made = factory()
    except Exception as exc:   # the user's code: say what it raised and where, not a traceback
        raise ConfigError(f"TARGET {spec} raised {_where(exc)}") from exc
    if not isinstance(made, Mapping):
        made = {k: getattr(made, k) for k in _KEYS if hasattr(made, k)}
    missing = [k for k in ("model", "optimizer", "loader") if made.get(k) is None]
    if missing or (made.get("loss_fn") is None) == (made.get("batch_loss") is None):
        raise ConfigError(f"{spec} must return a dict (or an object with attributes) of "
                          f"model, optimizer, loader and exactly one of loss_fn / batch_loss "
                          f"(missing: {missing or 'the loss'}); got "
                          f"{sorted(k for k, v in made.items() if v is not None)}")
    return made


def _import_target(mod_name: str, func: str) -> Any:
    """The module of a TARGET: a file path, or a module name looked up from the cwd."""
    if mod_name.endswith(".py") or "/" in mod_name:
        path = Path(mod_name)
        if not path.is_file():
            raise ConfigError(f"TARGET file {path} does not exist")
        loaded = importlib.util.spec_from_file_location(path.stem, path)
        assert loaded is not None and loaded.loader is not None
        module = importlib.util.module_from_spec(loaded)
        sys.path.insert(0, str(path.resolve().parent))
        sys.modules[loaded.name] = module   # dataclasses and pickling look the module up
        try:
            loaded.loader.exec_module(module)
        except Exception as exc:   # a syntax error, a failing import, ... in the user's file
            sys.modules.pop(loaded.name, None)
            raise ConfigError(f"TARGET file {path} cannot be loaded: {_where(exc)}") from exc
        return module
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())   # as `python -m` would (the console script not)
    try:
        return importlib.import_module(mod_name)
    except ModuleNotFoundError as exc:
        if exc.name != mod_name:   # found, but it imports something that is not installed
            raise ConfigError(f"TARGET module {mod_name!r} cannot be loaded: "
                              f"{_where(exc)}") from exc
        raise ConfigError(f"TARGET module {mod_name!r} cannot be imported ({exc}); run "
                          f"from the folder that holds it, or give its file: "
                          f"path/to/{mod_name.replace('.', '/')}.py:{func}") from exc
    except Exception as exc:
        raise ConfigError(f"TARGET module {mod_name!r} cannot be loaded: {_where(exc)}") from exc


def _where(exc: BaseException) -> str:
    """``ValueError: message (at mytask.py:12, in make)``: the exception and the innermost
    frame of the user's code (a syntax error names its own file and line)."""
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, SyntaxError):
        return text
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if _users(f.filename)]
    if frames:
        f = frames[-1]
        text += f" (at {f.filename}:{f.lineno}, in {f.name})"
    return text


def _users(filename: str) -> bool:
    """A frame of the user's code: not lrwatch's, Python's own or an installed package's."""
    return not (filename.startswith(("<", _LRWATCH_DIR, _STDLIB_DIR))
                or "site-packages" in filename or "dist-packages" in filename)


def _demo_target(seed: int) -> dict[str, Any]:
    """The model of ``lrwatch demo`` (byte-level GRU, AdamW) on its stdlib-source batches."""
    import torch

    from ..demo import CharGRU, DemoConfig, StdlibText

    cfg = DemoConfig()
    torch.manual_seed(seed)
    data = StdlibText(cfg.seq_len, cfg.batch_size, seed=seed)
    model = CharGRU(hidden=cfg.hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)

    def batch_loss(m: Any, batch: Any) -> Any:
        x, y = batch
        return torch.nn.functional.cross_entropy(m(x).reshape(-1, 256), y.reshape(-1))

    class Stream:
        def __iter__(self) -> Any:
            while True:
                yield data.batch()

    return {"model": model, "optimizer": opt, "loader": Stream(), "batch_loss": batch_loss,
            "configured_lr": cfg.lr}


def with_progress(fn: Callable[..., Any] | None, optimizer: Any, total: int,
                  progress: Progress) -> Callable[..., Any] | None:
    """``fn`` (the loss function, called once per step of the range test) reporting each step
    to ``progress`` before it runs: the step, the rate it runs at and the previous step's loss
    (read only when a line is printed: no extra device sync)."""
    if fn is None:
        return None
    state: dict[str, Any] = {"step": 0, "loss": None}

    def detail() -> str:
        text = f"lr {float(optimizer.param_groups[0]['lr']):.3g}"
        if state["loss"] is not None:
            text += f", loss {float(state['loss'].detach()):.4g}"
        return text

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        progress.update(state["step"], total, "steps", detail)
        loss = fn(*args, **kwargs)
        state["step"] += 1
        state["loss"] = loss
        return loss

    return wrapped


def render_curve(curve: LRCurve, rows: int = 12, width: int = 40) -> str:
    """The summary and a small text chart of the smoothed loss against the rate."""
    lines = [curve.summary(), ""]
    n = curve.steps
    if n == 0:
        return "\n".join(lines)
    k = min(rows, n)   # evenly spaced rows over the steps that ran, first and last included
    idx_set = {round(i * (n - 1) / max(1, k - 1)) for i in range(k)}
    if curve.largest_stable is not None:
        idx_set.add(curve.lrs.index(curve.largest_stable))
    idx = sorted(idx_set)
    vals = [curve.smoothed[i] for i in idx]
    lo, hi = min(vals), max(vals)
    lines.append(f"{'rate':>10s}  {'loss':>9s}  smoothed loss")
    for i, v in zip(idx, vals):
        bar = int(round((v - lo) / (hi - lo) * width)) if hi > lo else 0
        raw = curve.losses[i]
        mark = " <- largest stable" if curve.lrs[i] == curve.largest_stable else ""
        lines.append(f"{curve.lrs[i]:10.3g}  {raw if math.isfinite(raw) else float('nan'):9.4g}  "
                     f"{'#' * max(bar, 1)}{mark}")
    return "\n".join(lines)


def check_plot(path: str) -> None:
    """Before the test runs: matplotlib is there and ``path``'s folder can be written."""
    try:
        importlib.import_module("matplotlib")
    except ImportError as exc:
        raise ConfigError("--plot needs matplotlib: pip install 'lrwatch[plot]'") from exc
    folder = Path(path).resolve().parent
    if not folder.is_dir():
        raise ConfigError(f"--plot {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ConfigError(f"--plot {path}: the folder {folder} cannot be written")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise ConfigError(f"--plot {path}: the file exists and cannot be written")


def save_plot(curve: LRCurve, path: str, group: int = 0) -> str | None:
    """:func:`plot_curve`, after the test: ``None``, or why the file could not be written (a
    full disk, a path that changed since :func:`check_plot`), so the curve is still shown."""
    try:
        plot_curve(curve, path, group)
    except (OSError, ConfigError) as exc:
        return str(exc)
    return None


def plot_curve(curve: LRCurve, path: str, group: int = 0) -> None:
    """Save the curve as a PNG (matplotlib, the optional ``plot`` extra); ``group``: the
    parameter group whose rates the curve gives (:func:`~lrwatch.recovery.lr_find.leading_rate`)."""
    check_plot(path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(curve.lrs, curve.losses, ".", color="0.6", label="loss")
    ax.plot(curve.lrs, curve.smoothed, "-", color="C0", label="smoothed")
    if curve.largest_stable is not None:
        ax.axvline(curve.largest_stable, color="C3", ls="--",
                   label=f"largest stable {curve.largest_stable:.3g}")
    if curve.suggestion is not None:
        ax.axvline(curve.suggestion, color="C2", ls="-",
                   label=f"suggestion {curve.suggestion:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel(f"learning rate (parameter group {group})")
    ax.set_ylabel("training loss")
    finite = [x for x in curve.smoothed if math.isfinite(x)]
    if finite:   # keep the blow-up from flattening the useful part
        top = min(max(finite), 3 * curve.smoothed[0] if curve.smoothed[0] > 0 else max(finite))
        ax.set_ylim(min(finite) - 0.05 * abs(min(finite)), top)
    ax.set_title(f"lrwatch lr-find: stopped ({curve.stopped}) after {curve.steps} steps")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@click.command("lr-find", epilog=examples(
    "lrwatch lr-find mytask.py:make --plot curve.png   # make() returns the dict above",
    "lrwatch lr-find mypackage.tasks:make --json -q",
    "lrwatch lr-find                                   # the demo's byte-level GRU"))
@click.argument("target", required=False)
@click.option("--min-lr", type=click.FloatRange(min=0, min_open=True), default=1e-7,
              show_default=True, help="First rate of the test.")
@click.option("--max-lr", type=click.FloatRange(min=0, min_open=True), default=10.0,
              show_default=True, help="Last rate (the test usually stops earlier, at the "
              "blow-up).")
@click.option("--steps", type=click.IntRange(3), default=100, show_default=True,
              help="Steps (batches) from min-lr to max-lr.")
@click.option("--rule", type=click.Choice(SUGGEST_RULES), default="stable", show_default=True,
              help="stable: FRACTION x the largest stable rate; steepest: the steepest "
                   "descent of the smoothed loss (Lightning's rule); min10: a tenth of the "
                   "largest stable rate (fastai's first rule).")
@click.option("--fraction", type=click.FloatRange(0, 1, min_open=True), default=0.3,
              show_default=True, help="Share of the largest stable rate to suggest.")
@click.option("--plot", "plot", type=click.Path(dir_okay=False), default=None,
              help="Save the curve as a PNG here (needs the 'plot' extra: matplotlib).")
@click.option("--json", "as_json", is_flag=True, help="Print the curve as one JSON object.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed for the demo target (and torch) before the factory runs.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines on stderr.")
def lr_find_command(target: str | None, min_lr: float, max_lr: float, steps: int, rule: str,
                    fraction: float, plot: str | None, as_json: bool, seed: int,
                    quiet: bool) -> None:
    """Measure a learning rate before training: a range test (Smith 2015).

    TARGET is 'module:function' or 'file.py:function' returning a dict with model,
    optimizer, loader and loss_fn (called as loss_fn(model(x), y) on (x, y) batches) or
    batch_loss(model, batch); scheduler and scaler are optional. Without TARGET the demo's
    byte-level GRU is tested. The model, optimizer and data are left exactly as they were.
    Progress goes to stderr (a line every few seconds); the curve, or its JSON, to stdout.
    Exit status 1 when the curve gives no suggestion (the reason says why), 2 on bad input
    (also when the target's code raises: the traceback says where; and for a --plot file
    that cannot be written after the test: the curve is still printed).
    """
    import torch

    from .lr_find import leading_rate, lr_find

    try:
        if plot:
            check_plot(plot)   # now, not after the whole test has run
        if target is None:
            made: Mapping[str, Any] = _demo_target(seed)
        else:
            torch.manual_seed(seed)
            made = load_target(target)
        progress = Progress("lr-find", enabled=not quiet)
        loss_fn, batch_loss = made.get("loss_fn"), made.get("batch_loss")
        if (loss_fn is None) != (batch_loss is None):   # else lr_find says what is wrong
            loss_fn = with_progress(loss_fn, made["optimizer"], steps, progress)
            batch_loss = with_progress(batch_loss, made["optimizer"], steps, progress)
        curve = lr_find(made["model"], made["optimizer"], made["loader"], loss_fn,
                        batch_loss=batch_loss, scheduler=made.get("scheduler"),
                        scaler=made.get("scaler"), min_lr=min_lr, max_lr=max_lr,
                        num_steps=steps, rule=rule, fraction=fraction)
        progress.message(f"{curve.steps} of {steps} steps, stopped: {curve.stopped}")
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    except Exception as exc:   # the target's code (its factory, model or loss) raised
        _target_failed(exc)
    group = leading_rate(made["optimizer"], made.get("scheduler"))[0]
    failed = save_plot(curve, plot, group) if plot else None
    _report(curve, made, as_json, plot if failed is None else None)
    if failed is not None:   # the curve is out; the plot the user asked for is not
        click.echo(f"Error: --plot {plot}: not written ({failed})", err=True)
        sys.exit(2)
    if curve.suggestion is None:   # the curve and the reason are printed; a script must know
        sys.exit(1)


def _target_failed(exc: BaseException) -> NoReturn:
    """The traceback (it points into the target's code) and exit status 2: a failing target
    is bad input, and exit status 1 means "no suggestion" to a script."""
    traceback.print_exception(exc)
    click.echo(f"Error: the target raised {type(exc).__name__}: {exc}", err=True)
    sys.exit(2)


def _report(curve: LRCurve, made: Mapping[str, Any], as_json: bool, plot: str | None) -> None:
    """The curve on stdout: its JSON, or the summary, chart and suggestion against the
    configured rate (group 0's, or the first group's with a rate when group 0 is frozen at 0;
    a schedule's base rate, since a warm-up from 0 starts at 0)."""
    from .lr_find import leading_rate

    group, configured = leading_rate(made["optimizer"], made.get("scheduler"))
    if as_json:
        click.echo(json.dumps({**curve.to_dict(), "configured_lr": configured,
                               "param_group": group}))
        return
    click.echo(render_curve(curve))
    if group:
        click.echo(f"\nrates are parameter group {group}'s (group 0 is at rate 0 and stays there)")
    if curve.suggestion is not None and configured > 0:
        what = "the schedule's base rate is" if made.get("scheduler") is not None else \
            "the optimizer is configured with"
        click.echo(f"\n{what} {configured:.3g}: the suggestion is "
                   f"x{curve.suggestion / configured:.3g} of it")
    if plot:
        click.echo(f"plot: {plot}")
