"""Connection info: which server, which user, which token, and the Spark Connect URL.

How it works: ``resolve_connection`` reads the profile (config file, once per call), finds the
token (``_tokens``), takes the remaining settings in one documented order, resolves the
username through KBase Auth2 (cached) and builds the URL. Each setting is taken from the first
of these that has it:

- profile: the ``profile`` argument; ``default_profile`` of the config file; ``prod``.
- auth URL: the ``auth_url`` argument; ``KBASE_AUTH_URL``; the daemon's answer (only when the
  token came from the daemon); the profile.
- host, port, use_ssl: the argument (when not None); the daemon's answer (only when the token
  came from the daemon); the profile (prod: ``spark.berdl.kbase.us``, 443, TLS).

When the daemon gave the token and its answer is fresh (not ``stale``) for the same auth URL,
its username and expiry are used as they are: the daemon validated the token with Auth2 on
Auth2's schedule. Otherwise the token is checked with Auth2 here, so a bad token fails now with
Auth2's reason rather than later as a gRPC error.

URL: ``sc://{host}:{port}/;use_ssl=true|false;x-kbase-token=<quoted token>;user_id=<user>``.
The token travels as gRPC metadata ``x-kbase-token``; ``token=`` is never used (it would force
TLS and send ``authorization: Bearer``). ``host`` may contain ``{username}``.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote, urlsplit

from kbclient._auth2 import TokenCache, format_date, normalize_auth_url
from kbclient._authclient import SyncKBaseAuthClient
from kbclient._errors import (
    LOGIN_HINT,
    AuthError,
    AuthUnavailableError,
    KBaseError,
    KeyringError,
    NoTokenError,
    TokenExpiredError,
)
from kbclient._tokens import (
    SOURCE_ARGUMENT,
    SOURCE_DAEMON,
    TOKEN_ENV_VARS,
    FoundToken,
    find_token,
    read_keyring,
)
from kbclient.daemon_api import DaemonAnswerError, fetch_connection
from kbclient.profiles import ProfileError, load_config
from kbclient.tokenstore import NoOSKeyringError

log = logging.getLogger(__name__)

AUTH_URL_ENV = "KBASE_AUTH_URL"
_TOKEN_PARAM = re.compile(r"(x-kbase-token=)[^;]*")

_cache = TokenCache()
_clients: dict[str, SyncKBaseAuthClient] = {}
_clients_lock = threading.Lock()


def shared_auth_client(auth_url: str) -> SyncKBaseAuthClient:
    """One pooled blocking client per auth URL for the process, over one shared cache."""
    auth_url = normalize_auth_url(auth_url)
    with _clients_lock:
        client = _clients.get(auth_url)
        if client is None:
            client = _clients[auth_url] = SyncKBaseAuthClient(auth_url, cache=_cache)
        return client


def clear_auth_cache() -> None:
    """Forget every cached Auth2 answer of the shared clients (for tests and benchmarks)."""
    _cache.clear()


def _now() -> datetime:
    return datetime.now(timezone.utc)


def mask_url(url: str) -> str:
    """The URL with the token replaced by ``***``."""
    return _TOKEN_PARAM.sub(r"\1***", url)


def spark_url(*, host: str, port: int, use_ssl: bool, token: str, username: str) -> str:
    """The Spark Connect URL for the KBase proxy."""
    host = host.replace("{username}", username)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 address
    return (
        f"sc://{host}:{port}/;use_ssl={'true' if use_ssl else 'false'};"
        f"x-kbase-token={quote(token, safe='')};user_id={quote(username, safe='')}"
    )


DUMMY_ACCESS_KEY = "kbase-local-proxy"
DUMMY_SECRET_KEY = "re-signed-by-kbdaemon"  # noqa: S105 - a placeholder the proxy replaces


@dataclass(frozen=True)
class S3Options:
    """Where S3 tools send requests (the local S3 proxy) and the keys they sign with.

    Each method gives one tool's own form; the secret is not in the repr.
    """

    endpoint: str
    access_key: str
    secret_key: str = field(repr=False)
    region: str = "us-east-1"

    @property
    def _host(self) -> str:
        return urlsplit(self.endpoint).netloc

    @property
    def _secure(self) -> bool:
        return urlsplit(self.endpoint).scheme == "https"

    def object_store(self) -> dict[str, str]:
        """The object_store (Rust) options deltalake and polars read."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_ALLOW_HTTP": "false" if self._secure else "true",
        }

    def deltalake(self) -> dict[str, str]:
        """``storage_options`` of ``deltalake.DeltaTable``/``write_deltalake``."""
        # One writer per table through the proxy: no locking service, so allow plain renames.
        return {**self.object_store(), "AWS_S3_ALLOW_UNSAFE_RENAME": "true"}

    def polars(self) -> dict[str, str]:
        """``storage_options`` of polars' ``scan_parquet``/``read_parquet``/``scan_delta``."""
        return {key.lower(): value for key, value in self.object_store().items()}

    def pyarrow(self) -> dict[str, str]:
        """Keyword arguments of ``pyarrow.fs.S3FileSystem``."""
        return {
            "endpoint_override": self._host,
            "scheme": "https" if self._secure else "http",
            "access_key": self.access_key,
            "secret_key": self.secret_key,
            "region": self.region,
        }

    def pyarrow_filesystem(self) -> Any:
        """A ``pyarrow.fs.S3FileSystem`` to the local S3 proxy (pyarrow imported here)."""
        fs = importlib.import_module("pyarrow.fs")  # untyped; needed only here
        return fs.S3FileSystem(**self.pyarrow())

    def boto3(self) -> dict[str, str]:
        """Keyword arguments of ``boto3.client("s3", ...)`` (add path-style addressing)."""
        return {
            "endpoint_url": self.endpoint,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            "region_name": self.region,
        }

    def duckdb_secret_sql(self, name: str = "kbase") -> str:
        """A DuckDB ``CREATE OR REPLACE SECRET`` statement for httpfs (run it, then read s3://)."""
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"a DuckDB secret name is a plain identifier, not {name!r}")

        def literal(value: str) -> str:
            return "'" + value.replace("'", "''") + "'"

        return (
            f"CREATE OR REPLACE SECRET {name} (TYPE s3, KEY_ID {literal(self.access_key)}, "
            f"SECRET {literal(self.secret_key)}, REGION {literal(self.region)}, "
            f"ENDPOINT {literal(self._host)}, URL_STYLE 'path', "
            f"USE_SSL {'true' if self._secure else 'false'})"
        )


