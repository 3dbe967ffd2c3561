"""The daemon's service: tokens per profile, their checks with Auth2, the S3 proxies, the API.

How it works: ``Daemon`` owns a ``DaemonState`` (state.py) and does the I/O the state asks for:
reading the token store (off the event loop, with the keystore's timeout), asking Auth2 about a
token (kbclient's ``KBaseAuthClient``), showing desktop notifications. ``run()`` sleeps until the
state's next wake-up time or until a request changes something (a reload after login or logout);
there is no polling loop, so an idle daemon costs nothing. Each profile with an ``s3_upstream``
gets its own local S3 proxy. Each profile with a ``credentials_url`` gets S3 keys from the data
governance service with its current token (daemonkeys.py: fetched in the background at start and
after each login, dropped on logout, in memory only); the profile's S3 proxy re-signs with them,
and the socket API hands them to ``kbdaemon s3-credentials``. The socket API (api.py) calls
``health``/``status``/``connection``/``reload``/``s3_credentials``/``s3_keys``; process
concerns (pid file, socket, signals, logs) live in process.py.

The configuration is read again on ``reload`` (``kbdaemon login``, ``kbdaemon reload``,
SIGHUP) and when a request names a profile the daemon does not know yet: new profiles are
served at once, removed ones dropped, a profile whose auth URL changed is checked again, and an
S3 proxy whose upstream, port or allowed hosts changed is restarted. A config file that no
longer parses leaves the running configuration in place; status shows the problem.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, Protocol

from kbclient import (
    AuthError,
    KBaseAuthClient,
    KBaseError,
    TokenCache,
    TokenExpiredError,
    TokenInfo,
)
from kbclient.daemon_api import DaemonConnection, S3Credentials, S3KeysInfo
from kbclient.profiles import Config, Profile, ProfileError
from kbdaemon import __version__
from kbdaemon.api import UnknownProfileError
from kbdaemon.daemonkeys import ProfileKeys
from kbdaemon.errors import KBDaemonError, KeyringLockedError, KeystoreError
from kbdaemon.keystore import Keystore
from kbdaemon.notify import desktop_notify
from kbdaemon.s3keys import S3KeysNotConfiguredError, S3KeySource
from kbdaemon.s3proxy import S3Proxy
from kbdaemon.settings import DaemonSettings, daemon_settings
from kbdaemon.state import DaemonState, ProfileState, Status, TokenFacts

log = logging.getLogger(__name__)

RELOAD_ON_REQUEST_EVERY = 10.0
# Seconds a tool may keep the keys of `kbdaemon s3-credentials` before it asks again (the
# service's keys carry no expiry; SDKs ask again a few minutes before this).
CREDENTIALS_LIFETIME = 3600.0


class TokenChecker(Protocol):
    """Asks Auth2 about a token. Raises kbclient's AuthError (refused) or another KBaseError."""

    async def token_info(self, auth_url: str, token: str) -> TokenFacts: ...

    async def aclose(self) -> None: ...


class _AlwaysAsk(TokenCache):
    """The daemon schedules its own checks on ``cachefor``: each one must reach Auth2."""

    def get_info(self, key: str) -> TokenInfo | None:
        return None


