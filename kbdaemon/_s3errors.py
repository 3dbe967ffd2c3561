"""S3-style XML error responses of the local S3 proxy, the form every S3 SDK displays.

S3 answers errors with ``<Error><Code/><Message/><Resource/><RequestId/></Error>``; boto3, pyarrow,
polars and deltalake show Code and Message to the user, so the proxy's own failures (upstream
unreachable, timeout, bad redirect, refused request) use the same form. Errors of S3 itself are
never rewritten: they pass through as S3 sent them.
"""

from __future__ import annotations

import secrets
from xml.sax.saxutils import escape

from aiohttp import web

# status, S3-like code, what the user can do next
UPSTREAM_UNREACHABLE = (502, "UpstreamUnreachable")
UPSTREAM_TIMEOUT = (504, "UpstreamTimeout")
BAD_REDIRECT = (502, "BadRedirect")
HOST_REFUSED = (403, "HostNotAllowed")
NOT_A_PROXY = (403, "AbsoluteUriRefused")
KEYS_UNAVAILABLE = (503, "S3KeysUnavailable")  # the governance service is down, no keys held
KEYS_REFUSED = (403, "S3KeysRefused")  # the service refused the token or the account


def new_request_id() -> str:
    """An id to find a failure in the proxy's log, like S3's RequestId."""
    return secrets.token_hex(8).upper()


def error_xml(code: str, message: str, resource: str, request_id: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{escape(code)}</Code><Message>{escape(message)}</Message>"
        f"<Resource>{escape(resource)}</Resource><RequestId>{escape(request_id)}</RequestId>"
        "</Error>"
    ).encode()


def error_response(
    status: int, code: str, message: str, *, resource: str, request_id: str
) -> web.Response:
    """An S3-style error response (aiohttp leaves the body out for HEAD)."""
    body = error_xml(code, message, resource, request_id)
    headers = {"x-amz-request-id": request_id, "Content-Type": "application/xml"}
    return web.Response(status=status, body=body, headers=headers)
