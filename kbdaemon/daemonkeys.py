"""The daemon's S3 keys per profile: one key source and governance client for each.

How it works: a profile with a ``credentials_url`` gets a ``GovernanceClient`` and an
``S3KeySource`` (s3keys.py) whose fetch asks the service with the profile's token as the daemon
holds it at that moment (``token_of``), so a new login is used at once. The keys live in memory
only::

    start(profile) --> source (no keys yet) --prefetch()--> keys in the background
    token removed or replaced --> drop(): keys forgotten, a fetch under way cancelled
    rotate(name, token) --> the service's new keys become the held ones
    stop(name) / close() --> sources and clients closed

Every secret fetched is handed to ``on_secret`` (the log filters mask it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from kbclient.profiles import Profile
from kbdaemon.governance import GovernanceClient
from kbdaemon.s3keys import S3Keys, S3KeysError, S3KeysNeedLoginError, S3KeySource

__all__ = ["ProfileKeys"]

log = logging.getLogger(__name__)


def _need_login(name: str) -> S3KeysNeedLoginError:
    return S3KeysNeedLoginError(
        f"no KBase token is stored for profile {name}, so there are no S3 keys: "
        f"log in first (kbdaemon login --profile {name})"
    )


class ProfileKeys:
    """The key sources of the daemon's profiles.

    Args:
        token_of: the token the daemon holds for a profile now, or None.
        on_secret: called with each S3 secret, so log filters can mask it.
    """

    def __init__(
        self,
        *,
        token_of: Callable[[str], str | None],
        on_secret: Callable[[str], None] = lambda _secret: None,
    ) -> None:
        self._token_of = token_of
        self._on_secret = on_secret
        self.sources: dict[str, S3KeySource] = {}
        self._clients: dict[str, GovernanceClient] = {}
        self._prefetches: set[asyncio.Task[None]] = set()

    def get(self, name: str) -> S3KeySource | None:
        return self.sources.get(name)

    def start(self, profile: Profile) -> None:
        """A key source for a profile with a credentials URL. Raises S3KeysError (bad URL)."""
        if not profile.credentials_url:
            return
        client = GovernanceClient(profile.credentials_url)
        name = profile.name

        async def fetch() -> S3Keys:
            token = self._token_of(name)
            if token is None:
                raise _need_login(name)
            keys = await client.fetch(token)
            self._on_secret(keys.secret_key)
            return keys

        self._clients[name] = client
        self.sources[name] = S3KeySource(fetch)

    def prefetch(self, name: str) -> None:
        """Fetch a profile's keys in the background, so the first S3 request need not wait."""
        source = self.sources.get(name)
        if source is None or self._token_of(name) is None:
            return

        async def fetch() -> None:
            try:
                await source.get()
            except S3KeysError as exc:
                log.warning("profile %s: no S3 keys: %s", name, exc.message)

        task = asyncio.ensure_future(fetch())
        self._prefetches.add(task)
        task.add_done_callback(self._prefetches.discard)

    def drop(self, name: str, why: str) -> None:
        """Forget a profile's keys (its token was removed or replaced)."""
        source = self.sources.get(name)
        if source is None:
            return
        if source.status().state != "none":
            log.info("profile %s: S3 keys dropped (%s)", name, why)
        source.forget()

    async def rotate(self, name: str) -> S3Keys:
        """New keys from the service; they become the held ones.

        Raises:
            S3KeysError: no token, or the service refused or failed (the held keys stay).
        """
        token = self._token_of(name)
        if token is None:
            raise _need_login(name)
        keys = await self._clients[name].rotate(token)
        self._on_secret(keys.secret_key)
        self.sources[name].replace(keys)
        log.info("profile %s: S3 keys rotated (access key %s)", name, keys.access_key)
        return keys

    async def stop(self, name: str) -> None:
        if (source := self.sources.pop(name, None)) is not None:
            await source.close()
        if (client := self._clients.pop(name, None)) is not None:
            await client.close()

    async def close(self) -> None:
        for task in list(self._prefetches):
            task.cancel()
        for name in list(self.sources):
            await self.stop(name)
