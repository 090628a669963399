"""Actions: what lrwatch does about what the rules find.

This package holds the side effects of the engine's firings: alert sinks and their background
sender (:mod:`lrwatch.actions.alerts`), hooks that run a command or POST a URL
(:mod:`lrwatch.actions.hooks`), and the training-side snapshot and rollback actions.

Importing this package stays light (standard library and ``prometheus_client`` only): modules
that need torch are imported from their own submodule, never from here.
"""

from __future__ import annotations

from .alerts import (
    Alert,
    AlertmanagerSink,
    AlertSender,
    DeliveryError,
    LogSink,
    Sink,
    WebhookSink,
    alert_name,
)
from .hooks import HookAction, hook_payload

__all__ = [
    "Alert",
    "alert_name",
    "Sink",
    "AlertmanagerSink",
    "WebhookSink",
    "LogSink",
    "AlertSender",
    "DeliveryError",
    "HookAction",
    "hook_payload",
]
