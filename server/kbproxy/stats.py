"""Visibility: the access log line, statistics, and the HTTP stats port.

How it works: ``Stats`` is the relay's ``CallObserver``: it counts active calls per user, calls by
method and status code, bytes, and writes one access-log line per finished call (never a token:
the relay does not hand it one). Prometheus metrics live in a registry of their own; auth cache
and pool figures are read from their owners when scraped. ``stats_app`` serves::

    GET /healthz  200 while the process runs
    GET /readyz   200 when not draining and Auth2 answered its root recently, else 503
    GET /stats    JSON snapshot
    GET /metrics  Prometheus text format
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client import Counter as PCounter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from kbproxy.auth import Authenticator
from kbproxy.pool import ChannelPool
from kbproxy.relay import CallObserver, CallRecord
from kbproxy.routing import SessionRoutes

access_log = logging.getLogger("kbproxy.access")


class Stats(CallObserver):
    """Counters of the relay's calls, mirrored as Prometheus metrics."""

    def __init__(
        self, *, authenticator: Authenticator, pool: ChannelPool, sessions: SessionRoutes
    ) -> None:
        self.authenticator = authenticator
        self.pool = pool
        self.sessions = sessions
        self.started_at = time.time()
        self.active = 0
        self.active_by_user: Counter[str] = Counter()
        self.calls: Counter[tuple[str, str]] = Counter()
        self.bytes_in = 0
        self.bytes_out = 0
        self.registry = CollectorRegistry()
        self._calls = PCounter(
            "kbproxy_calls", "Finished calls", ["method", "code"], registry=self.registry
        )
        self._duration = Histogram(
            "kbproxy_call_duration_seconds",
            "Call duration",
            ["method"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800),
        )
        self._bytes = PCounter(
            "kbproxy_message_bytes", "Message bytes relayed", ["direction"], registry=self.registry
        )
        self._bytes_in, self._bytes_out = self._bytes.labels("in"), self._bytes.labels("out")
        self._children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._active = Gauge("kbproxy_active_calls", "Calls in progress", registry=self.registry)
        self.registry.register(_Snapshot(self))

    def started(self, record: CallRecord) -> None:
        self.active += 1
        self._active.inc()

    def finished(self, record: CallRecord) -> None:
        self.active -= 1
        self._active.dec()
        if record.routed:
            self.active_by_user[record.user] -= 1
            if self.active_by_user[record.user] <= 0:
                del self.active_by_user[record.user]
        code = record.code.name
        self.calls[(record.method, code)] += 1
        self.bytes_in += record.bytes_in
        self.bytes_out += record.bytes_out
        children = self._children.get((record.method, code))
        if children is None:
            children = self._children[(record.method, code)] = (
                self._calls.labels(record.method, code),
                self._duration.labels(record.method),
            )
        children[0].inc()
        children[1].observe(record.duration)
        self._bytes_in.inc(record.bytes_in)
        self._bytes_out.inc(record.bytes_out)
        fields = {
            "user": record.user,
            "method": record.method,
            "code": code,
            "duration_ms": round(record.duration * 1000, 1),
            "bytes_in": record.bytes_in,
            "bytes_out": record.bytes_out,
            "backend": record.backend,
        }
        if record.by_session:
            fields["routed_by"] = "session"
        error = " routed_by=session" if record.by_session else ""
        if record.code.name != "OK" and record.details:
            fields["details"] = record.details[:300]
            error += " details=" + repr(fields["details"])
        access_log.info(
            "%s %s %s %.1fms in=%d out=%d backend=%s%s",
            record.user,
            record.method,
            code,
            fields["duration_ms"],
            record.bytes_in,
            record.bytes_out,
            record.backend,
            error,
            extra={"fields": fields},
        )

    def routed(self, record: CallRecord) -> None:
        self.active_by_user[record.user] += 1

    def snapshot(self) -> dict[str, Any]:
        auth = self.authenticator.counters
        by_method: dict[str, dict[str, int]] = {}
        for (method, code), count in sorted(self.calls.items()):
            by_method.setdefault(method, {})[code] = count
        return {
            "uptime_s": round(time.time() - self.started_at, 1),
            "active_calls": self.active,
            "active_calls_by_user": dict(self.active_by_user),
            "calls": by_method,
            "bytes": {"in": self.bytes_in, "out": self.bytes_out},
            "auth": {
                "cache_hits": auth.hits,
                "cache_misses": auth.misses,
                "negative_cache_hits": auth.negative_hits,
                "single_flight_joins": auth.joins,
                "auth2_requests": auth.requests,
                "auth2_failures": auth.failures,
                "cache_size": len(self.authenticator.cache),
            },
            "pool": {
                "channels": len(self.pool),
                "created": self.pool.created,
                "closed": self.pool.closed,
            },
            "sessions": len(self.sessions),
        }


class _Snapshot(Collector):
    """Exposes the auth cache, pool and session figures at scrape time."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats

    def collect(self) -> Iterable[Any]:
        auth = self.stats.authenticator.counters
        cache = CounterMetricFamily(
            "kbproxy_auth_cache_lookups", "Token cache lookups", labels=["result"]
        )
        cache.add_metric(["hit"], auth.hits)
        cache.add_metric(["negative_hit"], auth.negative_hits)
        cache.add_metric(["miss"], auth.misses)
        yield cache
        yield CounterMetricFamily(
            "kbproxy_auth_single_flight_joins", "Calls that joined a lookup", value=auth.joins
        )
        yield CounterMetricFamily(
            "kbproxy_auth2_requests", "Requests made to KBase Auth2", value=auth.requests
        )
        yield CounterMetricFamily(
            "kbproxy_auth2_failures", "Auth2 unreachable, 5xx or slow", value=auth.failures
        )
        yield GaugeMetricFamily(
            "kbproxy_auth_cache_entries",
            "Token cache size",
            value=len(self.stats.authenticator.cache),
        )
        yield GaugeMetricFamily(
            "kbproxy_pool_channels", "Backend channels", value=len(self.stats.pool)
        )
        yield GaugeMetricFamily(
            "kbproxy_active_users",
            "Users with calls in progress",
            value=len(self.stats.active_by_user),
        )
        yield GaugeMetricFamily(
            "kbproxy_sessions",
            "Sessions remembered for FetchErrorDetails",
            value=len(self.stats.sessions),
        )


ReadyCheck = Callable[[], Awaitable[tuple[bool, str]]]


def stats_app(stats: Stats, ready: ReadyCheck) -> web.Application:
    """The aiohttp application of the stats port."""

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        ok, reason = await ready()
        return web.json_response(
            {"status": "ready" if ok else "not ready", "reason": reason}, status=200 if ok else 503
        )

    async def stats_json(request: web.Request) -> web.Response:
        return web.json_response(stats.snapshot())

    async def metrics(request: web.Request) -> web.Response:
        body = generate_latest(stats.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/stats", stats_json)
    app.router.add_get("/metrics", metrics)
    return app
