"""The checks of :class:`~lrwatch.recovery.config.RecoveryConfig`'s settings, run when one is
built: a :class:`~lrwatch.errors.ConfigError` that names the setting, what it must be and what
it got. Pure: no torch, no I/O."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:   # (config.py imports this module)
    from .config import RecoveryConfig

__all__ = ["check_actions", "check_pre_flight"]


def check_actions(self: RecoveryConfig) -> None:
    """The rollback, cut, skip, guard and replay settings of ``self``."""
    for name in ("lr_factor", "restart_lr_factor", "reduce_lr_factor", "probe_fraction",
                 "sudden_lr_factor"):
        v = getattr(self, name)
        if not (isinstance(v, (int, float)) and 0 < v <= 1):
            raise ConfigError(f"{name} must be in (0, 1], got {v!r}")
    for name in ("max_rollbacks", "cooldown", "skip_batches", "max_skips", "good_after",
                 "restart_warmup", "sudden_margin", "sudden_hold"):
        v = getattr(self, name)
        if name == "restart_warmup" and v == "auto":
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            extra = ' or "auto"' if name == "restart_warmup" else ""
            raise ConfigError(f"{name} must be a non-negative integer{extra}, got {v!r}")
    if self.guard_ratio != "auto" and (
            not isinstance(self.guard_ratio, (int, float)) or isinstance(self.guard_ratio, bool)
            or not (self.guard_ratio == 0 or self.guard_ratio > 1)):
        raise ConfigError(f"guard_ratio must be 0 (non-finite steps only), a number above "
                          f"1 or \"auto\", got {self.guard_ratio!r}")
    if self.guard not in ("auto", "on", "off"):
        raise ConfigError(f"guard must be 'auto', 'on' or 'off', got {self.guard!r}")
    for name in ("replay", "cut_unscheduled"):
        if not isinstance(getattr(self, name), bool):
            raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
    if (not isinstance(self.replay_mb, (int, float)) or isinstance(self.replay_mb, bool)
            or not self.replay_mb >= 0):
        raise ConfigError(f"replay_mb must be a number >= 0, got {self.replay_mb!r}")


def check_pre_flight(self: RecoveryConfig) -> None:
    """The probe, the range tests, the start and mid-run checks, the clip norm of ``self``."""
    if self.probe not in ("off", "auto"):
        raise ConfigError(f"probe must be 'off' or 'auto', got {self.probe!r}")
    if not isinstance(self.probe_steps, int) or self.probe_steps < 3:
        raise ConfigError(f"probe_steps must be an integer >= 3, got {self.probe_steps!r}")
    if not (isinstance(self.probe_span, (int, float)) and self.probe_span > 1):
        raise ConfigError(f"probe_span must be a number above 1, got {self.probe_span!r}")
    if self.lr_check not in ("off", "auto"):
        raise ConfigError(f"lr_check must be 'off' or 'auto', got {self.lr_check!r}")
    if (not isinstance(self.lr_check_steps, int) or isinstance(self.lr_check_steps, bool)
            or self.lr_check_steps < 3):
        raise ConfigError(f"lr_check_steps must be an integer >= 3, got "
                          f"{self.lr_check_steps!r}")
    if self.start_check not in ("off", "auto"):
        raise ConfigError(f"start_check must be 'off' or 'auto', got {self.start_check!r}")
    if self.mid_check not in ("off", "auto"):
        raise ConfigError(f"mid_check must be 'off' or 'auto', got {self.mid_check!r}")
    for name in ("mid_check_first", "mid_check_steps", "mid_check_batches"):
        v = getattr(self, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 2:
            raise ConfigError(f"{name} must be an integer >= 2, got {v!r}")
    f = self.mid_check_factor
    if not (isinstance(f, (int, float)) and not isinstance(f, bool) and 0 < f < 1):
        raise ConfigError(f"mid_check_factor must be a number in (0, 1), got {f!r}")
    f = self.mid_check_margin
    if not (isinstance(f, (int, float)) and not isinstance(f, bool) and 0 <= f < 1):
        raise ConfigError(f"mid_check_margin must be a number in [0, 1), got {f!r}")
    for name in ("start_check_steps", "start_check_batches"):
        v = getattr(self, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 2:
            raise ConfigError(f"{name} must be an integer >= 2, got {v!r}")
    c = self.start_check_confidence
    if not (isinstance(c, (int, float)) and not isinstance(c, bool) and 0.5 < c < 1):
        raise ConfigError(f"start_check_confidence must be a number in (0.5, 1), got {c!r}")
    c = self.start_check_gate
    if not (isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c)
            and c >= 0):
        raise ConfigError(f"start_check_gate must be a number >= 0 (0: always check), "
                          f"got {c!r}")
    g = self.clip_grad_norm
    if g is not None and not (isinstance(g, (int, float)) and not isinstance(g, bool)
                              and math.isfinite(g) and g > 0):
        raise ConfigError(f"clip_grad_norm must be None or a positive number (the norm "
                          f"your training step clips gradients to), got {g!r}")
