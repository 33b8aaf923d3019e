"""Logging set-up: text or JSON lines on stderr. Tokens and the secret are never logged."""

from __future__ import annotations

import json
import logging
import re
import sys
import time

_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the fields passed in ``extra``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and key not in entry:
                plain = value is None or isinstance(value, str | int | float | bool)
                entry[key] = value if plain else str(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(log_format: str = "text", level: str = "info") -> None:
    """Send the server's logs to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


_TOKEN_IN_QUERY = re.compile(r"([?&]token=)[^&\s\"']+", re.IGNORECASE)


class RedactTokens(logging.Filter):
    """Hides ``token=`` query values in records of loggers that print request lines.

    ``sds serve`` logs requests without their query string; this filter keeps
    tokens out of aiohttp's default access log too, whoever serves ``create_app()``.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = _TOKEN_IN_QUERY.sub(r"\1[redacted]", message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def redact_access_log() -> None:
    """Install RedactTokens on aiohttp's access logger (once)."""
    access = logging.getLogger("aiohttp.access")
    if not any(isinstance(f, RedactTokens) for f in access.filters):
        access.addFilter(RedactTokens())
