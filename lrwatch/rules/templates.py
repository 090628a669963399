"""Annotation templates (``summary: "loss {value:.3g} at step {step}"``): checked and rendered.

A template names only the fields of :data:`FIELDS`, and ``labels`` only as ``{labels[NAME]}``.
Python's ``str.format`` would also follow attributes and indexes (``{value.__class__}``): from
the rendering context a rule file reached module globals and ``os.environ`` and sent them out
in alerts. Here every other field name is refused, when the file is checked and again when an
event is rendered (a ``Rule`` built in Python skips the file's checks).

>>> check_template("{metric} = {value:.3g} ({labels[team]})")
>>> check_template("{value.__class__}")
"'{value.__class__}': a field is a plain name or labels[NAME], without attributes or other indexes"
>>> render("{rule}: {labels[team]}{labels[none]}", {"rule": "r", "labels": {"team": "ml"}})
'r: ml'
"""

from __future__ import annotations

import string
from typing import Any, Mapping

from _string import formatter_field_name_split  # type: ignore[import-not-found]

__all__ = ["FIELDS", "check_template", "render"]

#: Fields a summary/description template may use, e.g. ``"{metric} = {value:.3g}"``.
FIELDS = ("rule", "metric", "value", "step", "time", "severity", "statistic", "detector",
          "labels")


class _Formatter(string.Formatter):
    """``str.format`` over a mapping, with the field names of :func:`_split` only; a label
    the rule does not have renders as an empty string."""

    def get_field(self, field_name: str, args: Any, kwargs: Any) -> tuple[Any, str]:
        root, label = _split(field_name)
        if label is None:
            return kwargs[root], root
        return kwargs[root].get(label, ""), field_name


def _split(field_name: str) -> tuple[str, str | None]:
    """The field and, for ``labels[NAME]``, the label's name; ``ValueError`` for anything
    else (an attribute, another index, a positional field), ``KeyError`` for an unknown
    field."""
    first, rest = formatter_field_name_split(field_name)
    parts = list(rest)
    if first not in FIELDS:   # (a positional field too: {} or {0})
        raise KeyError(first)
    if not parts:
        return first, None
    if first == "labels" and len(parts) == 1 and not parts[0][0] and isinstance(parts[0][1], str):
        return first, parts[0][1]
    raise ValueError(f"'{{{field_name}}}': a field is a plain name or labels[NAME], without "
                     f"attributes or other indexes")


_FORMATTER = _Formatter()
_SAMPLE = {"rule": "r", "metric": "m", "value": 1.0, "step": 1, "time": 0.0, "severity": "info",
           "statistic": 1.0, "detector": "d", "labels": {}}


def check_template(text: str) -> str | None:
    """What is wrong with ``text`` as a template, or ``None``; an unknown field is reported
    as ``unknown template field {NAME}`` (the caller adds the valid choices)."""
    try:
        for _, fname, _, _ in _FORMATTER.parse(text):
            if fname is not None:
                _split(fname)
        _FORMATTER.vformat(text, (), _SAMPLE)
    except KeyError as exc:
        return f"unknown template field {{{exc.args[0]}}}"
    except ValueError as exc:
        return str(exc) if str(exc).startswith("'{") else f"bad template: {exc}"
    except (IndexError, AttributeError, TypeError) as exc:
        return f"bad template: {exc}"
    return None


def render(text: str, ctx: Mapping[str, Any]) -> str:
    """``text`` with the fields of ``ctx`` filled in (``labels``: a mapping); raises
    ``ValueError``/``KeyError`` (and what ``format`` raises) for a template
    :func:`check_template` refuses.

    A template of plain field names only (no ``labels[NAME]``, no field inside a format
    spec) is filled in by ``str.format_map``, which gives the same text five times faster:
    its fields can reach nothing but the values of ``ctx``.

    >>> ctx = {"value": 2.0, "step": 3, "labels": {}}
    >>> render("{value:.3g} at {step!r}", ctx), render("{labels[x]}{step}", ctx)
    ('2 at 3', '3')
    """
    plain = _PLAIN.get(text)
    if plain is None:
        plain = _plain(text)
        if len(_PLAIN) < _MOST_KEPT:
            _PLAIN[text] = plain
    if plain:
        return text.format_map(ctx)
    return _FORMATTER.vformat(text, (), ctx)


#: Whether each template seen is plain (see :func:`render`); at most this many kept.
_PLAIN: dict[str, bool] = {}
_MOST_KEPT = 4096


def _plain(text: str) -> bool:
    """Whether every field of ``text`` is a name of :data:`FIELDS` with no fields in its
    format spec (``str.format_map`` would then do what :data:`_FORMATTER` does).

    >>> _plain("{value:.3g} {step!r}"), _plain("{labels[x]}"), _plain("{value:{step}}")
    (True, False, False)
    >>> _plain("{}"), _plain("{value.real}"), _plain("{oops")
    (False, False, False)
    """
    try:
        return all(fname is None or (fname in FIELDS and "{" not in spec)
                   for _, fname, spec, _ in _FORMATTER.parse(text))
    except ValueError:
        return False
