"""Helpers shared by the CLI's subcommand modules: config, stores, errors, printing."""

from __future__ import annotations

import json
import sys
from datetime import datetime
from typing import Any

from kbclient._profiles import Config, ProfileError, load_config
from kbdaemon.errors import KBDaemonError
from kbdaemon.keystore import FileStore, KeyringStore, Keystore
from kbdaemon.paths import DaemonPaths
from kbdaemon.settings import load_settings


class CLIError(KBDaemonError):
    """A problem with what the user asked for; the message says what to do."""


def load_config_or_fail() -> Config:
    try:
        return load_config()
    except ProfileError as exc:
        raise CLIError(str(exc)) from None


def storage_preference() -> str:
    """``token_storage`` under ``[kbdaemon]`` in the config file: "keyring" (default) or "file"."""
    return load_settings().token_storage


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
