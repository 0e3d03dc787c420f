"""The Redis backend (`REDIS_URL`; Valkey works too): state shared by every process.

redis-py's asyncio client, with short socket and connect timeouts (REDIS_TIMEOUT_S) and
one immediate retry (a pooled connection to a Redis that restarted fails once, then the
pool reconnects), all under a hard deadline, so an outage answers StateUnavailable in
about a second and never hangs a webhook. Nothing needs restarting when Redis comes
back: the pool opens fresh connections on the next command.

Every operation is one round trip. Where it must read and write atomically (claiming
replay keys, reserving and admitting calls, the token bucket) it is a Lua script run by
EVALSHA; times inside the scripts come from Redis's own clock (TIME), so machines with
skewed clocks still agree on when a lease expires.

Call leases are sorted sets scored by their expiry in milliseconds: `calls:live` and
`calls:reserved` for the whole cluster, `calls:proc:<process>` for one process's live
calls. Every script first drops the expired members, so a process that died without
releasing its calls (SIGKILL, a lost machine) frees their slots within CALL_LEASE_TTL_S;
live processes renew their calls' leases every CALL_LEASE_TTL_S / 3.

Note for Redis Cluster: the scripts touch several keys, which Cluster requires in one
hash slot; put the prefix in braces (STATE_KEY_PREFIX="{phonebot}:") there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress
from typing import TypeVar

import redis.asyncio as aioredis
from loguru import logger
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from phonebot.state.base import (
    Handler,
    LeaseCounts,
    SharedState,
    StateUnavailable,
    stream_token_key,
)

T = TypeVar("T")
# Between tries of the AMD-verdict listener's subscription while Redis is unreachable.
RESUBSCRIBE_S = 0.5

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

_PURGE = """
for _, key in ipairs(purge) do redis.call('ZREMRANGEBYSCORE', key, '-inf', now) end
"""

# KEYS: the keys to claim. ARGV[1]: ttl in ms. Returns 0, or the index of a key already set.
CLAIM = """
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then return i end
end
for _, key in ipairs(KEYS) do redis.call('SET', key, '1', 'NX', 'PX', ARGV[1]) end
return 0
"""

# KEYS: live, reserved. ARGV: call_sid, ttl_ms, cap. Returns 1 (reserved) or 0 (full).
RESERVE = (
    _NOW
    + "local purge = {KEYS[1], KEYS[2]}"
    + _PURGE
    + """
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 1 end
if not redis.call('ZSCORE', KEYS[2], ARGV[1]) and
   redis.call('ZCARD', KEYS[1]) + redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[3]) then
  return 0
end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[1])
return 1
"""
)

# KEYS: token, live, reserved, proc. ARGV: call_sid, token_ttl_ms, lease_ttl_ms, cap,
# process_cap, draining ("1"/"0"). Returns ok / used / process_full / draining / full.
ADMIT = (
    _NOW
    + "local purge = {KEYS[2], KEYS[3], KEYS[4]}"
    + _PURGE
    + """
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('ZSCORE', KEYS[2], ARGV[1]) then
  return 'used'
end
local reserved = redis.call('ZREM', KEYS[3], ARGV[1]) == 1
if redis.call('ZCARD', KEYS[4]) >= tonumber(ARGV[5]) then return 'process_full' end
if not reserved then
  if ARGV[6] == '1' then return 'draining' end
  if redis.call('ZCARD', KEYS[2]) + redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[4]) then
    return 'full'
  end
end
redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[2])
local expiry = now + tonumber(ARGV[3])
redis.call('ZADD', KEYS[2], expiry, ARGV[1])
redis.call('ZADD', KEYS[4], expiry, ARGV[1])
redis.call('PEXPIRE', KEYS[4], ARGV[3])
return 'ok'
"""
)

# KEYS: live, proc, then one stream-token key per call. ARGV: lease_ttl_ms, token_ttl_ms,
# then the call_sids. Re-adds leases and spent tokens a Redis restart may have lost.
RENEW = (
    _NOW
    + """
