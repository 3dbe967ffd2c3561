"""The local S3 redirect proxy: S3 tools talk to 127.0.0.1, the proxy follows pre-signed redirects.

How it works (one client request)::

    check Host and request target --refused--> 403 S3 error
        |
    keys configured? re-sign the headers with them (S3KeySource; none to be had -> 503/403)
        |
    forward to the upstream (Delta Lake Proxy): method, path, query, headers, streamed body
        |   (403 to re-signed keys: refresh them, and send again once if they changed)
        |
    3xx to a pre-signed S3 URL? --yes--> follow it with only the signed headers + Range/If-*
        |                                (up to 5 hops; loop, bad Location -> 502 S3 error)
    stream the final response back: status and headers as they came, body chunk by chunk

Unreachable upstream gives 502, a timeout 504, both as S3-style XML errors. Bodies are never
decoded (``auto_decompress=False``); reading from one side waits for writes to the other, so
memory stays bounded whatever the object size. A client that disconnects cancels its handler,
which closes the upstream connection and logs the request with what was sent. Connections to
the upstream and to S3 are pooled.
The decisions live in :mod:`kbdaemon._redirects`; this module moves bytes.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import time
from collections.abc import Sequence

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from kbclient.daemon_api import ErrorCode
from kbdaemon import _bodyrelay, _s3errors
from kbdaemon import _redirects as rd
from kbdaemon.errors import KBDaemonError, PortInUseError
from kbdaemon.s3keys import (
    S3AccessDeniedError,
    S3Keys,
    S3KeysError,
    S3KeysNeedLoginError,
    S3KeySource,
    S3KeysTokenRejectedError,
)

__all__ = ["S3Proxy", "S3ProxyError"]

log = logging.getLogger(__name__)

_READ_BUFSIZE = 1024 * 1024
_RECV_SIZE = 1024 * 1024
_SMALL_BODY = 64 * 1024
_SHUTDOWN_GRACE = 2.0  # seconds in-flight transfers get when the proxy closes
_SKIP_AUTO_HEADERS = ("Accept", "Accept-Encoding", "Content-Type", "User-Agent")


class S3ProxyError(KBDaemonError):
    """The local S3 proxy cannot start: bad settings or its address is taken."""

    code = ErrorCode.S3_PROXY_ERROR


class S3ProxyPortInUseError(S3ProxyError, PortInUseError):
    """The proxy's listening address is taken: choose another port or stop what holds it."""

    code = ErrorCode.PORT_IN_USE


