"""Moved to :mod:`lrwatch.recovery.policy` (the one pure recovery policy); kept so that
``from lrwatch.actions.policy import RecoveryConfig`` and friends go on working."""

from __future__ import annotations

from ..recovery.policy import (CONTROL_ACTIONS, EXIT_BUDGET, EXIT_STOPPED, NOT_OUTCOMES,
                               STOP_RESTORE, UNKNOWN_OPTIMIZER_WARMUP, Decision, Plan,
                               PolicyState, Progress, RecoveryConfig, RecoveryPolicy,
                               SnapshotInfo, check_action_params, decide, restart_warmup_for,
                               unanswered_onset)

__all__ = ["RecoveryConfig", "PolicyState", "Decision", "decide", "CONTROL_ACTIONS",
           "EXIT_STOPPED", "EXIT_BUDGET", "STOP_RESTORE", "NOT_OUTCOMES", "check_action_params",
           "RecoveryPolicy", "Plan", "Progress", "SnapshotInfo", "restart_warmup_for",
           "UNKNOWN_OPTIMIZER_WARMUP", "unanswered_onset"]
