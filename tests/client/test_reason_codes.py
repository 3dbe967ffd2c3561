"""kbproxy's refusals through kbclient's translator: each reason code gives its kbclient error.

kbclient never imports kbproxy (the notebook side must not need the server package); this test
imports both, so a reason added to kbproxy without a translation in kbclient fails here.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from kbproxy import auth, bootstrap, policy
from kbproxy.errors import (
    AuthUnavailable,
    BackendUnavailable,
    PermissionDenied,
    ProxyError,
    Unauthenticated,
)
from kbproxy.reasons import Reason

import kbclient
from kbclient._grpcerrors import REASONS, translate

TOKEN = "SECRET-TOKEN-123"
EXPECTED: dict[Reason, tuple[type[Exception], bool]] = {
    Reason.NO_TOKEN: (kbclient.NoTokenError, False),
    Reason.TOKEN_INVALID: (kbclient.InvalidTokenError, False),
    Reason.TOKEN_EXPIRED: (kbclient.TokenExpiredError, False),
    Reason.MFA_REQUIRED: (kbclient.MFARequiredError, False),
    Reason.AUTH_UNAVAILABLE: (kbclient.AuthUnavailableError, False),
    Reason.BACKEND_UNAVAILABLE: (kbclient.SparkServerUnavailableError, True),
    Reason.BACKEND_LOST: (kbclient.SparkServerUnavailableError, True),
    Reason.UNKNOWN_SERVICE: (kbclient.KBaseError, False),
    Reason.DRAINING: (kbclient.SparkServerUnavailableError, True),
    Reason.OVERLOADED: (kbclient.SparkServerUnavailableError, True),
    Reason.CONFIG: (kbclient.KBaseError, False),
    Reason.BACKEND_STARTING: (kbclient.SparkServerUnavailableError, True),
    Reason.HUB_UNAVAILABLE: (kbclient.SparkServerUnavailableError, True),
    Reason.BACKEND_SPAWN_FAILED: (kbclient.SparkServerUnavailableError, False),
    Reason.HUB_USER_UNKNOWN: (kbclient.SparkServerUnavailableError, False),
    Reason.HUB_FORBIDDEN: (kbclient.KBaseError, False),
}


@dataclass
class _Code:
    name: str


class _PysparkLike(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self._code = _Code(code)

    def getGrpcStatusCode(self) -> _Code:
        return self._code


def _envoy_text(template: str) -> str:
    """A local reply's message as Envoy sends it (its format operators filled in)."""
    return template.replace(bootstrap._USER, "alice").replace(bootstrap._BACKEND, "h:15002")


def _refusals() -> list[tuple[str, str]]:
    """(gRPC code name, message) of every refusal kbproxy and its Envoy configuration make."""
    errors: list[ProxyError] = [
        Unauthenticated(auth.MISSING_HINT, Reason.NO_TOKEN),
        Unauthenticated(auth.REJECTED_HINT),
        Unauthenticated(auth.EXPIRED_HINT, Reason.TOKEN_EXPIRED),
        PermissionDenied("requires multi-factor authentication"),
        AuthUnavailable("the KBase auth service is unreachable"),
        BackendUnavailable("the Spark Connect server of user alice (h:1) did not accept"),
    ]
    found = [(e.code.name, str(e)) for e in errors]
    denies = [policy.unknown_service(), policy.refuse_draining(), policy.credentials([])]
    found += [(d.code.name, d.message) for d in denies]
    garbage = policy.credentials([("x-kbase-token", "t\u00f6ken")])
    assert isinstance(garbage, policy.Deny)
    found.append((garbage.code.name, garbage.message))
    for reason, text in (
        (Reason.BACKEND_UNAVAILABLE, bootstrap.backend_unavailable_message(5)),
        (Reason.BACKEND_LOST, bootstrap.BACKEND_LOST_MESSAGE),
        (Reason.OVERLOADED, bootstrap.OVERLOADED_MESSAGE),
        (Reason.CONFIG, bootstrap.AUTHZ_FAILED_MESSAGE),
    ):
        found.append((reason.status.name, _envoy_text(text)))
    return found


def test_kbclient_knows_every_reason_of_kbproxy() -> None:
    assert {reason.value for reason in Reason} == REASONS
    assert set(EXPECTED) == set(Reason)


@pytest.mark.parametrize("reason", list(Reason), ids=lambda r: r.value)
def test_each_reason_becomes_its_kbclient_error(reason: Reason) -> None:
    message = reason.tag(f"an English sentence that may change {TOKEN}")
    # a misleading status code: the reason code decides, not the status or the words
    found = translate(
        _PysparkLike(reason.status.name, message),
        target="h:443",
        username="alice",
        token=TOKEN,
        use_ssl=True,
    )
    error, waitable = EXPECTED[reason]
    assert found is not None
    assert type(found.error) is error
    assert found.waitable is waitable
    assert TOKEN not in str(found.error)


@pytest.mark.parametrize(("code", "message"), _refusals())
def test_every_refusal_kbproxy_makes_is_translated_by_its_code(code: str, message: str) -> None:
    reason = Reason(message.split("]", 1)[0].removeprefix("[kbproxy:"))
    assert message.startswith(f"[kbproxy:{reason.value}] ")
    assert code == reason.status.name
    found = translate(
        _PysparkLike(code, message), target="h:443", username="alice", token=TOKEN, use_ssl=True
    )
    assert found is not None
    assert type(found.error) is EXPECTED[reason][0]


def test_a_message_without_a_code_falls_back_to_words() -> None:
    found = translate(
        _PysparkLike("UNAVAILABLE", "the KBase auth service is unreachable"),
        target="h:443",
        username="alice",
        token=TOKEN,
        use_ssl=True,
    )
    assert found is not None and type(found.error) is kbclient.AuthUnavailableError
