"""Backend names: a username as KubeSpawner names the user's pod and service.

How it works::

    validated username --scheme--> the slug KubeSpawner puts in {username}

KubeSpawner (the hub's spawner) fills ``{username}`` of its name templates (pod
``jupyter-{user_server}``, which is ``jupyter-{username}`` for a user's default server) with a
slug made by its ``slug_scheme``. kbproxy fills ``{username}`` of its backend template with the
same slug, so the name it dials is the name the hub gave the user's server. Both schemes give
distinct users distinct names; neither truncates a name into another user's.

``safe`` (KubeSpawner 7's default)
    A name that is already a valid DNS label (``[a-z][a-z0-9-]*``, ending in a letter or digit,
    no ``--``) of at most 48 characters is used as it is. Any other name (``_``, upper case,
    longer) becomes a cleaned prefix (lower case, each run of other characters -> ``-``, starting
    with a letter, at most 37 characters) + ``---`` + the first 8 hex digits of the sha256 of the
    whole name: at most 48 characters.
``escape`` (the scheme of KubeSpawner < 7)
    Every character other than ``[a-z0-9]`` becomes ``-`` followed by the upper-case hex of each
    of its UTF-8 bytes (without zero padding), then the whole is lower-cased: ``a_b`` ->
    ``a-5fb``. Reversible, hence unique, but not length-limited.
"""

from __future__ import annotations

import functools
import hashlib
import re
import string
from typing import Literal, get_args

NameScheme = Literal["safe", "escape"]
NAME_SCHEMES: tuple[str, ...] = get_args(NameScheme)
DEFAULT_NAME_SCHEME: NameScheme = "safe"

SAFE_MAX_LENGTH = 48  # KubeSpawner's budget for {username} in its templates
HASH_LENGTH = 8
_DNS_LABEL = re.compile(r"[a-z]([a-z0-9-]{0,61}[a-z0-9])?")
_NOT_ALNUM = re.compile(r"[^a-z0-9]+")
_ESCAPE_SAFE = frozenset(string.ascii_lowercase + string.digits)


def _is_dns_label(name: str) -> bool:
    return _DNS_LABEL.fullmatch(name) is not None


def _clean_prefix(name: str, max_length: int) -> str:
    """Lower case, runs of other characters -> '-', starts with a letter, non-empty."""
    cleaned = _NOT_ALNUM.sub("-", name.lower()).lstrip("-")[:max_length].rstrip("-")
    if cleaned and not cleaned[0].isalpha():
        cleaned = "x-" + cleaned[: max_length - 2]
    return cleaned or "x"


def safe_name(name: str, max_length: int = SAFE_MAX_LENGTH) -> str:
    """KubeSpawner's ``safe`` slug of ``name``: the name itself when it is a fit DNS label.

    Args:
        name: a username (any string).
        max_length: the longest slug; KubeSpawner uses 48 for ``{username}``.
    Returns:
        A DNS label of at most ``max_length`` characters, distinct for distinct names.
    Raises:
        ValueError: ``max_length`` leaves no room for a name before the hash.
    """
    if "--" not in name and len(name) <= max_length and _is_dns_label(name):
        return name
    prefix_length = max_length - HASH_LENGTH - 3
    if prefix_length < 1:
        raise ValueError(f"a safe name needs at least {HASH_LENGTH + 4} characters")
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:HASH_LENGTH]
    return f"{_clean_prefix(name, prefix_length)}---{digest}"


def escape_name(name: str) -> str:
    """KubeSpawner's legacy ``escape`` slug: escapism with ``-``, then lower case."""
    return "".join(
        c if c in _ESCAPE_SAFE else "".join(f"-{byte:X}" for byte in c.encode("utf-8"))
        for c in name
    ).lower()


@functools.lru_cache(maxsize=4096)
def backend_name(username: str, scheme: NameScheme = DEFAULT_NAME_SCHEME) -> str:
    """The value of ``{username}`` in the backend template, by the hub's slug scheme.

    Raises:
        ValueError: an unknown scheme.
    """
    if scheme == "safe":
        return safe_name(username)
    if scheme == "escape":
        return escape_name(username)
    raise ValueError(f"unknown backend name scheme {scheme!r}: use {' or '.join(NAME_SCHEMES)}")
