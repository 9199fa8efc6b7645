"""Typed access to an action's flat wire parameters.

The SDKs flatten every list and struct to dotted keys with 1-based indexes
(`DataDisk.1.Part.2.Block=False`). :class:`Params` reads them back with the
documented types and ranges, raising ``MissingParameter``/``InvalidParameter``
that name the full wire key, so no malformed input gets further than here.
"""

from __future__ import annotations

import builtins
import re
from collections.abc import Mapping
from datetime import UTC, datetime

from opensmc.domain.errors import InvalidParameter, MissingParameter

_INDEX = re.compile(r"^([1-9][0-9]{0,5})(?:\.(.+))?$")
_ISO = re.compile(r"^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2})(?::(\d{2}))?(?:\.\d+)?Z$")
INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)


class Params:
    """A view on flat parameters; `prefix` is how its keys are named on the wire."""

    def __init__(self, values: Mapping[builtins.str, builtins.str], prefix: builtins.str = "") -> None:
        self._values = dict(values)
        self.prefix = prefix

    def wire(self, name: builtins.str) -> builtins.str:
        return f"{self.prefix}{name}"

    def has(self, name: builtins.str) -> builtins.bool:
        return name in self._values

    def raw(self, name: builtins.str) -> builtins.str | None:
        return self._values.get(name)

    def keys(self) -> list[builtins.str]:
        return list(self._values)

    # scalars -------------------------------------------------------------

    def str(
        self,
        name: builtins.str,
        *,
        required: builtins.bool = False,
        max_len: builtins.int | None = None,
        min_len: builtins.int | None = None,
        choices: tuple[builtins.str, ...] | None = None,
        missing_code: builtins.str | None = None,
    ) -> builtins.str | None:
        value = self._values.get(name)
        if value is None or (required and value == ""):
            if required:
                raise MissingParameter(self.wire(name), code=missing_code)
            return None
        if max_len is not None and len(value) > max_len:
            raise InvalidParameter(self.wire(name), f"It must be at most {max_len} characters long.")
        if min_len is not None and len(value) < min_len:
            raise InvalidParameter(self.wire(name), f"It must be at least {min_len} characters long.")
        if choices is not None and value not in choices:
            raise InvalidParameter(self.wire(name), f"Allowed values: {', '.join(choices)}.")
        return value

    def req_str(self, name: builtins.str, **kw: object) -> builtins.str:
        value = self.str(name, required=True, **kw)  # type: ignore[arg-type]
        assert value is not None
        return value

    def int(
        self,
        name: builtins.str,
        *,
        required: builtins.bool = False,
        lo: builtins.int | None = None,
        hi: builtins.int | None = None,
        wide: builtins.bool = False,
    ) -> builtins.int | None:
        raw = self._values.get(name)
        if raw is None or raw == "":
            if required:
                raise MissingParameter(self.wire(name))
            return None
        text = raw.strip()
        if not re.fullmatch(r"[+-]?[0-9]{1,20}", text):
            raise InvalidParameter(self.wire(name), "It must be an integer.")
        value = int(text)
        lo_bound, hi_bound = INT64 if wide else INT32
        if not lo_bound <= value <= hi_bound:
            raise InvalidParameter(self.wire(name), "It is out of the integer range.")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise InvalidParameter(self.wire(name), f"It must be between {lo} and {hi}.")
        return value

    def bool(self, name: builtins.str, *, default: builtins.bool | None = None) -> builtins.bool | None:
        raw = self._values.get(name)
        if raw is None or raw == "":
            return default
        low = raw.strip().lower()
        if low == "true":
            return True
        if low == "false":
            return False
        raise InvalidParameter(self.wire(name), "It must be true or false.")

    def time(self, name: builtins.str) -> datetime | None:
        """An ISO 8601 UTC time, `yyyy-MM-ddTHH:mm[:ss]Z`."""
        raw = self._values.get(name)
        if raw is None or raw == "":
            return None
        m = _ISO.match(raw.strip())
        if not m:
            raise InvalidParameter(self.wire(name), "Use the UTC format yyyy-MM-ddTHH:mm:ssZ.")
        y, mo, d, h, mi, s = (int(g) if g else 0 for g in m.groups())
        try:
            return datetime(y, mo, d, h, mi, s, tzinfo=UTC)
        except ValueError:
            raise InvalidParameter(self.wire(name), "It is not a valid date and time.") from None

    # repeat lists --------------------------------------------------------

    def groups(self, name: builtins.str, *, max_n: builtins.int | None = None) -> list[tuple[builtins.int, Params]]:
        """`Name.N.Field…` as (N, sub-params) pairs in N order; gaps and any order are fine."""
        found: dict[builtins.int, dict[builtins.str, builtins.str]] = {}
        head = name + "."
        for key, value in self._values.items():
            if not key.startswith(head):
                continue
            m = _INDEX.match(key[len(head) :])
            if not m:
                raise InvalidParameter(self.wire(key), "Repeat lists are written Name.N with N from 1.")
            n = int(m.group(1))
            if m.group(2) is None:
                raise InvalidParameter(self.wire(key), f"Expected {name}.{n}.<Field>.")
            found.setdefault(n, {})[m.group(2)] = value
        if max_n is not None and len(found) > max_n:
            raise InvalidParameter(self.wire(name), f"At most {max_n} items are allowed.")
        return [(n, Params(found[n], f"{self.prefix}{name}.{n}.")) for n in sorted(found)]

    def list(
        self, name: builtins.str, *, max_n: builtins.int | None = None, code: builtins.str | None = None
    ) -> list[builtins.str]:
        """`Name.N` values in N order (empty values dropped)."""
        found: dict[builtins.int, builtins.str] = {}
        head = name + "."
        for key, value in self._values.items():
            if not key.startswith(head):
                continue
            m = _INDEX.match(key[len(head) :])
            if not m or m.group(2) is not None:
                raise InvalidParameter(self.wire(key), f"Repeat lists are written {name}.N with N from 1.")
            found[int(m.group(1))] = value
        if max_n is not None and len(found) > max_n:
            raise InvalidParameter(self.wire(name), f"At most {max_n} items are allowed.", code=code)
        return [found[n] for n in sorted(found) if found[n] != ""]

    def sub(self, name: builtins.str) -> Params:
        """`Name.Field…` (a struct, not a list) as sub-params."""
        head = name + "."
        return Params(
            {k[len(head) :]: v for k, v in self._values.items() if k.startswith(head)},
            f"{self.prefix}{name}.",
        )

    def is_empty(self) -> builtins.bool:
        return not self._values
