"""Which Spark Connect server a call goes to: decided from the validated username alone.

How it works::

    validated username --backend map?--> host:port
                       --slug scheme (kbproxy.slugs)--> {username} of the template --> host:port

``{username}`` is the name KubeSpawner gives the user's pod and service, made by the same slug
scheme (``safe`` or ``escape``, as the hub's ``slug_scheme``): distinct users get distinct names,
never a truncation that two long usernames share. A backend map (operator's JSON file
``{"username": "host:port"}``) pins users to addresses and is consulted before the template.
Nothing the client sends other than its token influences the result.

``SessionRoutes`` remembers, for a while, which user and backend each Spark Connect session id
was seen with on authenticated calls, so that a FetchErrorDetails call of pyspark 4.0.0.dev1
(sent without the token) can reach the same server. A session id is bound to its first user: a
later call of another user with the same id does not move it.
"""

from __future__ import annotations

import json
import string
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from kbproxy.errors import ConfigError
from kbproxy.slugs import DEFAULT_NAME_SCHEME, NAME_SCHEMES, NameScheme, backend_name

DEFAULT_TEMPLATE = "spark-connect-{username}.{namespace}.svc.cluster.local:15002"
TEMPLATE_FIELDS = frozenset({"username", "namespace"})


def _check_address(address: str, where: str) -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{where}: expected HOST:PORT, got {address!r}")
    return address


@dataclass(frozen=True)
class Router:
    """Maps a validated username to its backend address.

    Args:
        template: a format string with ``{username}`` (the user's slug) and ``{namespace}``.
        namespace: the value of ``{namespace}``.
        backend_map: usernames (as validated, before the slug) pinned to ``host:port``.
        name_scheme: the hub's ``slug_scheme`` that makes ``{username}``: safe or escape.
    """

    template: str = DEFAULT_TEMPLATE
    namespace: str = "default"
    backend_map: Mapping[str, str] | None = None
    name_scheme: NameScheme = DEFAULT_NAME_SCHEME

    def __post_init__(self) -> None:
        if self.name_scheme not in NAME_SCHEMES:
            raise ConfigError(
                f"backend name scheme {self.name_scheme!r}: use {' or '.join(NAME_SCHEMES)}, "
                "as the hub's KubeSpawner slug_scheme"
            )
        try:
            names = {name for _, name, _, _ in string.Formatter().parse(self.template) if name}
        except ValueError as exc:
            raise ConfigError(f"backend template {self.template!r}: {exc}") from None
        if unknown := names - TEMPLATE_FIELDS:
            raise ConfigError(
                f"backend template {self.template!r} uses {', '.join(sorted(unknown))}; "
                "only {username} and {namespace} are known"
            )
        if "username" not in names and not self.backend_map:
            raise ConfigError(
                f"backend template {self.template!r} has no {{username}}: "
                "every user would share one server"
            )
        _check_address(self.address_for("example"), "backend template")
        for user, address in (self.backend_map or {}).items():
            _check_address(address, f"backend map entry {user!r}")

    def address_for(self, username: str) -> str:
        """The backend ``host:port`` of a validated username."""
        if self.backend_map and (pinned := self.backend_map.get(username)) is not None:
            return pinned
        name = backend_name(username, self.name_scheme)
        return self.template.format(username=name, namespace=self.namespace)


def load_backend_map(path: Path) -> dict[str, str]:
    """Read a backend map file: a JSON object ``{"username": "host:port"}``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read backend map {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"backend map {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in data.items()
    ):
        raise ConfigError(f'backend map {path}: expected a JSON object {{"username": "host:port"}}')
    return {user: _check_address(addr, f"backend map {path}") for user, addr in data.items()}


@dataclass(frozen=True)
class SessionRoute:
    """Where a session's calls went, and who made them."""

    username: str
    user_id: str | None
    backend: str


class SessionRoutes:
    """A bounded, expiring map: Spark Connect session id -> ``SessionRoute``.

    Args:
        max_size: the oldest sessions are forgotten beyond this many.
        ttl: seconds a session is remembered after its last authenticated call.
        clock: monotonic seconds (injectable for tests).
    """

    def __init__(
        self,
        *,
        max_size: int = 100_000,
        ttl: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_size = max_size
        self._ttl = ttl
        self._clock = clock
        self._routes: OrderedDict[str, tuple[float, SessionRoute]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._routes)

    def record(self, session_id: str, route: SessionRoute) -> bool:
        """Remember a session's route; False if the id is bound to another user."""
        now = self._clock()
        known = self._routes.get(session_id)
        if known is not None and known[0] > now and known[1].username != route.username:
            return False
        self._routes[session_id] = (now + self._ttl, route)
        self._routes.move_to_end(session_id)
        while len(self._routes) > self._max_size:
            self._routes.popitem(last=False)
        return True

    def lookup(self, session_id: str) -> SessionRoute | None:
        """The live route of a session, if it was seen recently."""
        known = self._routes.get(session_id)
        if known is None:
            return None
        if known[0] <= self._clock():
            del self._routes[session_id]
            return None
        return known[1]
