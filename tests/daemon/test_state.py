"""The daemon's token state machine, with plain inputs and no I/O."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import pytest

from kbdaemon.errors import (
    AuthUnreachableError,
    KeyringLockedError,
    KeystoreError,
    NotLoggedInError,
    TokenExpiredError,
)
from kbdaemon.state import (
    MAX_RECHECK,
    MIN_RECHECK,
    RETRY_FIRST,
    DaemonState,
    ProfileState,
    Status,
)

NOW = 1_800_000_000.0
DAY = 86400.0


@dataclass(frozen=True)
class Facts:
    user: str = "alice"
    expires: datetime | None = None
    cachefor: timedelta = timedelta(minutes=5)


def at(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, tz=timezone.utc)


def loaded(token: str = "SECRET-TOKEN") -> ProfileState:  # noqa: S107
    state = ProfileState(name="prod")
    state.token_loaded(token, kind="keyring", where="OS keyring", now=NOW)
    return state


def test_a_loaded_token_is_checked_at_once_and_not_served_before() -> None:
    state = loaded()
    assert state.status is Status.UNCHECKED and state.due(NOW)
    with pytest.raises(AuthUnreachableError):
        state.answer(now=NOW)


def test_an_accepted_token_is_served_and_checked_again_after_cachefor() -> None:
    state = loaded()
    state.accepted(Facts(expires=at(NOW + 30 * DAY)), now=NOW)
    answer = state.answer(now=NOW + 1)
    assert (answer.username, answer.token, answer.stale) == ("alice", "SECRET-TOKEN", False)
    assert answer.expires == NOW + 30 * DAY
    assert state.wake_at == NOW + 300
    assert not state.due(NOW + 299) and state.due(NOW + 300)
    assert "SECRET-TOKEN" not in repr(state) and "SECRET-TOKEN" not in repr(answer)


@pytest.mark.parametrize(
    ("cachefor", "expected"), [(timedelta(0), MIN_RECHECK), (timedelta(days=1), MAX_RECHECK)]
)
def test_cachefor_is_clamped(cachefor: timedelta, expected: float) -> None:
    state = loaded()
    state.accepted(Facts(cachefor=cachefor), now=NOW)
    assert state.wake_at == NOW + expected


def test_expiry_warning_starts_seven_days_before_and_wakes_the_daemon_then() -> None:
    state = loaded()
    expires = NOW + 10 * DAY
    state.accepted(Facts(expires=at(expires), cachefor=timedelta(hours=1)), now=NOW)
    assert state.warning(NOW) is None
    assert state.take_notification(NOW) is None
    later = expires - 3 * DAY
    text = state.warning(later)
    assert text is not None and "expires in 3.0 days" in text and "kbdaemon login" in text
    assert state.take_notification(later) == text
    assert state.take_notification(later + 60) is None  # once a day
    assert state.take_notification(later + DAY) is not None
    near = loaded()
    near.accepted(Facts(expires=at(NOW + 7 * DAY + 600), cachefor=timedelta(hours=1)), now=NOW)
    assert near.wake_at == NOW + 600  # wakes when the warning window opens


def test_a_passed_expiry_turns_into_token_expired_without_asking_auth2() -> None:
    state = loaded()
    state.accepted(Facts(expires=at(NOW + 100), cachefor=timedelta(hours=1)), now=NOW)
    assert state.wake_at == NOW + 100
    with pytest.raises(TokenExpiredError, match="expired on"):
        state.answer(now=NOW + 100)
    assert state.status is Status.EXPIRED and state.wake_at is None
    assert state.snapshot(NOW + 100)["status"] == "TOKEN_EXPIRED"


def test_unreachable_auth2_keeps_serving_the_last_known_info_marked_stale() -> None:
    state = loaded()
    state.accepted(Facts(expires=at(NOW + 30 * DAY)), now=NOW)
    state.unreachable("Auth2 timed out", now=NOW + 300)
    answer = state.answer(now=NOW + 301)
    assert answer.stale and answer.username == "alice"
    assert state.snapshot(NOW + 301)["status"] == "STALE"
    assert state.wake_at == NOW + 300 + RETRY_FIRST
    state.unreachable("again", now=NOW + 305)
    assert state.wake_at == NOW + 305 + 2 * RETRY_FIRST  # backoff
    state.accepted(Facts(expires=at(NOW + 30 * DAY)), now=NOW + 320)
    assert not state.answer(now=NOW + 321).stale and state.retry_delay == RETRY_FIRST


def test_unreachable_before_any_confirmation_is_an_error() -> None:
    state = loaded()
    state.unreachable("connection refused", now=NOW)
    with pytest.raises(AuthUnreachableError, match="connection refused"):
        state.answer(now=NOW)


def test_a_revoked_token_needs_a_login() -> None:
    state = loaded()
    state.accepted(Facts(), now=NOW)
    state.rejected("Invalid token", now=NOW + 300)
    with pytest.raises(NotLoggedInError, match="kbdaemon login --profile prod") as info:
        state.answer(now=NOW + 301)
    assert info.value.code == "NEEDS_LOGIN" and state.wake_at is None
    assert state.needs_reload()


def test_no_token_and_store_failures() -> None:
    state = ProfileState(name="ci")
    with pytest.raises(NotLoggedInError, match="not logged in"):
        state.answer(now=NOW)
    state.store_failed(KeyringLockedError("the OS keyring is locked"), now=NOW)
    assert state.status is Status.KEYRING_LOCKED and state.wake_at is None  # no prompt storm
    assert state.needs_reload()
    with pytest.raises(KeyringLockedError) as locked:
        state.answer(now=NOW)
    assert locked.value.code == "KEYRING_LOCKED"
    state.store_failed(KeystoreError("no keyring"), now=NOW)
    assert state.wake_at == NOW + RETRY_FIRST  # D-Bus may come up later
    with pytest.raises(KeystoreError) as unavailable:
        state.answer(now=NOW)
    assert unavailable.value.code == "KEYRING_UNAVAILABLE"


def test_a_store_failure_after_a_load_keeps_serving() -> None:
    state = loaded()
    state.accepted(Facts(), now=NOW)
    state.store_failed(KeyringLockedError("locked"), now=NOW + 1)
    assert state.answer(now=NOW + 2).username == "alice"


def test_a_new_token_resets_what_was_known() -> None:
    state = loaded("OLD")
    state.accepted(Facts(user="alice"), now=NOW)
    state.token_loaded("NEW", kind="file", where="file", now=NOW + 5)
    assert state.status is Status.UNCHECKED and state.user is None and state.due(NOW + 5)
    state.token_loaded("NEW", kind="file", where="file", now=NOW + 6)
    assert state.status is Status.UNCHECKED


def test_the_daemon_wakes_for_the_earliest_profile_only() -> None:
    daemon = DaemonState()
    assert daemon.next_wake() is None  # nothing to do: sleep until asked
    prod = daemon.profile("prod")
    prod.token_loaded("A", kind="keyring", where="k", now=NOW)
    prod.accepted(Facts(cachefor=timedelta(minutes=10)), now=NOW)
    ci = daemon.profile("ci")
    ci.token_loaded("B", kind="keyring", where="k", now=NOW)
    ci.accepted(Facts(cachefor=timedelta(minutes=2)), now=NOW)
    daemon.profile("appdev")
    assert daemon.next_wake() == NOW + 120
    assert [p.name for p in daemon.due(NOW + 120)] == ["ci"]
    snapshot = prod.snapshot(NOW)
    assert "A" not in snapshot.values() and snapshot["user"] == "alice"


def test_the_warning_counts_one_minute_in_the_singular() -> None:
    state = loaded()
    state.accepted(Facts(expires=at(NOW + 70)), now=NOW)
    warning = state.warning(NOW)
    assert warning is not None and "expires in 1 minute (on" in warning
    assert "expires in 2 minutes" in (state.warning(NOW - 60) or "")
