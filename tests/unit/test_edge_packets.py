"""What the upstream can take (edge/packets.py), pure: sizes, splitting, refusals."""

from __future__ import annotations

import json

import msgspec
import pytest

from edge.packets import Refusal, fit, puback_refusal, publish_packet_size
from firstcare.signing import new_signing_key, sign

TOPIC = "fc/v1/h1/oximeter/ox-1/vitals"


def batch(n: int) -> bytes:
    return json.dumps({"readings": [{"seq": s, "ts": "2026-11-26T10:15:30.120Z", "patient_id": "p-1",
                                     "metrics": {"spo2": 97}} for s in range(1, n + 1)]}).encode()


@pytest.mark.parametrize("topic, payload, mqtt5, size", [
    # fixed header byte + remaining length (1..4 bytes) + topic length + topic + packet id (+ MQTT 5 property length)
    ("a", 0, False, 1 + 1 + 2 + 1 + 2),
    ("a", 0, True, 1 + 1 + 2 + 1 + 2 + 1),
    ("a", 122, False, 1 + 1 + 127),  # remaining length 127: one byte
    ("a", 123, False, 1 + 2 + 128),  # 128: two bytes
    ("a", 16_378, False, 1 + 2 + 16_383),  # 16383: two bytes
    ("a", 16_379, False, 1 + 3 + 16_384),  # 16384: three
])
def test_the_size_of_a_qos1_publish(topic: str, payload: int, mqtt5: bool, size: int) -> None:
    assert publish_packet_size(topic, payload, mqtt5) == size


def test_what_fits_is_sent_as_it_is() -> None:
    payload = batch(3)
    assert fit(TOPIC, payload, 0, True) == [payload]
    assert fit(TOPIC, payload, publish_packet_size(TOPIC, len(payload), True), True) == [payload]


@pytest.mark.parametrize("limit", [600, 1000, 4096])
def test_an_oversize_batch_is_split_into_batches_that_fit_with_every_reading_once(limit: int) -> None:
    payload = batch(60)
    parts = fit(TOPIC, payload, limit, True)
    assert isinstance(parts, list) and len(parts) > 1
    assert all(publish_packet_size(TOPIC, len(p), True) <= limit for p in parts)
    seqs = []
    for part in parts:
        body = msgspec.json.decode(part)
        seqs += [r["seq"] for r in body["readings"]] if "readings" in body else [body["seq"]]
    assert seqs == list(range(1, 61))


def test_what_cannot_be_split_is_refused_for_good() -> None:
    signed = sign(new_signing_key(), "h1/oximeter/ox-1", TOPIC, batch(60))
    refused = fit(TOPIC, signed, 1000, True)
    assert isinstance(refused, Refusal) and refused.reason == "packet_too_large" and refused.permanent
    assert "signed" in refused.detail
    status = json.dumps({"state": "online", "firmware": "x" * 2000}).encode()
    assert isinstance(fit("fc/v1/h1/oximeter/ox-1/status", status, 1000, True), Refusal)
    one = batch(1)
    assert isinstance(fit(TOPIC, one, 100, True), Refusal)


@pytest.mark.parametrize("code, reason, permanent", [
    (0x87, "not_authorized", True), (0x90, "topic_name_invalid", True), (0x95, "packet_too_large", True),
    (0x99, "payload_format_invalid", True), (0x97, "quota_exceeded", False), (0x80, "refused", False),
    (0x83, "refused", False), (0x9E, "refused", True),
])
def test_puback_reason_codes(code: int, reason: str, permanent: bool) -> None:
    refusal = puback_refusal(code, "x")
    assert refusal is not None and (refusal.reason, refusal.permanent) == (reason, permanent)


@pytest.mark.parametrize("code", [0x00, 0x10])
def test_accepted_puback_reason_codes(code: int) -> None:
    assert puback_refusal(code) is None


def test_every_refusal_reason_is_a_quarantine_reason() -> None:
    from edge.packets import PUBACK_REFUSALS
    from edge.spool import QUARANTINE_REASONS

    assert {reason for reason, _ in PUBACK_REFUSALS.values()} <= set(QUARANTINE_REASONS)
