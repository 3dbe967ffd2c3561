"""Which Spark Connect server a call goes to: decided from the validated username alone.

How it works::

    validated username --sanitize--> DNS label --backend map? / template--> host:port

``sanitize_username`` does what the hub does when it names a user's services (lower case,
``[^a-z0-9.-]`` -> ``-``, at most 63 characters). A backend map (operator's JSON file
``{"username": "host:port"}``) pins users to addresses and is consulted before the template.
Nothing the client sends other than its token influences the result.
"""

from __future__ import annotations

import functools
import json
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kbproxy.errors import ConfigError

DEFAULT_TEMPLATE = "spark-connect-{username}.{namespace}.svc.cluster.local:15002"
TEMPLATE_FIELDS = frozenset({"username", "namespace"})
DNS_LABEL_MAX = 63
_UNSAFE = re.compile(r"[^a-z0-9.-]")


@functools.lru_cache(maxsize=4096)
def sanitize_username(username: str) -> str:
    """The username as the hub names per-user services: a DNS label of at most 63 characters."""
    return _UNSAFE.sub("-", username.lower())[:DNS_LABEL_MAX]


def _check_address(address: str, where: str) -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{where}: expected HOST:PORT, got {address!r}")
    return address


@dataclass(frozen=True)
class Router:
    """Maps a validated username to its backend address.

    Args:
        template: a format string with ``{username}`` (sanitized) and ``{namespace}``.
        namespace: the value of ``{namespace}``.
        backend_map: usernames (as validated, before sanitizing) pinned to ``host:port``.
    """

    template: str = DEFAULT_TEMPLATE
    namespace: str = "default"
    backend_map: Mapping[str, str] | None = None

    def __post_init__(self) -> None:
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
        return self.template.format(username=sanitize_username(username), namespace=self.namespace)


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
