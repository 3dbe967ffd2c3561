"""Backend names are KubeSpawner's own slugs: compared with the package, unique, never truncated."""

from __future__ import annotations

import random
import string
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import escapism
import pytest
from kbproxy.cli import build_parser, settings_from_args
from kbproxy.errors import ConfigError
from kbproxy.routing import Router
from kbproxy.slugs import backend_name, escape_name, safe_name
from kubespawner.slugs import escape_slug, is_valid_object_name, safe_slug

from testbed.auth import DevAuthServer
from testbed.hosts import hosts_launcher
from testbed.procs import free_port
from testbed.proxy import start_kbproxy
from testbed.standins import identity_backend
from tests.server.conftest import config_port, config_request, raw_call

KBASE_FIRST = string.ascii_lowercase
KBASE_REST = string.ascii_lowercase + string.digits + "_"
SHARED_63 = "a" * 30 + "_" + "b" * 32  # 63 characters, with an underscore


def kbase_usernames(count: int, seed: int = 12) -> list[str]:
    """Random names of KBase's shape ``[a-z][a-z0-9_]*``, 1 to 100 characters."""
    rng = random.Random(seed)
    names = []
    for _ in range(count):
        length = rng.choice([1, 2, 5, 20, 47, 48, 49, 62, 63, 64, 99, 100, rng.randint(1, 100)])
        names.append(rng.choice(KBASE_FIRST) + "".join(rng.choices(KBASE_REST, k=length - 1)))
    return names


def edge_names() -> list[str]:
    """Names at each rule's edge: lengths around 48 and 63, prefixes shared, odd characters."""
    names = [
        "alice",
        "a",
        "bob_1",
        "a_",
        "a__b",
        "x" * 48,
        "x" * 49,
        "x" * 63,
        "x" * 64,
        "x" * 100,
        SHARED_63 + "c",
        SHARED_63 + "d",
        SHARED_63 + "_",
        SHARED_63 + "c" * 37,
        SHARED_63 + "d" * 37,
        "a-b",
        "a--b",
        "a---b",
        "-a",
        "a-",
        "1abc",
        "_abc",
        "9",
        "",
        "_",
        "Alice",
        "ALICE_SMITH",
        "a.b",
        "ünïcødé",
        "İstanbul",
        "user\n",
        "名前",
        "emoji😀",
    ]
    names += [f"u{'_' * k}{'z' * k}" for k in range(1, 60, 7)]
    return names


ALL_NAMES = edge_names() + kbase_usernames(3000)


def test_safe_scheme_is_kubespawners_username_slug() -> None:
    # KubeSpawner fills {username} with safe_slug(name, max_length=48) under slug_scheme "safe".
    differing = [n for n in ALL_NAMES if safe_name(n) != safe_slug(n, max_length=48)]
    assert differing == []


def test_escape_scheme_is_kubespawners_legacy_slug_and_escapism() -> None:
    differing = [n for n in ALL_NAMES if escape_name(n) != escape_slug(n)]
    assert differing == []
    safe = set(string.ascii_lowercase + string.digits)
    assert all(escape_name(n) == escapism.escape(n, safe, "-").lower() for n in ALL_NAMES)


@pytest.mark.parametrize("scheme", ["safe", "escape"])
def test_distinct_kbase_users_get_distinct_names(scheme: str) -> None:
    names = sorted(set(kbase_usernames(3000)) | {n for n in edge_names() if n.islower()})
    slugs = {backend_name(n, scheme) for n in names}  # type: ignore[arg-type]
    assert len(slugs) == len(names)


def test_safe_names_are_dns_labels_within_48_characters() -> None:
    for name in ALL_NAMES:
        slug = safe_name(name)
        assert is_valid_object_name(slug), (name, slug)
        assert len(slug) <= 48


