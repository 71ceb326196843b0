"""Ingest slots: which slots a bridge claims and which it gives up (pure; docs/ingest-slots.md).

A cluster ingests through a fixed number of slots. Slot ``n`` is one persistent MQTT session,
client id ``{FC_MQTT_CLIENT_ID}-{n}``, on the shared subscription ``$share/{group}/...``; the
bridge holding the PostgreSQL session lock ``slot_key(n)`` is the only one connected with that
client id. Every bridge looks at the cluster once a tick (live members, locked slots) and moves
towards its fair share, ``ceil(slots / members)``:

* above it, it gives up its highest-numbered slots (draining each first: bridge.slot_ingest);
* below it, it tries the free slots, starting at an offset of its own so two bridges taking
  over at once mostly try different slots first.

The shares add up to at least the number of slots, so every slot has a taker as long as one
bridge lives. The plan never releases a slot it is still taking nor takes one it is giving up.

    plan_slots(total=8, members=3, held={0,1,2,3}, leaving=set(), locked={0,...,7}, start=0)
      -> SlotPlan(claim=(), want=0, release=(3,))
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection
from dataclasses import dataclass

DEFAULT_SLOTS = 8


@dataclass(frozen=True, slots=True)
class SlotPlan:
    """``release`` these now; try ``claim`` in order until ``want`` of them are taken."""

    claim: tuple[int, ...] = ()
    want: int = 0
    release: tuple[int, ...] = ()


def fair_share(total: int, members: int) -> int:
    """The most slots one bridge keeps: ``ceil(total / members)`` (all of them when alone)."""
    return math.ceil(total / max(1, members))


def plan_slots(total: int, members: int, held: Collection[int], leaving: Collection[int],
               locked: Collection[int], start: int = 0) -> SlotPlan:
    """What this bridge does this tick.

    ``held``: slots it holds or is taking; ``leaving``: slots it is draining (still locked by it,
    no longer counted as its own); ``locked``: slots any bridge holds a lock on (itself included);
    ``start``: where its search for free slots begins (e.g. a hash of its node name)."""
    target = fair_share(total, members)
    mine = sorted(held)
    if len(mine) > target:
        return SlotPlan(release=tuple(mine[target:][::-1]))
    busy = set(held) | set(leaving) | set(locked)
    order = [(start + i) % total for i in range(total)] if total else []
    free = tuple(s for s in order if s not in busy)
    want = min(target - len(mine), len(free))
    return SlotPlan(claim=free if want else (), want=want)


def slot_client_id(client_id: str, slot: int) -> str:
    """The MQTT client id of slot ``slot``'s persistent session."""
    return f"{client_id}-{slot}"


def slots_tag(client_id: str, total: int, group: str) -> str:
    """What every bridge of a cluster must agree on, as a short tag the others can compare:
    bridges with other slot client ids, counts or groups would strand the broker's queues of
    sessions nobody claims."""
    digest = hashlib.blake2b(f"{client_id}|{total}|{group}".encode(), digest_size=4).hexdigest()
    return f"slots-{digest}"


def share_filters(group: str, filters: Collection[str]) -> tuple[str, ...]:
    """The shared-subscription form of the bridge's topic filters."""
    return tuple(f"$share/{group}/{f}" for f in filters)
