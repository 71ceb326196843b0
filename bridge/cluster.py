"""What several bridge processes on one database agree on, and how (pure, plus the SQLite case).

Two kinds of lock, both PostgreSQL advisory locks keyed by two 32-bit integers
(``class``, ``hash(name)``), so each class is its own key space:

* **Transaction-scoped** (``pg_advisory_xact_lock``), taken by a transaction on the keys its
  work touches and released by its COMMIT or ROLLBACK: a device (``DEVICE``), a patient
  (``PATIENT``), a hospital's ingest alarms (``INGEST``). Whoever holds a key is the only one
  evaluating that key's state (alarms, condition delays, device record, NEWS2 inputs, patient
  ownership); it loads the state after taking the lock and writes it back before committing,
  so the next holder, in this process or another, starts from it.

  Deadlock-free ordering: within one transaction keys are taken in :func:`lock_order`
  (class, then hash), and a later call never takes a key of a lower class than an earlier
  call did (devices first, then the patients their readings name, then hospitals). Two
  names hashing alike share a lock: more waiting, never a wrong answer.

* **Session-scoped** (``pg_advisory_lock``), held by a dedicated connection for as long as it
  lives: ``LEADER`` (the one bridge that runs the cluster's timers), ``SLOT`` (an ingest slot:
  :mod:`bridge.slots`) and ``MEMBER`` (one per live bridge process: the cluster's membership, read
  from ``pg_locks``). PostgreSQL drops them when the holder's connection ends, so a process killed
  with SIGKILL frees its leadership, slots and membership without anyone cleaning up.

With SQLite one process owns the database (a file lock), so :class:`SingleNode` is always the
leader and transaction locks are not needed (``BEGIN IMMEDIATE`` serialises every writer).

Threads: a :class:`Cluster` is used from one thread at a time (the app's timer task calls
``is_leader`` through a worker thread); the lock-key helpers are pure.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import NamedTuple, Protocol

# transaction-scoped classes, in the order a transaction may take them
DEVICE = 1
PATIENT = 2
INGEST = 3
# session-scoped classes
LEADER = 101
SLOT = 102
MIGRATIONS = 103
MEMBER = 104


class LockKey(NamedTuple):
    """One advisory lock: ``cls`` is the key space, ``name`` what it protects."""

    cls: int
    name: str

    @property
    def ids(self) -> tuple[int, int]:
        """The two int4 arguments of ``pg_advisory_*lock(int, int)``."""
        return self.cls, name_hash(self.name)


def name_hash(name: str) -> int:
    """A stable signed 32-bit hash (the same in every process, unlike ``hash()``)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4).digest(), "big", signed=True)


def device_key(device_type: str, device_id: str) -> LockKey:
    return LockKey(DEVICE, f"{device_type}/{device_id}")


def patient_key(patient_id: str) -> LockKey:
    return LockKey(PATIENT, patient_id)


def ingest_key(hospital_id: str) -> LockKey:
    return LockKey(INGEST, hospital_id)


def subject_key(subject: str) -> LockKey:
    """The lock that guards an alert subject's state (``patient:p``, ``device:t:i``, ``ingest:h``,
    ``gateway:h:g``: an edge gateway's alarms share its hospital's ingest lock)."""
    kind, _, rest = subject.partition(":")
    if kind == "patient":
        return patient_key(rest)
    if kind == "device":
        device_type, _, device_id = rest.partition(":")
        return device_key(device_type, device_id)
    if kind == "ingest":
        return ingest_key(rest)
    if kind == "gateway":
        return ingest_key(rest.partition(":")[0])
    raise ValueError(f"unknown alert subject {subject!r}")


def slot_key(slot: int) -> LockKey:
    """The session lock that makes ingest slot ``slot`` one bridge's (:mod:`bridge.slots`)."""
    return LockKey(SLOT, f"slot-{slot}")


def lock_order(keys: Iterable[LockKey]) -> list[tuple[int, int]]:
    """The distinct lock ids of ``keys`` in the one order every process takes them."""
    return sorted({key.ids for key in keys})


class Cluster(Protocol):
    """Membership of one bridge process in the cluster sharing its database."""

    def is_leader(self) -> bool:
        """Whether this process runs the cluster's timers now (tries to become it if nobody is)."""
        ...

    def hold(self, key: LockKey) -> bool:
        """Hold a session lock (taking it if free): True if this process holds it now."""
        ...

    def holding(self, key: LockKey) -> bool:
        """Still held (False once the session that held it was lost)?"""
        ...

    def release(self, key: LockKey) -> None: ...

    def census(self, member: LockKey, cls: int) -> Census | None:
        """Hold ``member`` (this process's membership) and count the live members and the locked
        keys of class ``cls``; None when the database cannot be reached (nothing is held then)."""
        ...

    def close(self) -> None: ...


class Census(NamedTuple):
    """What the database says about the cluster at one moment."""

    members: int  # live bridge processes (MEMBER locks), this one included
    locked: frozenset[int]  # unsigned 32-bit name hashes of the locked keys of the class asked for
    tags: frozenset[str] = frozenset()  # the members' tags (open_cluster's ``tag``): one when they agree


def unsigned_hash(name: str) -> int:
    """``name_hash`` as ``pg_locks.objid`` shows it (an unsigned oid)."""
    return name_hash(name) & 0xFFFFFFFF


class SingleNode:
    """One bridge per database (SQLite): always the leader, the only member, every lock its own."""

    def __init__(self) -> None:
        self._held: set[LockKey] = set()

    def is_leader(self) -> bool:
        return True

    def hold(self, key: LockKey) -> bool:
        self._held.add(key)
        return True

    def holding(self, key: LockKey) -> bool:
        return key in self._held

    def release(self, key: LockKey) -> None:
        self._held.discard(key)

    def census(self, member: LockKey, cls: int) -> Census:
        return Census(1, frozenset(unsigned_hash(k.name) for k in self._held if k.cls == cls))

    def close(self) -> None:
        pass


def open_cluster(store_url: str, node: str, tag: str = "") -> Cluster:
    """The cluster membership for the store a URL names (backend imported only when chosen).
    ``tag`` (no spaces) is shown to the other members by :meth:`Cluster.census`."""
    if store_url.startswith(("postgresql://", "postgres://")):
        from bridge.cluster_postgres import PostgresCluster

        return PostgresCluster(store_url, node, tag)
    return SingleNode()
