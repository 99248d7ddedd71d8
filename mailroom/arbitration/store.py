"""What replicas share in Redis, and the Sidekiq queues GitLab's ``delivery_method: sidekiq``
pushes to: the only module that imports redis.

Keys, all under ``arbitration.namespace`` (``ns``):

- ``ns:replicas``: a sorted set of live replicas, each scored with the time its heartbeat
  expires (Redis's own clock, so replicas' clocks do not matter);
- ``ns:lease:<mailbox id>``: ``"<mailbox key>/<replica id> <fencing number>"`` with a TTL, set
  only if absent; the mailbox key (16 hex digits of ``identity.mailbox_key``: host, port, user,
  folder) tells a lease of another mailbox under the same id (another deployment in the same
  namespace) from one of ours. ``ns:fence:<mailbox id>`` counts the leases ever given for the
  mailbox (the fencing number);
- ``ns:delivered:<webhook-id>``: the outcome of a message that was settled (or is about to be),
  with a TTL of ``marker_ttl``: a new owner that finds it settles without posting again. A
  webhook-id names the mailbox on its server and the message (``identity``), so no two
  mailboxes share a marker;
- ``ns:notice:<digest of sender, recipient and reason>``: the reject-notice rate limit, shared;
- with ``mail_room_claims`` (a migration from the MailRoom gem): MailRoom's own claim of a
  message, ``<MailRoom's ns>:delivered:<uid>``, set if absent for ``MAIL_ROOM_CLAIM_S`` as
  MailRoom sets it, with a value of mailroom's (MailRoom writes ``1``).

Every change that must be atomic is one Lua script (Redis runs a script without interleaving).
Every call is bounded by ``COMMAND_TIMEOUT_S`` and made once: a failure surfaces at once as
``ArbitrationError`` (retrying is the caller's decision, with its deadlines in mind).
Redis Cluster is not supported (a script touches keys of many mailboxes); Sentinel is.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelManagedSSLConnection
from redis.backoff import NoBackoff

from mailroom.config import ArbitrationConfig
from mailroom.errors import ArbitrationError
from mailroom.trust import tls

__all__ = [
    "COMMAND_TIMEOUT_S",
    "MAIL_ROOM_CLAIM_S",
    "Lease",
    "RedisQueue",
    "RedisStore",
]

COMMAND_TIMEOUT_S = 2.0
MAIL_ROOM_CLAIM_S = 600  # MailRoom::Arbitration::Redis::EXPIRATION
T = TypeVar("T")

# KEYS: lease, fence. ARGV: replica id, ttl ms. The lease value, or nil when it is held.
_ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local value = ARGV[1] .. ' ' .. redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
return value
"""
# KEYS: leases. ARGV: ttl ms, then the value each lease must still have. 1 renewed; 2 taken
# again (the key was gone: Redis restarted without its data, and nobody else took it); 0 lost
# (another replica holds it).
_RENEW = """
local out = {}
for i, key in ipairs(KEYS) do
  local value = redis.call('GET', key)
  if value == ARGV[i + 1] then
    redis.call('PEXPIRE', key, ARGV[1])
    out[i] = 1
  elseif not value then
    redis.call('SET', key, ARGV[i + 1], 'PX', ARGV[1])
    out[i] = 2
  else
    out[i] = 0
  end
end
return out
"""
# KEYS: leases. ARGV: the value each must still have. Deletes only our own.
_RELEASE = """
local n = 0
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[i] then n = n + redis.call('DEL', key) end
end
return n
"""
# KEYS: MailRoom's claim. ARGV: our value, ttl s. nil when we claimed it, else the value there.
_CLAIM = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then return false end
return redis.call('GET', KEYS[1])
"""
# KEYS: claims. ARGV: ttl s, then the value each must still have. Extends only our own.
_EXTEND = """
local n = 0
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[i + 1] then n = n + redis.call('EXPIRE', key, ARGV[1]) end
end
return n
"""
# KEYS: the replica set. ARGV: replica id, ttl ms (0: leave). The number of live replicas.
_HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if tonumber(ARGV[2]) > 0 then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
else
  redis.call('ZREM', KEYS[1], ARGV[1])
end
return redis.call('ZCARD', KEYS[1])
"""


