"""JSON from untrusted clients: only what every consumer downstream can hold.

Python's :func:`json.loads` accepts ``NaN``, ``Infinity`` and ``1e400``
(which becomes ``inf``), any nesting depth, and ``\\ud800`` escapes that
decode to lone surrogates. Each of these parses fine and breaks later,
far from the input: a stored ``{"bandwidth_limit": NaN}`` made every
heartbeat of the source's agent fail with 500 (Starlette refuses to render
NaN), 1000 nested arrays raised ``RecursionError`` (a 500), and a lone
surrogate cannot be encoded to UTF-8 (PostgreSQL, responses). :func:`loads`
refuses them at the door with one :class:`StrictJsonError` naming the
problem, so callers turn it into a 400.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

__all__ = ["MAX_DEPTH", "NotJson", "StrictJsonError", "loads"]

#: Deepest nesting of arrays and objects accepted: far more than any of our
#: documents needs (a report is 4 deep), far less than the recursion limit.
MAX_DEPTH = 32

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")
_SURROGATE = re.compile("[\ud800-\udfff]")


class StrictJsonError(ValueError):
    """The text is not JSON, or is JSON we refuse; the message says which."""


class NotJson(StrictJsonError):
    """Not JSON at all (syntax, or not UTF-8), as opposed to JSON we refuse."""


def _no_constant(name: str) -> Any:
    raise StrictJsonError(f"{name} is not a number JSON allows; send a finite number.")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise StrictJsonError(f"the number {text[:32]} is too large; send a finite number.")
    return value


def depth(text: str) -> int:
    """The deepest array/object nesting in ``text`` (brackets inside strings do not count)."""
    deepest = level = 0
    for m in _BRACKET.finditer(_STRING.sub("", text)):
        if m.group() in "[{":
            level += 1
            deepest = max(deepest, level)
        else:
            level -= 1
    return deepest


def _check_strings(value: Any, level: int = 0) -> None:
    if isinstance(value, str):
        if _SURROGATE.search(value):
            raise StrictJsonError("a string holds a lone UTF-16 surrogate (\\ud800-\\udfff); send valid Unicode.")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_strings(k, level + 1)
            _check_strings(v, level + 1)
    elif isinstance(value, list):
        for v in value:
            _check_strings(v, level + 1)


def loads(text: str | bytes, *, max_depth: int = MAX_DEPTH) -> Any:
    """Parse ``text`` as JSON; raise :class:`StrictJsonError` for anything :mod:`json` would
    accept but we refuse (non-finite numbers, nesting over ``max_depth``, lone surrogates)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise NotJson("it is not UTF-8.") from None
    if depth(text) > max_depth:
        raise StrictJsonError(f"it nests arrays/objects deeper than {max_depth} levels.")
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except StrictJsonError:
        raise
    except (ValueError, RecursionError) as exc:
        raise NotJson(f"it is not valid JSON ({exc}).") from None
    _check_strings(value)
    return value
