"""The local S3 proxy's decisions, without I/O: which headers go where, which redirects to follow.

How it works::

    client request --upstream_headers()--> upstream (the Delta Lake Proxy)
        response 3xx? --decide_redirect()--> Follow(url, method)  --follow_headers()--> S3
                                          \\-> PassThrough (not a pre-signed S3 URL: client sees it)
                                          \\-> RedirectError (loop, too many hops, bad Location)
        response --response_headers()--> client

A redirect is followed only when its Location is a pre-signed S3 URL (SigV4 ``X-Amz-Signature``,
or SigV2 ``Signature`` with ``AWSAccessKeyId``) over https, or over http to a host the operator
allowed. The followed request carries only what the URL signed plus Range and If-*: S3 refuses a
pre-signed request that also has an Authorization header, and unsigned ``x-amz-*`` headers can
break the signature. ``upstream_headers`` is the one seam where the upstream request's headers are
made; with keys configured, ``resign`` then replaces the client's signature by one made with them
(botocore's SigV4 signer), so the client may sign with any key.

Re-signing signs Host, every ``x-amz-*`` header, Content-MD5, Content-Type and Range, with the
client's ``x-amz-content-sha256`` (a body hash, ``UNSIGNED-PAYLOAD`` or
``STREAMING-UNSIGNED-PAYLOAD-TRAILER``; ``UNSIGNED-PAYLOAD`` when it sent none). A body in signed
chunks (``STREAMING-AWS4-HMAC-SHA256-PAYLOAD``) carries signatures chained to the client's key and
cannot be re-signed: it is refused. A request signed in its query (a pre-signed URL) is sent as
it is.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from kbdaemon.s3keys import S3Keys

MAX_HOPS = 5
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})

# RFC 9110 7.6.1 plus the legacy ones; never forwarded in either direction.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Set by aiohttp itself for the hop it makes; a client's value would be wrong or duplicated.
# Content-Length goes upstream as the client sent it (S3 refuses a chunked PUT without one).
_SET_BY_TRANSPORT = frozenset({"host", "content-length"})
_SAFE_ON_FOLLOW = frozenset(
    {"range", "if-match", "if-none-match", "if-modified-since", "if-unmodified-since", "if-range"}
)

Headers = CIMultiDictProxy[str] | CIMultiDict[str] | Mapping[str, str]


def _hop_by_hop(headers: Headers) -> frozenset[str]:
    """Hop-by-hop names, including those a Connection header lists."""
    named = {
        token.strip().lower()
        for value in _getall(headers, "connection")
        for token in value.split(",")
        if token.strip()
    }
    return HOP_BY_HOP | named


def _getall(headers: Headers, name: str) -> list[str]:
    if isinstance(headers, CIMultiDictProxy | CIMultiDict):
        return headers.getall(name, [])
    return [v for k, v in headers.items() if k.lower() == name]


def upstream_headers(client_headers: Headers) -> CIMultiDict[str]:
    """Headers of the request to the upstream: the client's, less hop-by-hop ones and Host.

    Expect is dropped too: the proxy's own server already answered ``100 Continue``.
    Authorization goes through as the client made it; :func:`resign` replaces it when the proxy
    holds keys.
    """
    drop = _hop_by_hop(client_headers) | {"host", "expect"}
    return CIMultiDict((k, v) for k, v in client_headers.items() if k.lower() not in drop)


_CLIENT_SIGNING = frozenset({"authorization", "x-amz-date", "x-amz-security-token"})
_SIGNED_ALSO = frozenset({"content-md5", "content-type", "range"})
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
_SIGNED_CHUNKS = ("STREAMING-AWS4-HMAC-SHA256-PAYLOAD", "STREAMING-AWS4-ECDSA-P256-SHA256-PAYLOAD")


@dataclass(frozen=True)
class Refusal:
    """A client request the proxy will not send on: the client gets this S3 error."""

    status: int
    code: str
    message: str


class _Signer(S3SigV4Auth):  # type: ignore[misc]
    """botocore's S3 SigV4 signer, signing the body hash the client declared."""

    def __init__(self, credentials: Credentials, region: str, content_sha256: str) -> None:
        super().__init__(credentials, "s3", region)
        self._content_sha256 = content_sha256

    def payload(self, request: AWSRequest) -> str:
        return self._content_sha256


