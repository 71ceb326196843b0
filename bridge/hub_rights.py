"""A refreshed token narrows its subject's streams on every bridge, not only on the one it was sent to.

    bridge A: {"type": "auth"} -> Realtime.refresh narrows A's streams of the subject
              -> announce_rights: the claims on the hub's fan-out stream (Redis)
    bridge B: Hub.on_rights -> rights_from_elsewhere -> Realtime.narrow(claims): B's streams of
              the subject leave the rooms the claims no longer allow (``forbidden``)

The claims travel as the ticket payload does (sub, role, exp, hospitals, patients). An
announcement that cannot be made (Redis down) is counted and logged: the other bridges' streams
keep their rooms until their own token is refreshed or expires, as every stream ends at its
token's expiry. Everything here runs on the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from bridge.hub import Hub, HubError
from firstcare.auth import claims_from_payload
from firstcare.permissions import Claims

log = logging.getLogger("firstcare.realtime")
_pending: set[asyncio.Task[None]] = set()  # narrowing tasks under way (referenced until done)


def rights_payload(claims: Claims) -> str:
    return json.dumps({"sub": claims.sub, "role": claims.role, "exp": claims.exp,
                       "hospitals": sorted(claims.hospitals), "patients": sorted(claims.patients)})


def announce_rights(hub: Hub, claims: Claims) -> None:
    """Announce in the background: a refresh never waits for Redis (nor for its timeout)."""
    task = asyncio.get_running_loop().create_task(_announce(hub, claims), name="fc-rights-announce")
    _pending.add(task)
    task.add_done_callback(_pending.discard)


async def _announce(hub: Hub, claims: Claims) -> None:
    try:
        await hub.announce_rights(rights_payload(claims))
    except HubError as exc:
        hub.counters.rights_unannounced += 1
        log.warning("a refreshed token narrowed this bridge's streams only: %s", exc)


def rights_from_elsewhere(realtime: Any, payload: str) -> None:
    """Hub.on_rights: apply another bridge's refresh to this one's streams of the subject."""
    try:
        claims = claims_from_payload(json.loads(payload))
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("ignored a malformed rights announcement: %s", exc)
        return
    realtime.hub.counters.rights_received += 1
    if not any(c.claims.sub == claims.sub for c in realtime.connections.values()):
        return
    task = asyncio.get_running_loop().create_task(realtime.narrow(claims), name="fc-rights")
    _pending.add(task)
    task.add_done_callback(_pending.discard)
