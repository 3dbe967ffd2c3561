"""KBase Auth2 without I/O: the values it returns, how its answers are read, and the cache.

How it works: a caller builds a request with ``token_request``/``me_request``, sends it with any
HTTP client, and hands status and body to ``parse_token``/``parse_me``, which return a value or
raise the matching ``kbclient`` error. ``TokenCache`` keeps answers for Auth2's ``cachefor``
(never beyond the token's expiry), keyed by a hash of the token so the cache holds no token.
It also remembers each token's expiry, so that a token Auth2 later calls invalid can be reported
as "expired on <date>" when that is what happened.

Auth2 facts: ``GET {auth_url}api/V2/token`` and ``api/V2/me`` with header ``Authorization:
<token>``; times in epoch milliseconds; errors are ``{"error": {"httpcode", "appcode",
"message", ...}}``; an invalid or expired token is 401 with appcode 10020.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from kbclient._errors import (
    LOGIN_HINT,
    AuthUnavailableError,
    InvalidTokenError,
    TokenExpiredError,
)

INVALID_TOKEN_APPCODE = 10020
MFA_VALUES = ("Used", "NotUsed", "Unknown")


@dataclass(frozen=True)
class TokenInfo:
    """What Auth2 says about a token (``GET api/V2/token``)."""

    user: str
    type: str
    id: str
    created: datetime
    expires: datetime | None
    cachefor: timedelta
    mfa: str
    name: str | None = None

    @property
    def expired(self) -> bool:
        return self.expires is not None and self.expires <= datetime.now(timezone.utc)


@dataclass(frozen=True)
class UserInfo:
    """What Auth2 says about the token's user (``GET api/V2/me``)."""

    user: str
    display: str
    email: str
    customroles: tuple[str, ...] = ()


def normalize_auth_url(auth_url: str) -> str:
    """Auth2 URLs end with a slash; endpoints are resolved relative to it."""
    if not auth_url.startswith(("http://", "https://")):
        raise ValueError(f"auth URL must start with http:// or https://, not {auth_url!r}")
    return auth_url if auth_url.endswith("/") else auth_url + "/"


def token_request(auth_url: str, token: str) -> tuple[str, dict[str, str]]:
    return normalize_auth_url(auth_url) + "api/V2/token", {"Authorization": token}


def me_request(auth_url: str, token: str) -> tuple[str, dict[str, str]]:
    return normalize_auth_url(auth_url) + "api/V2/me", {"Authorization": token}


def _from_ms(value: Any) -> datetime | None:
    if value is None:
        return None
    return datetime.fromtimestamp(int(value) / 1000, tz=timezone.utc)


def format_date(when: datetime) -> str:
    return when.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _decode(status: int, body: bytes, auth_url: str) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        raise AuthUnavailableError(
            f"KBase auth service at {auth_url} gave an answer that is not JSON (HTTP {status}); "
            "check the auth URL (KBASE_AUTH_URL or auth_url=)"
        ) from None


def check_error(status: int, body: bytes, auth_url: str, *, expires: datetime | None) -> Any:
    """Decode a body; raise the matching error for a non-200 answer.

    ``expires`` is the token's expiry when known from earlier, to tell "expired" from "invalid".
    """
    if status == 200:
        return _decode(status, body, auth_url)
    if status in (400, 401):
        data = _decode(status, body, auth_url)
        error = data.get("error", {}) if isinstance(data, dict) else {}
        if expires is not None and expires <= datetime.now(timezone.utc):
            raise TokenExpiredError(
                f"the token expired on {format_date(expires)}; {LOGIN_HINT}", expired=expires
            )
        reason = error.get("message") or f"HTTP {status}"
        raise InvalidTokenError(
            f"KBase auth service rejected the token ({reason}): it is invalid, revoked or "
            f"expired; {LOGIN_HINT}"
        )
    if status == 404:
        raise AuthUnavailableError(
            f"{auth_url} has no KBase auth API (HTTP 404); check the auth URL "
            "(KBASE_AUTH_URL or auth_url=), e.g. https://kbase.us/services/auth/"
        )
    raise AuthUnavailableError(
        f"KBase auth service at {auth_url} answered HTTP {status}; try again in a minute"
    )


