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
    # the server decodes parameter names, so a percent-encoded name is a token too
    ('127.0.0.1:5 - "WebSocket /realtime/ws?%74oken=eyJa.b.c" [accepted]',
     '127.0.0.1:5 - "WebSocket /realtime/ws?%74oken=[redacted]" [accepted]'),
    ("GET /realtime/events?room=vitals&t%6F%6Ben=eyJa.b.c&%54icket=abc",
     "GET /realtime/events?room=vitals&t%6F%6Ben=[redacted]&%54icket=[redacted]"),
    ("GET /realtime/events?TOKEN=eyJa.b.c", "GET /realtime/events?TOKEN=[redacted]"),
    ("GET /realtime/events?last_event_id=e:1&room=alerts", "GET /realtime/events?last_event_id=e:1&room=alerts"),
])
def test_redact(line: str, expected: str) -> None:
    assert redact(line) == expected


def test_the_filter_rewrites_formatted_records() -> None:
    record = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, '%s - "WebSocket %s" [accepted]',
                               ("127.0.0.1:5", "/realtime/ws?token=secret.jwt.value"), None)
    assert RedactSecrets().filter(record)
    assert "secret" not in record.getMessage() and "token=[redacted]" in record.getMessage()


def test_a_server_logging_a_percent_encoded_token_never_writes_it(tmp_path) -> None:
    """The redaction as installed for a server: on uvicorn's own logger and handler."""
    from firstcare.logs import install_redaction

    log_file = tmp_path / "server.log"
    handler = logging.FileHandler(log_file)
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(handler)
    try:
        install_redaction()
        logger.warning('%s - "WebSocket %s" [accepted]', "127.0.0.1:5", "/realtime/ws?%74oken=eyJhbGciOi.secret.sig")
    finally:
        logger.removeHandler(handler)
        handler.close()
    assert "secret" not in log_file.read_text() and "%74oken=[redacted]" in log_file.read_text()
