"""No credential reaches a log line."""

import logging

import pytest

from firstcare.logs import RedactSecrets, redact


@pytest.mark.parametrize(("line", "expected"), [
    ('127.0.0.1:5 - "WebSocket /realtime/ws?token=eyJa.b.c" [accepted]',
     '127.0.0.1:5 - "WebSocket /realtime/ws?token=[redacted]" [accepted]'),
    ("GET /realtime/events/patient/p1?room=vitals&ticket=abc-123&last_event_id=e:1",
     "GET /realtime/events/patient/p1?room=vitals&ticket=[redacted]&last_event_id=e:1"),
    ("nothing secret here", "nothing secret here"),
])
def test_redact(line: str, expected: str) -> None:
    assert redact(line) == expected


def test_the_filter_rewrites_formatted_records() -> None:
    record = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, '%s - "WebSocket %s" [accepted]',
                               ("127.0.0.1:5", "/realtime/ws?token=secret.jwt.value"), None)
    assert RedactSecrets().filter(record)
    assert "secret" not in record.getMessage() and "token=[redacted]" in record.getMessage()
