"""kbclient's reading of kbproxy's BACKEND_STARTING refusals (the state of a start at the hub)."""

from __future__ import annotations

import pytest

from kbclient._grpcerrors import start_state, translate


@pytest.mark.parametrize(
    ("sentence", "state"),
    [
        ("user alice's Spark server was asked to start (0 s so far", "requested from the hub"),
        ("user alice's Spark server is starting at the hub (12 s so far", "pending at the hub"),
        (
            "user alice's Spark server is up at the hub and its Spark Connect server is starting",
            "server up, its Spark Connect server starting",
        ),
        ("a sentence a newer kbproxy might say", "starting"),
    ],
)
def test_start_state(sentence: str, state: str) -> None:
    assert start_state(f"[kbproxy:BACKEND_STARTING] {sentence}") == state


class Unavailable(Exception):
    """What pyspark raises, as far as ``translate`` reads it (a status code and its message)."""

    def getGrpcStatusCode(self) -> object:
        class Code:
            name = "UNAVAILABLE"

        return Code()


def test_a_coded_refusal_carries_its_reason_and_message() -> None:
    message = "[kbproxy:BACKEND_STARTING] user alice's Spark server is starting at the hub"
    translated = translate(
        Unavailable(message),
        target="h:443",
        username="alice",
        token="SECRETTOKEN0123456789",
        use_ssl=True,
    )
    assert translated is not None and translated.waitable
    assert (translated.reason, translated.message) == ("BACKEND_STARTING", message)
