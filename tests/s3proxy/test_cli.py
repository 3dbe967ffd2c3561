"""`kbdaemon s3-proxy` parses its command line and refuses bad settings with clear messages."""

from __future__ import annotations

import pytest

from kbdaemon import exitcodes
from kbdaemon.cli import main
from kbdaemon.s3cli import parse_listen


def test_listen_addresses() -> None:
    assert parse_listen("127.0.0.1:9000") == ("127.0.0.1", 9000)
    assert parse_listen("[::1]:0") == ("::1", 0)
    assert parse_listen(":9000") == ("127.0.0.1", 9000)
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_listen("9000")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--listen", "0.0.0.0:0"], "--allow-remote"),
        (["--listen", "localhost"], "HOST:PORT"),
        (["--listen", "127.0.0.1:70000"], "out of range"),
        (["--read-timeout", "0"], "positive"),
    ],
)
def test_bad_settings_exit_with_usage(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["s3-proxy", "--upstream", "https://dlp.example.org", *argv])
    assert code == exitcodes.USAGE
    assert message in capsys.readouterr().err


def test_upstream_must_be_an_http_url(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["s3-proxy", "--upstream", "ftp://dlp.example.org/?X-Amz-Signature=secret"])
    assert code == exitcodes.USAGE
    err = capsys.readouterr().err
    assert "upstream must be" in err and "secret" not in err