local expiry = now + tonumber(ARGV[1])
for i = 3, #ARGV do
  redis.call('ZADD', KEYS[1], expiry, ARGV[i])
  redis.call('ZADD', KEYS[2], expiry, ARGV[i])
  redis.call('SET', KEYS[i], '1', 'NX', 'PX', ARGV[2])
end
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return 1
"""
)

# KEYS: live, reserved, proc. Returns {live, reserved, process_live}.
COUNTS = (
    _NOW
    + "local purge = {KEYS[1], KEYS[2], KEYS[3]}"
    + _PURGE
    + """
return {redis.call('ZCARD', KEYS[1]), redis.call('ZCARD', KEYS[2]), redis.call('ZCARD', KEYS[3])}
"""
)

# KEYS: reserved. ARGV: call_sids. Returns those still reserved (not used, not expired).
STILL_RESERVED = (
    _NOW
    + """
local pending = {}
for _, sid in ipairs(ARGV) do
  local expiry = redis.call('ZSCORE', KEYS[1], sid)
  if expiry and tonumber(expiry) > now then table.insert(pending, sid) end
end
return pending
"""
)

# KEYS: bucket. ARGV: tokens per ms, burst. Returns the wait in ms (as a string), "0" if taken.
TAKE_TOKEN = (
    _NOW
    + """
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or burst
local last = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - last) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', now)
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate) + 1000)
return tostring(wait)
"""
)


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class RedisState(SharedState):
    backend = "redis"

    def __init__(self, url: str, prefix: str = "phonebot:", timeout_s: float = 0.5):
        self._prefix = prefix
        self._timeout_s = timeout_s
        # One retry for a stale pooled connection; the deadline bounds retries and all.
        self._deadline_s = timeout_s * 2.5 + 0.1
        self._client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1),
            decode_responses=True,
        )
        self._scripts = {
            name: self._client.register_script(source)
            for name, source in {
                "claim": CLAIM,
                "reserve": RESERVE,
                "admit": ADMIT,
                "renew": RENEW,
                "counts": COUNTS,
                "still_reserved": STILL_RESERVED,
                "take_token": TAKE_TOKEN,
            }.items()
        }
        self._handlers: dict[str, list[Handler]] = {}
        self._listener: asyncio.Task | None = None
        self.round_trips = 0

    def describe(self) -> str:
        pool = self._client.connection_pool.connection_kwargs
        return f"redis at {pool.get('host', '?')}:{pool.get('port', '?')}"

    def _key(self, key: str) -> str:
        return self._prefix + key

    def _lease_keys(self, process: str) -> tuple[str, str, str]:
        return (
            self._key("calls:live"),
            self._key("calls:reserved"),
            self._key(f"calls:proc:{process}"),
        )

    async def _call(self, operation: Callable[[], Awaitable[T]], counted: bool = True) -> T:
        """Run one round trip under the deadline; every failure becomes StateUnavailable."""
        if counted:
            self.round_trips += 1
        try:
            async with asyncio.timeout(self._deadline_s):
                return await operation()
        except TimeoutError as error:
            self._failed()
            raise StateUnavailable(f"Redis did not answer within {self._deadline_s:g} s") from error
        except (RedisError, OSError) as error:
            self._failed()
            raise StateUnavailable(f"Redis unreachable: {error}") from error

    def _failed(self) -> None:
        if self.on_error is not None:
            self.on_error()

    async def _script(
        self, name: str, keys: Sequence[str], args: Sequence, counted: bool = True
    ) -> object:
        script = self._scripts[name]
        return await self._call(lambda: script(keys=list(keys), args=list(args)), counted)

    # --- once-only keys and values --------------------------------------------------

    async def claim(self, keys: Sequence[str], ttl_s: float) -> str | None:
        found = await self._script("claim", [self._key(k) for k in keys], [_ms(ttl_s)])
        return None if not found else keys[int(found) - 1]

    async def forget(self, keys: Sequence[str]) -> None:
        if keys:
            await self._call(lambda: self._client.delete(*[self._key(k) for k in keys]))

    async def put(self, key: str, value: str, ttl_s: float) -> None:
        await self._call(lambda: self._client.set(self._key(key), value, px=_ms(ttl_s)))

    async def get(self, key: str) -> str | None:
        return await self._call(lambda: self._client.get(self._key(key)))

    async def announce(
        self, key: str, value: str, ttl_s: float, channel: str, message: str
    ) -> None:
        async def set_and_publish() -> None:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.set(self._key(key), value, px=_ms(ttl_s))
                pipe.publish(self._key(channel), message)
                await pipe.execute()

        await self._call(set_and_publish)

    def watch(self, channel: str, handler: Handler) -> None:
        self._handlers.setdefault(self._key(channel), []).append(handler)
        self._ensure_listener()

    def _ensure_listener(self) -> None:
        """Start the one pub/sub listener of this process (needs a running event loop)."""
        if self._listener is not None and not self._listener.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # started by the first watch/listen call made on a loop
        self._listener = loop.create_task(self._listen(), name="redis-state-listener")

    def listen(self) -> None:
        """Make sure the listener runs (called by readers before they wait)."""
        if self._handlers:
            self._ensure_listener()

    async def _listen(self) -> None:
        """Dispatch announcements to this process's handlers; resubscribe after outages."""
        down = False
        while True:
            pubsub = self._client.pubsub()
            try:
                await pubsub.subscribe(*self._handlers)
                if down:
                    logger.info("Shared state: Redis subscription restored")
                    down = False
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                    if message and message.get("type") == "message":
                        for handler in self._handlers.get(message["channel"], ()):
                            handler(message["data"])
            except (RedisError, OSError, TimeoutError) as error:
                if not down:
                    logger.warning(f"Shared state: Redis subscription lost ({error}); retrying")
                    down = True
                await asyncio.sleep(RESUBSCRIBE_S)
            finally:
                with suppress(Exception):  # not CancelledError: that ends the listener
                    await pubsub.aclose()

    # --- rate limits ----------------------------------------------------------------

    async def take_token(self, key: str, per_s: float, burst: float) -> float:
        wait_ms = await self._script("take_token", [self._key(key)], [per_s / 1000.0, burst])
        return float(wait_ms) / 1000.0

    # --- call leases ----------------------------------------------------------------

    async def reserve(self, call_sid: str, ttl_s: float, cap: int) -> bool:
        live, reserved, _ = self._lease_keys("-")
        return bool(await self._script("reserve", [live, reserved], [call_sid, _ms(ttl_s), cap]))

    async def admit(
        self,
        call_sid: str,
        process: str,
        *,
        token_ttl_s: float,
        lease_ttl_s: float,
        cap: int,
        process_cap: int,
        draining: bool,
    ) -> str:
        live, reserved, proc = self._lease_keys(process)
        token = self._key(stream_token_key(call_sid))
        args = [call_sid, _ms(token_ttl_s), _ms(lease_ttl_s), cap, process_cap, int(draining)]
        return str(await self._script("admit", [token, live, reserved, proc], args))

    async def renew(
        self, process: str, call_sids: Sequence[str], lease_ttl_s: float, token_ttl_s: float
    ) -> None:
        if not call_sids:
            return
        live, _, proc = self._lease_keys(process)
        tokens = [self._key(stream_token_key(sid)) for sid in call_sids]
        args = [_ms(lease_ttl_s), _ms(token_ttl_s), *call_sids]
        await self._script("renew", [live, proc, *tokens], args)

    async def release(self, process: str, call_sid: str) -> None:
        live, _, proc = self._lease_keys(process)

        async def remove() -> None:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.zrem(live, call_sid)
                pipe.zrem(proc, call_sid)
                await pipe.execute()

        await self._call(remove)

    async def counts(self, process: str, *, counted: bool = True) -> LeaseCounts:
        keys = self._lease_keys(process)
        live, reserved, process_live = await self._script("counts", keys, [], counted)
        return LeaseCounts(int(live), int(reserved), int(process_live))

    async def still_reserved(self, call_sids: Sequence[str]) -> list[str]:
        if not call_sids:
            return []
        _, reserved, _ = self._lease_keys("-")
        return list(await self._script("still_reserved", [reserved], list(call_sids)))

    # --- housekeeping ---------------------------------------------------------------

    async def ping(self) -> None:
        await self._call(self._client.ping, counted=False)

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
            self._listener = None
        with suppress(Exception):
            await self._client.aclose()
