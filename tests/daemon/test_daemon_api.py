"""The contract between kbclient and kbdaemon: one error-code enum, one JSON shape, public names.

No sockets here: the codes and shapes are values, and the import rule is checked on the source.
"""

from __future__ import annotations

import argparse
import ast
from datetime import datetime, timezone
from pathlib import Path

import pytest

import kbdaemon
from kbclient.daemon_api import (
    DaemonAnswerError,
    DaemonConnection,
    ErrorCode,
    ExitCode,
    exit_code_for,
)
from kbclient.profiles import BUILTIN_PROFILES, Profile, load_config
from kbdaemon import errors
from kbdaemon.cli import build_parser
from kbdaemon.settings import SettingsError, daemon_settings

KBDAEMON_DIR = Path(kbdaemon.__file__).parent


def test_kbdaemon_imports_only_public_kbclient_names() -> None:
    offenders = []
    for path in sorted(KBDAEMON_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] == "kbclient" and any(p.startswith("_") for p in parts[1:]):
                    offenders.append(f"{path.name}:{node.lineno} {name}")
    assert offenders == []


def test_each_error_carries_its_code_http_status_and_exit_code() -> None:
    assert ErrorCode.NEEDS_LOGIN == "NEEDS_LOGIN"
    assert (ErrorCode.NEEDS_LOGIN.http_status, ErrorCode.NEEDS_LOGIN.exit_code) == (401, 3)
    assert (ErrorCode.KEYRING_LOCKED.http_status, ErrorCode.KEYRING_LOCKED.exit_code) == (503, 5)
    assert ErrorCode.PEER_REFUSED.http_status == 403
    assert ErrorCode.UNKNOWN_PROFILE.http_status == 404
    assert errors.TokenRejectedError("x").exit_code == ExitCode.INVALID_TOKEN == 7
    assert errors.PortInUseError("x").exit_code == ExitCode.PORT_IN_USE == 8
    assert errors.KeyringLockedError("x").code is ErrorCode.KEYRING_LOCKED
    assert SettingsError("x").code is ErrorCode.BAD_CONFIG
    # Statuses: the ones that are codes map to their exit code, the healthy ones to 0.
    assert [exit_code_for(s) for s in ("OK", "STALE", "CHECKING", "REVOKED", "TOKEN_EXPIRED")] == [
        0,
        0,
        0,
        3,
        3,
    ]
    assert DaemonAnswerError("SOMETHING_NEW", "x").error_code is ErrorCode.DAEMON_ERROR
    assert DaemonAnswerError("AUTH_UNREACHABLE", "x").error_code.exit_code == 6


def test_the_connection_json_round_trips_and_masks_the_token() -> None:
    conn = DaemonConnection(
        profile="prod",
        username="alice",
        token="SECRET-TOKEN",
        auth_url="https://kbase.us/services/auth/",
        spark_host="spark.berdl.kbase.us",
        spark_port=443,
        use_ssl=True,
        s3_endpoint="http://127.0.0.1:8900",
        expires=datetime.fromtimestamp(1_800_000_000.123, tz=timezone.utc),
        stale=False,
        token_source="file",
    )
    data = conn.to_json()
    assert data["expires"] == 1_800_000_000_123 and data["token"] == "SECRET-TOKEN"
    assert DaemonConnection.from_json(data) == conn
    assert "SECRET-TOKEN" not in repr(conn)
    with pytest.raises(KeyError):
        DaemonConnection.from_json({"profile": "prod"})


def test_the_config_file_is_parsed_once_for_both(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[kbdaemon]\ntoken_storage = "file"\n[profiles.lab]\nspark_port = 1\n')
    config = load_config(path)
    path.unlink()  # the settings come from what was read, not from the file again
    assert daemon_settings(config).token_storage == "file"
    assert config.profile("lab").spark_port == 1
    path.write_text('[kbdaemon]\ntoken_storage = "paper"\n')
    with pytest.raises(SettingsError, match=r'token_storage must be "keyring" or "file"'):
        daemon_settings(load_config(path))


def test_each_profile_names_its_own_token_page() -> None:
    assert BUILTIN_PROFILES["prod"].token_page == "https://narrative.kbase.us/#auth2/account"
    assert BUILTIN_PROFILES["ci"].token_page == "https://ci.kbase.us/#auth2/account"
    assert BUILTIN_PROFILES["appdev"].token_page == "https://appdev.kbase.us/#auth2/account"
    local = Profile(name="local", auth_url="http://127.0.0.1:8080/")
    assert "http://127.0.0.1:8080/" in local.token_page


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_every_subcommand_and_flag_has_help() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helped = {choice.dest for choice in sub._choices_actions if choice.help}
    commands = _subparsers(parser)
    assert set(commands) == helped, f"subcommands without help: {set(commands) - helped}"
    missing = [
        f"{name} {'/'.join(action.option_strings)}"
        for name, command in commands.items()
        for action in command._actions
        if action.option_strings and not action.help
    ]
    assert missing == []
    assert {"login", "reload", "restart", "doctor", "install", "uninstall"} <= set(commands)
