"""Framework adapters: thin callbacks over the same :class:`~lrwatch.watch.Watcher` core.

- :mod:`lrwatch.integrations.lightning` -- ``LrwatchCallback`` for PyTorch Lightning 2.x
  (``pip install 'lrwatch[lightning]'``).
- :mod:`lrwatch.integrations.transformers` -- ``LrwatchCallback`` for the Hugging Face
  ``Trainer`` (``pip install 'lrwatch[transformers]'``).

Neither framework is imported here, so ``import lrwatch.integrations`` always works; import the
submodule of the framework you use. Probes, rules and actions all live in the Watcher: an adapter
only says *when* (which framework hook) to measure the gradients, record the step, log the
loss and evaluation results, and where the iteration boundary is (rollback and snapshots).
"""

from __future__ import annotations

__all__: list[str] = []