class S3Proxy:
    """A local HTTP endpoint for S3 tools in front of the Delta Lake Proxy.

    Args:
        upstream: base URL of the Delta Lake Proxy (``https://host[:port][/prefix]``).
        host: address to listen on; loopback unless ``allow_remote``.
        port: port to listen on; 0 picks a free one (see :attr:`endpoint`).
        allow_remote: allow a non-loopback ``host`` and any Host header.
        allow_http_hosts: hosts (``host`` or ``host:port``) whose pre-signed URLs may be
            followed over plain http; https is required otherwise.
        connect_timeout: seconds to connect to the upstream or S3.
        read_timeout: seconds without a byte from the upstream or S3 before giving up.
        keys: where the S3 keys come from; with them every upstream request is re-signed
            (the client's own signature is dropped). None forwards the client's signature.
        region: the region re-signed requests name in their credential scope.

    Raises:
        S3ProxyError: from the constructor for bad settings, from :meth:`start` when the
            address cannot be bound.
    """

    def __init__(
        self,
        *,
        upstream: str,
        host: str = "127.0.0.1",
        port: int = 0,
        allow_remote: bool = False,
        allow_http_hosts: Sequence[str] = (),
        connect_timeout: float = 10.0,
        read_timeout: float = 300.0,
        keys: S3KeySource | None = None,
        region: str = "us-east-1",
    ) -> None:
        self._upstream = _parse_upstream(upstream)
        self._keys = keys
        self._region = region
        self._upstream_base = str(self._upstream).rstrip("/")
        if not allow_remote and not _is_loopback(host):
            raise S3ProxyError(
                f"the S3 proxy listens on loopback only, not on {host!r}; "
                "pass --allow-remote to listen on another address"
            )
        if not 0 <= port <= 65535:
            raise S3ProxyError(f"port {port} is out of range 0-65535")
        if connect_timeout <= 0 or read_timeout <= 0:
            raise S3ProxyError("timeouts must be positive numbers of seconds")
        self._host = host
        self._port = port
        self._allow_remote = allow_remote
        self._allow_http_hosts = tuple(allow_http_hosts)
        self._read_timeout = read_timeout
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=read_timeout
        )
        self._own_hosts: frozenset[str] = frozenset()
        self._bound_port = 0
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None

    def __repr__(self) -> str:
        return (
            f"S3Proxy(upstream={rd.redacted(self._upstream)!r}, endpoint={self.endpoint!r}, "
            f"resigning={self._keys is not None})"
        )

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT``, the URL S3 tools use, once started ('' before)."""
        if not self._bound_port:
            return ""
        host = "127.0.0.1" if self._host in ("0.0.0.0", "localhost", "") else self._host
        if ":" in host:
            host = "[::1]" if host == "::" else f"[{host}]"
        return f"http://{host}:{self._bound_port}"

    async def start(self) -> None:
        """Bind the address and start serving.

        Raises:
            S3ProxyError: the address is taken or cannot be bound.
        """
        if self._runner is not None:
            raise S3ProxyError("the S3 proxy is already started")
        app = web.Application(client_max_size=0)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            handler_cancellation=True,
            shutdown_timeout=_SHUTDOWN_GRACE,
        )
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            if exc.errno == errno.EADDRINUSE:
                raise S3ProxyPortInUseError(
                    f"cannot listen on {self._host}:{self._port}: the address is in use; "
                    "choose another port (0 picks a free one) or stop what holds it"
                ) from None
            raise S3ProxyError(
                f"cannot listen on {self._host}:{self._port}: {exc.strerror or exc}"
            ) from None
        self._bound_port = int(runner.addresses[0][1])
        self._own_hosts = rd.own_host_names(
            self._host, self._bound_port, allow_remote=self._allow_remote
        )
        connector = aiohttp.TCPConnector(limit=256, limit_per_host=64, keepalive_timeout=30)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=_SKIP_AUTO_HEADERS,
            read_bufsize=_READ_BUFSIZE,
        )
        self._runner = runner
        log.info(
            "S3 proxy listening on %s, upstream %s%s",
            self.endpoint,
            rd.redacted(self._upstream),
            ", re-signing with the configured keys" if self._keys else "",
        )

    async def close(self) -> None:
        """Stop serving, give in-flight transfers a few seconds, close pooled connections.

        Safe to call twice.
        """
        runner, self._runner = self._runner, None
        session, self._session = self._session, None
        if runner is not None:
            await runner.cleanup()
        if session is not None:
            await session.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        rid = _s3errors.new_request_id()
        target = request.raw_path
        resource = request.path
        if not target.startswith("/"):
            origin_form = self._origin_form(target)
            if origin_form is None:
                return self._refuse(request, rid, _s3errors.NOT_A_PROXY, resource)
            target = origin_form
        if not rd.host_allowed(request.headers.get("Host"), self._own_hosts):
            return self._refuse(request, rid, _s3errors.HOST_REFUSED, resource)
        assert self._session is not None
        url = URL(self._upstream_base + target, encoded=True)
        has_body = request.body_exists
        try:
            upstream, hops = await self._fetch(request, url, has_body)
        except asyncio.CancelledError:
            log.info(
                "%s %s: cut off before the upstream answered (client left or proxy stops), %.1f ms",
                request.method,
                resource,
                (time.monotonic() - started) * 1000,
            )
            raise
        except _Failure as failure:
            log.warning(
                "%s %s -> %d %s (%s) request id %s",
                request.method,
                resource,
                failure.status,
                failure.code,
                failure.message,
                rid,
            )
            return _s3errors.error_response(
                failure.status, failure.code, failure.message, resource=resource, request_id=rid
            )
        try:
            response, sent = await self._relay(request, upstream, started)
        finally:
            upstream.close()
        log.info(
            "%s %s -> %d, %d bytes, %d redirect(s) followed, %.1f ms",
            request.method,
            resource,
            upstream.status,
            sent,
            hops,
            (time.monotonic() - started) * 1000,
        )
        return response

    def _origin_form(self, target: str) -> str | None:
        try:
            absolute = URL(target, encoded=True)
        except ValueError:
            return None
        if not absolute.is_absolute() or absolute.scheme != "http":
            return None
        if not rd.host_allowed(absolute.raw_authority, self._own_hosts - {"*"}):
            return None
        return absolute.raw_path_qs

    def _refuse(
        self, request: web.Request, rid: str, what: tuple[int, str], resource: str
    ) -> web.Response:
        status, code = what
        if code == _s3errors.NOT_A_PROXY[1]:
            message = "this is a local S3 endpoint, not a proxy for other hosts"
        else:
            message = (
                f"Host {request.headers.get('Host', '')!r} is not this proxy's address; "
                f"use {self.endpoint}"
            )
        log.warning("%s %s -> %d %s, request id %s", request.method, resource, status, code, rid)
        return _s3errors.error_response(status, code, message, resource=resource, request_id=rid)

    async def _fetch(
        self, request: web.Request, url: URL, has_body: bool
    ) -> tuple[aiohttp.ClientResponse, int]:
        """The final upstream response after following pre-signed redirects, and the hop count."""
        assert self._session is not None
        method = request.method
        headers = rd.upstream_headers(request.headers)
        keys = None
        if self._keys is not None:
            keys = await self._current_keys()
            headers = self._signed(headers, method, url, keys)
        visited = [url]
        response = await self._send(method, url, headers, request.content if has_body else None)
        if keys is not None and response.status == 403 and not has_body:
            assert self._keys is not None
            newer = await self._keys.refresh_after_rejection(keys)
            if newer is not None:
                log.info(
                    "%s %s: S3 refused the keys; sending again with new ones", method, url.path
                )
                await _discard(response)
                headers = self._signed(rd.upstream_headers(request.headers), method, url, newer)
                response = await self._send(method, url, headers, None)
        while True:
            decision = rd.decide_redirect(
                status=response.status,
                location=response.headers.get("Location"),
                current=url,
                method=method,
                visited=visited,
                allow_http_hosts=self._allow_http_hosts,
            )
            if isinstance(decision, rd.PassThrough) or (
                has_body and isinstance(decision, rd.Follow)
            ):
                return response, len(visited) - 1
            await _discard(response)
            if isinstance(decision, rd.RedirectError):
                raise _Failure(_s3errors.BAD_REDIRECT[0], decision.code, decision.message)
            url, method = decision.url, decision.method
            visited.append(url)
            response = await self._send(method, url, rd.follow_headers(request.headers, url), None)

    async def _current_keys(self) -> S3Keys:
        assert self._keys is not None
        try:
            return await self._keys.get()
        except S3KeysError as exc:
            if isinstance(
                exc, S3KeysTokenRejectedError | S3AccessDeniedError | S3KeysNeedLoginError
            ):
                raise _Failure(*_s3errors.KEYS_REFUSED, exc.message) from None
            raise _Failure(*_s3errors.KEYS_UNAVAILABLE, exc.message) from None

    def _signed(
        self, headers: CIMultiDict[str], method: str, url: URL, keys: S3Keys
    ) -> CIMultiDict[str]:
        signed = rd.resign(headers, method=method, url=url, keys=keys, region=self._region)
        if isinstance(signed, rd.Refusal):
            raise _Failure(signed.status, signed.code, signed.message)
        return signed

    async def _send(
        self,
        method: str,
        url: URL,
        headers: rd.Headers,
        body: aiohttp.StreamReader | None,
    ) -> aiohttp.ClientResponse:
        assert self._session is not None
        try:
            response = await self._session.request(
                method, url, headers=headers, data=body, allow_redirects=False
            )
            _read_in_large_pieces(response)
            return response
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise _Failure(
                *_s3errors.UPSTREAM_TIMEOUT, f"{rd.redacted(url)} did not answer in time"
            ) from None
        except aiohttp.ClientSSLError as exc:
            raise _Failure(
                *_s3errors.UPSTREAM_UNREACHABLE,
                f"TLS to {rd.redacted(url)} failed: {type(exc).__name__}",
            ) from None
        except aiohttp.ClientError as exc:
            raise _Failure(
                *_s3errors.UPSTREAM_UNREACHABLE,
                f"cannot reach {rd.redacted(url)}: {_describe(exc)}",
            ) from None

    async def _relay(
        self, request: web.Request, upstream: aiohttp.ClientResponse, started: float
    ) -> tuple[web.StreamResponse, int]:
        """Stream ``upstream`` to the client; the response and the number of body bytes sent."""
        response = web.StreamResponse(
            status=upstream.status,
            reason=upstream.reason,
            headers=rd.response_headers(upstream.headers),
        )
        await response.prepare(request)
        relay = _bodyrelay.take_over(request, upstream)
        sent = 0
        try:
            if relay is not None:
                try:
                    await relay.relay(request, response, read_timeout=self._read_timeout)
                finally:
                    sent = relay.sent
                    relay.give_back(upstream)
            else:
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                    sent += len(chunk)
        except asyncio.CancelledError:
            log.info(
                "%s %s -> %d, cut off after %d bytes (client left or proxy stops), %.1f ms",
                request.method,
                request.path,
                upstream.status,
                sent,
                (time.monotonic() - started) * 1000,
            )
            raise
        except (TimeoutError, aiohttp.ClientError) as exc:
            # Headers are gone already: cutting the connection is the only signal left.
            log.warning(
                "%s %s: upstream failed after %d bytes (%s); closing the client connection",
                request.method,
                request.path,
                sent,
                _describe(exc),
            )
            if request.transport is not None:
                request.transport.close()
            return response, sent
        await response.write_eof()
        return response, sent


class _Failure(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


async def _discard(response: aiohttp.ClientResponse) -> None:
    """Drop a redirect's body; read a small one so its connection can be reused."""
    length = response.content_length
    if length is not None and length <= _SMALL_BODY:
        try:
            await response.read()
        except (TimeoutError, aiohttp.ClientError):
            response.close()
            return
        response.release()
    else:
        response.close()


def _read_in_large_pieces(response: aiohttp.ClientResponse) -> None:
    """Let the event loop read 1 MiB per recv() from this connection, not asyncio's 256 KiB.

    Fewer system calls per GiB: bench_s3 measured about a quarter less CPU. asyncio's selector
    transports read ``max_size`` bytes at a time; transports without it are left alone.
    """
    transport = response.connection.transport if response.connection else None
    if transport is not None and isinstance(getattr(transport, "max_size", None), int):
        transport.max_size = _RECV_SIZE  # type: ignore[attr-defined]


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return exc.strerror or type(exc).__name__
    if isinstance(exc, TimeoutError):
        return "timed out"
    return type(exc).__name__


def _parse_upstream(upstream: str) -> URL:
    try:
        url = URL(upstream)
    except ValueError:
        url = URL()
    if url.scheme not in ("http", "https") or not url.host or url.query_string or url.fragment:
        raise S3ProxyError(
            f"the upstream must be an http(s) URL without query, like "
            f"https://delta-proxy.example.org, not {rd.redacted(upstream)!r}"
        )
    return url


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
