"""The daemon's knowledge of each profile's token: an I/O-free state machine.

How it works: the daemon feeds events in (a token was read from the store, Auth2 accepted or
rejected it, Auth2 could not be reached, the store failed) with the current time, and asks for
decisions back (what to answer ``/v1/connection``, when to wake up next, whether to warn). It
never sleeps or polls: ``next_wake`` is the earliest time any profile needs attention.

::

    NOT_LOGGED_IN --loaded--> UNCHECKED --accepted--> VALID --cachefor elapsed--> (check again)
                            |  \\--unreachable--> UNREACHABLE (retry with backoff)
                            |                       VALID --unreachable--> STALE (serves last info)
                            \\--rejected--> REVOKED          any --expiry passed--> EXPIRED
    store failed -> KEYRING_UNAVAILABLE (retry with backoff) / KEYRING_LOCKED (retry when asked)

Checks follow Auth2's ``cachefor`` (clamped to 30 s .. 1 h), and also wake at the expiry and at
the start of the warning window (7 days before expiry).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from kbdaemon.errors import (
    AuthUnreachableError,
    KeyringLockedError,
    KeystoreError,
    NotLoggedInError,
    TokenExpiredError,
)

WARN_BEFORE = timedelta(days=7)
MIN_RECHECK = 30.0
MAX_RECHECK = 3600.0
RETRY_FIRST = 5.0
RETRY_MAX = 300.0
NOTIFY_EVERY = 24 * 3600.0


class TokenFacts(Protocol):
    """What Auth2 says about a token (kbclient's TokenInfo fits)."""

    @property
    def user(self) -> str: ...

    @property
    def expires(self) -> datetime | None: ...

    @property
    def cachefor(self) -> timedelta: ...


class Status(enum.Enum):
    NOT_LOGGED_IN = "NEEDS_LOGIN"
    UNCHECKED = "CHECKING"
    VALID = "OK"
    STALE = "STALE"
    UNREACHABLE = "AUTH_UNREACHABLE"
    REVOKED = "REVOKED"
    EXPIRED = "TOKEN_EXPIRED"
    KEYRING_LOCKED = "KEYRING_LOCKED"
    KEYRING_UNAVAILABLE = "KEYRING_UNAVAILABLE"


@dataclass(frozen=True)
class Answer:
    """What ``/v1/connection`` hands out for a profile."""

    username: str
    token: str = field(repr=False)
    expires: float | None
    stale: bool
    token_source: str


@dataclass
class ProfileState:
    """One profile's token, what Auth2 last said about it, and when to look again."""

    name: str
    status: Status = Status.NOT_LOGGED_IN
    token: str | None = field(default=None, repr=False)
    storage: str | None = None
    storage_kind: str | None = None
    user: str | None = None
    expires: float | None = None
    cachefor: float = MIN_RECHECK
    last_ok: float | None = None
    last_error: str | None = None
    wake_at: float | None = None
    retry_delay: float = RETRY_FIRST
    notified_at: float | None = None

    # events -----------------------------------------------------------------------------------

    def token_loaded(self, token: str, *, kind: str, where: str, now: float) -> None:
        changed = token != self.token
        self.token, self.storage_kind, self.storage = token, kind, where
        if changed:
            self.status, self.user, self.expires, self.last_ok = Status.UNCHECKED, None, None, None
            self.last_error, self.notified_at = None, None
        self.retry_delay = RETRY_FIRST
        self.wake_at = now

    def token_missing(self) -> None:
        self.status, self.token, self.storage, self.storage_kind = (
            Status.NOT_LOGGED_IN,
            None,
            None,
            None,
        )
        self.user = self.expires = self.last_ok = self.wake_at = None
        self.last_error = None

    def store_failed(self, error: KeystoreError, *, now: float) -> None:
        if self.token is not None:  # keep serving what was read before
            self.last_error = error.message
            return
        self.last_error = error.message
        if isinstance(error, KeyringLockedError):
            # No timed retry: each attempt may pop up an unlock prompt. A request or a reload
            # (`kbdaemon login`, kbclient asking) tries again.
            self.status, self.wake_at = Status.KEYRING_LOCKED, None
        else:
            self.status = Status.KEYRING_UNAVAILABLE
            self._retry(now)

    def accepted(self, facts: TokenFacts, *, now: float) -> None:
        self.user = facts.user
        self.expires = facts.expires.timestamp() if facts.expires else None
        self.cachefor = min(max(facts.cachefor.total_seconds(), MIN_RECHECK), MAX_RECHECK)
        self.status, self.last_ok, self.last_error = Status.VALID, now, None
        self.retry_delay = RETRY_FIRST
        wake = now + self.cachefor
        if self.expires is not None:
            warn_at = self.expires - WARN_BEFORE.total_seconds()
            wake = min(wake, self.expires, *([warn_at] if warn_at > now else []))
        self.wake_at = wake
        self.tick(now)

    def rejected(self, message: str, *, now: float, expired: bool = False) -> None:
        self.last_error = message
        self.status = Status.EXPIRED if expired else Status.REVOKED
        self.tick(now)
        self.wake_at = None

    def unreachable(self, message: str, *, now: float) -> None:
        self.last_error = message
        self.status = Status.STALE if self.user is not None else Status.UNREACHABLE
        self._retry(now)
        self.tick(now)

    def tick(self, now: float) -> None:
        """Apply the passing of time: an expiry that has passed ends the token's use."""
        if self.token is not None and self.expires is not None and self.expires <= now:
            self.status, self.wake_at = Status.EXPIRED, None

    def _retry(self, now: float) -> None:
        self.wake_at = now + self.retry_delay
        self.retry_delay = min(self.retry_delay * 2, RETRY_MAX)

    # decisions --------------------------------------------------------------------------------

    def due(self, now: float) -> bool:
        return self.wake_at is not None and self.wake_at <= now

    def needs_reload(self) -> bool:
        """Whether a request should read the store again (a login may have happened since)."""
        return self.status in (
            Status.NOT_LOGGED_IN,
            Status.REVOKED,
            Status.EXPIRED,
            Status.KEYRING_LOCKED,
            Status.KEYRING_UNAVAILABLE,
        )

    def answer(self, *, now: float) -> Answer:
        """The connection info to hand out, or the KBDaemonError that says why not."""
        self.tick(now)
        login = f"run `kbdaemon login --profile {self.name}`"
        if self.status is Status.NOT_LOGGED_IN:
            raise NotLoggedInError(f"not logged in for profile {self.name!r}: {login}")
        if self.status is Status.REVOKED:
            raise NotLoggedInError(
                f"KBase Auth2 rejected the stored token of profile {self.name!r} (revoked or "
                f"invalid): {login} with a new token"
            )
        if self.status is Status.EXPIRED:
            raise TokenExpiredError(
                f"the token of profile {self.name!r} expired on {_date(self.expires)}: "
                f"{login} with a new token"
            )
        if self.status is Status.KEYRING_LOCKED:
            raise KeyringLockedError(self.last_error or "the OS keyring is locked")
        if self.status is Status.KEYRING_UNAVAILABLE:
            raise KeystoreError(self.last_error or "the OS keyring is unavailable")
        if self.status in (Status.UNCHECKED, Status.UNREACHABLE) or self.user is None:
            raise AuthUnreachableError(
                f"KBase Auth2 has not confirmed the token of profile {self.name!r} yet"
                + (f": {self.last_error}" if self.last_error else "")
            )
        assert self.token is not None
        return Answer(
            username=self.user,
            token=self.token,
            expires=self.expires,
            stale=self.status is Status.STALE,
            token_source=self.storage_kind or "unknown",
        )

    def warning(self, now: float) -> str | None:
        """A sentence when the token expires within 7 days, else None."""
        if self.status not in (Status.VALID, Status.STALE) or self.expires is None:
            return None
        left = self.expires - now
        if left > WARN_BEFORE.total_seconds():
            return None
        return (
            f"the KBase token of profile {self.name!r} expires in {_span(left)} "
            f"(on {_date(self.expires)}): run `kbdaemon login --profile {self.name}` with a new one"
        )

    def take_notification(self, now: float) -> str | None:
        """The warning, at most once a day: the caller shows it as a desktop notification."""
        text = self.warning(now)
        if text is None or (self.notified_at is not None and now - self.notified_at < NOTIFY_EVERY):
            return None
        self.notified_at = now
        return text

    def snapshot(self, now: float) -> dict[str, Any]:
        """Status for humans and scripts; never the token."""
        self.tick(now)
        return {
            "profile": self.name,
            "status": self.status.value,
            "user": self.user,
            "expires": int(self.expires * 1000) if self.expires is not None else None,
            "storage": self.storage,
            "storage_kind": self.storage_kind,
            "last_ok_check": int(self.last_ok * 1000) if self.last_ok is not None else None,
            "next_check": int(self.wake_at * 1000) if self.wake_at is not None else None,
            "last_error": self.last_error,
            "warning": self.warning(now),
        }


@dataclass
class DaemonState:
    """All profiles the daemon serves."""

    profiles: dict[str, ProfileState] = field(default_factory=dict)

    def profile(self, name: str) -> ProfileState:
        if name not in self.profiles:
            self.profiles[name] = ProfileState(name=name)
        return self.profiles[name]

    def next_wake(self) -> float | None:
        times = [p.wake_at for p in self.profiles.values() if p.wake_at is not None]
        return min(times) if times else None

    def due(self, now: float) -> list[ProfileState]:
        return [p for p in self.profiles.values() if p.due(now)]


def _date(epoch: float | None) -> str:
    if epoch is None:
        return "an unknown date"
    return datetime.fromtimestamp(epoch).astimezone().strftime("%Y-%m-%d %H:%M %Z")


def _span(seconds: float) -> str:
    seconds = max(seconds, 0)
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} hours"
    minutes = round(seconds / 60)
    return f"{minutes} minute{'' if minutes == 1 else 's'}"
