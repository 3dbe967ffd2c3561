"""Visibility: the access log line, statistics, and the HTTP stats port.

How it works: ``Stats`` is the relay's ``CallObserver``: it counts active calls per user, calls by
method and status code, bytes, and writes one access-log line per finished call (never a token:
the relay does not hand it one). Prometheus metrics live in a registry of their own; auth cache
and pool figures are read from their owners when scraped, and so are the call, byte and active
call counts, which the relay's hot path keeps as plain integers (only the duration histogram is
updated per call). ``stats_app`` serves::

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

import grpc
from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from kbproxy.auth import Authenticator
from kbproxy.dataplane import AccessEntry
from kbproxy.policy import HEALTH_PREFIX, spark_method
from kbproxy.pool import ChannelPool
from kbproxy.reasons import reason_of
from kbproxy.relay import KNOWN_METHODS, CallObserver, CallRecord

access_log = logging.getLogger("kbproxy.access")


class Stats(CallObserver):
    """Counters of the relay's calls, mirrored as Prometheus metrics."""

    def __init__(self, *, authenticator: Authenticator, pool: ChannelPool) -> None:
        self.authenticator = authenticator
        self.pool = pool
        self.started_at = time.time()
        self.active = 0
        self.active_by_user: Counter[str] = Counter()
        self.calls: Counter[tuple[str, str]] = Counter()
        self.bytes_in = 0
        self.bytes_out = 0
        self.refusals: Counter[str] = Counter()
        self.envoy_figures: Callable[[], Awaitable[dict[str, int]]] | None = None
        self.envoy: dict[str, int] | None = None
        self.hub_figures: Callable[[], dict[str, int]] | None = None  # with --hub-url
        self.registry = CollectorRegistry()
        self._duration = Histogram(
            "kbproxy_call_duration_seconds",
            "Call duration",
            ["method"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800),
        )
        self._durations: dict[str, Any] = {}
        Gauge("kbproxy_active_calls", "Calls in progress", registry=self.registry).set_function(
            lambda: self.active_calls
        )
        self.registry.register(_Snapshot(self))

    def started(self, record: CallRecord) -> None:
        self.active += 1

    def finished(self, record: CallRecord) -> None:
        self.active -= 1
        user = record.user
        if record.routed:
            left = self.active_by_user[user] - 1
            if left > 0:
                self.active_by_user[user] = left
            else:
                del self.active_by_user[user]
        self._count(record, time.monotonic() - record.started)

    def envoy_call(self, entry: AccessEntry) -> None:
        """A call Envoy relayed or refused (one line of its access log)."""
        if entry.path.startswith(HEALTH_PREFIX):
            return
        code = _code(entry.grpc_status, entry.http_status, entry.flags)
        record = CallRecord(
            method=spark_method(entry.path) or entry.path,
            user=entry.user,
            backend=entry.backend,
            code=code,
            bytes_in=entry.bytes_in,
            bytes_out=entry.bytes_out,
            details=entry.message if code != grpc.StatusCode.OK else "",
        )
        self._count(record, entry.duration_ms / 1000)

    def _count(self, record: CallRecord, duration: float) -> None:
        method = record.method if record.method in KNOWN_METHODS else "other"
        code = record.code.name
        self.calls[(method, code)] += 1
        self.bytes_in += record.bytes_in
        self.bytes_out += record.bytes_out
        if record.details and (reason := reason_of(record.details)) is not None:
            self.refusals[reason.value] += 1
        histogram = self._durations.get(method)
        if histogram is None:
            histogram = self._durations[method] = self._duration.labels(method)
        histogram.observe(duration)
        if access_log.isEnabledFor(logging.INFO):
            _log_call(record, code, duration)

    def routed(self, record: CallRecord) -> None:
        self.active_by_user[record.user] += 1

    async def refresh(self) -> None:
        """Read Envoy's figures (if it is the data plane) before a snapshot or a scrape."""
        if self.envoy_figures is not None:
            self.envoy = await self.envoy_figures()

    @property
    def active_calls(self) -> int:
        if self.envoy is not None:
            return self.envoy.get("upstream_calls_active", 0)
        return self.active

    def snapshot(self) -> dict[str, Any]:
        auth = self.authenticator.counters
        by_method: dict[str, dict[str, int]] = {}
        for (method, code), count in sorted(self.calls.items()):
            by_method.setdefault(method, {})[code] = count
        return {
            "uptime_s": round(time.time() - self.started_at, 1),
            "active_calls": self.active_calls,
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
            "refusals": dict(self.refusals),
            "envoy": self.envoy,
            "hub": self.hub_figures() if self.hub_figures is not None else None,
        }


