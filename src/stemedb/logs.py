"""Logging of a StemeDB process: text or JSON lines on stderr, and the access log's switch.

Owns: `configure_logging(level, format)`, which gives the root logger one
console handler — replacing the one it installed before and a plain
StreamHandler such as logging.basicConfig() adds, never any other kind (files,
test capture) — and the two line formats. Structured fields are passed the standard way,
`log.info("message", extra={"door": "http", ...})`: the JSON format makes
each a key of the line's object, the text format appends them as
`key=value`. JSON lines carry `time` (UTC, ISO 8601 with milliseconds),
`level`, `logger`, `message`, the fields, and `exception` (the traceback) when
there is one. Must never: log a secret (callers pass token names, never
tokens), or raise from formatting a record (a value JSON cannot hold is
written as its str()).

Resource handling: the handler writes to the stream it was given (stderr by
default) and owns nothing else; configuring again replaces it.
Error handling: an unknown level or format raises ConfigError naming it.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any, TextIO

from stemedb.errors import ConfigError

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}
FORMATS = ("text", "json")
ACCESS_LOGGER = "stemedb.access"

# Attributes every LogRecord has; anything else on a record came from `extra=` and is a field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime",
                                                                        "taskName"}


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields a record was logged with (its `extra=`), in the order given."""
    return {key: value for key, value in vars(record).items()
            if key not in _STANDARD and not key.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.datetime.fromtimestamp(record.created, tz=datetime.timezone.utc)
        line: dict[str, Any] = {
            "time": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in fields_of(record).items():
            line.setdefault(key, value)  # a field never hides the line's own keys
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message key=value …`, then the traceback if there is one."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        text = super().formatMessage(record)
        extra = fields_of(record)
        if extra:
            text += " " + " ".join(f"{key}={_text_value(value)}" for key, value in extra.items())
        return text


def _text_value(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if not text or any(c.isspace() or c in '"=' for c in text) else text


class _StemeHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler configure_logging installs (its type tells it apart from others' handlers)."""


def configure_logging(level: str = "info", format: str = "text", *,  # noqa: A002 - the option's name
                      access: bool = False, stream: TextIO | None = None) -> logging.Handler:
    """Send every log record at `level` or above to `stream` (stderr) as text or JSON lines.

    `access` lets the access log's INFO lines (logger "stemedb.access",
    written when [log] access is on) through whatever `level` is. Calling
    it again replaces the handler it installed before (and a basicConfig()
    console handler, so lines are not written twice).
    """
    numeric = LEVELS.get(level.lower()) if isinstance(level, str) else None
    if numeric is None:
        raise ConfigError(f"log level: expected one of {', '.join(LEVELS)}, got {level!r}")
    if format not in FORMATS:
        raise ConfigError(f"log format: expected one of {', '.join(FORMATS)}, got {format!r}")
    root = logging.getLogger()
    for old in [h for h in root.handlers if type(h) in (_StemeHandler, logging.StreamHandler)]:
        root.removeHandler(old)
    handler = _StemeHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if format == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(numeric)
    logging.getLogger(ACCESS_LOGGER).setLevel(logging.INFO if access else logging.NOTSET)
    return handler
