"""The Redis job queue: one stream per queue, read through one consumer group.

Per queue (keys in ``keys.py``):
- the stream holds messages that are ready or leased; acknowledging deletes the entry, so
  its length is the queue depth (with the delayed set);
- ``delayed`` (sorted set by due time) holds messages enqueued or released with a delay; a
  claim first moves the due ones into the stream;
- ``leases`` (sorted set by expiry) holds the stream entries currently leased.

Lease expiry is kept per entry rather than read from the consumer group's idle time
(XAUTOCLAIM's min-idle): idle time can only be compared with the *claimer's* lease, so a
worker claiming with a short lease would take a message another worker holds under a long
one. A claim re-takes an expired entry with XCLAIM, which bumps the group's delivery counter;
that counter is the fencing token in the receipt (``<entry id>|<deliveries>|<worker>``), so a
worker that lost its lease cannot ack, extend or release the next holder's claim. Extending
uses XCLAIM JUSTID, which resets the idle time without counting a delivery.

Each operation is one Lua script, so it is atomic on the server. A message keeps its
lorafleet id across redeliveries and re-adds (it is a field of the entry, not the entry id),
and ``attempts`` = attempts before the last re-add + deliveries of the current entry.
"""

from __future__ import annotations

import json
from typing import Any

import redis

from lorafleet.platform.domain.errors import Conflict, Unavailable
from lorafleet.platform.queue._common import (
    bad_receipt,
    check_claim,
    check_delay,
    check_enqueue,
    check_lease,
    new_message_id,
)
from lorafleet.platform.queue.base import Message
from lorafleet.platform.queue.keys import RedisKeys, validate_queue_name

DEFAULT_DEDUPE_TTL_SECONDS = 7 * 24 * 3600
"""How long a dedupe key keeps answering with its first message id."""

# Server time in ms, so every lease and delay is measured by one clock.
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: stream, delayed[, dedupe]   ARGV: id, payload, delay_ms, dedupe_ttl_s
_ENQUEUE = _NOW + """
if #KEYS == 3 then
  local existing = redis.call('GET', KEYS[3])
  if existing then return existing end
  redis.call('SET', KEYS[3], ARGV[1], 'EX', ARGV[4])
end
local delay = tonumber(ARGV[3])
if delay > 0 then
  redis.call('ZADD', KEYS[2], now + delay, cjson.encode({id = ARGV[1], payload = ARGV[2], attempts = 0}))
else
  redis.call('XADD', KEYS[1], '*', 'id', ARGV[1], 'payload', ARGV[2], 'attempts', '0')
end
return ARGV[1]
"""

# KEYS: stream, delayed, leases   ARGV: group, consumer, lease_ms
# Returns {entry id, flat fields, deliveries} or nil.
_CLAIM = _NOW + """
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 100)
for _, member in ipairs(due) do
  local m = cjson.decode(member)
  redis.call('XADD', KEYS[1], '*', 'id', m.id, 'payload', m.payload, 'attempts', tostring(m.attempts))
  redis.call('ZREM', KEYS[2], member)
end
redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
local lease_until = now + tonumber(ARGV[3])
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, 16)
for _, eid in ipairs(expired) do
  local claimed = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, eid)
  if claimed[1] and claimed[1][2] then
    redis.call('ZADD', KEYS[3], lease_until, eid)
    local pending = redis.call('XPENDING', KEYS[1], ARGV[1], eid, eid, 1)
    return {eid, claimed[1][2], pending[1][4]}
  end
  redis.call('ZREM', KEYS[3], eid)
end
local read = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', 1, 'STREAMS', KEYS[1], '>')
if read and read[1] and read[1][2][1] then
  local entry = read[1][2][1]
  redis.call('ZADD', KEYS[3], lease_until, entry[1])
  return {entry[1], entry[2], 1}
end
return nil
"""

# Is (entry, deliveries) still held by this consumer? Used by the three scripts below.
_HELD = """
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #pending == 0 or pending[1][2] ~= ARGV[2] or pending[1][4] ~= tonumber(ARGV[4]) then
  return 0
end
"""

# KEYS: stream, leases   ARGV: group, consumer, entry id, deliveries, lease_ms
_EXTEND = _NOW + _HELD + """
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[5]), ARGV[3])
return 1
"""