class KBaseChecker:
    """kbclient's async Auth2 client, one per auth URL, without its answer cache."""

    def __init__(self, *, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self._clients: dict[str, KBaseAuthClient] = {}

    async def token_info(self, auth_url: str, token: str) -> TokenFacts:
        client = self._clients.get(auth_url)
        if client is None:
            client = KBaseAuthClient(auth_url, timeout=self.timeout, cache=_AlwaysAsk())
            self._clients[auth_url] = client
        return await client.token_info(token)

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()


class Daemon:
    """Serves connection info for every profile that has a token, and runs the S3 proxies.

    Args:
        config: the profiles (kbclient's config file, read once at start).
        keystore: where tokens are read from.
        checker: asks Auth2 about tokens.
        clock: wall-clock seconds (``time.time``), replaceable in tests.
        notify: shows a desktop notification (title, text); best effort.
        on_secret: called with each token the daemon holds, so log filters can mask it.
        socket_path: reported in status.
        settings: the ``[kbdaemon]`` table of the config file (default: the config's own).
        config_loader: reads the config file again on reload; None: the config never changes.
    """

    def __init__(
        self,
        *,
        config: Config,
        keystore: Keystore,
        checker: TokenChecker,
        clock: Callable[[], float] = time.time,
        notify: Callable[[str, str], None] | None = None,
        on_secret: Callable[[str], None] = lambda _token: None,
        socket_path: str = "",
        settings: DaemonSettings | None = None,
        config_loader: Callable[[], Config] | None = None,
    ) -> None:
        self.config = config
        self.config_loader = config_loader
        self.config_error: str | None = None
        self.keystore = keystore
        self.checker = checker
        self.clock = clock
        self.notify = notify or desktop_notify
        self.on_secret = on_secret
        self.socket_path = socket_path
        self.settings = settings or daemon_settings(config)
        self.state = DaemonState()
        self.proxies: dict[str, S3Proxy] = {}
        self.keys = ProfileKeys(
            token_of=lambda name: self.state.profile(name).token, on_secret=on_secret
        )
        self.started = clock()
        self._changed = asyncio.Event()
        self._stopping = False
        self._reload_requested = False
        self._locks: dict[str, asyncio.Lock] = {}
        self._last_reload: dict[str, float] = {}

    # lifecycle --------------------------------------------------------------------------------

    def profiles_served(self) -> list[Profile]:
        return list(self.config.profiles.values())

    async def start(self) -> None:
        """Read every profile's token, check them, start the S3 proxies. Raises S3ProxyError."""
        for profile in self.profiles_served():
            self.state.profile(profile.name)
        # One after the other: a locked keyring then asks to be unlocked once, not per profile.
        for profile in self.profiles_served():
            error = await self._load(profile.name)
            if isinstance(error, KeyringLockedError):
                for rest in self.profiles_served():
                    if self.state.profile(rest.name).token is None:
                        self.state.profile(rest.name).store_failed(error, now=self.clock())
                break
        await self._check_due()
        try:
            for profile in self.profiles_served():
                self.keys.start(profile)
                self.keys.prefetch(profile.name)
                await self._start_proxy(profile)
        except BaseException:
            await self.close()
            raise

    async def _start_proxy(self, profile: Profile) -> None:
        if profile.s3_upstream:
            proxy = S3Proxy(
                upstream=profile.s3_upstream,
                port=profile.s3_port,
                allow_http_hosts=self.settings.s3_allow_http_hosts,
                keys=self.keys.get(profile.name),
            )
            await proxy.start()
            self.proxies[profile.name] = proxy

    async def reload_config(self) -> None:
        """Read the config file again and apply what changed; a bad file changes nothing."""
        if self.config_loader is None:
            return
        try:
            config = await asyncio.to_thread(self.config_loader)
            settings = daemon_settings(config)
        except (KBaseError, KBDaemonError) as exc:
            self.config_error = str(exc)
            log.warning("config not reloaded, keeping the running one: %s", exc)
            return
        self.config_error = None
        old, old_settings = self.config, self.settings
        self.config, self.settings = config, settings
        for name in [n for n in self.state.profiles if n not in config.profiles]:
            log.info("profile %s: removed from the config", name)
            del self.state.profiles[name]
            if (proxy := self.proxies.pop(name, None)) is not None:
                await proxy.close()
            await self.keys.stop(name)
        for profile in config.profiles.values():
            before = old.profiles.get(profile.name)
            if before is None:
                log.info("profile %s: added to the config", profile.name)
                await self._load(profile.name)
            elif before.auth_url != profile.auth_url:
                self.state.profile(profile.name).token_missing()
                await self._load(profile.name)
            s3 = (
                profile.s3_upstream,
                profile.s3_port,
                settings.s3_allow_http_hosts,
                profile.credentials_url,
            )
            was = (
                (
                    before.s3_upstream,
                    before.s3_port,
                    old_settings.s3_allow_http_hosts,
                    before.credentials_url,
                )
                if before
                else (None, 0, (), None)
            )
            if s3 != was:
                if (proxy := self.proxies.pop(profile.name, None)) is not None:
                    await proxy.close()
                try:
                    if profile.credentials_url != (before.credentials_url if before else None):
                        await self.keys.stop(profile.name)
                        self.keys.start(profile)
                        self.keys.prefetch(profile.name)
                    await self._start_proxy(profile)
                except (OSError, KBDaemonError) as exc:
                    self.config_error = f"S3 proxy of profile {profile.name}: {exc}"
                    log.warning("%s", self.config_error)
        self._changed.set()

    async def run(self) -> None:
        """Check tokens when they are due until ``stop()``; sleeps in between, never polls."""
        while not self._stopping:
            if self._reload_requested:
                self._reload_requested = False
                await self.reload(None)
            await self._check_due()
            wake = self.state.next_wake()
            timeout = None if wake is None else min(max(wake - self.clock(), 0.0), 3600.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)
            self._changed.clear()

    def request_reload(self) -> None:
        """Read the config and the token store again soon (SIGHUP); safe in a signal handler."""
        self._reload_requested = True
        self._changed.set()

    def stop(self) -> None:
        self._stopping = True
        self._changed.set()

    async def close(self) -> None:
        for proxy in self.proxies.values():
            await proxy.close()
        self.proxies.clear()
        await self.keys.close()
        await self.checker.aclose()

    # token handling ---------------------------------------------------------------------------

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def _load(self, name: str) -> KeystoreError | None:
        state = self.state.profile(name)
        self._last_reload[name] = self.clock()
        try:
            found = await asyncio.to_thread(self.keystore.lookup, name)
        except KeystoreError as exc:
            log.warning("profile %s: cannot read the token: %s", name, exc.message)
            state.store_failed(exc, now=self.clock())
            return exc
        if found is None:
            if state.token is not None:
                log.info("profile %s: the token was removed (logout)", name)
                self.keys.drop(name, "the token was removed")
            state.token_missing()
            return None
        changed = state.token != found.token
        if changed:
            self.keys.drop(name, "another token was stored")
        self.on_secret(found.token)
        state.token_loaded(found.token, kind=found.kind, where=found.where, now=self.clock())
        if changed:
            self.keys.prefetch(name)
        return None

    async def _validate(self, state: ProfileState) -> None:
        token = state.token
        if token is None:
            await self._load(state.name)
            if state.token is None:
                return
            token = state.token
        auth_url = self.config.profiles[state.name].auth_url
        try:
            facts = await self.checker.token_info(auth_url, token)
        except AuthError as exc:
            if state.token == token:
                expired = isinstance(exc, TokenExpiredError)
                state.rejected(str(exc), now=self.clock(), expired=expired)
                log.warning("profile %s: Auth2 refused the token: %s", state.name, exc)
            return
        except (KBaseError, OSError) as exc:
            if state.token == token:
                # kbclient's advice (KBASE_AUTH_URL, auth_url=) is for sessions; the daemon's
                # auth URL is the profile's.
                reason = str(exc).split(";")[0]
                where = f" in {self.config.path}" if self.config.path else ""
                message = (
                    f"{reason}; the daemon retries by itself (check the network and the "
                    f"auth_url under [profiles.{state.name}]{where})"
                )
                state.unreachable(message, now=self.clock())
                log.warning(
                    "profile %s: %s; serving the last known info%s",
                    state.name,
                    reason,
                    " (stale)" if state.status is Status.STALE else "",
                )
            return
        if state.token != token:
            return
        was_ok = state.status is Status.VALID
        state.accepted(facts, now=self.clock())
        if not was_ok:
            log.info("profile %s: token of %s confirmed by Auth2", state.name, state.user)
        note = state.take_notification(self.clock())
        if note:
            log.warning("%s", note)
            self.notify("KBase token expires soon", note)

    async def _check(self, state: ProfileState) -> None:
        async with self._lock(state.name):
            if state.due(self.clock()):
                await self._validate(state)

    async def _check_due(self) -> None:
        due = self.state.due(self.clock())
        if due:
            await asyncio.gather(*(self._check(p) for p in due))

    async def _profile(self, name: str | None) -> Profile:
        """The named profile; an unknown name makes the daemon read its config file first."""
        if name and name not in self.config.profiles:
            await self.reload_config()
        try:
            return self.config.profile(name)
        except ProfileError as exc:
            raise UnknownProfileError(str(exc)) from None

    # the API's service ------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "pid": os.getpid(), "version": __version__}

    async def connection(self, profile_name: str | None) -> dict[str, Any]:
        profile = await self._profile(profile_name)
        state = self.state.profile(profile.name)
        now = self.clock()
        async with self._lock(profile.name):
            recent = now - self._last_reload.get(profile.name, 0.0) < RELOAD_ON_REQUEST_EVERY
            if state.needs_reload() and not recent:
                await self._load(profile.name)
            if state.status is Status.UNCHECKED or (
                state.status is Status.UNREACHABLE and state.due(now)
            ):
                await self._validate(state)
        self._changed.set()
        answer = state.answer(now=self.clock())
        proxy = self.proxies.get(profile.name)
        return DaemonConnection(
            profile=profile.name,
            username=answer.username,
            token=answer.token,
            auth_url=profile.auth_url,
            spark_host=profile.spark_host,
            spark_port=profile.spark_port,
            use_ssl=profile.use_ssl,
            s3_endpoint=proxy.endpoint if proxy else None,
            expires=(
                datetime.fromtimestamp(answer.expires, tz=timezone.utc)
                if answer.expires is not None
                else None
            ),
            stale=answer.stale,
            token_source=answer.token_source,
        ).to_json()

    async def _keys_of(self, profile_name: str | None) -> tuple[Profile, S3KeySource]:
        """The profile and its key source, its token read again if a login may have happened."""
        profile = await self._profile(profile_name)
        source = self.keys.get(profile.name)
        if source is None:
            where = f" in {self.config.path}" if self.config.path else ""
            raise S3KeysNotConfiguredError(
                f"profile {profile.name} has no credentials_url, so the daemon has no S3 keys: "
                f'add credentials_url = "https://..." (the data governance service) under '
                f"[profiles.{profile.name}]{where}, then run `kbdaemon reload`"
            )
        state = self.state.profile(profile.name)
        async with self._lock(profile.name):
            recent = self.clock() - self._last_reload.get(profile.name, 0.0)
            if state.token is None and recent >= RELOAD_ON_REQUEST_EVERY:
                await self._load(profile.name)
        return profile, source

    async def s3_credentials(self, profile_name: str | None) -> dict[str, Any]:
        """The profile's S3 keys (``/v1/s3-credentials``). Raises S3KeysError."""
        profile, source = await self._keys_of(profile_name)
        keys = await source.get()
        now = self.clock()
        until = now + CREDENTIALS_LIFETIME
        held_until = source.status().expires_at
        if held_until is not None:
            until = min(until, held_until)
        proxy = self.proxies.get(profile.name)
        return S3Credentials(
            profile=profile.name,
            access_key=keys.access_key,
            secret_key=keys.secret_key,
            session_token=keys.session_token,
            expires=datetime.fromtimestamp(until, tz=timezone.utc),
            s3_endpoint=proxy.endpoint if proxy else None,
        ).to_json()

    async def s3_keys(self, profile_name: str | None, *, rotate: bool = False) -> dict[str, Any]:
        """The state of the profile's S3 keys (``/v1/s3-keys``), after a rotation if asked.

        Raises:
            S3KeysError: no credentials URL, no token, or the service refused or failed.
        """
        profile, _source = await self._keys_of(profile_name)
        if rotate:
            await self.keys.rotate(profile.name)
        return self._keys_info(profile).to_json()

    def _keys_info(self, profile: Profile) -> S3KeysInfo:
        source = self.keys.get(profile.name)
        proxy = self.proxies.get(profile.name)
        status = source.status().to_json() if source else {"state": "none"}
        return S3KeysInfo.from_json(
            {
                **status,
                "profile": profile.name,
                "credentials_url": profile.credentials_url,
                "s3_endpoint": proxy.endpoint if proxy else None,
            }
        )

    async def reload(self, profile_name: str | None) -> dict[str, Any]:
        """Read the config file, then the token store of one profile (or all), again."""
        await self.reload_config()
        if profile_name:
            names = [(await self._profile(profile_name)).name]
        else:
            names = list(self.state.profiles)
        for name in names:
            state = self.state.profile(name)
            async with self._lock(name):
                await self._load(name)
                if state.status is Status.UNCHECKED:
                    await self._validate(state)
        self._changed.set()
        return await self.status()

    async def status(self) -> dict[str, Any]:
        now = self.clock()
        profiles = []
        for name, state in self.state.profiles.items():
            profile = self.config.profiles[name]
            proxy = self.proxies.get(name)
            if state.token is None and proxy is None and name != self.config.default_profile:
                continue
            entry = state.snapshot(now)
            entry.update(
                auth_url=profile.auth_url,
                spark_host=profile.spark_host,
                spark_port=profile.spark_port,
                use_ssl=profile.use_ssl,
                s3_upstream=profile.s3_upstream,
                s3_endpoint=proxy.endpoint if proxy else None,
                credentials_url=profile.credentials_url,
                s3_keys=source.status().to_json() if (source := self.keys.get(name)) else None,
            )
            profiles.append(entry)
        return {
            **self.health(),
            "started": int(self.started * 1000),
            "uptime_s": round(now - self.started, 1),
            "socket": self.socket_path,
            "config": str(self.config.path) if self.config.path else None,
            "config_error": self.config_error,
            "default_profile": self.config.default_profile,
            "profiles": profiles,
        }
