"""The documented input rules shared by several actions (spec/API.md §0)."""

from __future__ import annotations

import re

from opensmc.domain.errors import InvalidParameter
from opensmc.params import Params

# Names start with a letter (or a CJK character); then letters, digits, `:`, `_`, `-`
# (and `.` for workgroups).
_NAME = re.compile(r"^[A-Za-z\u4e00-\u9fff][\w:\-\u4e00-\u9fff]*$", re.ASCII)
_NAME_DOT = re.compile(r"^[A-Za-z\u4e00-\u9fff][\w:.\-\u4e00-\u9fff]*$", re.ASCII)
_ASCII_WORD = re.compile(r"^[A-Za-z0-9\u4e00-\u9fff:_\-.]*$")
MAX_TAGS = 20


def _starts_http(value: str) -> bool:
    low = value.lower()
    return low.startswith("http://") or low.startswith("https://")


def check_name(p: Params, field: str, value: str, *, lo: int = 2, hi: int = 128, dots: bool = False) -> str:
    """Names: lo..hi chars, start with a letter, then letters, digits, `:`, `_`, `-` (`.` if dots)."""
    pattern = _NAME_DOT if dots else _NAME
    ok = lo <= len(value) <= hi and not _starts_http(value) and bool(pattern.match(value))
    if ok and not dots and "." in value:
        ok = False
    if not ok:
        extra = ", '.'" if dots else ""
        raise InvalidParameter(
            p.wire(field),
            f"It must be {lo} to {hi} characters, start with a letter, and contain only letters, "
            f"digits, ':', '_', '-'{extra}; it may not start with http:// or https://.",
        )
    return value


def check_description(p: Params, field: str, value: str, *, lo: int = 0, hi: int = 256) -> str:
    if not lo <= len(value) <= hi or _starts_http(value):
        raise InvalidParameter(
            p.wire(field),
            f"It must be {lo} to {hi} characters and may not start with http:// or https://.",
        )
    return value


def parse_tags(
    p: Params,
    name: str = "Tag",
    *,
    require_value: bool = False,
    key_max: int = 128,
    allow_missing_key: bool = False,
) -> list[tuple[str, str | None]]:
    """`Tag.N.Key`/`Tag.N.Value` pairs, N = 1..20, checked against the tag rules.

    A value of None means the pair had no Value (a key-only filter).
    """
    groups = p.groups(name)
    if len(groups) > MAX_TAGS:
        raise InvalidParameter(
            p.wire(name),
            f"The maximum number of the Tag parameters cannot exceed {MAX_TAGS}.",
            code="NumberExceed.Tags",
        )
    out: list[tuple[str, str | None]] = []
    seen: set[str] = set()
    for _n, g in groups:
        key = g.raw("Key")
        value = g.raw("Value")
        if key is None or key == "":
            if allow_missing_key and value is None:
                continue
            if value is not None:
                raise InvalidParameter(
                    g.wire("Key"), "A tag value was given without its key.", code="InvalidParameter.TagValue"
                )
            raise InvalidParameter(g.wire("Key"), "The tag key may not be empty.", code="InvalidParameter.TagKey")
        low = key.lower()
        if (
            len(key) > key_max
            or low.startswith("aliyun")
            or low.startswith("acs:")
            or "http://" in low
            or "https://" in low
        ):
            raise InvalidParameter(
                g.wire("Key"),
                f"A tag key is 1 to {key_max} characters, may not start with 'aliyun' or 'acs:' "
                "and may not contain http:// or https://.",
                code="InvalidParameter.TagKey",
            )
        if value is not None:
            vlow = value.lower()
            if len(value) > 128 or "http://" in vlow or "https://" in vlow:
                raise InvalidParameter(
                    g.wire("Value"),
                    "A tag value is at most 128 characters and may not contain http:// or https://.",
                    code="InvalidParameter.TagValue",
                )
            if require_value and value == "":
                raise InvalidParameter(
                    g.wire("Value"), "The tag value may not be empty.", code="InvalidParameter.TagValue"
                )
        if key in seen:
            raise InvalidParameter(
                g.wire("Key"), f"The tag key {key!r} is given twice.", code="InvalidParameter.TagKey"
            )
        seen.add(key)
        out.append((key, value))
    return out


def page(p: Params, *, default_size: int = 10, max_size: int = 50) -> tuple[int, int]:
    """PageNumber (>= 1, default 1) and PageSize (1..max_size, default default_size)."""
    number = p.int("PageNumber", lo=1, hi=2**31 - 1)
    size = p.int("PageSize", lo=1, hi=max_size)
    return (number or 1, size or default_size)
