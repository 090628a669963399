"""Help text shared by the ``lrwatch`` subcommands: the examples every ``--help`` ends with."""

from __future__ import annotations

__all__ = ["examples"]


def examples(*lines: str) -> str:
    """A click ``epilog`` listing example command lines, kept as written (``\\b``: no rewrap).

    >>> print(examples("lrwatch demo", "lrwatch demo --inject nan"))
    \b
    Examples:
      lrwatch demo
      lrwatch demo --inject nan
    """
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)
