"""The cluster census on the machine's PostgreSQL (bridge.cluster_postgres): members and locked
slots read from pg_locks, every lock of a session gone with its connection, and the members'
slot settings visible to each other."""

from __future__ import annotations

from bridge.cluster import MEMBER, SLOT, LockKey, slot_key, unsigned_hash
from bridge.cluster_postgres import PostgresCluster
from bridge.slots import slots_tag


def test_the_census_counts_members_and_locked_slots_and_forgets_a_closed_session(pg_url: str) -> None:
    tag = slots_tag("fc", 4, "firstcare")
    a, b = PostgresCluster(pg_url, "node-a", tag), PostgresCluster(pg_url, "node-b", tag)
    try:
        assert a.census(LockKey(MEMBER, "node-a"), SLOT) == (1, frozenset(), frozenset({tag}))
        assert a.hold(slot_key(0)) and a.hold(slot_key(1))
        assert not b.hold(slot_key(1)), "one holder per slot"
        assert b.hold(slot_key(2))
        census = b.census(LockKey(MEMBER, "node-b"), SLOT)
        assert census is not None
        assert census.members == 2
        assert census.locked == {unsigned_hash(slot_key(n).name) for n in (0, 1, 2)}
        assert census.tags == {tag}
        a.close()  # as SIGKILL would: the connection ends, its locks with it
        census = b.census(LockKey(MEMBER, "node-b"), SLOT)
        assert census is not None and census.members == 1
        assert census.locked == {unsigned_hash(slot_key(2).name)}
        assert b.hold(slot_key(1))
    finally:
        a.close()
        b.close()


def test_a_member_with_other_slot_settings_shows_its_tag(pg_url: str) -> None:
    a = PostgresCluster(pg_url, "node-a", slots_tag("fc", 4, "firstcare"))
    b = PostgresCluster(pg_url, "node-b", slots_tag("fc-other", 4, "firstcare"))
    try:
        a.census(LockKey(MEMBER, "node-a"), SLOT)
        census = b.census(LockKey(MEMBER, "node-b"), SLOT)
        assert census is not None
        assert census.tags == {slots_tag("fc", 4, "firstcare"), slots_tag("fc-other", 4, "firstcare")}
    finally:
        a.close()
        b.close()
