"""The Prometheus side of lrwatch on one machine: ``lrwatch stack`` (a local Prometheus,
Alertmanager and Pushgateway with the repository's configs), the generated Grafana dashboards
(``lrwatch dashboards generate``) and their command line.

``local`` starts the services, ``grafana`` builds the dashboards, ``cli`` formats both for the
command line. The files those services read live outside the package, in the repository's
``rules/``, ``exporters/`` and ``grafana/``.
"""

from __future__ import annotations

from .local import BINARIES, OPTIONAL_LABEL, LocalStack, StackConfig, find_binary, repo_root

__all__ = ["StackConfig", "LocalStack", "find_binary", "repo_root", "BINARIES", "OPTIONAL_LABEL"]
