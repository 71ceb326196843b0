"""Exceptions shared by every FirstCare package.

    FirstCareError
    ├── ConfigError          a setting is missing or has a bad value (names the key)
    ├── ContractError        something violates the wire contract
    │   ├── TopicError       an MQTT topic outside the grammar
    │   └── RoomError        a room name outside the grammar
    ├── AuthError            a token is missing, invalid or expired (carries a code)
    ├── StoreError           the storage backend failed on this work (a constraint, a bug)
    │   └── StoreUnavailable the store itself cannot take writes now (locked, unreachable,
    │                        disk full or failing): retry the same work later, whole
    └── BrokerError          the embedded or external MQTT broker failed

Each carries a short machine-readable ``reason``; library errors are converted at the
boundary with ``raise ... from exc`` so callers never catch a third-party type.
"""

from __future__ import annotations


class FirstCareError(Exception):
    reason: str = "error"

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class ConfigError(FirstCareError):
    reason = "config_invalid"


class ContractError(FirstCareError):
    reason = "contract_violation"


class TopicError(ContractError):
    reason = "topic_invalid"


class RoomError(ContractError):
    reason = "room_invalid"


class AuthError(FirstCareError):
    reason = "token_invalid"


class StoreError(FirstCareError):
    reason = "store_failed"


class StoreUnavailable(StoreError):
    """Not the fault of what was being stored: the consumer keeps the batch unacknowledged
    and retries it with backoff. Any other exception is blamed on the batch's content and
    isolated to one message (see :class:`firstcare.mqtt.AckingConsumer`)."""

    reason = "store_unavailable"


class BrokerError(FirstCareError):
    reason = "broker_failed"
