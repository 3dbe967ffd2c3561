"""Profiles: which KBase environment a session or the daemon talks to.

How it works: three built-in profiles (prod, the default; ci; appdev) are overlaid by the
optional TOML file ``<user config dir>/kbase-spark-connect/config.toml``, read once, at the edge::

    default_profile = "prod"           # optional

    [profiles.prod]
    s3_upstream = "https://datalake.example.org/"   # the Delta Lake Proxy; enables the S3 proxy
    s3_port = 8900                                  # local port of the S3 proxy (0: any free port)
    credentials_url = "https://gov.example.org/"    # the data governance service: the daemon
                                    # fetches your S3 keys there (no built-in default is known)

    [profiles.mylab]                   # a custom profile: every key optional, defaults from prod
    auth_url = "https://ci.kbase.us/services/auth/"
    spark_host = "spark.example.org"   # may contain {username}
    spark_port = 443
    use_ssl = true

The file location can be overridden with ``KBASE_CONFIG`` (a path). The file is parsed once per
process: ``load_config`` keeps the ``[kbdaemon]`` table (``Config.daemon_table``) for kbdaemon,
which reads its own settings from there instead of reading the file again.

Each profile knows where its users get a token (``Profile.token_page``): the KBase UI of the
site its ``auth_url`` belongs to.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import platformdirs

from kbclient._errors import KBaseError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

APP_NAME = "kbase-spark-connect"
DEFAULT_PROFILE = "prod"
PROD_AUTH_URL = "https://kbase.us/services/auth/"
DEFAULT_SPARK_HOST = "spark.berdl.kbase.us"
DEFAULT_SPARK_PORT = 443


class ProfileError(KBaseError, ValueError):
    """An unknown profile or a malformed config file; the message says which and where."""


@dataclass(frozen=True)
class Profile:
    """Where one KBase environment lives."""

    name: str
    auth_url: str = PROD_AUTH_URL
    spark_host: str = DEFAULT_SPARK_HOST
    spark_port: int = DEFAULT_SPARK_PORT
    use_ssl: bool = True
    s3_upstream: str | None = None
    s3_port: int = 0
    credentials_url: str | None = None

    @property
    def token_page(self) -> str:
        """The web page where a user of this profile makes a token (the site of ``auth_url``)."""
        parts = urlsplit(self.auth_url)
        host = parts.netloc
        if host == "kbase.us":
            host = "narrative.kbase.us"
        if parts.path.rstrip("/").endswith("/services/auth"):
            return f"{parts.scheme}://{host}/#auth2/account"
        return f"the KBase sign-in site of {self.auth_url}"


BUILTIN_PROFILES: dict[str, Profile] = {
    "prod": Profile(name="prod"),
    "ci": Profile(
        name="ci",
        auth_url="https://ci.kbase.us/services/auth/",
        spark_host="spark.ci.berdl.kbase.us",
    ),
    "appdev": Profile(
        name="appdev",
        auth_url="https://appdev.kbase.us/services/auth/",
        spark_host="spark.appdev.berdl.kbase.us",
    ),
}

_FIELDS: dict[str, type] = {
    "auth_url": str,
    "spark_host": str,
    "spark_port": int,
    "use_ssl": bool,
    "s3_upstream": str,
    "s3_port": int,
    "credentials_url": str,
}


def config_dir() -> Path:
    return Path(platformdirs.user_config_dir(APP_NAME, appauthor=False))


def config_path() -> Path:
    override = os.environ.get("KBASE_CONFIG")
    return Path(override) if override else config_dir() / "config.toml"


@dataclass(frozen=True)
class Config:
    """The profiles known on this machine and the default one."""

    profiles: dict[str, Profile]
    default_profile: str = DEFAULT_PROFILE
    path: Path | None = None
    daemon_table: dict[str, Any] = field(default_factory=dict)

    def profile(self, name: str | None = None) -> Profile:
        """The named profile, or the default. Raises ProfileError for an unknown name."""
        name = name or self.default_profile
        try:
            return self.profiles[name]
        except KeyError:
            known = ", ".join(sorted(self.profiles))
            where = f" (add [profiles.{name}] to {self.path})" if self.path else ""
            raise ProfileError(f"unknown profile {name!r}; known: {known}{where}") from None


def parse_config(data: dict[str, Any], *, source: str = "config") -> Config:
    """Overlay the decoded TOML on the built-in profiles."""
    profiles = dict(BUILTIN_PROFILES)
    tables = data.get("profiles", {})
    if not isinstance(tables, dict):
        raise ProfileError(f"{source}: [profiles] must be a table")
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise ProfileError(f"{source}: [profiles.{name}] must be a table")
        base = profiles.get(name, replace(BUILTIN_PROFILES["prod"], name=name))
        changes: dict[str, Any] = {}
        for key, value in table.items():
            expected = _FIELDS.get(key)
            if expected is None:
                allowed = ", ".join(_FIELDS)
                raise ProfileError(
                    f"{source}: [profiles.{name}] unknown key {key!r}; allowed: {allowed}"
                )
            if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                raise ProfileError(
                    f"{source}: [profiles.{name}] {key} must be {expected.__name__}, not {value!r}"
                )
            changes[key] = value
        profiles[name] = replace(base, **changes)
    default = data.get("default_profile", DEFAULT_PROFILE)
    if default not in profiles:
        raise ProfileError(f"{source}: default_profile {default!r} is not a known profile")
    daemon_table = data.get("kbdaemon", {})
    if not isinstance(daemon_table, dict):
        raise ProfileError(f"{source}: [kbdaemon] must be a table")
    return Config(profiles=profiles, default_profile=default, daemon_table=daemon_table)


def load_config(path: Path | None = None) -> Config:
    """Read the config file (absent file: the built-in profiles). Raises ProfileError."""
    path = path or config_path()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return Config(profiles=dict(BUILTIN_PROFILES), path=path)
    except OSError as exc:
        raise ProfileError(f"cannot read {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{path} is not valid TOML: {exc}") from None
    return replace(parse_config(data, source=str(path)), path=path)