def resign(
    headers: CIMultiDict[str], *, method: str, url: URL, keys: S3Keys, region: str
) -> CIMultiDict[str] | Refusal:
    """``headers`` (from :func:`upstream_headers`) signed for ``method`` ``url`` with ``keys``.

    The client's Authorization, X-Amz-Date and X-Amz-Security-Token are replaced; the rest of
    the headers go as they are. Returns a :class:`Refusal` for a body in signed chunks.
    """
    if is_presigned(url):
        return headers
    content_sha256 = headers.get("x-amz-content-sha256", "").strip() or UNSIGNED_PAYLOAD
    if content_sha256.upper().startswith(_SIGNED_CHUNKS):
        return Refusal(
            501,
            "NotImplemented",
            "the local S3 proxy signs requests with your S3 keys itself and cannot re-sign an "
            "upload in signed chunks (STREAMING-AWS4-HMAC-SHA256-PAYLOAD); turn chunked "
            "signing off in the client (unsigned payloads are fine)",
        )
    kept = CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in _CLIENT_SIGNING)
    to_sign = {
        k: v for k, v in kept.items() if k.lower().startswith("x-amz-") or k.lower() in _SIGNED_ALSO
    }
    to_sign["X-Amz-Content-SHA256"] = content_sha256
    request = AWSRequest(method=method, url=str(url), headers=to_sign)
    credentials = Credentials(keys.access_key, keys.secret_key, keys.session_token or None)
    _Signer(credentials, region, content_sha256).add_auth(request)
    for name in ("Authorization", "X-Amz-Date", "X-Amz-Content-SHA256", "X-Amz-Security-Token"):
        value = request.headers.get(name)
        if value is not None:
            kept.popall(name, None)
            kept[name] = value
    return kept


def response_headers(upstream: Headers) -> CIMultiDict[str]:
    """Headers of the response to the client: the upstream's, less hop-by-hop ones.

    Content-Length stays (aiohttp then sends the body with exactly that length); Content-Range,
    ETag, Last-Modified, Content-Type and Content-Encoding go through unchanged.
    """
    drop = _hop_by_hop(upstream)
    return CIMultiDict((k, v) for k, v in upstream.items() if k.lower() not in drop)


def signed_header_names(url: URL) -> frozenset[str]:
    """Header names a SigV4 pre-signed URL signed (``X-Amz-SignedHeaders``), lower case."""
    for key, value in parse_qsl(url.raw_query_string, keep_blank_values=True):
        if key.lower() == "x-amz-signedheaders":
            return frozenset(n.strip().lower() for n in value.split(";") if n.strip())
    return frozenset()


def follow_headers(client_headers: Headers, url: URL) -> CIMultiDict[str]:
    """Headers of a followed request: only those the URL signed, plus Range and If-*.

    Host is set by the transport from the URL; Authorization, ``x-amz-*`` and ``amz-sdk-*``
    headers are dropped unless the URL signed them.
    """
    keep = (signed_header_names(url) | _SAFE_ON_FOLLOW) - _hop_by_hop(client_headers)
    keep -= _SET_BY_TRANSPORT | {"authorization"}
    return CIMultiDict((k, v) for k, v in client_headers.items() if k.lower() in keep)


def is_presigned(url: URL) -> bool:
    """A pre-signed S3 URL: SigV4 ``X-Amz-Signature``, or SigV2 ``Signature``+``AWSAccessKeyId``."""
    keys = {k.lower() for k, _ in parse_qsl(url.raw_query_string, keep_blank_values=True)}
    return "x-amz-signature" in keys or {"signature", "awsaccesskeyid"} <= keys


