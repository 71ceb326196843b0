"""Logging that never writes a credential: ``token=`` and ``ticket=`` values (browsers must put
them in URLs, and servers log URLs) are replaced before any handler formats a record."""

from __future__ import annotations

import logging
import re

_SECRET = re.compile(r"((?:token|ticket)=)[^&\s\"']+", re.IGNORECASE)
_LOGGERS = ("", "uvicorn", "uvicorn.error", "uvicorn.access", "firstcare")


def redact(text: str) -> str:
    """>>> redact('GET /realtime/ws?token=eyJ.x.y&since=a:1')
    'GET /realtime/ws?token=[redacted]&since=a:1'"""
    return _SECRET.sub(r"\1[redacted]", text)


class RedactSecrets(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def install_redaction() -> None:
    """Attach the filter to the loggers and handlers a server uses (call after uvicorn has
    configured its own loggers)."""
    secret_filter = RedactSecrets()
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactSecrets) for f in logger.filters):
            logger.addFilter(secret_filter)
        for handler in logger.handlers:
            if not any(isinstance(f, RedactSecrets) for f in handler.filters):
                handler.addFilter(secret_filter)
