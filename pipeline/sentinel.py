"""Redis behind Sentinel: one URL names the deployment, and every client follows its primary.

``TUWEN_REDIS_URL=redis+sentinel://[[user]:password@]h1:26379,h2:26379,h3:26379/<service>/<db>`` with an
optional ``?sentinel_password=…`` (when the sentinels themselves require a password). The password before
the hosts is the Redis servers' own. Each client asks the sentinels for the current primary whenever it
opens a connection (redis-py's ``SentinelConnectionPool``; kombu's ``sentinel://`` transport for the
Celery broker), so after a failover the next connection goes to the new primary without a restart.
Each client logs a change of primary once, and ``counts`` counts them (the workers' and the gateway's
``tuwen_redis_primary_changes_total``).

Writes a client is told about survive a failover only if a replica holds them: ``Ack`` (``WAIT``,
``TUWEN_REDIS_REPLICAS_ACK``) makes the job store wait for that before it answers (docs/deployment.md).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis
import redis.asyncio.sentinel as async_sentinel
import redis.sentinel

log = logging.getLogger(__name__)

SCHEME = "redis+sentinel"
#: The sentinels' own port, when a host names none.
SENTINEL_PORT = 26379


@dataclass(frozen=True)
class SentinelUrl:
    """A parsed ``redis+sentinel://`` URL."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None

    def kombu_url(self) -> str:
        """The Celery broker URL for kombu's Sentinel transport (``sentinel://h1:p1;sentinel://h2:p2``)."""
        auth = ""
        if self.password is not None:
            auth = f"{self.username or ''}:{self.password}@"
        return ";".join(f"sentinel://{auth}{host}:{port}/{self.db}" for host, port in self.sentinels)

    def transport_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """kombu's transport options for this deployment: the service name, and how to reach the sentinels."""
        return {"master_name": self.service, "sentinel_kwargs": _sentinel_kwargs(self, options)}


def parse(url: str) -> SentinelUrl | None:
    """The Sentinel deployment ``url`` names, or None for a plain Redis URL; ``ValueError`` if malformed."""
    if not url.startswith(SCHEME + "://"):
        return None
    parts = urlsplit(url)
    auth, _, hosts = parts.netloc.rpartition("@")
    username, _, password = auth.partition(":") if auth else ("", "", "")
    sentinels = []
    for host in filter(None, hosts.split(",")):
        name, _, port = host.rpartition(":") if host.count(":") == 1 else (host, "", "")
        if not name or (port and not port.isdigit()):
            raise ValueError(f"{SCHEME}: {host!r} is not host or host:port")
        sentinels.append((name, int(port) if port else SENTINEL_PORT))
    path = [p for p in parts.path.split("/") if p]
    if not sentinels or not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError(f"{SCHEME} URLs look like {SCHEME}://h1:26379,h2:26379/<service name>/<db number>")
    extra = parse_qs(parts.query)
    unknown = set(extra) - {"sentinel_password"}
    if unknown:
        raise ValueError(f"{SCHEME}: unknown parameters {', '.join(sorted(unknown))} (only sentinel_password)")
    return SentinelUrl(tuple(sentinels), unquote(path[0]), int(path[1]) if len(path) == 2 else 0,
                       unquote(username) or None, unquote(password) if auth and ":" in auth else None,
                       extra["sentinel_password"][0] if extra else None)


class Counts:
    """What this process's Redis clients saw of failovers (``collector`` turns them into metrics)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.primary_changes = 0
        self.unreplicated_writes = 0

    def followed(self, service: str, before: Any, after: Any) -> Any:
        """``after``, the primary's address a client was just told; a change from ``before`` (a client's
        earlier answer, None at its first) is counted and logged."""
        if before is not None and after != before:
            with self._lock:
                self.primary_changes += 1
            log.warning("Redis Sentinel: the primary of %s moved from %s:%s to %s:%s; following it", service,
                        *before, *after)
        return after

    def unreplicated(self, what: str, acked: int, wanted: int, timeout_ms: int) -> None:
        with self._lock:
            self.unreplicated_writes += 1
        log.warning("%s reached %d of %d replicas within %d ms: refused, since a failover could lose it", what,
                    acked, wanted, timeout_ms)


counts = Counts()


def collector() -> Any:
    """A Prometheus collector of ``counts`` (``prometheus_client`` is imported only here: producers that
    install no metrics need none)."""
    from prometheus_client.core import CounterMetricFamily
    from prometheus_client.registry import Collector

    class RedisCounts(Collector):
        def collect(self) -> Any:
            yield CounterMetricFamily("tuwen_redis_primary_changes", "Times a Redis client of this process "
                                      "followed a new primary (Sentinel failover)", value=counts.primary_changes)
            yield CounterMetricFamily("tuwen_redis_unreplicated_writes", "Writes that reached fewer replicas "
                                      "than TUWEN_REDIS_REPLICAS_ACK in time", value=counts.unreplicated_writes)

    return RedisCounts()


class _FollowingProxy(redis.sentinel.SentinelConnectionPoolProxy):  # type: ignore[misc]
    """What redis-py's sentinel-managed connections ask for the primary's address (they hold the pool's
    proxy, not the pool); it already asks the sentinels on every new connection. This also tells of a change."""

    def get_master_address(self) -> Any:
        before = self.master_address
        return counts.followed(self.service_name, before, super().get_master_address())


class FollowingPool(redis.sentinel.SentinelConnectionPool):  # type: ignore[misc]
    def __init__(self, service_name: str, sentinel_manager: Any, **kwargs: Any) -> None:
        super().__init__(service_name, sentinel_manager, **kwargs)
        self.proxy = _FollowingProxy(self, self.is_master, self.check_connection, service_name, sentinel_manager)
        self.connection_kwargs["connection_pool"] = self.proxy


class AsyncFollowingPool(async_sentinel.SentinelConnectionPool):  # type: ignore[misc]
    async def get_master_address(self) -> Any:
        before = self.master_address
        return counts.followed(self.service_name, before, await super().get_master_address())


def _sentinel_kwargs(target: SentinelUrl, options: dict[str, Any]) -> dict[str, Any]:
    kwargs = {"socket_connect_timeout": options.get("socket_connect_timeout", 2),
              "socket_timeout": options.get("socket_connect_timeout", 2)}
    if target.sentinel_password is not None:
        kwargs["password"] = target.sentinel_password
    return kwargs


def _primary_kwargs(target: SentinelUrl, options: dict[str, Any]) -> dict[str, Any]:
    return {**options, "db": target.db, "username": target.username, "password": target.password}


def primary(target: SentinelUrl, **options: Any) -> redis.Redis:
    """A client of the deployment's current primary, with the options a plain client would get."""
    manager = redis.sentinel.Sentinel(target.sentinels, sentinel_kwargs=_sentinel_kwargs(target, options))
    client: redis.Redis = manager.master_for(target.service, redis_class=redis.Redis,
                                             connection_pool_class=FollowingPool,
                                             **_primary_kwargs(target, options))
    return client


def async_primary(target: SentinelUrl, **options: Any) -> Any:
    """``primary`` for ``redis.asyncio``."""
    manager = async_sentinel.Sentinel(target.sentinels, sentinel_kwargs=_sentinel_kwargs(target, options))
    return manager.master_for(target.service, connection_pool_class=AsyncFollowingPool,
                              **_primary_kwargs(target, options))
