"""The client of the data governance service's credentials routes: the user's S3 keys.

The governance service is KBase/BERDL's "MinIO manager service" (public source:
github.com/BERDataLakehouse/minio_manager_service, read at commit b231f6dc, 2026-06-02:
``src/routes/credentials.py``, ``src/main.py`` AuthMiddleware, ``src/service/errors.py``,
``error_mapping.py``, ``exception_handlers.py``, ``models.py``). What this module relies on:

- ``GET {base}/credentials/`` returns the user's keys, creating the S3 user on first use and the
  same keys on every later call until they are rotated; ``POST {base}/credentials/rotate`` mints
  a new secret and returns the new keys. Both answer 200 with the JSON
  ``{"username", "s3_access_key", "s3_secret_key", "polaris_client_id", "polaris_client_secret"}``
  (the access key is the username). There is no expiry in the answer.
- The KBase token goes in ``Authorization: Bearer <token>`` (the scheme is checked, case
  insensitive). The service asks Auth2's ``api/V2/me`` and requires a custom role
  (``KBASE_REQUIRED_ROLES``, default ``BERDL_USER``).
- Errors are ``{"error": <int code or null>, "error_type": <str or null>, "message": <str>}``:
  no or malformed header 401 (10010, 10030), invalid token 401 (10020), missing role 403 (10040),
  a credential lock held 409 (20045), S3 unreachable 503 (20050), anything else 500 with
  ``error`` null.

Errors become the exceptions of :mod:`kbdaemon.s3keys`, whose messages say what to do next.
"""

from __future__ import annotations

import httpx

from kbdaemon.s3keys import (
    S3AccessDeniedError,
    S3Keys,
    S3KeysError,
    S3KeysTokenRejectedError,
    S3KeysUnavailableError,
)

__all__ = ["GovernanceClient"]

CREDENTIALS_PATH = "credentials/"
ROTATE_PATH = "credentials/rotate"
# Error codes of the governance service (src/service/errors.py).
NO_TOKEN = 10010
INVALID_TOKEN = 10020
INVALID_AUTH_HEADER = 10030
MISSING_ROLE = 10040


class GovernanceClient:
    """An async client of the governance service's credentials routes.

    Args:
        base_url: the service's base URL (its routes are below it, ``{base}/credentials/``).
        timeout: seconds for each request.
        transport: an httpx transport (tests); the default one otherwise.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        url = httpx.URL(base_url)
        if url.scheme not in ("http", "https") or not url.host or url.query:
            raise S3KeysError(
                f"the credentials URL must be an http(s) URL without query, like "
                f"https://governance.example.org/, not {base_url.split('?')[0]!r}"
            )
        self.base_url = str(url).rstrip("/") + "/"
        self._client = httpx.AsyncClient(timeout=timeout, transport=transport)

    def __repr__(self) -> str:
        return f"GovernanceClient({self.base_url!r})"

    async def fetch(self, token: str) -> S3Keys:
        """The user's current keys (``GET credentials/``).

        Raises:
            S3KeysTokenRejectedError: the token is invalid or expired.
            S3AccessDeniedError: the account lacks the role the service requires.
            S3KeysUnavailableError: the service is unreachable, failed or answered nonsense.
        """
        return await self._call("GET", CREDENTIALS_PATH, token)

    async def rotate(self, token: str) -> S3Keys:
        """New keys (``POST credentials/rotate``); the old secret stops working at once.

        Raises:
            The same as :meth:`fetch`.
        """
        return await self._call("POST", ROTATE_PATH, token)

    async def close(self) -> None:
        await self._client.aclose()

    async def _call(self, method: str, path: str, token: str) -> S3Keys:
        url = self.base_url + path
        try:
            response = await self._client.request(
                method, url, headers={"Authorization": f"Bearer {token}"}
            )
        except httpx.TimeoutException:
            raise S3KeysUnavailableError(
                f"the data governance service at {self.base_url} did not answer in time; "
                "the S3 keys are refreshed again soon"
            ) from None
        except httpx.HTTPError as exc:
            raise S3KeysUnavailableError(
                f"cannot reach the data governance service at {self.base_url} "
                f"({type(exc).__name__}); check the network or the credentials URL"
            ) from None
        if response.status_code == 200:
            try:
                return S3Keys.from_json(response.json())
            except ValueError as exc:
                raise S3KeysUnavailableError(
                    f"{self.base_url}{path} answered 200 but not with S3 keys ({exc}); "
                    "is the credentials URL the data governance service?"
                ) from None
        raise _error_of(response, self.base_url)


def _error_of(response: httpx.Response, base_url: str) -> S3KeysError:
    code: object = None
    message = ""
    try:
        body = response.json()
        if isinstance(body, dict):
            code = body.get("error")
            message = str(body.get("message") or body.get("error_type") or "")
    except ValueError:
        pass
    status = response.status_code
    said = f": {message}" if message else ""
    if status == 401 or code in (NO_TOKEN, INVALID_TOKEN, INVALID_AUTH_HEADER):
        return S3KeysTokenRejectedError(
            f"the data governance service refused the KBase token ({status}{said}); "
            "log in again with a valid token (kbdaemon login)"
        )
    if status == 403 or code == MISSING_ROLE:
        return S3AccessDeniedError(
            f"your KBase account may not use the data lake ({status}{said}); "
            "ask the KBase team for data lake access (the BERDL user role)"
        )
    if status == 404:
        return S3KeysUnavailableError(
            f"{base_url} has no credentials route (404); check the credentials URL"
        )
    return S3KeysUnavailableError(
        f"the data governance service failed ({status}{said}); the S3 keys are tried again soon"
    )
