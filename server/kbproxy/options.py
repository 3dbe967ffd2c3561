"""Values of kbproxy's flags, and their defaults from ``KBPROXY_<NAME>`` environment variables.

How it works: each parser turns one flag's text into a value or raises
``argparse.ArgumentTypeError`` with a message saying what was expected. ``EnvArgs`` adds a flag
whose default is its environment variable parsed by the same function; a bad variable is kept
in ``env_errors`` so that the command can refuse it naming the variable. A flag given on the
command line wins over its variable.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

MIB = 1024 * 1024


def parse_host_port(value: str) -> tuple[str, int]:
    """Parse HOST:PORT (IPv6 as [::1]:PORT) for argparse."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def parse_size(value: str) -> int:
    """Bytes, optionally with a KiB/MiB/GiB suffix."""
    text = value.strip()
    for suffix, factor in (("GiB", 1024 * MIB), ("MiB", MIB), ("KiB", 1024), ("B", 1)):
        if text.endswith(suffix):
            text, scale = text[: -len(suffix)].strip(), factor
            break
    else:
        scale = 1
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(
            f"expected a size such as 268435456 or 256MiB, got {value!r}"
        )
    return int(text) * scale


def parse_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise argparse.ArgumentTypeError(f"expected seconds (a number >= 0), got {value!r}")
    return seconds


def parse_count(value: str) -> int:
    if not value.strip().isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value!r}")
    return int(value)


def parse_bool(value: str) -> bool:
    text = value.strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def parse_optional_host_port(value: str) -> tuple[str, int] | None:
    return None if value.strip().lower() in ("", "off", "none") else parse_host_port(value)


def parse_users(value: str) -> frozenset[str]:
    return frozenset(u.strip() for u in value.split(",") if u.strip())


def env_name(flag: str) -> str:
    return "KBPROXY_" + flag.lstrip("-").upper().replace("-", "_")


class EnvArgs:
    """Adds flags whose default comes from ``KBPROXY_<NAME>``, parsed like the flag itself."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser
        self.env_errors: list[str] = []

    def add(
        self, flag: str, *, type: Any, default: Any, help: str, metavar: str | None = None
    ) -> None:
        var = env_name(flag)
        raw = os.environ.get(var)
        if raw is not None:
            try:
                default = type(raw)
            except argparse.ArgumentTypeError as exc:
                self.env_errors.append(f"{var}: {exc}")
        shown = "%(default)s" if not isinstance(default, frozenset) else ",".join(sorted(default))
        self.parser.add_argument(
            flag,
            type=type,
            default=default,
            metavar=metavar,
            help=f"{help} [env {var}; default {shown or 'none'}]",
        )

    def add_switch(self, flag: str, *, default: bool, help: str) -> None:
        var = env_name(flag)
        raw = os.environ.get(var)
        if raw is not None:
            try:
                default = parse_bool(raw)
            except argparse.ArgumentTypeError as exc:
                self.env_errors.append(f"{var}: {exc}")
        self.parser.add_argument(
            flag,
            action=argparse.BooleanOptionalAction,
            default=default,
            help=f"{help} [env {var}=true|false; default %(default)s]",
        )


def parse_log_format(value: str) -> str:
    if value not in ("text", "json"):
        raise argparse.ArgumentTypeError(f"expected text or json, got {value!r}")
    return value


def parse_log_level(value: str) -> str:
    if value.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise argparse.ArgumentTypeError(f"expected DEBUG, INFO, WARNING or ERROR, got {value!r}")
    return value.upper()


EVENT_LOOPS = ("auto", "uvloop", "asyncio")
DATA_PLANES = ("auto", "envoy", "grpc")


def parse_choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    """A parser accepting one of ``choices``."""

    def parse(value: str) -> str:
        if value not in choices:
            raise argparse.ArgumentTypeError(
                f"expected {', '.join(choices[:-1])} or {choices[-1]}, got {value!r}"
            )
        return value

    return parse
