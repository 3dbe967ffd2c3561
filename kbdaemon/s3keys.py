"""The user's S3 keys, held in memory only: when to refresh them, one fetch at a time.

The keys come from the data governance service (:mod:`kbdaemon.governance`) or are given once
(:meth:`S3KeySource.fixed`).

How it works::

    S3KeySource.get()
        holder.current(now) valid?  --no--> fetch now (single flight); failure raises
            | yes
        holder.due(now)?  --yes--> refresh in the background, answer the current keys
            | no
        the current keys

    upstream S3 refuses the keys (403) --> S3KeySource.refresh_after_rejection(): a refresh
        at most every ``min_forced_interval``; the new keys if they changed

Keys are good for ``keep_for`` after the last successful fetch: when the service is down the
last keys are used until then (the service would answer them anyway; only a rotation changes
them); when it refuses the token or the account, they are dropped at once. They are refreshed
every ``refresh_every``, sooner when S3 refused them. The secret is in no repr, log line or
error message.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from kbclient.daemon_api import ErrorCode, S3Credentials
from kbdaemon.errors import KBDaemonError

__all__ = [
    "KeyStatus",
    "S3AccessDeniedError",
    "S3KeyHolder",
    "S3KeySource",
    "S3Keys",
    "S3KeysError",
    "S3KeysNeedLoginError",
    "S3KeysNotConfiguredError",
    "S3KeysTokenRejectedError",
    "S3KeysUnavailableError",
    "credential_process_json",
]

log = logging.getLogger(__name__)


class S3KeysError(KBDaemonError):
    """The S3 keys cannot be had; the subclass says why and what to do."""

    code = ErrorCode.S3_KEYS_ERROR


class S3KeysNotConfiguredError(S3KeysError):
    """The profile has no ``credentials_url``: the daemon does not know where keys come from."""

    code = ErrorCode.S3_KEYS_NOT_CONFIGURED


class S3KeysNeedLoginError(S3KeysError):
    """No KBase token is stored for the profile: log in first."""

    code = ErrorCode.NEEDS_LOGIN


class S3KeysUnavailableError(S3KeysError):
    """The governance service cannot be reached or failed: try again later."""

    code = ErrorCode.S3_KEYS_UNAVAILABLE


class S3KeysTokenRejectedError(S3KeysError):
    """The service says the KBase token is invalid or expired: log in again."""

    code = ErrorCode.INVALID_TOKEN


class S3AccessDeniedError(S3KeysError):
    """The token is valid but its account may not use the data lake (a role is missing)."""

    code = ErrorCode.S3_ACCESS_DENIED


@dataclass(frozen=True)
class S3Keys:
    """One S3 access key and its secret; the secret is never in the repr."""

    access_key: str
    secret_key: str = field(repr=False)
    username: str = ""
    session_token: str = field(default="", repr=False)

    def __repr__(self) -> str:
        return f"S3Keys(access_key={self.access_key!r}, username={self.username!r})"

    @classmethod
    def from_json(cls, data: Any) -> S3Keys:
        """The keys of the service's ``CredentialsResponse`` body.

        Raises:
            ValueError: the body is not that model (the message names no value).
        """
        if not isinstance(data, dict):
            raise ValueError("the answer is not a JSON object")
        access, secret = data.get("s3_access_key"), data.get("s3_secret_key")
        if not isinstance(access, str) or not access or not isinstance(secret, str) or not secret:
            raise ValueError("the answer has no s3_access_key and s3_secret_key")
        username = data.get("username")
        return cls(access, secret, username if isinstance(username, str) else "")


def credential_process_json(keys: S3Keys, *, expires_at: float | None = None) -> dict[str, Any]:
    """The AWS SDKs' ``credential_process`` output (Version 1) for ``keys``.

    Args:
        keys: the keys to hand out.
        expires_at: wall-clock seconds when an SDK should run the process again (it caches
            the keys until a few minutes before); None for no expiry.
    """
    when = (
        None
        if expires_at is None
        else datetime.datetime.fromtimestamp(expires_at, tz=datetime.timezone.utc)
    )
    return S3Credentials(
        profile="",
        access_key=keys.access_key,
        secret_key=keys.secret_key,
        session_token=keys.session_token,
        expires=when,
    ).credential_process()


@dataclass(frozen=True)
class KeyStatus:
    """What ``status`` shows of the keys: never the secret."""

    state: str  # "none", "fresh", "due", "expired"
    access_key: str | None
    fetched_at: float | None
    expires_at: float | None
    last_error: str | None
    last_error_code: str | None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class S3KeyHolder:
    """The keys and when to refresh them, without I/O; ``now`` is wall-clock seconds.

    Args:
        refresh_every: seconds after a fetch when the keys are fetched again.
        keep_for: seconds after the last successful fetch the keys are used while the
            service cannot be reached; after that, requests fail with the last error.
        retry_after: seconds between attempts after a failed refresh.
        min_forced_interval: the least seconds between two refreshes that S3's refusals force.
    """

    def __init__(
        self,
        *,
        refresh_every: float = 300.0,
        keep_for: float = 12 * 3600.0,
        retry_after: float = 15.0,
        min_forced_interval: float = 10.0,
    ) -> None:
        if not 0 < refresh_every <= keep_for:
            raise ValueError("refresh_every must be positive and at most keep_for")
        self.refresh_every = refresh_every
        self.keep_for = keep_for
        self.retry_after = retry_after
        self.min_forced_interval = min_forced_interval
        self._keys: S3Keys | None = None
        self._fetched_at = 0.0
        self._attempted_at = float("-inf")
        self._forced_at = float("-inf")
        self._stale = False
        self._error: S3KeysError | None = None

    def __repr__(self) -> str:
        return f"S3KeyHolder(keys={self._keys!r}, fetched_at={self._fetched_at})"

    def current(self, now: float) -> S3Keys | None:
        """The keys if they are still good to use."""
        if self._keys is None or now >= self._fetched_at + self.keep_for:
            return None
        return self._keys

    def due(self, now: float) -> bool:
        """Whether a refresh should start now."""
        if now < self._attempted_at + self.retry_after:
            return False
        return self._keys is None or self._stale or now >= self._fetched_at + self.refresh_every

    def next_wake(self, now: float) -> float:
        """Seconds until :meth:`due` next turns true (0 when it is)."""
        if self.due(now):
            return 0.0
        retry = self._attempted_at + self.retry_after
        if self._keys is None or self._stale:
            return max(0.0, retry - now)
        return max(0.0, max(retry, self._fetched_at + self.refresh_every) - now)

    def may_force(self, now: float) -> bool:
        """Whether S3's refusal of the keys may force a refresh now (rate-limited)."""
        return now >= self._forced_at + self.min_forced_interval

    def forcing(self, now: float) -> None:
        self._forced_at = now

    def attempting(self, now: float) -> None:
        self._attempted_at = now

    def fetched(self, keys: S3Keys, now: float) -> bool:
        """Record fresh keys; whether they differ from the ones held."""
        changed = self._keys is None or (
            (keys.access_key, keys.secret_key) != (self._keys.access_key, self._keys.secret_key)
        )
        self._keys = keys
        self._fetched_at = now
        self._stale = False
        self._error = None
        return changed

    def failed(self, error: S3KeysError) -> None:
        """Record a failed refresh: the held keys stay until they expire if the service could
        not answer, and are dropped at once if it refused the token or the account."""
        self._error = error
        if isinstance(error, S3KeysTokenRejectedError | S3AccessDeniedError):
            self._keys = None
            self._stale = False

    def clear(self) -> None:
        """Forget the keys and the last error (logout, or another user's token)."""
        self._keys = None
        self._fetched_at = 0.0
        self._attempted_at = float("-inf")
        self._stale = False
        self._error = None

    def mark_stale(self) -> None:
        """The service said the keys changed (or S3 refused them): refresh at the next chance."""
        self._stale = True

    @property
    def error(self) -> S3KeysError | None:
        return self._error

    def status(self, now: float) -> KeyStatus:
        if self._keys is None:
            state = "none"
        elif self.current(now) is None:
            state = "expired"
        elif self._stale or now >= self._fetched_at + self.refresh_every:
            state = "due"
        else:
            state = "fresh"
        return KeyStatus(
            state=state,
            access_key=self._keys.access_key if self._keys else None,
            fetched_at=self._fetched_at if self._keys else None,
            expires_at=self._fetched_at + self.keep_for if self._keys else None,
            last_error=self._error.message if self._error else None,
            last_error_code=self._error.code.value if self._error else None,
        )


