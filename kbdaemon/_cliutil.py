"""Helpers shared by the CLI's subcommand modules: config, stores, errors, printing."""

from __future__ import annotations

import json
import socket
import sys
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from kbclient.daemon_api import ROUTE_STATUS, DaemonAnswerError, request
from kbclient.profiles import Config, ProfileError, load_config
from kbdaemon.control import RunningDaemon
from kbdaemon.errors import KBDaemonError, PortInUseError
from kbdaemon.keystore import FileStore, KeyringStore, Keystore
from kbdaemon.paths import DaemonPaths
from kbdaemon.settings import daemon_settings


class CLIError(KBDaemonError):
    """A problem with what the user asked for; the message says what to do."""


def load_config_or_fail() -> Config:
    try:
        return load_config()
    except ProfileError as exc:
        raise CLIError(str(exc)) from None


def _ports_of(paths: DaemonPaths) -> set[int]:
    """The S3 proxy ports the running daemon holds (they are free again once it stops)."""
    try:
        status = request(ROUTE_STATUS, path=paths.socket, timeout=5.0)
    except (DaemonAnswerError, OSError, ValueError):
        return set()
    ports = set()
    for entry in (status or {}).get("profiles", []):
        endpoint = entry.get("s3_endpoint")
        if endpoint and (port := urlsplit(endpoint).port):
            ports.add(port)
    return ports


def check_before_start(paths: DaemonPaths, *, running: RunningDaemon | None) -> Config:
    """Whether a new daemon could start: the config parses and its S3 ports are free.

    Ports the ``running`` daemon holds count as free: they are released when it stops.
    Raises CLIError, SettingsError or PortInUseError with what to fix.
    """
    config = load_config_or_fail()
    daemon_settings(config)
    own = _ports_of(paths) if running is not None and running.answering else set()
    for profile in config.profiles.values():
        if not profile.s3_upstream or not profile.s3_port or profile.s3_port in own:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", profile.s3_port))
            except OSError:
                where = f" in {config.path}" if config.path else ""
                raise PortInUseError(
                    f"127.0.0.1:{profile.s3_port} (the S3 proxy of profile {profile.name}) is in "
                    f"use by another program: stop it, or set another s3_port{where} "
                    "(0 picks a free one)"
                ) from None
    return config


def storage_preference(config: Config) -> str:
    """``token_storage`` under ``[kbdaemon]`` in the config file: "keyring" (default) or "file"."""
    return daemon_settings(config).token_storage


def make_keystore(paths: DaemonPaths) -> Keystore:
    return Keystore(keyring_store=KeyringStore(), file_store=FileStore(path=paths.token_file))


def fail(error: KBDaemonError) -> int:
    print(f"kbdaemon: {error.message}", file=sys.stderr)
    return error.exit_code


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def when(epoch_ms: int | None, *, none: str = "never") -> str:
    if epoch_ms is None:
        return none
    return datetime.fromtimestamp(epoch_ms / 1000).astimezone().strftime("%Y-%m-%d %H:%M %Z")
