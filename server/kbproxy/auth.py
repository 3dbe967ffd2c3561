"""Token validation against KBase Auth2: cached, single flight, with the MFA policy.

How it works::

    token --sha256--> key --cache hit--> Identity (or the cached refusal)
                          \\--miss--> in flight for key? --yes--> join it
                                                        \\--no--> GET {auth}api/V2/token

A valid token is cached for min(cachefor, expires - now, max_ttl); an invalid one (401) for
``negative_ttl``. Auth2 being down, answering 5xx or too slowly is ``AuthUnavailable`` and is
never cached. The cache is an LRU of at most ``max_size`` entries, keyed by a hash so that the
token itself is never kept. ``TokenCache`` is plain data in, decisions out; ``Auth2Client`` is
the only I/O; ``Authenticator`` puts them together with the policy.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Protocol

import httpx

from kbproxy.errors import AuthUnavailable, PermissionDenied, Unauthenticated
from kbproxy.reasons import Reason

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Identity:
    """What Auth2 says about a valid token."""

    username: str
    mfa: str
    token_type: str
    expires_ms: int
    cachefor_ms: int


class TokenSource(Protocol):
    """Looks a token up; raises Unauthenticated (invalid) or AuthUnavailable."""

    async def lookup(self, token: str) -> Identity: ...


def token_key(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


@dataclass
class AuthCounters:
    hits: int = 0
    misses: int = 0
    negative_hits: int = 0
    joins: int = 0
    requests: int = 0
    failures: int = 0


class TokenCache:
    """LRU of token hashes -> Identity or refusal, each with its own expiry (I/O-free)."""

    def __init__(
        self,
        *,
        max_size: int = 10_000,
        max_ttl: float = 300.0,
        negative_ttl: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_size = max_size
        self.max_ttl = max_ttl
        self.negative_ttl = negative_ttl
        self._clock = clock
        self._entries: OrderedDict[bytes, tuple[float, Identity | Unauthenticated]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> Identity | Unauthenticated | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def ttl_for(self, identity: Identity) -> float:
        """min(cachefor, expires - now, max_ttl), in seconds, never negative."""
        until_expiry = identity.expires_ms / 1000 - self._clock()
        return max(0.0, min(identity.cachefor_ms / 1000, until_expiry, self.max_ttl))

    def put(self, key: bytes, result: Identity | Unauthenticated) -> None:
        ttl = self.negative_ttl if isinstance(result, Unauthenticated) else self.ttl_for(result)
        if ttl <= 0:
            self._entries.pop(key, None)
            return
        self._entries[key] = (self._clock() + ttl, result)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_size:
            self._entries.popitem(last=False)


REJECTED_HINT = (
    "KBase rejected the token (invalid, expired or revoked): "
    "log in again (kbdaemon login) or create a new token, then start a new Spark session "
    "(create_spark_session())"
)

EXPIRED_HINT = (
    "the KBase token has expired: log in again (kbdaemon login) or create a new token, then "
    "start a new Spark session (create_spark_session())"
)


class Auth2Client:
    """Asks KBase Auth2 about tokens with one pooled httpx client.

    Args:
        auth_url: the service root, ending with a slash (https://kbase.us/services/auth/).
        timeout: seconds for the whole request; slower counts as unavailable.
    """

    def __init__(self, *, auth_url: str, timeout: float = 5.0) -> None:
        self.auth_url = auth_url if auth_url.endswith("/") else auth_url + "/"
        self.timeout = timeout
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
            follow_redirects=False,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def lookup(self, token: str) -> Identity:
        url = self.auth_url + "api/V2/token"
        try:
            response = await self._client.get(url, headers={"Authorization": token})
        except httpx.TimeoutException:
            raise AuthUnavailable(
                f"the KBase auth service did not answer within {self.timeout:g} s; "
                "try again in a moment"
            ) from None
        except httpx.HTTPError as exc:
            raise AuthUnavailable(
                f"the KBase auth service is unreachable ({type(exc).__name__}); "
                "try again in a moment"
            ) from None
        if response.status_code in (400, 401):
            raise Unauthenticated(REJECTED_HINT)
        if response.status_code != 200:
            raise AuthUnavailable(
                f"the KBase auth service answered HTTP {response.status_code}; "
                "try again in a moment"
            )
        try:
            body = response.json()
            identity = Identity(
                username=str(body["user"]),
                mfa=str(body.get("mfa") or "Unknown"),
                token_type=str(body.get("type") or ""),
                expires_ms=int(body["expires"]),
                cachefor_ms=int(body.get("cachefor") or 0),
            )
        except (ValueError, KeyError, TypeError):
            raise AuthUnavailable(
                "the KBase auth service sent an unexpected answer; try again in a moment"
            ) from None
        if identity.expires_ms <= time.time() * 1000:
            raise Unauthenticated(EXPIRED_HINT, Reason.TOKEN_EXPIRED)
        return identity

    async def ping(self) -> bool:
        """True when the auth service answers its root with 200."""
        try:
            response = await self._client.get(self.auth_url)
        except httpx.HTTPError:
            return False
        return response.status_code == 200


@dataclass(frozen=True)
class MfaPolicy:
    """Whether a token must have been created with multi-factor authentication."""

    required: bool = True
    exempt: Collection[str] = field(default_factory=frozenset)

    def check(self, identity: Identity) -> None:
        if not self.required or identity.mfa == "Used" or identity.username in self.exempt:
            return
        raise PermissionDenied(
            f"this service requires a token created with multi-factor authentication, and "
            f"user {identity.username}'s token was not (mfa={identity.mfa}): log in to KBase "
            "with MFA and create a new token"
        )


MISSING_HINT = (
    "no KBase token: pass it in the Spark Connect URL as x-kbase-token=<token> "
    "(create_spark_session() does this), or as gRPC metadata 'authorization: Bearer <token>'"
)


class Authenticator:
    """Cached, single-flight token validation followed by the MFA policy."""

    def __init__(self, *, source: TokenSource, cache: TokenCache, policy: MfaPolicy) -> None:
        self.source = source
        self.cache = cache
        self.policy = policy
        self.counters = AuthCounters()
        self._in_flight: dict[bytes, asyncio.Task[Identity | Unauthenticated]] = {}

    def cached(self, token: str | None) -> Identity | None:
        """The token's identity if the cache knows it (policy checked), else None.

        Raises Unauthenticated (no token, or a cached refusal) or PermissionDenied, as
        ``authenticate`` does; never waits.
        """
        if not token:
            raise Unauthenticated(MISSING_HINT, Reason.NO_TOKEN)
        result = self.cache.get(token_key(token))
        if result is None:
            return None
        if isinstance(result, Unauthenticated):
            self.counters.negative_hits += 1
            raise Unauthenticated(result.sentence, result.reason)
        self.counters.hits += 1
        self.policy.check(result)
        return result

    async def authenticate(self, token: str | None) -> Identity:
        """The token's identity; raises Unauthenticated, PermissionDenied or AuthUnavailable."""
        identity = self.cached(token)
        if identity is not None:
            return identity
        assert token
        self.counters.misses += 1
        result = await self._fetch(token_key(token), token)
        if isinstance(result, Unauthenticated):
            raise Unauthenticated(result.sentence, result.reason)
        self.policy.check(result)
        return result

    async def _fetch(self, key: bytes, token: str) -> Identity | Unauthenticated:
        task = self._in_flight.get(key)
        if task is not None:
            self.counters.joins += 1
        else:
            task = asyncio.create_task(self._lookup(key, token))
            self._in_flight[key] = task
            task.add_done_callback(lambda done: self._settled(key, done))
        # shield: a caller that goes away does not cancel the lookup the others wait for.
        return await asyncio.shield(task)

    def _settled(self, key: bytes, task: asyncio.Task[Identity | Unauthenticated]) -> None:
        self._in_flight.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved here too: every caller may have gone away

    async def _lookup(self, key: bytes, token: str) -> Identity | Unauthenticated:
        self.counters.requests += 1
        try:
            result: Identity | Unauthenticated = await self.source.lookup(token)
        except Unauthenticated as exc:
            result = exc
        except AuthUnavailable:
            self.counters.failures += 1
            raise
        self.cache.put(key, result)
        return result