def _log_call(record: CallRecord, code: str, duration: float) -> None:
    method = record.method if record.method.isidentifier() else repr(record.method[:200])
    fields: dict[str, Any] = {
        "user": record.user,
        "method": record.method[:200],
        "code": code,
        "duration_ms": round(duration * 1000, 1),
        "bytes_in": record.bytes_in,
        "bytes_out": record.bytes_out,
        "backend": record.backend,
    }
    error = ""
    if code != "OK" and record.details:
        fields["details"] = record.details[:300]
        error += " details=" + repr(fields["details"])
    access_log.info(
        "%s %s %s %.1fms in=%d out=%d backend=%s%s",
        record.user,
        method,
        code,
        fields["duration_ms"],
        record.bytes_in,
        record.bytes_out,
        record.backend,
        error,
        extra={"fields": fields},
    )


class _Snapshot(Collector):
    """Exposes the auth cache, pool and session figures at scrape time."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats

    def collect(self) -> Iterable[Any]:
        calls = CounterMetricFamily("kbproxy_calls", "Finished calls", labels=["method", "code"])
        for (method, code), count in sorted(self.stats.calls.items()):
            calls.add_metric([method, code], count)
        yield calls
        relayed = CounterMetricFamily(
            "kbproxy_message_bytes", "Message bytes relayed", labels=["direction"]
        )
        relayed.add_metric(["in"], self.stats.bytes_in)
        relayed.add_metric(["out"], self.stats.bytes_out)
        yield relayed
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
        refused = CounterMetricFamily(
            "kbproxy_refusals", "Calls refused by kbproxy or Envoy", labels=["reason"]
        )
        for reason, count in sorted(self.stats.refusals.items()):
            refused.add_metric([reason], count)
        yield refused
        for name, value in sorted((self.stats.envoy or {}).items()):
            yield GaugeMetricFamily(f"kbproxy_envoy_{name}", f"Envoy: {name}", value=value)
        yield GaugeMetricFamily(
            "kbproxy_active_users",
            "Users with calls in progress",
            value=len(self.stats.active_by_user),
        )


_CODES = {code.value[0]: code for code in grpc.StatusCode}
_HTTP_CODES = {401: grpc.StatusCode.UNAUTHENTICATED}


_CLIENT_WENT_AWAY = ("DR", "DC")  # Envoy's flags: downstream reset, connection closed


def _code(grpc_status: int | None, http_status: int, flags: str) -> grpc.StatusCode:
    # A call the client reset has no grpc-status of its own: Envoy infers UNKNOWN (2) for it.
    client_went_away = any(flag in flags.split(",") for flag in _CLIENT_WENT_AWAY)
    if grpc_status is not None and not (client_went_away and grpc_status == 2):
        return _CODES.get(grpc_status, grpc.StatusCode.UNKNOWN)
    if http_status == 0 or client_went_away:
        return grpc.StatusCode.CANCELLED
    return _HTTP_CODES.get(http_status, grpc.StatusCode.UNKNOWN)


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
        await stats.refresh()
        return web.json_response(stats.snapshot())

    async def metrics(request: web.Request) -> web.Response:
        await stats.refresh()
        body = generate_latest(stats.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/stats", stats_json)
    app.router.add_get("/metrics", metrics)
    return app