def parse_token(
    status: int, body: bytes, auth_url: str, *, expires: datetime | None = None
) -> TokenInfo:
    """TokenInfo from the answer to ``GET api/V2/token``; raises a kbclient error otherwise."""
    data = check_error(status, body, auth_url, expires=expires)
    try:
        info = TokenInfo(
            user=str(data["user"]),
            type=str(data.get("type", "")),
            id=str(data.get("id", "")),
            created=_from_ms(data.get("created", 0)) or datetime.fromtimestamp(0, timezone.utc),
            expires=_from_ms(data.get("expires")),
            cachefor=timedelta(milliseconds=int(data.get("cachefor", 300_000))),
            mfa=data.get("mfa") if data.get("mfa") in MFA_VALUES else "Unknown",
            name=data.get("name"),
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        raise AuthUnavailableError(
            f"KBase auth service at {auth_url} gave an unexpected token record; "
            "check the auth URL (KBASE_AUTH_URL or auth_url=)"
        ) from None
    if info.expired and info.expires is not None:
        raise TokenExpiredError(
            f"the token expired on {format_date(info.expires)}; {LOGIN_HINT}",
            expired=info.expires,
        )
    return info


def parse_me(status: int, body: bytes, auth_url: str) -> UserInfo:
    """UserInfo from the answer to ``GET api/V2/me``; raises a kbclient error otherwise."""
    data = check_error(status, body, auth_url, expires=None)
    try:
        return UserInfo(
            user=str(data["user"]),
            display=str(data.get("display") or ""),
            email=str(data.get("email") or ""),
            customroles=tuple(str(r) for r in data.get("customroles") or ()),
        )
    except (KeyError, TypeError, AttributeError):
        raise AuthUnavailableError(
            f"KBase auth service at {auth_url} gave an unexpected user record"
        ) from None


def token_key(auth_url: str, token: str) -> str:
    import hashlib

    return hashlib.sha256(f"{auth_url}\0{token}".encode()).hexdigest()


class TokenCache:
    """Auth2 answers kept for ``cachefor``; thread-safe; holds hashes, never tokens."""

    def __init__(self, *, max_entries: int = 1024, clock: Any = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._max = max_entries
        self._infos: dict[str, tuple[float, TokenInfo]] = {}
        self._users: dict[str, tuple[float, UserInfo]] = {}
        self._expiry: dict[str, datetime] = {}

    def _lifetime(self, info: TokenInfo) -> float:
        seconds = info.cachefor.total_seconds()
        if info.expires is not None:
            seconds = min(seconds, (info.expires - datetime.now(timezone.utc)).total_seconds())
        return max(0.0, seconds)

    def get_info(self, key: str) -> TokenInfo | None:
        with self._lock:
            entry = self._infos.get(key)
            if entry is None:
                return None
            if entry[0] <= self._clock():
                del self._infos[key]
                return None
            return entry[1]

    def put_info(self, key: str, info: TokenInfo) -> None:
        with self._lock:
            if len(self._infos) >= self._max:
                self._infos.pop(next(iter(self._infos)))
            self._infos[key] = (self._clock() + self._lifetime(info), info)
            if info.expires is not None:
                if len(self._expiry) >= self._max:
                    self._expiry.pop(next(iter(self._expiry)))
                self._expiry[key] = info.expires

    def get_user(self, key: str) -> UserInfo | None:
        with self._lock:
            entry = self._users.get(key)
            if entry is None or entry[0] <= self._clock():
                self._users.pop(key, None)
                return None
            return entry[1]

    def put_user(self, key: str, user: UserInfo, lifetime: float) -> None:
        with self._lock:
            if len(self._users) >= self._max:
                self._users.pop(next(iter(self._users)))
            self._users[key] = (self._clock() + lifetime, user)

    def known_expiry(self, key: str) -> datetime | None:
        """The expiry Auth2 once reported for this token, even after its entry lapsed."""
        with self._lock:
            return self._expiry.get(key)

    def forget(self, key: str) -> None:
        with self._lock:
            self._infos.pop(key, None)
            self._users.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._infos.clear()
            self._users.clear()
            self._expiry.clear()
