"""The daemon's own settings: the ``[kbdaemon]`` table of the config file kbclient reads.

How it works: the profiles (auth URL, Spark host, S3 upstream and port) are kbclient's
(``kbclient.profiles``); settings only the daemon uses live beside them. The file is parsed once,
by ``kbclient.profiles.load_config``; ``daemon_settings`` reads the ``[kbdaemon]`` table it kept::

    [kbdaemon]
    token_storage = "keyring"               # or "file": what `kbdaemon login` uses by default
    s3_allow_http_hosts = ["127.0.0.1:8333"] # pre-signed URLs the S3 proxies may follow over http
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kbclient.daemon_api import ErrorCode
from kbclient.profiles import Config
from kbdaemon.errors import KBDaemonError


class SettingsError(KBDaemonError):
    """The ``[kbdaemon]`` table of the config file is malformed; the message says where."""

    code = ErrorCode.BAD_CONFIG


@dataclass(frozen=True)
class DaemonSettings:
    token_storage: str = "keyring"  # noqa: S105 - the name of a store, not a secret
    s3_allow_http_hosts: tuple[str, ...] = ()


def parse_settings(data: dict[str, Any], *, source: str = "config") -> DaemonSettings:
    table = data.get("kbdaemon", {})
    if not isinstance(table, dict):
        raise SettingsError(f"{source}: [kbdaemon] must be a table")
    unknown = set(table) - {"token_storage", "s3_allow_http_hosts"}
    if unknown:
        raise SettingsError(
            f"{source}: [kbdaemon] unknown key(s) {', '.join(sorted(unknown))}; "
            "allowed: token_storage, s3_allow_http_hosts"
        )
    storage = table.get("token_storage", "keyring")
    if storage not in ("keyring", "file"):
        raise SettingsError(
            f'{source}: [kbdaemon] token_storage must be "keyring" or "file", not {storage!r}'
        )
    hosts = table.get("s3_allow_http_hosts", [])
    if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
        raise SettingsError(f"{source}: [kbdaemon] s3_allow_http_hosts must be a list of strings")
    return DaemonSettings(token_storage=storage, s3_allow_http_hosts=tuple(hosts))


def daemon_settings(config: Config) -> DaemonSettings:
    """The ``[kbdaemon]`` settings of an already loaded config file. Raises SettingsError."""
    source = str(config.path) if config.path else "config"
    return parse_settings({"kbdaemon": config.daemon_table}, source=source)
