"""The alias module re-exports exactly the recovery policy's public names (issue 16: the dead
``control_rules`` is gone from both)."""

from __future__ import annotations

import lrwatch.actions.policy as alias
import lrwatch.recovery.policy as policy


def test_alias_exports_the_same_objects_as_the_policy():
    assert set(policy.__all__) <= set(alias.__all__)
    for name in alias.__all__:
        assert getattr(alias, name) is getattr(policy, name), name


def test_dead_control_rules_is_gone():
    assert not hasattr(policy, "control_rules")
    assert not hasattr(alias, "control_rules")