@dataclass(frozen=True, repr=False)
class ConnectionInfo:
    """Everything needed to reach the user's Spark server; only ``token`` holds the token in clear.

    ``spark_url``, ``masked_url``, repr and str show the token as ``***``, so printing any of
    them in a notebook is safe; ``spark_url_with_token()`` is the URL a Spark Connect client
    needs (keep it out of output).

    Attributes:
        profile: the profile name (prod, ci, appdev or one of the config file).
        username: the KBase user the token belongs to.
        host, port, use_ssl: where the Spark Connect proxy listens.
        auth_url: the KBase Auth2 service.
        token_expires: when the token expires, if known.
        token_source: argument, KBASE_AUTH_TOKEN, KB_AUTH_TOKEN, kbdaemon or keyring.
        s3_endpoint: the daemon's local S3 proxy, when it runs one.
        mfa: Auth2's ``mfa`` value of the token (Used, NotUsed, Unknown), when checked here.
        token: the KBase token itself, in clear.
    """

    profile: str
    username: str
    host: str
    port: int
    use_ssl: bool
    auth_url: str
    token_expires: datetime | None
    token_source: str
    s3_endpoint: str | None = None
    mfa: str | None = None
    token: str = field(default="", compare=False)

    def s3_storage_options(
        self, *, access_key: str | None = None, secret_key: str | None = None
    ) -> S3Options:
        """Options for S3 tools (pyarrow, polars, deltalake, DuckDB, boto3) to the local S3 proxy.

        The keys are dummies unless given: kbdaemon's S3 proxy re-signs every request with the
        user's own keys when its profile has a ``credentials_url``, so the secret never enters
        the notebook. Give real keys only for a profile whose proxy does not re-sign.

        Raises:
            ProfileError: the daemon runs no S3 proxy for this profile (the message says how).
        """
        if not self.s3_endpoint:
            raise ProfileError(
                f"kbdaemon runs no local S3 proxy for profile {self.profile}: set s3_upstream "
                f"(and credentials_url) under [profiles.{self.profile}] in config.toml and run "
                "`kbdaemon reload`"
            )
        return S3Options(
            endpoint=self.s3_endpoint,
            access_key=access_key or DUMMY_ACCESS_KEY,
            secret_key=secret_key or DUMMY_SECRET_KEY,
        )

    def spark_url_with_token(self) -> str:
        """The Spark Connect URL with the token in clear, for ``SparkSession.builder.remote``."""
        return spark_url(
            host=self.host,
            port=self.port,
            use_ssl=self.use_ssl,
            token=self.token,
            username=self.username,
        )

    @property
    def masked_url(self) -> str:
        """The Spark Connect URL with the token shown as ``***`` (safe to print or log)."""
        return mask_url(self.spark_url_with_token())

    @property
    def spark_url(self) -> str:
        """The same as ``masked_url``: the token is never in it (``spark_url_with_token()`` is)."""
        return self.masked_url

    @property
    def target(self) -> str:
        return f"{self.host.replace('{username}', self.username)}:{self.port}"

    def __repr__(self) -> str:
        return (
            f"ConnectionInfo(profile={self.profile!r}, username={self.username!r}, "
            f"spark_url={self.masked_url!r}, auth_url={self.auth_url!r}, "
            f"token_expires={self.token_expires!r}, token_source={self.token_source!r}, "
            f"s3_endpoint={self.s3_endpoint!r}, mfa={self.mfa!r})"
        )

    def __str__(self) -> str:
        expires = format_date(self.token_expires) if self.token_expires else "unknown"
        rows = [
            ("profile", self.profile),
            ("user", self.username),
            ("spark url", self.masked_url),
            ("auth url", self.auth_url),
            ("token from", self.token_source),
            ("token expires", expires),
            ("token MFA", self.mfa or "unknown"),
            ("s3 endpoint", self.s3_endpoint or "none (kbdaemon runs no S3 proxy)"),
        ]
        return "\n".join(f"{name + ':':15}{value}" for name, value in rows)


