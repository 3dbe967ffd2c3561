"""``create_spark_session()``: a ready Spark Connect session to the user's own server.

How it works::

    resolve_connection()          token, user (Auth2, cached), URL      -> kbclient errors
    SparkSession.builder.remote(url).create()   always a new session, never getOrCreate
    wait until ready              one cheap RPC (spark.version), pyspark retries off;
                                  a starting server (UNAVAILABLE from the proxy) is retried
                                  for at most ``wait_for_server`` seconds, each wait one
                                  short WARNING line (shows in a notebook); a server the
                                  hub starts (BACKEND_STARTING) gets one line per state
                                  change instead (requested, pending, ready); every attempt
                                  runs against that deadline, so the wait never overshoots
    apply app_name, spark_config  then pyspark's own retry policies are put back, each
                                  wrapped by ``_outage.WarningPolicy``: a server lost later
                                  gives one warning while pyspark retries, not silence

gRPC failures of that first RPC are translated by ``_grpcerrors`` (the one boundary); later
errors of the session's queries are pyspark's own. ``spark.stop()`` releases the server-side
session. Nothing here runs an event loop: the blocking API is safe inside Jupyter's running
loop, and ``acreate_spark_session`` runs the same steps in a worker thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from kbclient._connection import (
    ConnectionInfo,
    daemon_s3_endpoint,
    next_step_for,
    resolve_connection,
)
from kbclient._errors import AuthError, KBaseError, SparkServerUnavailableError
from kbclient._grpcerrors import START_HINT, Translated, start_state, translate
from kbclient._outage import Target, WarningPolicy

if TYPE_CHECKING:
    from pyspark.sql.connect.session import SparkSession

log = logging.getLogger(__name__)

DEFAULT_WAIT_FOR_SERVER = 120.0
_FIRST_DELAY = 0.5
_MAX_DELAY = 5.0
_SLOW_NOTE = 3.0  # an unanswered try is first mentioned after this many seconds
_SLOW_REPEAT = 15.0
_LAST_TRY = 0.5  # the least time a try is given before the deadline


def get_connection_info(
    *,
    host: str | None = None,
    port: int | None = None,
    token: str | None = None,
    auth_url: str | None = None,
    use_ssl: bool | None = None,
    profile: str | None = None,
) -> ConnectionInfo:
    """Where ``create_spark_session`` would connect, as whom, with which token (masked).

    Arguments as for ``create_spark_session``. Contacts Auth2 (cached) and the local daemon,
    not the Spark server.

    Raises:
        KBaseError: NoTokenError, InvalidTokenError, AuthUnavailableError, ProfileError, ...
    """
    info = resolve_connection(
        host=host, port=port, token=token, auth_url=auth_url, use_ssl=use_ssl, profile=profile
    )
    if info.s3_endpoint is None:
        endpoint = daemon_s3_endpoint(info.profile, info.username)
        if endpoint is not None:
            info = _with_s3(info, endpoint)
    return info


def _with_s3(info: ConnectionInfo, endpoint: str) -> ConnectionInfo:
    from dataclasses import replace

    return replace(info, s3_endpoint=endpoint)


def create_spark_session(
    *,
    host: str | None = None,
    port: int | None = None,
    token: str | None = None,
    auth_url: str | None = None,
    use_ssl: bool | None = None,
    app_name: str | None = None,
    spark_config: Mapping[str, Any] | None = None,
    profile: str | None = None,
    wait_for_server: float = DEFAULT_WAIT_FOR_SERVER,
) -> SparkSession:
    """A new, ready Spark Connect session to your own Spark server.

    With no arguments: the token from the first of the ``token`` argument, KBASE_AUTH_TOKEN,
    KB_AUTH_TOKEN, the running kbdaemon and the OS keyring; the server of the profile
    (prod: ``spark.berdl.kbase.us:443`` with TLS, auth ``https://kbase.us/services/auth/``).

    Args:
        host: the Spark Connect proxy host (may contain ``{username}``); None: the profile's.
        port: its port; None: the profile's (443).
        token: a KBase token; None: discovered as above.
        auth_url: KBase Auth2; None: KBASE_AUTH_URL, else the daemon's or the profile's.
        use_ssl: TLS to the proxy; None: the profile's (True).
        app_name: sets ``spark.app.name`` of the session.
        spark_config: runtime Spark SQL settings for the session.
        profile: prod, ci, appdev or a profile of the config file; None: the default one.
        wait_for_server: seconds to wait for a server that is starting (0: do not wait).

    Returns:
        A new ``pyspark.sql.connect.session.SparkSession``; ``spark.stop()`` releases it.

    Raises:
        NoTokenError: no token anywhere.
        InvalidTokenError, TokenExpiredError, MFARequiredError: the token is refused.
        AuthUnavailableError: KBase Auth2 cannot be reached.
        SparkServerUnavailableError: the proxy or your Spark server is not reachable.
        KeyringError, ProfileError: see their messages.
    """
    info = resolve_connection(
        host=host, port=port, token=token, auth_url=auth_url, use_ssl=use_ssl, profile=profile
    )
    return build_session(
        info, app_name=app_name, spark_config=spark_config, wait_for_server=wait_for_server
    )


async def acreate_spark_session(
    *,
    host: str | None = None,
    port: int | None = None,
    token: str | None = None,
    auth_url: str | None = None,
    use_ssl: bool | None = None,
    app_name: str | None = None,
    spark_config: Mapping[str, Any] | None = None,
    profile: str | None = None,
    wait_for_server: float = DEFAULT_WAIT_FOR_SERVER,
) -> SparkSession:
    """``create_spark_session`` for async code: the blocking steps run in a worker thread."""
    import asyncio

    return await asyncio.to_thread(
        create_spark_session,
        host=host,
        port=port,
        token=token,
        auth_url=auth_url,
        use_ssl=use_ssl,
        app_name=app_name,
        spark_config=spark_config,
        profile=profile,
        wait_for_server=wait_for_server,
    )


def build_session(
    info: ConnectionInfo,
    *,
    app_name: str | None = None,
    spark_config: Mapping[str, Any] | None = None,
    wait_for_server: float = DEFAULT_WAIT_FOR_SERVER,
) -> SparkSession:
    """A new session for ``info``, ready (one RPC answered) and configured."""
    from pyspark.sql.connect.session import SparkSession

    spark = SparkSession.builder.remote(info.spark_url_with_token()).create()
    try:
        client = spark.client
        policies = client.get_retry_policies()
        client.set_retry_policies([])
        try:
            _wait_until_ready(spark, info, wait_for_server)
        except BaseException:
            spark.release_session_on_close = False  # never reached: nothing to release
            raise
        finally:
            target = Target(username=info.username, address=info.target, token=info.token)
            wrapped: list[Any] = [WarningPolicy(policy, target) for policy in policies]
            client.set_retry_policies(wrapped)  # duck-typed: pyspark asks only what they answer
        settings = dict(spark_config or {})
        if app_name is not None:
            settings["spark.app.name"] = app_name
        for key, value in settings.items():
            spark.conf.set(key, value)
    except BaseException:
        spark.stop()
        raise
    log.info("Spark Connect session %s for %s at %s", spark.session_id, info.username, info.target)
    return spark


def _attempt(
    spark: SparkSession, timeout: float | None, on_slow: Callable[[float], None]
) -> BaseException | None:
    """One cheap RPC (``spark.version``): None when it answered, else its error.

    With a ``timeout``, the RPC runs in a worker thread and is abandoned after that many
    seconds (raising TimeoutError): pyspark has no per-call deadline, and a proxy that is
    still connecting to a server may hold a call for a minute. While it is held,
    ``on_slow(seconds so far)`` is called after ``_SLOW_NOTE`` s and then every
    ``_SLOW_REPEAT`` s, so a long wait is never silent.
    """
    if timeout is None:
        try:
            spark.version  # noqa: B018 - AnalyzePlan(SparkVersion)
        except Exception as exc:
            return exc
        return None
    outcome: list[BaseException | None] = []
    done = threading.Event()

    def work() -> None:
        try:
            spark.version  # noqa: B018 - AnalyzePlan(SparkVersion)
            outcome.append(None)
        except BaseException as exc:  # handed to the caller
            outcome.append(exc)
        finally:
            done.set()

    started = time.monotonic()
    end = started + max(0.0, timeout)
    threading.Thread(target=work, name="kbclient-ready", daemon=True).start()
    note = started + _SLOW_NOTE
    while not done.wait(max(0.0, min(note, end) - time.monotonic())):
        now = time.monotonic()
        if now >= end:
            raise TimeoutError
        if now >= note:
            on_slow(now - started)
            note = now + _SLOW_REPEAT
    return outcome[0]


def waiting_message(
    info: ConnectionInfo, *, waited: float, deadline: float, pause: float | None = None
) -> str:
    """The one line logged per wait: what, how long so far, until when (wall clock).

    ``pause`` is the time to the next try after a refusal; None while a try is unanswered.
    """
    until = time.strftime("%H:%M:%S", time.localtime(deadline))
    state = (
        f"no answer after {waited:.0f} s"
        if pause is None
        else f"not ready after {waited:.0f} s, next try in {pause:.1f} s"
    )
    return (
        f"Waiting for your Spark server ({info.username} via {info.target}): {state}, "
        f"giving up at {until}"
    )


def starting_message(info: ConnectionInfo, *, state: str, waited: float, deadline: float) -> str:
    """The one line logged when the hub's start of the user's server changes state."""
    until = time.strftime("%H:%M:%S", time.localtime(deadline))
    return (
        f"Your Spark server ({info.username}) is being started through JupyterHub: {state} "
        f"({waited:.0f} s so far, giving up at {until})"
    )


def _wait_until_ready(spark: SparkSession, info: ConnectionInfo, wait_for_server: float) -> None:
    """Return once the server answers; raise a kbclient error, never later than the limit."""
    wait_for_server = max(0.0, wait_for_server)
    started = time.monotonic()
    deadline = started + wait_for_server
    wall_deadline = time.time() + wait_for_server
    delay = _FIRST_DELAY
    last: Translated | None = None
    state: str | None = None  # of a start through the hub (BACKEND_STARTING)

    def slow(_: float) -> None:
        waited = time.monotonic() - started
        log.warning("%s", waiting_message(info, waited=waited, deadline=wall_deadline))

    while True:
        remaining = deadline - time.monotonic()
        try:
            exc = _attempt(spark, None if wait_for_server == 0 else remaining, slow)
        except TimeoutError:
            raise _gave_up(info, last, time.monotonic() - started) from None
        if exc is None:
            if state is not None:
                waited = time.monotonic() - started
                log.warning("Your Spark server (%s) is ready (after %.0f s)", info.username, waited)
            return
        translated = translate(
            exc, target=info.target, username=info.username, token=info.token, use_ssl=info.use_ssl
        )
        if translated is None:
            raise exc
        if isinstance(translated.error, AuthError):
            step = next_step_for(info.token_source)
            if step is not None:
                translated.error.set_next_step(step)
        # The next try gets at least _LAST_TRY s before the deadline, or there is none.
        room = deadline - time.monotonic() - _LAST_TRY
        if not translated.waitable or room <= 0:
            if translated.waitable and wait_for_server > 0:
                raise _gave_up(info, translated, time.monotonic() - started) from None
            raise translated.error from None
        last = translated
        pause = min(delay, room)
        waited = time.monotonic() - started
        if translated.reason == "BACKEND_STARTING":
            now_state = start_state(translated.message)
            if now_state != state:
                state = now_state
                message = starting_message(info, state=state, waited=waited, deadline=wall_deadline)
                log.warning("%s", message)
        else:
            log.warning(
                "%s", waiting_message(info, waited=waited, pause=pause, deadline=wall_deadline)
            )
        time.sleep(pause)
        delay = min(delay * 2, _MAX_DELAY)


def _gave_up(info: ConnectionInfo, last: Translated | None, waited: float) -> KBaseError:
    """The error once ``wait_for_server`` is used up (the last refusal, or "did not answer")."""
    if last is None:
        error: KBaseError = SparkServerUnavailableError(
            f"your Spark server ({info.username}) did not answer through {info.target}; "
            f"{START_HINT}"
        )
    else:
        error = last.error
    error.add_context(f"gave up after waiting {waited:.0f} s")
    return error
