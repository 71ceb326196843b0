"""Cluster membership on PostgreSQL: session-level advisory locks held by one dedicated
connection per bridge process (:mod:`bridge.cluster` explains the lock classes).

    cluster = PostgresCluster("postgresql://...", node="host-1234")
    cluster.is_leader()                 # holds or takes LEADER; False while another bridge holds it
    cluster.hold(LockKey(SLOT, "3"))    # any other session lock (e.g. an ingest slot): True if ours now
    cluster.holding(LockKey(SLOT, "3")) # still ours? (False once the connection was lost)
    cluster.release(LockKey(SLOT, "3"))
    cluster.census(LockKey(MEMBER, node), SLOT)  # (live members, locked slot keys) from pg_locks
    cluster.close()                     # ends the session: PostgreSQL releases every lock at once

PostgreSQL releases a session's advisory locks when its connection ends, for whatever reason
(a clean stop, SIGKILL, a machine gone and its TCP connection timed out by keepalives), so a
survivor's next attempt takes them over. If the connection breaks, this process stops believing
it holds anything (``holding`` is False until taken again): at worst two processes both act for
a moment, which the work itself tolerates (timers lock and re-check what they act on).

Threads: one thread at a time (the app's timer task, through a worker thread).
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg

from bridge.cluster import LEADER, Census, LockKey

log = logging.getLogger("firstcare.cluster")

LEADER_KEY = LockKey(LEADER, "timers")


class PostgresCluster:
    def __init__(self, url: str, node: str, tag: str = "") -> None:
        self.url = url
        self.node = node
        self.tag = tag  # shown to the others in application_name (63 characters at most)
        self._conn: psycopg.Connection[Any] | None = None
        self._held: set[LockKey] = set()

    def _connection(self) -> psycopg.Connection[Any]:
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            self._drop()
            name = f"fc-cluster {self.tag} {self.node}" if self.tag else f"firstcare-cluster {self.node}"
            conn = self._conn = psycopg.connect(
                self.url, autocommit=True, connect_timeout=5, keepalives=1, keepalives_idle=10,
                keepalives_interval=5, keepalives_count=3, application_name=name[:63],
                options="-c statement_timeout=5000")
        return conn

    def _drop(self) -> None:
        if self._held:
            log.warning("lost the cluster session: no longer holding %s", sorted(k.name for k in self._held))
        self._held.clear()
        if self._conn is not None:
            self._conn.close()
        self._conn = None

    def hold(self, key: LockKey) -> bool:
        """Hold ``key`` (taking it if free); False if another session holds it or PostgreSQL
        cannot be reached. Checks the session is alive when the key was held already."""
        try:
            conn = self._connection()
            if key in self._held:
                conn.execute("SELECT 1")
                return True
            row = conn.execute("SELECT pg_try_advisory_lock(%s, %s)", key.ids).fetchone()
            if row and row[0]:
                self._held.add(key)
                return True
            return False
        except psycopg.Error as exc:
            log.debug("cluster lock %s not held: %s", key, exc)
            self._drop()
            return False

    def holding(self, key: LockKey) -> bool:
        return key in self._held and self._conn is not None and not self._conn.broken

    def release(self, key: LockKey) -> None:
        if key not in self._held:
            return
        self._held.discard(key)
        try:
            self._connection().execute("SELECT pg_advisory_unlock(%s, %s)", key.ids)
        except psycopg.Error:
            self._drop()

    def census(self, member: LockKey, cls: int) -> Census | None:
        """Hold ``member`` and read, from ``pg_locks``, how many members hold their lock and which
        keys of class ``cls`` are locked in this database (by anyone, this session included)."""
        if not self.hold(member):
            return None
        try:
            rows = self._connection().execute(
                "SELECT l.classid::int, l.objid::bigint, coalesce(a.application_name, '') FROM pg_locks l"
                " LEFT JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.objsubid = 2"
                " AND l.granted AND l.classid::int = ANY(%s)"
                " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                ([member.cls, cls],)).fetchall()
        except psycopg.Error as exc:
            log.debug("cluster census failed: %s", exc)
            self._drop()
            return None
        tags = frozenset(name.split(" ")[1] if name.startswith("fc-cluster ") else ""
                         for c, _, name in rows if c == member.cls)
        return Census(sum(1 for c, _, _ in rows if c == member.cls), frozenset(o for c, o, _ in rows if c == cls), tags)

    def is_leader(self) -> bool:
        return self.hold(LEADER_KEY)

    def close(self) -> None:
        self._held.clear()
        if self._conn is not None:
            self._conn.close()
            self._conn = None
