"""Log lines for every allm process: text for people, JSON for log shippers.

``setup(process)`` configures the root logger once per process. The format comes from
``ALLM_LOG_FORMAT`` (``text`` or ``json``), which ``--log-format`` sets and the managers
inherit, so a gateway and its managers write one format. ``request_id`` holds the HTTP
request id of the request being handled (the gateway's task, or the manager's worker
thread that runs it): every line logged meanwhile carries it. A record's ``fields`` (an
access line's status, tokens, timings) become ``key=value`` pairs in text and keys of
their own in JSON. See docs/design.md, "Logs and metrics".
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import time
from typing import Any, Final

FORMAT_ENV: Final = "ALLM_LOG_FORMAT"
LEVEL_ENV: Final = "ALLM_LOG_LEVEL"
FORMATS: Final = ("text", "json")

#: the HTTP request id of the request this task or thread is handling; "" for none
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


def log_format() -> str:
    value = os.environ.get(FORMAT_ENV, "text")
    return value if value in FORMATS else "text"


class _RequestFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", ""):
            record.request_id = request_id.get()
        return True


def _pairs(fields: dict[str, Any]) -> str:
    out = []
    for key, value in fields.items():
        if value is None:
            continue
        text = str(value)
        if not text or any(c.isspace() or c in '"=' for c in text):
            text = json.dumps(text)
        out.append(f"{key}={text}")
    return " ".join(out)


class TextFormatter(logging.Formatter):
    """``2026-11-25 03:00:00,123 gateway INFO allm.access [req_ab12]: message key=value …``"""

    def __init__(self, process: str) -> None:
        super().__init__("%(asctime)s " + process + " %(levelname)s %(name)s%(tag)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        rid = getattr(record, "request_id", "")
        record.tag = f" [{rid}]" if rid else ""
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if fields:
            pairs = _pairs(fields)
            # The traceback, if any, stays last.
            head, sep, rest = line.partition("\n")
            line = f"{head} {pairs}{sep}{rest}" if pairs else line
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts, level, process, logger, request_id, message, then fields."""

    def __init__(self, process: str) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "process": self.process,
            "pid": record.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", "")
        if rid:
            entry["request_id"] = rid
        fields = getattr(record, "fields", None)
        if fields:
            entry.update({k: v for k, v in fields.items() if k not in entry})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def json_line(process: str, raw: bytes) -> bytes:
    """One line another process wrote to stderr, as a JSON line: as is if it is one already
    (an allm manager's), else wrapped (an engine's own print)."""
    text = raw.decode("utf-8", "replace").rstrip()
    if text.startswith("{"):
        return text.encode() + b"\n"
    now = time.time()
    entry = {
        "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z",
        "level": "info",
        "process": process,
        "logger": "stderr",
        "message": text,
    }
    return json.dumps(entry, ensure_ascii=False).encode() + b"\n"


def setup(process: str, fmt: str | None = None) -> None:
    """Configure the root logger for this process (``gateway``, ``text#0``, …)."""
    fmt = fmt or log_format()
    handler = logging.StreamHandler()
    handler.addFilter(_RequestFilter())
    handler.setFormatter(JsonFormatter(process) if fmt == "json" else TextFormatter(process))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(os.environ.get(LEVEL_ENV, "INFO"))