Fetch = Callable[[], Awaitable[S3Keys]]


class S3KeySource:
    """Keys for each request: the holder's decisions, the service's answers, one fetch at a time.

    Args:
        fetch: makes one fetch (for example ``lambda: client.fetch(token)``).
        holder: the key holder (its settings say when to refresh).
        clock: wall-clock seconds (tests move it).
    """

    def __init__(
        self,
        fetch: Fetch,
        *,
        holder: S3KeyHolder | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._fetch = fetch
        self.holder = holder or S3KeyHolder()
        self._clock = clock
        self._inflight: asyncio.Task[S3Keys] | None = None
        self._background: set[asyncio.Task[Any]] = set()

    def __repr__(self) -> str:
        return f"S3KeySource({self.holder!r})"

    @classmethod
    def fixed(cls, keys: S3Keys) -> S3KeySource:
        """A source of keys given once (from the environment, say), never refreshed."""

        async def same() -> S3Keys:
            return keys

        forever = float("inf")
        source = cls(same, holder=S3KeyHolder(refresh_every=forever, keep_for=forever))
        source.replace(keys)
        return source

    async def get(self) -> S3Keys:
        """Keys to sign with now; a due refresh runs in the background.

        Raises:
            S3KeysError: no good keys are held and fetching failed (the last error).
        """
        now = self._clock()
        keys = self.holder.current(now)
        if keys is not None:
            if self.holder.due(now) and self._inflight is None:
                self._spawn()
            return keys
        if self._inflight is None and not self.holder.due(now) and self.holder.error:
            raise self.holder.error
        return await self._refresh()

    async def refresh(self) -> S3Keys:
        """Fetch now (joining a fetch under way) and return the new keys.

        Raises:
            S3KeysError: the fetch failed (the held keys stay until they expire).
        """
        return await self._refresh()

    async def refresh_after_rejection(self, rejected: S3Keys) -> S3Keys | None:
        """S3 refused ``rejected``: new keys if a (rate-limited) refresh finds others, else None."""
        now = self._clock()
        current = self.holder.current(now)
        if current is not None and current != rejected:
            return current
        if not self.holder.may_force(now):
            return None
        self.holder.forcing(now)
        self.holder.mark_stale()
        try:
            keys = await self._refresh()
        except S3KeysError:
            return None
        return keys if keys != rejected else None

    def status(self) -> KeyStatus:
        """The keys' state for ``status`` output (never the secret)."""
        return self.holder.status(self._clock())

    def replace(self, keys: S3Keys) -> None:
        """Keys the caller got itself (a rotation) become the held ones."""
        self.holder.fetched(keys, self._clock())

    def forget(self) -> None:
        """Drop the keys held (logout); a fetch under way is cancelled."""
        if self._inflight is not None:
            self._inflight.cancel()
            self._inflight = None
        self.holder.clear()

    async def close(self) -> None:
        for task in [*self._background, *([self._inflight] if self._inflight else [])]:
            task.cancel()
        for task in list(self._background):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _spawn(self) -> None:
        task = asyncio.ensure_future(self._refresh_quietly())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _refresh_quietly(self) -> None:
        try:
            await self._refresh()
        except S3KeysError as exc:
            log.warning("S3 keys not refreshed, the held ones stay in use: %s", exc.message)

    async def _refresh(self) -> S3Keys:
        if self._inflight is None:
            self._inflight = asyncio.ensure_future(self._fetch_once())
            self._inflight.add_done_callback(self._clear_inflight)
        return await asyncio.shield(self._inflight)

    def _clear_inflight(self, task: asyncio.Task[S3Keys]) -> None:
        if self._inflight is task:
            self._inflight = None
        if not task.cancelled():
            task.exception()  # retrieved: a failed fetch with no waiter is no "never retrieved"

    async def _fetch_once(self) -> S3Keys:
        self.holder.attempting(self._clock())
        try:
            keys = await self._fetch()
        except S3KeysError as exc:
            self.holder.failed(exc)
            raise
        if self.holder.fetched(keys, self._clock()):
            log.info("S3 keys of %s fetched (access key %s)", keys.username, keys.access_key)
        return keys