def redacted(url: URL | str) -> str:
    """A URL fit for logs and errors: scheme, host and path; never the query (signatures) or
    a user:password."""
    parts = urlsplit(str(url))
    suffix = "?…" if parts.query else ""
    netloc = parts.netloc.rpartition("@")[2]  # no user:password
    return f"{parts.scheme}://{netloc}{parts.path}{suffix}" if parts.scheme else parts.path


@dataclass(frozen=True)
class Follow:
    """Follow the redirect: make ``method`` to ``url`` with ``follow_headers``."""

    url: URL
    method: str
    drop_body: bool


@dataclass(frozen=True)
class PassThrough:
    """Not a redirect the proxy follows: give the response to the client as it is."""


@dataclass(frozen=True)
class RedirectError:
    """A redirect the proxy should follow but cannot: the client gets a 502 S3 error."""

    code: str
    message: str


Decision = Follow | PassThrough | RedirectError


def decide_redirect(
    *,
    status: int,
    location: str | None,
    current: URL,
    method: str,
    visited: Sequence[URL],
    allow_http_hosts: Iterable[str] = (),
) -> Decision:
    """What to do with an upstream response of ``status`` to ``method`` on ``current``.

    Args:
        status: the response status.
        location: its Location header, if any.
        current: the URL that gave the response (relative Locations resolve against it).
        method: the method of the request that gave the response.
        visited: URLs already requested for this client request, first one included.
        allow_http_hosts: hosts (``host`` or ``host:port``) that may be followed over http.
    """
    if status not in REDIRECT_STATUSES or not location:
        return PassThrough()
    try:
        target = current.join(URL(location.strip(), encoded=True))
        host = target.host
        port = target.port
    except (ValueError, TypeError):
        if _looks_presigned(location):
            return RedirectError("MalformedRedirect", "the upstream sent a malformed Location")
        return PassThrough()
    if not is_presigned(target):
        return PassThrough()
    if target.scheme not in ("http", "https") or not host or port is None:
        return RedirectError(
            "MalformedRedirect",
            f"the upstream redirected to an unsupported or malformed URL {redacted(target)}",
        )
    if target.scheme == "http" and not _allowed_http(host, port, allow_http_hosts):
        return RedirectError(
            "InsecureRedirect",
            f"the upstream redirected to plain http ({redacted(target)}); "
            "allow the host with --allow-http-host if that is intended",
        )
    if target in visited:
        return RedirectError("RedirectLoop", f"redirect loop at {redacted(target)}")
    if len(visited) > MAX_HOPS:
        return RedirectError("TooManyRedirects", f"more than {MAX_HOPS} redirects")
    if status == 303 or (status in (301, 302) and method == "POST"):
        return Follow(url=target, method="GET" if method != "HEAD" else "HEAD", drop_body=True)
    return Follow(url=target, method=method, drop_body=False)


def _looks_presigned(location: str) -> bool:
    lowered = location.lower()
    return "x-amz-signature=" in lowered or "awsaccesskeyid=" in lowered


def _allowed_http(host: str, port: int, allowed: Iterable[str]) -> bool:
    names = {a.strip().lower() for a in allowed}
    host = host.lower()
    return host in names or f"{host}:{port}" in names or f"[{host}]:{port}" in names


def host_allowed(host_header: str | None, own: Iterable[str]) -> bool:
    """Whether a request's Host names this proxy (guards against DNS rebinding)."""
    if not host_header:
        return False
    names = {o.lower() for o in own}
    return "*" in names or host_header.strip().lower() in names


def own_host_names(bound_host: str, port: int, *, allow_remote: bool) -> frozenset[str]:
    """The Host values this proxy answers to when bound to ``bound_host``:``port``."""
    names = {f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"}
    if bound_host not in ("0.0.0.0", "::", ""):
        names.add(f"[{bound_host}]:{port}" if ":" in bound_host else f"{bound_host}:{port}")
    if port == 80:
        names |= {"127.0.0.1", "localhost", "[::1]"}
    if allow_remote:
        names.add("*")
    return frozenset(names)