KEY_DIGITS = 16  # of the mailbox key in a lease


@dataclass(frozen=True, slots=True)
class Lease:
    """A mailbox's lease as stored: for which mailbox, who holds it, its fencing number."""

    mailbox: str
    value: str  # "<mailbox key>/<replica id> <fence>", compared on renew and release

    @property
    def replica(self) -> str:
        return self.value.rpartition(" ")[0].rpartition("/")[2]

    @property
    def fence(self) -> int:
        return int(self.value.rpartition(" ")[2])

    @property
    def mailbox_key(self) -> str | None:
        """The mailbox key the holder gave (None: a lease of a version before 0.2)."""
        holder = self.value.rpartition(" ")[0]
        return holder.partition("/")[0] if "/" in holder else None

    def held_for_another(self, key: str) -> bool:
        """Held for a mailbox other than the one whose ``identity.mailbox_key`` is ``key``."""
        mine = self.mailbox_key
        return mine is not None and mine != key[:KEY_DIGITS]


def _tls_connection(base: type[Any], context: ssl.SSLContext) -> type[Any]:
    """``base`` (redis-py's TLS connection class) using mailroom's TLS context, so Redis
    trusts what every other client trusts (``mailroom.tls``)."""

    class Connection(base):  # type: ignore[misc]
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.ssl_context.context = context  # redis-py builds one only when this is None

    return Connection


def _client(config: ArbitrationConfig) -> tuple[aioredis.Redis, list[aioredis.Redis]]:
    """The client of the master, and the clients of the sentinels (to be closed as well)."""
    password = config.password.reveal() if config.password is not None else None
    common: dict[str, Any] = {
        "username": config.username,
        "password": password,
        "socket_timeout": COMMAND_TIMEOUT_S,
        "socket_connect_timeout": COMMAND_TIMEOUT_S,
        "retry": Retry(NoBackoff(), 0),  # once: the lease loop decides about retries
        "decode_responses": True,
    }
    context = None
    if config.tls:
        context = tls.client_context(ca_file=config.ca_file, verify=config.tls_verify)
    if config.sentinels:
        sentinel_kwargs: dict[str, Any] = {
            "socket_timeout": COMMAND_TIMEOUT_S,
            "socket_connect_timeout": COMMAND_TIMEOUT_S,
        }
        if config.sentinel_password is not None:
            sentinel_kwargs["password"] = config.sentinel_password.reveal()
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(config.sentinels), sentinel_kwargs=sentinel_kwargs
        )
        extra: dict[str, Any] = {}
        if context is not None:
            extra["connection_class"] = _tls_connection(SentinelManagedSSLConnection, context)
            extra["ssl"] = True
        client: aioredis.Redis = sentinel.master_for(
            config.master_name or "", db=config.db, **common, **extra
        )
        return client, list(sentinel.sentinels)
    if config.url is None:  # the config requires url or sentinels
        raise ArbitrationError("arbitration: neither url nor sentinels", misconfigured=True)
    if config.url.startswith("unix:"):
        socket_path = config.url.removeprefix("unix://")
        return aioredis.Redis(unix_socket_path=socket_path, db=config.db, **common), []
    parts = urlsplit(config.url)
    connection_class: type[Any] = aioredis.Connection
    kwargs: dict[str, Any] = {}
    if context is not None:
        connection_class = _tls_connection(aioredis.SSLConnection, context)
        kwargs["ssl_check_hostname"] = config.tls_verify
    pool = aioredis.ConnectionPool(
        connection_class=connection_class,
        host=unquote(parts.hostname or "localhost"),
        port=parts.port or 6379,
        db=config.db,
        **common,
        **kwargs,
    )
    return aioredis.Redis.from_pool(pool), []  # the client owns the pool and closes it


def _key_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