def resolve_connection(
    *,
    host: str | None = None,
    port: int | None = None,
    token: str | None = None,
    auth_url: str | None = None,
    use_ssl: bool | None = None,
    profile: str | None = None,
) -> ConnectionInfo:
    """Find the token, resolve the user and build the URL (see the module docstring).

    Raises:
        NoTokenError, InvalidTokenError, TokenExpiredError, AuthUnavailableError, ProfileError.
    """
    config = load_config()
    prof = config.profile(profile)
    found = _find_token(token, prof.name)
    daemon = found.daemon
    final_auth = normalize_auth_url(
        auth_url
        or os.environ.get(AUTH_URL_ENV, "").strip()
        or (daemon.auth_url if daemon else "")
        or prof.auth_url
    )
    final_host = host or (daemon.spark_host if daemon else prof.spark_host)
    final_port = port if port is not None else (daemon.spark_port if daemon else prof.spark_port)
    final_ssl = use_ssl if use_ssl is not None else (daemon.use_ssl if daemon else prof.use_ssl)

    daemon_fits = daemon is not None and normalize_auth_url(daemon.auth_url) == final_auth
    mfa: str | None = None
    if daemon is not None and daemon.expires is not None and daemon.expires <= _now():
        raise TokenExpiredError(
            f"the token from kbdaemon expired on {format_date(daemon.expires)}; {LOGIN_HINT}",
            expired=daemon.expires,
        )
    if daemon is not None and daemon_fits and not daemon.stale:
        username, expires = daemon.username, daemon.expires
    else:
        try:
            info = shared_auth_client(final_auth).token_info(found.token)
        except AuthUnavailableError as exc:
            if daemon is None or not daemon_fits:
                exc.add_context(f"checking {describe_source(found.source)}")
                raise
            log.warning("%s; using the last answer kbdaemon had", exc)
            username, expires = daemon.username, daemon.expires
        except KBaseError as exc:
            exc.add_context(describe_source(found.source))
            if isinstance(exc, AuthError) and (step := next_step_for(found.source)) is not None:
                exc.set_next_step(step)
            raise
        else:
            username, expires, mfa = info.user, info.expires, info.mfa
    return ConnectionInfo(
        profile=prof.name,
        username=username,
        host=final_host,
        port=final_port,
        use_ssl=final_ssl,
        auth_url=final_auth,
        token_expires=expires,
        token_source=found.source if found.source != SOURCE_DAEMON else _daemon_label(found),
        s3_endpoint=daemon.s3_endpoint if daemon else None,
        mfa=mfa,
        token=found.token,
    )


