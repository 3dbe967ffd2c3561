"""KBase Auth2 clients: ``KBaseAuthClient`` (async) and ``SyncKBaseAuthClient`` (blocking).

How it works: both are thin I/O shells around ``_auth2`` (requests, parsing, cache). Each holds
one pooled httpx client, made on first use (so ``import kbclient`` does not import httpx), and a
``TokenCache``: a cached answer is returned without any request until Auth2's ``cachefor``
lapses. The async client shares one in-flight request among concurrent callers of the same
token. The blocking client uses httpx's blocking client, never an event loop, so it is safe in a
thread where a loop is running (Jupyter). httpx errors become ``AuthUnavailableError`` here.
"""

from __future__ import annotations

import threading
from datetime import timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any

from kbclient._auth2 import (
    TokenCache,
    TokenInfo,
    UserInfo,
    me_request,
    normalize_auth_url,
    parse_me,
    parse_token,
    token_key,
    token_request,
)
from kbclient._errors import AuthUnavailableError
from kbclient.profiles import PROD_AUTH_URL

if TYPE_CHECKING:
    import asyncio

    import httpx

USER_AGENT = "kbclient (kbase-spark-connect)"


def _unreachable(auth_url: str, exc: Exception) -> AuthUnavailableError:
    import httpx

    what = "did not answer in time" if isinstance(exc, httpx.TimeoutException) else "is unreachable"
    return AuthUnavailableError(
        f"KBase auth service at {auth_url} {what} ({type(exc).__name__}); check your network "
        "and the auth URL (KBASE_AUTH_URL or auth_url=), then try again"
    )


class _Base:
    def __init__(self, auth_url: str, timeout: float, cache: TokenCache | None) -> None:
        self.auth_url = normalize_auth_url(auth_url)
        self.timeout = timeout
        self.cache = cache if cache is not None else TokenCache()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(auth_url={self.auth_url!r}, timeout={self.timeout})"

    def _cached_info(self, token: str) -> tuple[str, TokenInfo | None]:
        key = token_key(self.auth_url, token)
        return key, self.cache.get_info(key)

    def _read_info(self, key: str, status: int, body: bytes) -> TokenInfo:
        try:
            info = parse_token(status, body, self.auth_url, expires=self.cache.known_expiry(key))
        except Exception:
            self.cache.forget(key)
            raise
        self.cache.put_info(key, info)
        return info

    def _read_user(self, key: str, status: int, body: bytes, cachefor: timedelta) -> UserInfo:
        user = parse_me(status, body, self.auth_url)
        self.cache.put_user(key, user, cachefor.total_seconds())
        return user


class KBaseAuthClient(_Base):
    """Asynchronous KBase Auth2 client with a cache; use one instance per event loop.

    Args:
        auth_url: the Auth2 service, e.g. ``https://kbase.us/services/auth/``.
        timeout: seconds for each HTTP request.
        cache: share a ``TokenCache`` between clients (default: one of its own).
    """

    def __init__(
        self,
        auth_url: str = PROD_AUTH_URL,
        *,
        timeout: float = 10.0,
        cache: TokenCache | None = None,
    ) -> None:
        super().__init__(auth_url, timeout, cache)
        self._client: httpx.AsyncClient | None = None
        self._inflight: dict[str, asyncio.Future[TokenInfo]] = {}

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            import httpx

            self._client = httpx.AsyncClient(
                timeout=self.timeout, headers={"User-Agent": USER_AGENT}, follow_redirects=False
            )
        return self._client

    async def _get(self, url: str, headers: dict[str, str]) -> tuple[int, bytes]:
        import httpx

        try:
            response = await self._http().get(url, headers=headers)
        except httpx.HTTPError as exc:
            raise _unreachable(self.auth_url, exc) from None
        return response.status_code, response.content

    async def token_info(self, token: str) -> TokenInfo:
        """What Auth2 says about ``token``, from the cache when fresh.

        Raises:
            InvalidTokenError, TokenExpiredError: Auth2 refused the token.
            AuthUnavailableError: Auth2 is unreachable, slow or failing.
        """
        key, info = self._cached_info(token)
        if info is not None:
            return info
        import asyncio

        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[TokenInfo] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            status, body = await self._get(*token_request(self.auth_url, token))
            info = self._read_info(key, status, body)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning without waiters
            raise
        else:
            future.set_result(info)
            return info
        finally:
            del self._inflight[key]

    async def me(self, token: str) -> UserInfo:
        """The token's user: display name, email, custom roles (cached like ``token_info``)."""
        info = await self.token_info(token)
        key = token_key(self.auth_url, token)
        user = self.cache.get_user(key)
        if user is not None:
            return user
        status, body = await self._get(*me_request(self.auth_url, token))
        return self._read_user(key, status, body, info.cachefor)

    async def aclose(self) -> None:
        """Close the pooled HTTP connections."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def __aenter__(self) -> KBaseAuthClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class SyncKBaseAuthClient(_Base):
    """Blocking KBase Auth2 client with a cache; thread-safe, and safe inside a running loop.

    Args:
        auth_url: the Auth2 service, e.g. ``https://kbase.us/services/auth/``.
        timeout: seconds for each HTTP request.
        cache: share a ``TokenCache`` between clients (default: one of its own).
    """

    def __init__(
        self,
        auth_url: str = PROD_AUTH_URL,
        *,
        timeout: float = 10.0,
        cache: TokenCache | None = None,
    ) -> None:
        super().__init__(auth_url, timeout, cache)
        self._client: httpx.Client | None = None
        self._lock = threading.Lock()

    def _http(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                import httpx

                self._client = httpx.Client(
                    timeout=self.timeout,
                    headers={"User-Agent": USER_AGENT},
                    follow_redirects=False,
                )
            return self._client

    def _get(self, url: str, headers: dict[str, str]) -> tuple[int, bytes]:
        import httpx

        try:
            response = self._http().get(url, headers=headers)
        except httpx.HTTPError as exc:
            raise _unreachable(self.auth_url, exc) from None
        return response.status_code, response.content

    def token_info(self, token: str) -> TokenInfo:
        """What Auth2 says about ``token``, from the cache when fresh.

        Raises:
            InvalidTokenError, TokenExpiredError: Auth2 refused the token.
            AuthUnavailableError: Auth2 is unreachable, slow or failing.
        """
        key, info = self._cached_info(token)
        if info is not None:
            return info
        status, body = self._get(*token_request(self.auth_url, token))
        return self._read_info(key, status, body)

    def me(self, token: str) -> UserInfo:
        """The token's user: display name, email, custom roles (cached like ``token_info``)."""
        info = self.token_info(token)
        key = token_key(self.auth_url, token)
        user = self.cache.get_user(key)
        if user is not None:
            return user
        status, body = self._get(*me_request(self.auth_url, token))
        return self._read_user(key, status, body, info.cachefor)

    def close(self) -> None:
        """Close the pooled HTTP connections."""
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def __enter__(self) -> SyncKBaseAuthClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
