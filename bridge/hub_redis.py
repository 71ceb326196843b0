"""Redis hub backend: several bridge processes share rooms, history and presence.

Redis Streams are the source of truth (pub/sub silently drops a subscriber that falls behind):

    {p}room:{room}:s   per-room history, entry id "<offset>-0", MAXLEN ~ history_size, expiring
    {p}room:{room}:o   the room's last offset        {p}room:{room}:e   the room's epoch
    {p}fanout          one entry per publication (all its rooms), read by every process with
                       XREAD BLOCK from where it left off: the one path to local subscribers
    {p}presence:{room} sorted set conn -> last seen (ms), with {p}presence:{room}:i for details
    {p}seen:{room}     hash user -> last seen (ms), kept a day
    {p}ticket:{t}      single-use connection tickets (GETDEL)
                       (the fanout stream also carries ``resync``, ``presence`` and ``rights``
                       controls: a subject's refreshed claims, for every process's streams)
    {p}once:{alert}:{action}:{ts}   an alarm transition already published, kept a day

Offsets are assigned and the envelope spliced inside one Lua script, so two processes
publishing into one room can never interleave ids. History is read by another script that
compares the cursor with the room's own offsets and its first retained entry in one atomic
step: streams are trimmed approximately (``MAXLEN ~`` keeps whole nodes), so what a read
returns never decides whether the history reaches back.

When a publish fails (Redis down, a timeout: the publication may or may not have been
recorded), the rooms it touched are remembered, and before this process publishes anything
again their keys are deleted and a ``resync`` entry is added to the fanout stream, in one
script: the rooms start a new epoch, and every process tells its subscribers of those rooms to
resync. The listener does the same as soon as it reads again, so the news does not wait for the
next publication.

An alarm transition is published once however many bridges try: the publish script sets its
``once`` key and publishes in one step, and does nothing when the key exists. Two bridges
catching up alarms after an outage (bridge/fanout.py re-publishes every transition stored since
its first loss, whoever committed it) therefore deliver each transition once, and so do a
bridge's live publish and another's catch-up of the same transition.

The listener task owns ``_state`` and the fanout cursor; ``_lost_rooms`` is shared by the
publishers and the listener on one event loop, and ``_settle_lock`` serialises its reset.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import secrets
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from bridge.hub import (
    RESYNC,
    RIGHTS,
    Delivery,
    HubError,
    HubState,
    Member,
    Publication,
    coalesce_key,
    resync_publication,
)
from firstcare.events import Event, encode_ephemeral, envelope_parts, parse_event_id, splice, transition_key
from firstcare.payloads import now_ms

log = logging.getLogger("firstcare.hub")

FANOUT_MAXLEN = 100_000
PRESENCE_TTL_MS = 60_000
LAST_SEEN_TTL_S = 86_400
ONCE_TTL_S = 86_400  # how long an alarm transition is remembered as published
RESET_CHUNK = 200  # rooms per reset script (Lua's unpack has a stack limit)
MAX_OFFSET = 2**53  # Lua numbers are doubles

_PUBLISH = """
local n = tonumber(ARGV[1])
local maxlen, ttl, now, new_epoch = ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
local head, mid, tail, alert, key = ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10]
local once = KEYS[3 * n + 2]
if once and not redis.call('SET', once, '1', 'NX', 'EX', ARGV[#ARGV - 1]) then
  return false
end
local fanout = {'n', n, 'a', alert, 'k', key}
local out = {}
for i = 1, n do
  local room = ARGV[10 + i]
  local okey, ekey, skey = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  local epoch = redis.call('GET', ekey)
  if not epoch then
    epoch = new_epoch
    redis.call('SET', ekey, epoch)
  end
  local offset = redis.call('INCR', okey)
  local id = epoch .. ':' .. offset
  local data = head .. room .. mid .. id .. tail
  redis.call('XADD', skey, 'MAXLEN', '~', maxlen, offset .. '-0', 'd', data, 't', now, 'a', alert, 'k', key)
  redis.call('EXPIRE', skey, ttl)
  redis.call('EXPIRE', okey, ttl)
  redis.call('EXPIRE', ekey, ttl)
  table.insert(fanout, 'r' .. i); table.insert(fanout, room)
  table.insert(fanout, 'i' .. i); table.insert(fanout, id)
  table.insert(fanout, 'd' .. i); table.insert(fanout, data)
  table.insert(out, id)
end
redis.call('XADD', KEYS[3 * n + 1], 'MAXLEN', '~', ARGV[#ARGV], '*', unpack(fanout))
return out
"""


_RESET = """
local n = tonumber(ARGV[1])
local fanout = {'n', n, 'a', '1', 'k', '', 'c', 'resync'}
for i = 1, n do
  redis.call('DEL', KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i])
  table.insert(fanout, 'r' .. i); table.insert(fanout, ARGV[2 + i])
end
redis.call('XADD', KEYS[3 * n + 1], 'MAXLEN', '~', ARGV[2], '*', unpack(fanout))
return n
"""

_HISTORY = """
local epoch = redis.call('GET', KEYS[2])
local current = redis.call('GET', KEYS[1])
if not epoch or not current then return {'gone'} end
if epoch ~= ARGV[1] then return {'epoch'} end
current = tonumber(current)
local since = tonumber(ARGV[2])
if since > current then return {'ahead'} end
if since == current then return {'ok', current, {}} end
if current - since > tonumber(ARGV[3]) then return {'size'} end
local first = redis.call('XRANGE', KEYS[3], '-', '+', 'COUNT', 1)
if #first == 0 then return {'trimmed'} end
local first_offset = tonumber(string.match(first[1][1], '^(%d+)-'))
if first_offset > since + 1 then return {'trimmed'} end
return {'ok', current, redis.call('XRANGE', KEYS[3], '(' .. ARGV[2] .. '-0', current .. '-0')}
"""


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisBackend:
    name = "redis"

    def __init__(self, url: str, history_size: int = 1000, history_age_s: float = 3600.0, node: str = "",
                 prefix: str = "fc:hub:") -> None:
        self.url = url
        self.node = node or secrets.token_hex(4)
        self._history_size = history_size
        self._history_age_s = history_age_s
        self._ttl_s = max(60, int(history_age_s * 2))
        self._p = prefix
        self._redis = aioredis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self._reader = aioredis.Redis.from_url(url, socket_timeout=15, socket_connect_timeout=5)
        self._publish_script = self._redis.register_script(_PUBLISH)
        self._reset_script = self._redis.register_script(_RESET)
        self._history_script = self._redis.register_script(_HISTORY)
        self._deliver: Callable[[Publication], None] = lambda p: None
        self._listener: asyncio.Task[None] | None = None
        self._state: HubState = HubState.STARTING
        self._lost_rooms: set[str] = set()
        self._settle_lock = asyncio.Lock()
        self.counters = {"reconnects": 0, "read_errors": 0, "epochs_reset": 0, "alerts_already_published": 0}

    def _room_keys(self, room: str) -> list[str]:
        return [f"{self._p}room:{room}:o", f"{self._p}room:{room}:e", f"{self._p}room:{room}:s"]

    async def start(self, deliver: Callable[[Publication], None]) -> None:
        self._deliver = deliver
        try:
            last = await self._redis.xrevrange(f"{self._p}fanout", count=1)
            self._state = HubState.OK
        except RedisError as exc:
            log.warning("Redis hub unreachable at start (%s); will keep trying", exc)
            last = []
            self._state = HubState.DEGRADED
        start_id = _s(last[0][0]) if last else "0-0"
        self._listener = asyncio.create_task(self._listen(start_id), name="fc-hub-redis")

    async def stop(self) -> None:
        if self._listener is not None:
            # redis-py can swallow a cancellation that lands while a blocking XREAD returns;
            # cancel until the task has really ended.
            for _ in range(20):
                self._listener.cancel()
                done, _ = await asyncio.wait([self._listener], timeout=0.5)
                if done:
                    break
        await self._redis.aclose()
        await self._reader.aclose()

    async def _listen(self, last_id: str) -> None:
        """The one loop that feeds local subscribers, from where it left off, across outages."""
        failures = 0
        rng = random.Random()
        while True:
            try:
                await self._settle_lost_rooms()
                replies = await self._reader.xread({f"{self._p}fanout": last_id}, count=500, block=2000)
                if self._state != HubState.OK:
                    log.info("Redis hub connection restored")
                    self.counters["reconnects"] += 1
                self._state = HubState.OK
                failures = 0
                for _stream, entries in replies or ():
                    for entry_id, fields in entries:
                        last_id = _s(entry_id)
                        self._deliver(self._publication(fields))
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                self.counters["read_errors"] += 1
                if self._state == HubState.OK:
                    log.warning("Redis hub connection lost: %s", exc)
                self._state = HubState.DEGRADED
                delay = rng.uniform(0, min(10.0, 0.2 * 2 ** failures)) + 0.1
                failures += 1
                await asyncio.sleep(delay)

    @staticmethod
    def _publication(fields: dict[bytes, bytes]) -> Publication:
        n = int(fields[b"n"])
        control = _s(fields.get(b"c", b""))
        if control == RESYNC:
            return resync_publication(_s(fields[f"r{i}".encode()]) for i in range(1, n + 1))
        if control == RIGHTS:  # another process's refreshed claims: see Hub.announce_rights
            return Publication((Delivery("", "", fields[b"v"]),), RIGHTS, _s(fields[b"o"]))
        if control == "presence":
            return Publication(tuple(Delivery(_s(fields[f"r{i}".encode()]), "", fields[f"d{i}".encode()])
                                     for i in range(1, n + 1)), "presence", _s(fields[b"o"]))
        alert = fields[b"a"] == b"1"
        key = _s(fields[b"k"]) or None
        return Publication(tuple(
            Delivery(_s(fields[f"r{i}".encode()]), _s(fields[f"i{i}".encode()]), fields[f"d{i}".encode()], alert, key)
            for i in range(1, n + 1)
        ))

    async def _settle_lost_rooms(self) -> None:
        """Start the rooms that missed publications over in a new epoch, and have every process
        tell their subscribers, before anything else is published into them. Raises RedisError
        (the rooms stay pending)."""
        if not self._lost_rooms and not self._settle_lock.locked():
            return
        async with self._settle_lock:
            while self._lost_rooms:
                chunk = sorted(self._lost_rooms)[:RESET_CHUNK]
                keys = [k for room in chunk for k in self._room_keys(room)] + [f"{self._p}fanout"]
                await self._reset_script(keys=keys, args=[len(chunk), FANOUT_MAXLEN, *chunk])
                self._lost_rooms.difference_update(chunk)
                self.counters["epochs_reset"] += len(chunk)
                log.info("new epoch for %d room(s) that missed publications; their clients are told to resync",
                         len(chunk))

    async def publish(self, event: Event, rooms: list[str]) -> Publication:
        if not rooms:
            return Publication(())
        head, mid, tail = envelope_parts(event)
        key = coalesce_key(event) or ""
        keys = [k for room in rooms for k in self._room_keys(room)] + [f"{self._p}fanout"]
        transition = transition_key(event)
        if transition is not None:
            keys.append(f"{self._p}once:{transition[0]}:{transition[1]}:{transition[2]}")
        args: list[Any] = [len(rooms), self._history_size, self._ttl_s, now_ms(), secrets.token_hex(4),
                           head, mid, tail, "1" if event.is_alert else "0", key, *rooms, ONCE_TTL_S, FANOUT_MAXLEN]
        try:
            await self._settle_lost_rooms()
            ids = await self._publish_script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            self._lost_rooms.update(rooms)
            self._state = HubState.DEGRADED
            raise HubError(f"Redis hub publish failed: {exc}") from exc
        if ids is None:
            self.counters["alerts_already_published"] += 1
            return Publication(())
        return Publication(tuple(
            Delivery(room, _s(id), splice((head, mid, tail), room, _s(id)), event.is_alert, key or None)
            for room, id in zip(rooms, ids, strict=True)
        ))

    async def history(self, room: str, since: str) -> list[Delivery] | None:
        try:
            epoch, offset = parse_event_id(since)
        except ValueError:
            return None
        if offset >= MAX_OFFSET:
            return None
        try:
            reply = await self._history_script(keys=self._room_keys(room),
                                               args=[epoch, str(offset), self._history_size])
        except (RedisError, OSError) as exc:
            raise HubError(f"Redis hub history failed: {exc}") from exc
        if _s(reply[0]) != "ok":
            return None  # epoch changed or gone, cursor ahead, more missed than kept, or trimmed
        current, entries = int(reply[1]), reply[2]
        decoded = []
        for entry_id, flat in entries:
            fields = dict(zip(flat[::2], flat[1::2], strict=True))
            decoded.append((int(_s(entry_id).split("-")[0]), fields))
        if [o for o, _ in decoded] != list(range(offset + 1, current + 1)):
            return None  # not contiguous: never hand out a partial replay
        cutoff = now_ms() - int(self._history_age_s * 1000)
        if decoded and int(decoded[0][1][b"t"]) < cutoff:
            return None
        return [Delivery(room, f"{epoch}:{o}", fields[b"d"], fields[b"a"] == b"1", _s(fields[b"k"]) or None)
                for o, fields in decoded]

    async def announce(self, event: Event, rooms: list[str], origin: str) -> None:
        if not rooms:
            return
        fields: dict[str, Any] = {"n": len(rooms), "a": "0", "k": "", "c": "presence", "o": origin}
        for i, room in enumerate(rooms, start=1):
            fields[f"r{i}"], fields[f"i{i}"], fields[f"d{i}"] = room, "", encode_ephemeral(event, room)
        try:
            await self._redis.xadd(f"{self._p}fanout", fields, maxlen=FANOUT_MAXLEN, approximate=True)
        except (RedisError, OSError) as exc:
            raise HubError(f"Redis hub announce failed: {exc}") from exc

    async def announce_rights(self, claims: str, origin: str) -> None:
        fields = {"n": 0, "a": "0", "k": "", "c": RIGHTS, "o": origin, "v": claims}
        try:
            await self._redis.xadd(f"{self._p}fanout", fields, maxlen=FANOUT_MAXLEN, approximate=True)
        except (RedisError, OSError) as exc:
            raise HubError(f"Redis hub rights announcement failed: {exc}") from exc

    async def position(self, room: str) -> str | None:
        okey, ekey, _ = self._room_keys(room)
        try:
            epoch, offset = await self._redis.mget(ekey, okey)
        except RedisError as exc:
            raise HubError(f"Redis hub position failed: {exc}") from exc
        return f"{_s(epoch)}:{int(offset)}" if epoch is not None and offset is not None else None

    async def presence_join(self, room: str, member: Member) -> None:
        await self.presence_refresh([(room, member)])

    async def presence_leave(self, room: str, member: Member) -> None:
        seen = f"{self._p}seen:{room}"
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.zrem(f"{self._p}presence:{room}", member.conn_id)
                pipe.hdel(f"{self._p}presence:{room}:i", member.conn_id)
                pipe.hset(seen, member.user, now_ms()).expire(seen, LAST_SEEN_TTL_S)
                await pipe.execute()
        except RedisError as exc:
            log.debug("presence leave failed: %s", exc)

    async def presence_refresh(self, memberships: list[tuple[str, Member]]) -> None:
        if not memberships:
            return
        now = now_ms()
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for room, m in memberships:
                    zkey, hkey = f"{self._p}presence:{room}", f"{self._p}presence:{room}:i"
                    seen = f"{self._p}seen:{room}"
                    pipe.zadd(zkey, {m.conn_id: now})
                    pipe.hset(hkey, m.conn_id, json.dumps({"user": m.user, "node": m.node, "joined_ms": m.joined_ms}))
                    pipe.expire(zkey, PRESENCE_TTL_MS // 1000 * 2).expire(hkey, PRESENCE_TTL_MS // 1000 * 2)
                    pipe.hset(seen, m.user, now).expire(seen, LAST_SEEN_TTL_S)
                await pipe.execute()
        except RedisError as exc:
            log.debug("presence refresh failed: %s", exc)

    async def presence(self, room: str) -> list[dict[str, Any]]:
        zkey, hkey = f"{self._p}presence:{room}", f"{self._p}presence:{room}:i"
        try:
            await self._redis.zremrangebyscore(zkey, "-inf", now_ms() - PRESENCE_TTL_MS)
            members = await self._redis.zrange(zkey, 0, -1, withscores=True)
            details = await self._redis.hmget(hkey, [m for m, _ in members]) if members else []
        except RedisError as exc:
            raise HubError(f"Redis hub presence failed: {exc}") from exc
        out = []
        for (conn, seen), info in zip(members, details, strict=True):
            if info is None:
                continue
            meta = json.loads(info)
            out.append({"conn_id": _s(conn), "user": meta["user"], "node": meta["node"],
                        "joined_ms": meta["joined_ms"], "last_seen_ms": int(seen)})
        return out

    async def last_seen(self, room: str) -> dict[str, int]:
        try:
            seen = await self._redis.hgetall(f"{self._p}seen:{room}")
        except RedisError as exc:
            raise HubError(f"Redis hub last seen failed: {exc}") from exc
        cutoff = now_ms() - LAST_SEEN_TTL_S * 1000
        return {_s(user): int(at) for user, at in seen.items() if int(at) >= cutoff}

    async def put_ticket(self, ticket: str, value: str, ttl_s: int) -> None:
        try:
            await self._redis.set(f"{self._p}ticket:{ticket}", value, ex=ttl_s, nx=True)
        except RedisError as exc:
            raise HubError(f"Redis hub ticket failed: {exc}") from exc

    async def take_ticket(self, ticket: str) -> str | None:
        try:
            value = await self._redis.getdel(f"{self._p}ticket:{ticket}")
        except RedisError as exc:
            raise HubError(f"Redis hub ticket failed: {exc}") from exc
        return _s(value) if value is not None else None

    def mark_lost(self, rooms: list[str]) -> None:
        self._lost_rooms.update(rooms)

    def state(self) -> HubState:
        return self._state

    def stats(self) -> dict[str, Any]:
        return {**self.counters, "lost_rooms_pending": len(self._lost_rooms)}
