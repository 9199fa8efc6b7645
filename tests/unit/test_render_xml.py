"""Issue 7 item 7: `Format=XML` output is well-formed whatever the strings hold."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

from opensmc.api.render import render

NASTY = "".join(chr(c) for c in range(0x20)) + "<&>\"'\ud800\udfff\ufffe\uffff\U0001f600 end"


def test_xml_with_control_characters_parses() -> None:
    body = {"RequestId": "r", "Item": {"Description": NASTY, "Tags": {"Tag": [{"Key": NASTY, "Value": "v"}]}}}
    data, _ = render(body, "DescribeResponse", "XML")
    root = ET.fromstring(data)  # raises on a document that is not well-formed
    text = root.findtext("Item/Description") or ""
    # What XML can hold is kept (tab, newline, markup characters, astral planes)...
    for kept in ("\t", "\n", "<&>\"'", "\U0001f600 end"):
        assert kept in text
    # ...and what it cannot is replaced, one for one.
    assert "\x01" not in text and "\ufffe" not in text
    # 29 C0 controls (all but tab, LF, CR), two surrogates, U+FFFE, U+FFFF
    assert text.count("\ufffd") == 29 + 2 + 2


def test_json_with_lone_surrogate_renders() -> None:
    data, _ = render({"Description": "a\ud800b"}, "R", "JSON")
    assert json.loads(data) == {"Description": "a\ud800b"}
