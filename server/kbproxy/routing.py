"""Which Spark Connect server a call goes to: decided from the validated username alone.

How it works::

    validated username --backend map?--> host:port
                       --slug scheme (kbproxy.slugs)--> {username} of the template --> host:port

``{username}`` is the name KubeSpawner gives the user's pod and service, made by the same slug
scheme (``safe`` or ``escape``, as the hub's ``slug_scheme``): distinct users get distinct names,
never a truncation that two long usernames share. A backend map (operator's JSON file
``{"username": "host:port"}``) pins users to addresses and is consulted before the template.
Nothing the client sends other than its token influences the result.
"""

from __future__ import annotations

import json
import string
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kbproxy.errors import ConfigError
from kbproxy.slugs import DEFAULT_NAME_SCHEME, NAME_SCHEMES, NameScheme, backend_name

# KubeSpawner names the pod and Service of a user's default server jupyter-{username}
DEFAULT_TEMPLATE = "jupyter-{username}.{namespace}.svc.cluster.local:15002"
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