class RedisStore:
    """The Redis side of arbitration for one replica (``replica``: its id)."""

    def __init__(self, config: ArbitrationConfig, *, replica: str) -> None:
        self.config = config
        self.replica = replica
        self.where = config.describe()
        ns = config.namespace
        self._ns = ns
        self._replicas = f"{ns}:replicas"
        self._redis, self._sentinels = _client(config)
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._renew = self._redis.register_script(_RENEW)
        self._release = self._redis.register_script(_RELEASE)
        self._heartbeat = self._redis.register_script(_HEARTBEAT)
        self._claim = self._redis.register_script(_CLAIM)
        self._extend = self._redis.register_script(_EXTEND)

    def lease_key(self, mailbox: str) -> str:
        return f"{self._ns}:lease:{mailbox}"

    def _marker_key(self, webhook_id: str) -> str:
        return f"{self._ns}:delivered:{webhook_id}"

    async def _call(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT_S * 2):
                return await call()
        except TimeoutError as exc:
            raise ArbitrationError(f"{what}: Redis at {self.where} did not answer in time") from exc
        except redis.exceptions.AuthenticationError as exc:
            raise ArbitrationError(
                f"{what}: Redis at {self.where} refused the password; check "
                "arbitration.password (or password_file) and username",
                misconfigured=True,
            ) from exc
        except redis.exceptions.ResponseError as exc:
            text = str(exc).split("\n")[0][:200]
            misconfigured = any(w in text for w in ("NOAUTH", "WRONGPASS", "NOPERM", "DB index"))
            raise ArbitrationError(
                f"{what}: Redis at {self.where} answered: {text}", misconfigured=misconfigured
            ) from exc
        except (redis.exceptions.RedisError, OSError) as exc:
            reason = str(exc).split("\n")[0][:200] or type(exc).__name__
            raise ArbitrationError(f"{what}: Redis at {self.where}: {reason}") from exc

    async def ping(self) -> None:
        await self._call("PING", self._redis.ping)

    async def heartbeat(self, ttl_s: float) -> int:
        """Announce this replica for ``ttl_s`` (0: leave); the number of live replicas."""
        args: list[str | int] = [self.replica, int(ttl_s * 1000)]
        count = await self._call("heartbeat", lambda: self._heartbeat([self._replicas], args))
        return int(count)

    async def holders(self, mailboxes: Sequence[str]) -> dict[str, Lease | None]:
        """Who holds each mailbox's lease now (None: free)."""
        if not mailboxes:
            return {}
        keys = [self.lease_key(m) for m in mailboxes]
        values = await self._call("MGET", lambda: self._redis.mget(keys))
        return {m: Lease(m, str(v)) if v else None for m, v in zip(mailboxes, values, strict=True)}

    async def acquire(self, mailbox: str, ttl_s: float, key: str) -> Lease | None:
        """The lease of ``mailbox`` (whose ``identity.mailbox_key`` is ``key``) if it was free
        (now ours), else None."""
        keys = [self.lease_key(mailbox), f"{self._ns}:fence:{mailbox}"]
        args: list[str | int] = [f"{key[:KEY_DIGITS]}/{self.replica}", int(ttl_s * 1000)]
        value = await self._call("acquire", lambda: self._acquire(keys, args))
        return Lease(mailbox, str(value)) if value else None

    async def renew(self, leases: Sequence[Lease], ttl_s: float) -> list[bool]:
        """Extend each lease still ours by ``ttl_s`` (taking it again where its key is gone,
        as after a Redis restart); False where another replica holds it now."""
        if not leases:
            return []
        keys = [self.lease_key(lease.mailbox) for lease in leases]
        args: list[str | int] = [int(ttl_s * 1000), *(lease.value for lease in leases)]
        result = await self._call("renew", lambda: self._renew(keys, args))
        return [bool(flag) for flag in result]

    async def release(self, leases: Sequence[Lease]) -> None:
        """Give up leases that are still ours."""
        if leases:
            keys = [self.lease_key(lease.mailbox) for lease in leases]
            values = [lease.value for lease in leases]
            await self._call("release", lambda: self._release(keys, values))

    async def delivered(self, webhook_id: str) -> str | None:
        """The outcome a replica recorded for ``webhook_id``, or None."""
        value = await self._call("marker", lambda: self._redis.get(self._marker_key(webhook_id)))
        return str(value) if value is not None else None

    async def record(self, webhook_id: str, outcome: str) -> None:
        """Record that ``webhook_id`` came to ``outcome`` (before it is settled)."""
        key = self._marker_key(webhook_id)
        ttl = int(self.config.marker_ttl_s)
        await self._call("marker", lambda: self._redis.set(key, outcome, ex=ttl))

    async def forget(self, webhook_ids: Sequence[str]) -> None:
        """Delete the markers of ``webhook_ids``: ``mailroom redrive`` puts dead letters back to
        be posted again, which their ``dead_lettered`` markers would prevent."""
        if webhook_ids:
            keys = [self._marker_key(webhook_id) for webhook_id in webhook_ids]
            await self._call("marker", lambda: self._redis.delete(*keys))

    async def claim_mail_room(self, uid: str, value: str) -> str | None:
        """Claim the message ``uid`` the way MailRoom does (``SET <ns>:delivered:<uid> NX EX
        600``), with ``value``: None when it is ours now, else the value found there."""
        key = self.config.mail_room_key(uid)
        args: list[str | int] = [value, MAIL_ROOM_CLAIM_S]
        found = await self._call("MailRoom claim", lambda: self._claim([key], args))
        return None if found is None else str(found)

    async def extend_mail_room(self, uid: str, value: str) -> None:
        """Give our claim of ``uid`` another ``MAIL_ROOM_CLAIM_S`` (a delivery still retried)."""
        keys = [self.config.mail_room_key(uid)]
        args: list[str | int] = [MAIL_ROOM_CLAIM_S, value]
        await self._call("MailRoom claim", lambda: self._extend(keys, args))

    async def allow_notice(
        self, recipient: str, reason: str, window_s: float, *, sender: str = ""
    ) -> bool:
        """True (and recorded) when no replica sent ``recipient`` a notice for ``reason`` from
        ``sender`` within ``window_s`` (another deployment's notices, from another sender,
        count apart)."""
        who = f"{sender.strip().lower()}\0{recipient.strip().lower()}"
        key = f"{self._ns}:notice:{_key_digest(who + chr(0) + reason)}"
        created = await self._call(
            "notice rate limit", lambda: self._redis.set(key, "1", nx=True, ex=int(window_s))
        )
        return bool(created)

    async def close(self) -> None:
        for client in (self._redis, *self._sentinels):
            with contextlib.suppress(redis.exceptions.RedisError, OSError):
                await client.aclose()