def _find_token(token: str | None, profile: str) -> FoundToken:
    """``find_token``; when no token is found and the keyring failed, that failure is the cause.

    ``python -m kbclient`` tells "no token anywhere" (exit 2) from "the keyring failed" (5) by it.
    """
    failures: list[KeyringError] = []

    def reader(name: str) -> str | None:
        try:
            return read_keyring(name)
        except NoOSKeyringError:
            raise  # no keyring to fail: no token there (exit 2), the message says why
        except KeyringError as exc:
            failures.append(exc)
            raise

    try:
        return find_token(token, profile, keyring_reader=reader)
    except NoTokenError as exc:
        if failures:
            raise exc from failures[0]
        raise


def describe_source(source: str) -> str:
    """A phrase naming where a token came from, for messages."""
    if source == "argument":
        return "the token given as argument"
    if source.startswith(SOURCE_DAEMON):
        return "the token from kbdaemon"
    if source == "keyring":
        return "the token in the OS keyring"
    return f"the token in {source}"


def next_step_for(source: str) -> str | None:
    """What to do about a refused token from ``source``, when a new login would not help.

    A token from the environment or the argument wins over the one ``kbdaemon login`` stores,
    so "log in again" cannot fix it; None for the daemon and the keyring (logging in does).
    """
    if source in TOKEN_ENV_VARS:
        return (
            f"{source} wins over the token `kbdaemon login` stores: set it to a valid token, "
            f"or unset it (shell: `unset {source}`; notebook: `del os.environ[{source!r}]`)"
        )
    if source == SOURCE_ARGUMENT:
        return (
            "pass a valid token as token=, or leave token= out to use KBASE_AUTH_TOKEN or the "
            "token `kbdaemon login` stores"
        )
    return None


def _daemon_label(found: object) -> str:
    daemon = getattr(found, "daemon", None)
    inner = getattr(daemon, "token_source", "")
    return f"{SOURCE_DAEMON} ({inner})" if inner and inner != SOURCE_DAEMON else SOURCE_DAEMON


def daemon_s3_endpoint(profile: str, username: str) -> str | None:
    """The daemon's S3 endpoint for a profile of the same user, if a daemon runs one."""
    try:
        answer = fetch_connection(profile, timeout=1.0)
    except (DaemonAnswerError, OSError, ValueError, KeyError, TypeError):
        return None
    if answer is None or answer.username != username:
        return None
    return answer.s3_endpoint
