"""A tiny protobuf wire-format reader: the session id and user id of a Spark Connect request.

How it works: every request message of ``spark.connect.SparkConnectService`` has the session id
as field 1 (a string) and a ``UserContext`` as field 2, whose field 1 is the user id. The reader
walks the top-level fields, skipping the others by wire type, and stops as soon as it has both,
so a large AddArtifacts chunk costs no more than its first few bytes. kbproxy must not import
pyspark (the server image does not have it), hence no generated classes. Malformed input gives
``None`` values, never an exception.
"""

from __future__ import annotations

from dataclasses import dataclass

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_MAX_SESSION_ID = 256


@dataclass(frozen=True)
class RequestIds:
    """What a request says about its session (``None`` where absent or unreadable)."""

    session_id: str | None = None
    user_id: str | None = None


def _varint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(data: bytes | memoryview, wanted: frozenset[int]) -> dict[int, memoryview]:
    """The first occurrence of each wanted length-delimited field, stopping once all are found."""
    view = memoryview(data)
    found: dict[int, memoryview] = {}
    pos = 0
    while pos < len(view) and len(found) < len(wanted):
        key, pos = _varint(view, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            _, pos = _varint(view, pos)
        elif wire_type == _I64:
            pos += 8
        elif wire_type == _I32:
            pos += 4
        elif wire_type == _LEN:
            length, pos = _varint(view, pos)
            if pos + length > len(view):
                raise ValueError("truncated field")
            if number in wanted and number not in found:
                found[number] = view[pos : pos + length]
            pos += length
        else:  # groups (3, 4) are not used by Spark Connect
            raise ValueError(f"unsupported wire type {wire_type}")
    return found


def _text(value: memoryview | None) -> str | None:
    if value is None or not 0 < len(value) <= _MAX_SESSION_ID:
        return None
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        return None


def _quick(message: bytes) -> RequestIds | None:
    """The common layout (field 1, then field 2 starting with its field 1), short lengths."""
    if len(message) < 4 or message[0] != 0x0A or message[1] >= 0x80:
        return None
    end = 2 + message[1]
    if len(message) < end + 4 or message[end] != 0x12 or message[end + 1] >= 0x80:
        return None
    if message[end + 2] != 0x0A or message[end + 3] >= 0x80:
        return None
    user_end = end + 4 + message[end + 3]
    if user_end > end + 2 + message[end + 1] or user_end > len(message):
        return None
    try:
        session_id = message[2:end].decode("utf-8")
        user_id = message[end + 4 : user_end].decode("utf-8")
    except UnicodeDecodeError:
        return None
    return RequestIds(session_id or None, user_id or None)


def read_request_ids(message: bytes) -> RequestIds:
    """Session id (field 1) and ``user_context.user_id`` (field 2.1) of a request message."""
    if (quick := _quick(message)) is not None:
        return quick
    try:
        top = _fields(message, frozenset((1, 2)))
        user_id = None
        if (context := top.get(2)) is not None:
            user_id = _text(_fields(context, frozenset((1,))).get(1))
        return RequestIds(session_id=_text(top.get(1)), user_id=user_id)
    except ValueError:
        return RequestIds()
