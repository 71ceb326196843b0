"""Logging that never writes a credential: ``token=`` and ``ticket=`` values (browsers must put
them in URLs, and servers log URLs) are replaced before any handler formats a record. A
parameter is recognised by its decoded name, as the server reads it: ``?%74oken=`` is a token."""

from __future__ import annotations

import logging
import re
from urllib.parse import unquote_plus

# a query parameter anywhere in a line: its name as written (maybe percent-encoded) and its value
_PARAM = re.compile(r"(?P<name>[^\s?&=\"';#]+)=(?P<value>[^&\s\"'#]*)")
SECRET_PARAMS = frozenset({"token", "ticket"})
_LOGGERS = ("", "uvicorn", "uvicorn.error", "uvicorn.access", "firstcare")


def _hide(match: re.Match[str]) -> str:
    # the server decodes parameter names (``%74oken`` is ``token``), so decode before comparing
    if unquote_plus(match["name"]).strip().lower() in SECRET_PARAMS and match["value"]:
        return f"{match['name']}=[redacted]"
    return match[0]


def redact(text: str) -> str:
    """>>> redact('GET /realtime/ws?token=eyJ.x.y&since=a:1')
    'GET /realtime/ws?token=[redacted]&since=a:1'
    >>> redact('WebSocket /realtime/ws?%74oken=eyJ.x.y')
    'WebSocket /realtime/ws?%74oken=[redacted]'
    """
    if "=" not in text:
        return text
    return _PARAM.sub(_hide, text)


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
