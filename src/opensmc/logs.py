"""Logging set-up shared by `opensmc server` and `opensmc agent`: ``--log-level`` and ``--log-format``.

``text`` is one human line per record. ``json`` is one JSON object per line
(for journald, Loki, Elasticsearch…): ``time``, ``level``, ``logger``,
``message``, and the structured fields a record carries. Code that logs
something a machine should filter on (an API call, a job transition) passes
them as ``extra={"fields": {...}}`` and also writes them into the message, so
the text format loses nothing. Part of the agent's zipapp: Python 3.6 compatible (docs/agent.md).
"""

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any, Dict

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: "logging.LogRecord") -> str:
        doc: "Dict[str, Any]" = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            doc.update(fields)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


def add_arguments(p: "Any") -> None:
    p.add_argument("--log-level", choices=LEVELS, default="info", help="least severe level logged (default: info)")
    p.add_argument(
        "--log-format", choices=FORMATS, default="text", help="text lines, or one JSON object per line (default: text)"
    )


def configure(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # One line per HTTP request the agent or CLI makes is noise; our own access log names every API call.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, root.level))