# KEYS: stream, leases, delayed   ARGV: group, consumer, entry id, deliveries, mode, delay_ms
_FINISH = _NOW + _HELD + """
local entry = redis.call('XRANGE', KEYS[1], ARGV[3], ARGV[3])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
redis.call('ZREM', KEYS[2], ARGV[3])
if ARGV[5] == 'release' and entry[1] then
  local f = {}
  local fields = entry[1][2]
  for i = 1, #fields, 2 do f[fields[i]] = fields[i + 1] end
  local attempts = tonumber(f['attempts']) + tonumber(ARGV[4])
  local delay = tonumber(ARGV[6])
  if delay > 0 then
    local member = cjson.encode({id = f['id'], payload = f['payload'], attempts = attempts})
    redis.call('ZADD', KEYS[3], now + delay, member)
  else
    redis.call('XADD', KEYS[1], '*', 'id', f['id'], 'payload', f['payload'], 'attempts', tostring(attempts))
  end
end
return 1
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000)) if seconds > 0 else 0


class RedisQueue:
    def __init__(self, client: redis.Redis, prefix: str, *,
                 dedupe_ttl_seconds: int = DEFAULT_DEDUPE_TTL_SECONDS) -> None:
        self._client = client
        self._keys = RedisKeys(prefix)
        self._dedupe_ttl = dedupe_ttl_seconds
        self._enqueue = client.register_script(_ENQUEUE)
        self._claim = client.register_script(_CLAIM)
        self._extend = client.register_script(_EXTEND)
        self._finish = client.register_script(_FINISH)

    def enqueue(self, queue: str, payload: dict[str, Any], *, dedupe_key: str | None = None,
                delay_seconds: float = 0.0) -> str:
        payload_json = check_enqueue(queue, payload, dedupe_key, delay_seconds)
        keys = [self._keys.queue_stream(queue), self._keys.queue_delayed(queue)]
        if dedupe_key is not None:
            keys.append(self._keys.queue_dedupe(queue, dedupe_key))
        result = self._run(self._enqueue, keys,
                           [new_message_id(), payload_json, _ms(delay_seconds), self._dedupe_ttl])
        return _text(result)

    def claim(self, queue: str, *, worker: str, lease_seconds: float) -> Message | None:
        check_claim(queue, worker, lease_seconds)
        keys = [self._keys.queue_stream(queue), self._keys.queue_delayed(queue),
                self._keys.queue_leases(queue)]
        result = self._run(self._claim, keys, [self._keys.queue_group, worker, _ms(lease_seconds)])
        if not result:
            return None
        entry_id, flat, deliveries = _text(result[0]), result[1], int(result[2])
        fields = {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat), 2)}
        return Message(
            id=fields["id"], queue=queue, payload=json.loads(fields["payload"]),
            attempts=int(fields["attempts"]) + deliveries,
            receipt=f"{entry_id}|{deliveries}|{worker}",
        )

    def extend(self, message: Message, *, lease_seconds: float) -> bool:
        check_lease(lease_seconds)
        entry_id, deliveries, worker = self._parse(message)
        keys = [self._keys.queue_stream(message.queue), self._keys.queue_leases(message.queue)]
        args = [self._keys.queue_group, worker, entry_id, deliveries, _ms(lease_seconds)]
        return bool(self._run(self._extend, keys, args))

    def ack(self, message: Message) -> None:
        self._finish_claim(message, mode="ack", delay_seconds=0.0)

    def release(self, message: Message, *, delay_seconds: float = 0.0) -> None:
        check_delay(delay_seconds)
        self._finish_claim(message, mode="release", delay_seconds=delay_seconds)

    def depth(self, queue: str) -> int:
        validate_queue_name(queue)
        try:
            with self._client.pipeline(transaction=True) as pipe:
                pipe.xlen(self._keys.queue_stream(queue))
                pipe.zcard(self._keys.queue_delayed(queue))
                ready, delayed = pipe.execute()
        except redis.RedisError as exc:
            raise Unavailable(f"Redis unavailable: {exc}", code="queue_unavailable") from exc
        return int(ready) + int(delayed)

    # -- internals -----------------------------------------------------------------------

    def _finish_claim(self, message: Message, *, mode: str, delay_seconds: float) -> None:
        entry_id, deliveries, worker = self._parse(message)
        keys = [self._keys.queue_stream(message.queue), self._keys.queue_leases(message.queue),
                self._keys.queue_delayed(message.queue)]
        args = [self._keys.queue_group, worker, entry_id, deliveries, mode, _ms(delay_seconds)]
        if not self._run(self._finish, keys, args):
            raise Conflict(f"message {message.id} is no longer held by this receipt (lease expired and "
                           "re-claimed, released, or already acknowledged)", code="lease_lost")

    @staticmethod
    def _parse(message: Message) -> tuple[str, int, str]:
        try:
            entry_id, deliveries, worker = message.receipt.split("|", 2)
            return entry_id, int(deliveries), worker
        except ValueError:
            raise bad_receipt(message.receipt) from None

    @staticmethod
    def _run(script: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            return script(keys=keys, args=args)
        except redis.ConnectionError as exc:
            raise Unavailable(f"Redis unavailable: {exc}", code="queue_unavailable") from exc
        except redis.TimeoutError as exc:
            raise Unavailable(f"Redis timed out: {exc}", code="queue_unavailable") from exc
