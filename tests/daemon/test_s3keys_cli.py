"""The S3 key commands and shapes without the governance service: exports, the AWS profile, JSON.

The pure parts (s3env, the socket's JSON shapes, kbclient's storage options) with plain inputs;
the CLI against a real daemon whose profile has no ``credentials_url``, and without a daemon.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from datetime import datetime, timezone

import pytest

from kbclient import S3Options
from kbclient._connection import ConnectionInfo
from kbclient.daemon_api import ExitCode, S3Credentials, S3KeysInfo
from kbclient.profiles import ProfileError, parse_config
from kbdaemon import cli
from kbdaemon.s3env import aws_profile_section, env_vars, export_lines, merge_section
from kbdaemon.s3keys import S3Keys, credential_process_json
from tests.conftest import ALICE_TOKEN
from tests.daemon.conftest import Kbdaemon

SECRET = "s3cr3t'with\\odd$chars"
CREDS = S3Credentials(
    profile="prod",
    access_key="alice",
    secret_key=SECRET,
    expires=datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc),
    s3_endpoint="http://127.0.0.1:8900",
)
KEY_COMMANDS = ("s3-credentials", "aws-config", "env", "s3-keys")


def test_every_flag_of_the_key_commands_has_help() -> None:
    for fast in (False, True):
        parser = cli.build_parser(fast=fast)
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        for name in KEY_COMMANDS[:1] if fast else KEY_COMMANDS:
            command = sub.choices[name]
            assert command.description, name
            for action in command._actions:
                assert action.help and action.help != argparse.SUPPRESS, (name, action.dest)


def test_the_socket_shapes_go_both_ways_and_hide_the_secret() -> None:
    assert S3Credentials.from_json(json.loads(json.dumps(CREDS.to_json()))) == CREDS
    assert SECRET not in repr(CREDS)
    assert CREDS.credential_process() == {
        "Version": 1,
        "AccessKeyId": "alice",
        "SecretAccessKey": SECRET,
        "Expiration": "2026-06-01T12:00:00Z",
    }
    with_session = S3Credentials(profile="p", access_key="a", secret_key="s", session_token="t")
    assert with_session.credential_process()["SessionToken"] == "t"
    assert "Expiration" not in with_session.credential_process()
    keys = S3Keys("alice", SECRET)
    assert credential_process_json(keys, expires_at=CREDS.expires.timestamp()) == (
        CREDS.credential_process()
    )
    info = S3KeysInfo(
        profile="prod",
        credentials_url="https://gov.example/",
        s3_endpoint=None,
        state="fresh",
        access_key="alice",
        fetched_at=1.5,
        expires_at=2.5,
    )
    assert S3KeysInfo.from_json(json.loads(json.dumps(info.to_json()))) == info


def test_exports_for_each_shell_quote_the_values() -> None:
    variables = env_vars(CREDS)
    names = [name for name, _ in variables]
    assert names == [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_ENDPOINT_URL",
        "MINIO_ENDPOINT_URL",
        "MINIO_SECURE",
        "MINIO_ACCESS_KEY",
        "MINIO_SECRET_KEY",
        "S3_ENDPOINT",
        "S3_ACCESS_KEY",
        "S3_SECRET_KEY",
    ]
    assert dict(variables)["MINIO_ENDPOINT_URL"] == "127.0.0.1:8900"
    assert dict(variables)["MINIO_SECURE"] == "false"
    sh = export_lines(variables, "sh")
    assert sh[1] == "export AWS_SECRET_ACCESS_KEY='s3cr3t'\"'\"'with\\odd$chars'"
    out = subprocess.run(
        ["sh", "-c", "\n".join(sh) + '\nprintf %s "$S3_SECRET_KEY"'],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout == SECRET
    assert export_lines(variables, "fish")[1] == (
        "set -gx AWS_SECRET_ACCESS_KEY 's3cr3t\\'with\\\\odd$chars';"
    )
    assert export_lines(variables, "powershell")[1] == (
        "$env:AWS_SECRET_ACCESS_KEY = 's3cr3t''with\\odd$chars'"
    )
    with pytest.raises(ValueError, match="use one of sh, fish, powershell"):
        export_lines(variables, "csh")
    no_proxy = S3Credentials(profile="p", access_key="a", secret_key="s")
    assert "AWS_ENDPOINT_URL" not in dict(env_vars(no_proxy))


def test_the_aws_profile_replaces_its_block_and_keeps_the_rest() -> None:
    section = aws_profile_section(
        "kbase", command="/x/kbdaemon s3-credentials --profile prod", endpoint="http://e:1"
    )
    assert section.splitlines() == [
        "[profile kbase]",
        "credential_process = /x/kbdaemon s3-credentials --profile prod",
        "region = us-east-1",
        "endpoint_url = http://e:1",
        "s3 =",
        "    addressing_style = path",
    ]
    assert merge_section("", section) == section
    existing = (
        "[default]\nregion = eu-west-1\n\n[profile kbase]\nendpoint_url = http://old:2\n"
        "\n# my other profile\n[profile other]\nregion = x\n"
    )
    merged = merge_section(existing, section)
    assert merged == (
        "[default]\nregion = eu-west-1\n\n" + section + "\n# my other profile\n"
        "[profile other]\nregion = x\n"
    )
    assert merge_section(merged, section) == merged
    appended = merge_section("[default]\nregion = r", section)
    assert appended == "[default]\nregion = r\n\n" + section


def test_storage_options_point_every_tool_at_the_local_proxy() -> None:
    options = S3Options(endpoint="http://127.0.0.1:8900", access_key="k", secret_key="o'x")
    assert "o'x" not in repr(options)
    assert options.deltalake()["AWS_ENDPOINT_URL"] == "http://127.0.0.1:8900"
    assert options.deltalake()["AWS_ALLOW_HTTP"] == "true"
    assert options.polars()["aws_secret_access_key"] == "o'x"
    assert options.pyarrow()["endpoint_override"] == "127.0.0.1:8900"
    assert options.pyarrow()["scheme"] == "http"
    assert options.boto3()["endpoint_url"] == "http://127.0.0.1:8900"
    sql = options.duckdb_secret_sql("lake")
    assert sql.startswith("CREATE OR REPLACE SECRET lake (TYPE s3, KEY_ID 'k', SECRET 'o''x'")
    assert "ENDPOINT '127.0.0.1:8900', URL_STYLE 'path', USE_SSL false" in sql
    with pytest.raises(ValueError, match="plain identifier"):
        options.duckdb_secret_sql("x; DROP")
    info = ConnectionInfo(
        profile="ci",
        username="alice",
        host="h",
        port=443,
        use_ssl=True,
        auth_url="https://a/",
        token_expires=None,
        token_source="kbdaemon",
        token=ALICE_TOKEN,
    )
    with pytest.raises(ProfileError, match=r"set s3_upstream .* under \[profiles.ci\]"):
        info.s3_storage_options()


def test_credentials_url_is_a_profile_setting() -> None:
    config = parse_config({"profiles": {"prod": {"credentials_url": "https://gov.example/"}}})
    assert config.profile("prod").credentials_url == "https://gov.example/"
    assert config.profile("ci").credentials_url is None
    with pytest.raises(ProfileError, match="credentials_url must be str"):
        parse_config({"profiles": {"prod": {"credentials_url": 5}}})


def test_the_key_commands_say_what_to_do_without_a_daemon(kbdaemon: Kbdaemon) -> None:
    for command in KEY_COMMANDS:
        result = kbdaemon(command)
        assert result.returncode == ExitCode.NOT_RUNNING, command
        assert "kbdaemon is not running: start it (kbdaemon start)" in result.stderr
        assert result.stdout == ""


@pytest.mark.slow
def test_a_profile_without_credentials_url_names_the_setting(kbdaemon: Kbdaemon) -> None:
    login = kbdaemon("login", "--with-token", "--insecure-storage", input=ALICE_TOKEN + "\n")
    assert login.returncode == 0, login.stderr
    assert kbdaemon("start").returncode == 0
    for command in KEY_COMMANDS:
        result = kbdaemon(command)
        assert result.returncode == ExitCode.ERROR, command
        assert "profile prod has no credentials_url" in result.stderr
        assert "under [profiles.prod] in " in result.stderr
    status = kbdaemon.status()["profiles"][0]
    assert status["credentials_url"] is None and status["s3_keys"] is None
    unknown = kbdaemon("s3-credentials", "--profile", "nosuch")
    assert unknown.returncode == ExitCode.ERROR and "unknown profile 'nosuch'" in unknown.stderr
