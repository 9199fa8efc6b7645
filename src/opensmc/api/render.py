"""Response bodies: JSON by default, XML when `Format=XML` is asked (WIRE.md §4).

Lists are always wrapper objects (`{"Tags": {"Tag": [...]}}`); in XML a
wrapper becomes an element holding one element per item.
"""

from __future__ import annotations

import json
import re
from typing import Any
from xml.sax.saxutils import escape

from opensmc.domain.errors import SmcError

HOST_ID = "smc.aliyuncs.com"
JSON_TYPE = "application/json;charset=utf-8"
XML_TYPE = "text/xml;charset=utf-8"

#: What XML 1.0 cannot hold even escaped (§2.2 Char): C0 controls but tab, LF and CR,
#: surrogates, U+FFFE and U+FFFF. A description, tag or agent-reported field may hold
#: them (JSON carries them fine), so XML output replaces each by U+FFFD rather than
#: emit a document no parser accepts.
_NOT_XML_CHAR = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def error_body(err: SmcError, request_id: str) -> dict[str, Any]:
    return {
        "RequestId": request_id,
        "HostId": HOST_ID,
        "Code": err.code,
        "Message": err.message,
        "Recommend": f"https://api.aliyun.com/troubleshoot?q={err.code}&product=smc",
    }


def render(body: dict[str, Any], root: str, fmt: str) -> tuple[bytes, str]:
    """(bytes, content type) for `body`; `root` names the XML root element."""
    if fmt.upper() == "XML":
        return _xml(root, body).encode(), XML_TYPE
    text = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    try:
        return text.encode(), JSON_TYPE
    except UnicodeEncodeError:
        # A lone surrogate (from a JSON \ud800 escape) has no UTF-8 form; as a
        # \u escape it stays valid JSON that decodes back to the same string.
        return json.dumps(body, separators=(",", ":")).encode(), JSON_TYPE


def _xml(root: str, body: dict[str, Any]) -> str:
    parts = ['<?xml version="1.0" encoding="UTF-8"?>', f"<{root}>"]
    for key, value in body.items():
        parts.append(_xml_value(key, value))
    parts.append(f"</{root}>")
    return "".join(parts)


def _xml_value(name: str, value: Any) -> str:
    if isinstance(value, dict):
        return f"<{name}>" + "".join(_xml_value(k, v) for k, v in value.items()) + f"</{name}>"
    if isinstance(value, list):
        return "".join(_xml_value(name, item) for item in value)
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = ""
    else:
        text = escape(_NOT_XML_CHAR.sub("\ufffd", str(value)))
    return f"<{name}>{text}</{name}>"