def test_names_sharing_63_characters_are_not_truncated_into_one() -> None:
    long_a, long_b = SHARED_63 + "c" * 37, SHARED_63 + "d" * 37  # 100 characters each
    assert len(long_a) == len(long_b) == 100
    for scheme in ("safe", "escape"):
        assert backend_name(long_a, scheme) != backend_name(long_b, scheme)
    assert safe_name(long_a).endswith("---" + safe_name(long_a)[-8:])
    assert escape_name("bob_1") == "bob-5f1"


def test_valid_short_names_are_kept_as_they_are() -> None:
    assert safe_name("alice") == "alice"
    assert safe_name("x" * 48) == "x" * 48
    assert safe_name("x" * 49) != "x" * 49
    assert safe_name("bob_1").startswith("bob-1---")


def test_router_uses_the_scheme_and_refuses_an_unknown_one() -> None:
    template = "jupyter-{username}.{namespace}.svc:15002"
    assert Router(template=template, namespace="ns").address_for("bob_1") == (
        f"jupyter-{safe_name('bob_1')}.ns.svc:15002"
    )
    escaped = Router(template=template, namespace="ns", name_scheme="escape")
    assert escaped.address_for("bob_1") == "jupyter-bob-5f1.ns.svc:15002"
    with pytest.raises(ConfigError, match="use safe or escape"):
        Router(template=template, name_scheme="short")  # type: ignore[arg-type]


def test_scheme_flag_and_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    def scheme(*argv: str) -> str:
        return settings_from_args(build_parser().parse_args(["serve", *argv])).backend_name_scheme

    assert scheme() == "safe"
    monkeypatch.setenv("KBPROXY_BACKEND_NAME_SCHEME", "escape")
    assert scheme() == "escape"
    assert scheme("--backend-name-scheme", "safe") == "safe"  # the flag wins


def test_an_unknown_scheme_is_a_usage_error_saying_what_to_use() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kbproxy", "serve", "--backend-name-scheme", "truncate"],
        capture_output=True,
        text=True,
        env={"PATH": ""},
        check=False,
    )
    assert result.returncode == 2
    assert "--backend-name-scheme" in result.stderr
    assert "expected safe or escape" in result.stderr


@pytest.fixture
def long_name_users(dev_auth: DevAuthServer) -> Iterator[dict[str, str]]:
    """Two users whose 100-character names share their first 63 characters; name -> token."""
    users = {SHARED_63 + "c" * 37: "token-long-c", SHARED_63 + "d" * 37: "token-long-d"}
    dev_auth.write_tokens({token: {"user": user, "mfa": "Used"} for user, token in users.items()})
    yield users


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["safe", "escape"])
def test_two_users_sharing_63_characters_reach_two_servers(
    tmp_path: Path,
    dev_auth: DevAuthServer,
    long_name_users: dict[str, str],
    kbproxy_data_plane: list[str],
    scheme: str,
) -> None:
    # Each user's backend has a name of its own (in a private /etc/hosts of kbproxy), on its own
    # loopback address; all listen on one port, so only the name tells them apart.
    port = free_port()
    addresses = {}
    with ExitStack() as stack:
        for index, user in enumerate(long_name_users, start=2):
            address = f"127.0.0.{index}"
            stack.enter_context(identity_backend(address, port, identity=str(index)))
            addresses[f"jupyter-{backend_name(user, scheme)}"] = address  # type: ignore[arg-type]
        launcher = hosts_launcher(addresses, tmp_path / "hosts")
        proxy = start_kbproxy(
            tmp_path / "kbproxy",
            auth_url=dev_auth.url,
            backend_template=f"jupyter-{{username}}:{port}",
            launcher=launcher,
            extra_args=["--backend-name-scheme", scheme, *kbproxy_data_plane],
        )
        try:
            answered = {
                user: config_port(raw_call(proxy.address, "Config", config_request(), token=token))
                for user, token in long_name_users.items()
            }
        finally:
            proxy.stop()
    assert sorted(answered.values()) == [2, 3]
