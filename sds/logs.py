"""Logging set-up: text or JSON lines on stderr.

Three guards apply to every record of every logger (ours, aiohttp's, asyncio's):

- tokens never reach the output: ``token=`` query values, ``Bearer`` credentials
  and anything shaped like a JWT are replaced by ``[redacted]`` (``RedactTokens``);
- one record is one line: control characters in every logged value are escaped
  (``\\n`` is written as the two characters ``\\x0a``), so a request path or a
  token ``sub`` cannot forge a line; the lines of a traceback are indented;
- a malformed HTTP request costs no line of its own: aiohttp's "Error handling
  request" records are counted and summarised at most once per interval
  (``RequestErrorSummary``), like refused tokens (``sds.auth``).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections import Counter

_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
}

REDACTED = "[redacted]"
_TOKEN_IN_QUERY = re.compile(r"((?:^|[?&;\s])token=)[^&\s\"';]+", re.IGNORECASE)
_BEARER = re.compile(r"(\bbearer\s+)[^\s\"',;]+", re.IGNORECASE)
# A JWT: base64url header (always a JSON object, so it starts with "eyJ"), payload
# and signature, dot-separated. Also the first two parts alone (a cut-off token).
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]*)?")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def redact(text: str) -> str:
    """``text`` with every token-like part replaced by ``[redacted]``."""
    if "eyJ" in text:
        text = _JWT.sub(REDACTED, text)
    text = _TOKEN_IN_QUERY.sub(r"\1" + REDACTED, text)
    return _BEARER.sub(r"\1" + REDACTED, text)


def escape_control(text: str) -> str:
    """``text`` on one line: control characters written as ``\\xNN`` (or ``\\uNNNN``)."""
    return _CONTROL.sub(_escape_char, text)


def _escape_char(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _exception_lines(text: str) -> list[str]:
    """A traceback's lines, each escaped, ready to indent under the record's line."""
    return [escape_control(line) for line in redact(text).splitlines()]


class RedactTokens(logging.Filter):
    """Replaces tokens in a record's message, its string ``extra`` fields and its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and isinstance(value, str):
                setattr(record, key, redact(value))
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


LOG_SUMMARY_INTERVAL = 60.0
_REQUEST_ERROR = "Error handling request"


class LogSummary:
    """Counts events by name and logs one summary line at most once per interval.

    For what anyone can cause many times (refused tokens, malformed requests): one
    line per interval instead of one per event, with the names and counts only.
    """

    def __init__(self, logger: logging.Logger, what: str, interval: float) -> None:
        self.logger = logger
        self.what = what
        self.interval = interval
        self._since_log: Counter[str] = Counter()
        self._last_log = float("-inf")

    def count(self, name: str, now: float | None = None) -> None:
        """Count one event; log the summary if an interval has passed."""
        self._since_log[name] += 1
        self.flush_if_due(now)

    def flush_if_due(self, now: float | None = None) -> None:
        """Log the summary when an interval has passed since the last one (and there is one)."""
        now = time.monotonic() if now is None else now
        if self._since_log and now - self._last_log >= self.interval:
            self.flush(now)

    def flush(self, now: float | None = None) -> None:
        """Log what was counted since the last summary line."""
        self._last_log = time.monotonic() if now is None else now
        if not self._since_log:
            return
        summary = ", ".join(f"{name}={count}" for name, count in sorted(self._since_log.items()))
        self._since_log.clear()
        self.logger.warning("%s since last report: %s", self.what, summary)


class RequestErrorSummary(logging.Filter):
    """Counts aiohttp's "Error handling request" records and summarises them per interval.

    A malformed request (a parse error, status 400) gets no line of its own: anyone
    can send many. Any other failure of a request keeps its line with the traceback,
    at most one per interval; the rest are counted. The summary names the error
    classes and counts, never a request line.
    """

    def __init__(self, interval: float = LOG_SUMMARY_INTERVAL) -> None:
        super().__init__()
        self.interval = interval
        self.summary = LogSummary(logging.getLogger("sds.http"), "bad HTTP requests", interval)
        self._last_traceback = float("-inf")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "aiohttp.server" or not str(record.msg).startswith(_REQUEST_ERROR):
            return True
        from aiohttp.http_exceptions import HttpProcessingError

        error = record.exc_info[1] if record.exc_info else None
        if record.levelno < logging.WARNING:
            return False
        now = time.monotonic()
        malformed = isinstance(error, HttpProcessingError)
        keep = not malformed and now - self._last_traceback >= self.interval
        if keep:
            self._last_traceback = now
            self.summary.flush_if_due(now)
        else:
            self.summary.count(type(error).__name__ if error else "unknown", now)
        return keep


def flush_log_summaries(*, force: bool = False) -> None:
    """Log due request-error summaries of the installed handlers (housekeeping, shutdown)."""
    for handler in logging.getLogger().handlers:
        for candidate in handler.filters:
            if isinstance(candidate, RequestErrorSummary):
                if force:
                    candidate.summary.flush()
                else:
                    candidate.summary.flush_if_due()


class TextFormatter(logging.Formatter):
    """``time level logger: message``; control characters escaped, traceback lines indented."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.message = escape_control(record.getMessage())
        record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += "".join("\n  " + part for part in _exception_lines(record.exc_text))
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the fields passed in ``extra``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": escape_control(record.getMessage()),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and key not in entry:
                if isinstance(value, str):
                    entry[key] = escape_control(value)
                elif value is None or isinstance(value, int | float | bool):
                    entry[key] = value
                else:
                    entry[key] = escape_control(str(value))
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = "\n".join(_exception_lines(record.exc_text))
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(log_format: str = "text", level: str = "info") -> None:
    """Send the server's logs to stderr in the chosen format, through the guards above."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(RequestErrorSummary())
    handler.addFilter(RedactTokens())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


_REQUEST_LOGGERS = (
    "aiohttp.access",
    "aiohttp.server",
    "aiohttp.web",
    "aiohttp.websocket",
    "asyncio",
)


def redact_access_log() -> None:
    """Install RedactTokens on the loggers that print requests (once).

    ``setup_logging`` guards its handler already; this keeps tokens out of the
    logs of whoever serves ``create_app()`` with a logging set-up of their own.
    """
    for name in _REQUEST_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactTokens) for f in logger.filters):
            logger.addFilter(RedactTokens())
