"""``lrwatch daemon``: the serving-side watcher.

Sources (:mod:`.server` HTTP API, :mod:`.sources` tailed JSONL) feed validated records
(:mod:`.records`) to one worker (:mod:`.core`) that fills windows (:mod:`.windows`), joins
delayed labels (:mod:`.labels`), tests each window against a reference profile
(:mod:`.reference`, :mod:`.stats`) with thresholds calibrated to a false-alarm rate
(:mod:`.calibrate`, :mod:`.detector`), feeds one sample per window to the rules engine and runs
the actions; :mod:`.state` makes it all survive ``kill -9``, :mod:`.metrics` exports it.

Nothing here imports torch.
"""

from __future__ import annotations

from .calibrate import Calibration, calibrate
from .config import DaemonConfig
from .core import Daemon
from .detector import DriftDetector, DriftResult
from .baseline import build_reference
from .reference import Reference, read_data
from .server import DaemonServer

__all__ = ["Daemon", "DaemonConfig", "DaemonServer", "DriftDetector", "DriftResult",
           "Reference", "build_reference", "read_data", "Calibration", "calibrate"]
