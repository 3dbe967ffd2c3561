"""Token stores (kbclient.tokenstore) and kbdaemon's policy over them: the opt-in file, the
keyring timeout and errors, backends that are no OS keyring, a real Secret Service."""

from __future__ import annotations

import stat
import threading
from pathlib import Path

import keyring.core
import pytest

from kbclient.tokenstore import (
    KEYRING_SERVICE,
    FileStore,
    KeyringLockedError,
    KeyringStore,
    NoOSKeyringError,
    TokenStoreError,
    call_with_timeout,
)
from kbdaemon.errors import KeystoreError
from kbdaemon.keystore import Keystore
from tests.daemon.conftest import lock_secret_service

TOKEN = "TOKEN0123456789abcdefXYZ"


def test_the_file_store_is_private_and_round_trips(tmp_path: Path) -> None:
    store = FileStore(path=tmp_path / "data" / "tokens.json")
    assert store.get("prod") is None
    store.set("prod", TOKEN)
    store.set("ci", "OTHER")
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert (store.get("prod"), store.get("ci")) == (TOKEN, "OTHER")
    assert store.delete("prod") and not store.delete("prod")
    assert store.delete("ci")
    assert not store.path.exists()  # the last token gone: no file left behind


def test_a_file_made_readable_by_others_is_made_private_again(tmp_path: Path) -> None:
    store = FileStore(path=tmp_path / "tokens.json")
    store.set("prod", TOKEN)
    store.path.chmod(0o644)
    assert store.get("prod") == TOKEN
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600


def test_a_damaged_file_says_what_to_do(tmp_path: Path) -> None:
    store = FileStore(path=tmp_path / "tokens.json")
    store.path.write_text("{not json")
    with pytest.raises(TokenStoreError, match=r"damaged; remove it and run `kbdaemon login`"):
        store.get("prod")


def test_a_keyring_that_does_not_answer_is_reported_as_locked() -> None:
    release = threading.Event()
    with pytest.raises(KeyringLockedError, match="did not answer within 0 s"):
        call_with_timeout(lambda: release.wait(5), 0.2, "read")
    release.set()


def test_the_null_keyring_is_refused_not_trusted(tmp_path: Path) -> None:
    # The isolated environment selects keyring's null backend, which drops what it is given.
    with pytest.raises(NoOSKeyringError, match=r"stores nothing.*--insecure-storage"):
        KeyringStore().set("prod", TOKEN)
    keystore = Keystore(keyring_store=KeyringStore(), file_store=FileStore(path=tmp_path / "t"))
    with pytest.raises(KeystoreError, match=r"no OS keyring") as info:
        keystore.save("prod", TOKEN, insecure=False)
    assert info.value.code == "KEYRING_UNAVAILABLE" and info.value.exit_code == 5
    assert keystore.lookup("prod") is None  # nothing to read there: not logged in


def test_no_backend_at_all_names_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", "keyring.backends.fail.Keyring")
    keyring.core.init_backend()
    with pytest.raises(NoOSKeyringError, match=r"no OS keyring: .*install"):
        KeyringStore().get("prod")


def test_lookup_prefers_the_chosen_file_and_save_keeps_one_copy(tmp_path: Path) -> None:
    keystore = Keystore(
        keyring_store=FileStore(path=tmp_path / "as-keyring.json"),
        file_store=FileStore(path=tmp_path / "tokens.json"),
    )
    assert keystore.lookup("prod") is None
    keystore.save("prod", "IN-KEYRING", insecure=False)
    found = keystore.lookup("prod")
    assert found is not None and found.token == "IN-KEYRING"
    assert "IN-KEYRING" not in repr(found)
    keystore.save("prod", TOKEN, insecure=True)
    found = keystore.lookup("prod")
    assert found is not None and (found.kind, found.token) == ("file", TOKEN)
    assert keystore.keyring.get("prod") is None
    assert keystore.remove("prod") == ["file"] and keystore.lookup("prod") is None


@pytest.mark.slow
def test_a_real_secret_service_keyring(secret_service: str) -> None:
    import keyring

    store = KeyringStore()
    assert "SecretService" in store.describe()
    assert store.get("prod") is None
    store.set("prod", TOKEN)
    # The entry kbclient falls back to when no daemon runs.
    assert keyring.get_password(KEYRING_SERVICE, "prod") == TOKEN
    assert store.get("prod") == TOKEN
    assert store.delete("prod") and store.get("prod") is None
    assert not store.delete("prod")


# keyring's SecretService backend leaves its D-Bus connection open when it raises KeyringLocked;
# the store closes it (an unclosed socket would fail this or a later test with a ResourceWarning).
@pytest.mark.slow
def test_a_locked_secret_service_keyring_is_told_apart(secret_service: str) -> None:
    store = KeyringStore()
    store.set("prod", TOKEN)
    lock_secret_service()
    keystore = Keystore(keyring_store=store, file_store=FileStore())
    with pytest.raises(KeyringLockedError, match="the OS keyring is locked: unlock it"):
        store.get("prod")
    with pytest.raises(KeystoreError, match="the OS keyring is locked: unlock it") as info:
        keystore.lookup("prod")
    assert info.value.code == "KEYRING_LOCKED"
