"""Signed readings (firstcare/signing.py): the wire form, every refusal, no canonicalisation."""

from __future__ import annotations

import base64
import json

import msgspec
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from firstcare.payloads import MAX_PAYLOAD_BYTES, Rejection
from firstcare.signing import (
    KeyRecord,
    Opened,
    b64url,
    expired,
    is_signed,
    new_signing_key,
    open_message,
    parse_public_key,
    public_raw,
    sign,
    signing_input,
)
from firstcare.topics import parse_topic

KEY = new_signing_key()
GW_KEY = new_signing_key()
T7 = "fc/v1/h1/monitor/monitor-7/vitals"
T8 = "fc/v1/h1/monitor/monitor-8/vitals"
T7_H2 = "fc/v1/h2/monitor/monitor-7/vitals"
BODY = b'{"seq":1,"ts":"2026-11-26T10:15:30.120Z","metrics":{"heart_rate":72}}'
KEYS = {
    "m7": KeyRecord("m7", public_raw(KEY), "device", "h1", "monitor", "monitor-7"),
    "gw": KeyRecord("gw", public_raw(GW_KEY), "gateway", "h1", gateway_id="ward-3"),
}


def opened(topic: str, payload: bytes, required: bool = False) -> Opened | Rejection:
    return open_message(parse_topic(topic), topic, payload, KEYS, required)


def reason(result: Opened | Rejection) -> str:
    return result.reason if isinstance(result, Rejection) else "ok"


def test_wire_form_and_signed_bytes() -> None:
    wrapper = json.loads(sign(KEY, "m7", T7, BODY))
    assert set(wrapper) == {"signed", "sig", "kid"}
    assert wrapper["signed"].encode() == BODY and wrapper["kid"] == "m7"
    signature = base64.urlsafe_b64decode(wrapper["sig"] + "==")
    KEY.public_key().verify(signature, b"fc-sig-v1\n" + T7.encode() + b"\n" + BODY)
    assert signing_input(T7, BODY) == b"fc-sig-v1\n" + T7.encode() + b"\n" + BODY


def test_a_good_signature_opens_to_the_exact_inner_bytes() -> None:
    assert opened(T7, sign(KEY, "m7", T7, BODY)) == Opened(BODY, "m7")


def test_any_json_spelling_of_the_same_string_verifies() -> None:
    """No canonicalisation: the signed bytes are the string's value, however it is escaped."""
    escaped = "".join(f"\\u{ord(c):04x}" for c in BODY.decode())
    sig = json.loads(sign(KEY, "m7", T7, BODY))["sig"]
    payload = f'{{"kid": "m7", "sig": "{sig}", "signed": "{escaped}"}}'.encode()
    assert opened(T7, payload) == Opened(BODY, "m7")


def _tamper_sig(payload: bytes) -> bytes:
    wrapper = json.loads(payload)
    raw = bytearray(base64.urlsafe_b64decode(wrapper["sig"] + "=="))
    raw[0] ^= 1
    wrapper["sig"] = b64url(bytes(raw))
    return json.dumps(wrapper).encode()


def _tamper_body(payload: bytes) -> bytes:
    wrapper = json.loads(payload)
    wrapper["signed"] = wrapper["signed"].replace('"heart_rate":72', '"heart_rate":35')
    return json.dumps(wrapper).encode()


GOOD = sign(KEY, "m7", T7, BODY)


@pytest.mark.parametrize(("topic", "payload", "expected"), [
    (T7, _tamper_body(GOOD), "signature_invalid"),                      # a value changed
    (T7, _tamper_sig(GOOD), "signature_invalid"),                       # the signature changed
    (T7, GOOD.replace(b'"kid":"m7"', b'"kid":"m7","extra":1'), "signature_invalid"),  # unknown field
    (T8, GOOD, "signature_invalid"),                                    # moved to another device
    (T7_H2, GOOD, "signature_invalid"),                                 # moved to another hospital
    (T7, sign(KEY, "m7", T8, BODY), "signature_invalid"),              # signed for another topic
    (T8, sign(KEY, "m7", T8, BODY), "signature_key_scope"),            # monitor-7's key signing for monitor-8
    (T7_H2, sign(KEY, "m7", T7_H2, BODY), "signature_key_scope"),      # ... or for its id in another hospital
    (T7, sign(KEY, "nobody", T7, BODY), "signature_key_unknown"),      # unregistered or revoked
    (T7, b'{"signed": "x", "sig": "!!", "kid": "m7"}', "signature_invalid"),
    (T7, b'{"signed": 1, "sig": "AA", "kid": "m7"}', "signature_invalid"),
    (T7, b'{"sig": "AA", "kid": "m7"}', "signature_invalid"),
    (T8, sign(GW_KEY, "gw", T8, BODY), "ok"),                           # a gateway covers its hospital
    (T7_H2, sign(GW_KEY, "gw", T7_H2, BODY), "signature_key_scope"),   # ... and only its hospital
])
def test_refusals(topic: str, payload: bytes, expected: str) -> None:
    assert reason(opened(topic, payload)) == expected


def test_a_wrapper_that_is_not_json_is_not_a_signature() -> None:
    """msgspec refuses a lone surrogate escape as JSON: the payload decoder dead-letters it."""
    broken = b'{"signed": "\\ud800", "sig": "AA", "kid": "m7"}'
    assert opened(T7, broken) == Opened(broken, None)
    assert reason(opened(T7, broken, required=True)) == "signature_required"


def test_unsigned_passes_unless_required() -> None:
    assert opened(T7, BODY) == Opened(BODY, None)
    unsigned, signed = opened(T7, BODY), opened(T7, GOOD, required=True)
    assert isinstance(unsigned, Opened) and not unsigned.verified
    assert reason(opened(T7, BODY, required=True)) == "signature_required"
    assert isinstance(signed, Opened) and signed.verified


def test_oversized_messages_are_left_to_the_size_check() -> None:
    big = b'{"sig": "' + b"x" * MAX_PAYLOAD_BYTES + b'"}'
    assert opened(T7, big, required=True) == Opened(big, None)


@pytest.mark.parametrize(("payload", "signed"), [
    (BODY, False),
    (b'{"seq": 1, "patient_id": "sig", "metrics": {}}', False),  # "sig" as a value, not a field
    (b'{"readings": [{"sig": 1}]}', False),                        # nested, not top level
    (b"not json \"sig\"", False),
    (GOOD, True),
    (b'{"sig": null}', True),
])
def test_is_signed_means_a_top_level_sig_field(payload: bytes, signed: bool) -> None:
    assert is_signed(payload) is signed


def test_freshness_window() -> None:
    assert not expired(1_000, 1_000 + 60_000, 60_000)
    assert expired(1_000, 1_001 + 60_000, 60_000)
    assert not expired(10_000, 5_000, 60_000)  # from the future: the payload's own ts rule applies


def test_public_keys_are_read_as_base64_url_base64_or_pem() -> None:
    raw = public_raw(KEY)
    pem = KEY.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    for text in (b64url(raw), base64.b64encode(raw).decode(), f"  {pem}\n"):
        assert parse_public_key(text) == raw
    with pytest.raises(ValueError, match="32 bytes"):
        parse_public_key(b64url(raw[:31]))
    with pytest.raises(ValueError):
        parse_public_key("not base64 at all!")
    ec_pem = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    with pytest.raises(ValueError, match="not an Ed25519"):
        parse_public_key(ec_pem)


def test_the_wrapper_is_compact_json() -> None:
    assert msgspec.json.decode(GOOD)["signed"] == BODY.decode()