class RedisQueue:
    """One Redis that Sidekiq jobs are pushed to (``delivery.sidekiq``), with the same client
    settings as the store: bounded commands, each made once (the delivery's retries decide)."""

    def __init__(self, config: ArbitrationConfig) -> None:
        self.where = config.describe()
        self._redis, self._sentinels = _client(config)

    async def length(self, key: str) -> int:
        """``LLEN key``: the jobs waiting there (``mailroom check``)."""
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT_S * 2):
                return int(await self._redis.llen(key))
        except (TimeoutError, redis.exceptions.RedisError, OSError) as exc:
            reason = str(exc).split("\n")[0][:200] or type(exc).__name__
            raise ArbitrationError(f"LLEN: Redis at {self.where}: {reason}") from exc

    async def push(self, key: str, job: str) -> None:
        """``LPUSH key job``; ``ArbitrationError`` when Redis did not take it."""
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT_S * 2):
                await self._redis.lpush(key, job)
        except TimeoutError as exc:
            raise ArbitrationError(f"LPUSH: Redis at {self.where} did not answer in time") from exc
        except redis.exceptions.AuthenticationError as exc:
            raise ArbitrationError(
                f"LPUSH: Redis at {self.where} refused the password", misconfigured=True
            ) from exc
        except (redis.exceptions.RedisError, OSError) as exc:
            reason = str(exc).split("\n")[0][:200] or type(exc).__name__
            misconfigured = any(w in reason for w in ("NOAUTH", "WRONGPASS", "NOPERM"))
            raise ArbitrationError(
                f"LPUSH: Redis at {self.where}: {reason}", misconfigured=misconfigured
            ) from exc

    async def close(self) -> None:
        for client in (self._redis, *self._sentinels):
            with contextlib.suppress(redis.exceptions.RedisError, OSError):
                await client.aclose()
