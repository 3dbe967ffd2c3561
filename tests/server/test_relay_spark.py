"""The real pyspark client through kbproxy to real Spark Connect servers."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pytest

from testbed.proxy import KbproxyServer
from testbed.spark import SparkConnectServer
from tests.conftest import ALICE_TOKEN, BOB_TOKEN
from tests.server.conftest import proxy_url, spark_session

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def alice(kbproxy: KbproxyServer) -> Any:
    """alice's Spark session through the proxy, shared by this module's tests."""
    with spark_session(proxy_url(kbproxy, ALICE_TOKEN)) as spark:
        yield spark


def test_range_create_dataframe_and_sql(alice: Any) -> None:
    assert [r.id for r in alice.range(5).collect()] == [0, 1, 2, 3, 4]
    df = alice.createDataFrame([(1, "a"), (2, "b")], ["x", "y"])
    assert df.selectExpr("sum(x) AS s").collect()[0].s == 3
    df.createOrReplaceTempView("letters")
    assert alice.sql("SELECT y FROM letters WHERE x = 2").collect()[0].y == "b"


def test_each_user_reaches_their_own_server(
    kbproxy: KbproxyServer, spark_servers: list[SparkConnectServer], alice: Any
) -> None:
    assert int(alice.conf.get("spark.connect.grpc.binding.port")) == spark_servers[0].port
    with spark_session(proxy_url(kbproxy, BOB_TOKEN, "alice")) as bob:
        # bob claims to be alice in user_id: routing follows the token's user only.
        assert int(bob.conf.get("spark.connect.grpc.binding.port")) == spark_servers[1].port


def test_result_of_200_mb_arrives_whole(alice: Any) -> None:
    n = 12_500_000
    table = alice.range(0, n, 1, 8).selectExpr("id", "id * 2 AS twice").toArrow()
    assert table.num_rows == n
    assert table.nbytes >= 200_000_000
    assert pc.sum(table["id"]).as_py() == n * (n - 1) // 2


def _failure(spark: Any) -> Any:
    with pytest.raises(Exception) as caught:
        spark.sql("SELECT no_such_column FROM range(3)").collect()
    return caught.value


def test_analysis_exception_and_its_details_as_without_the_proxy(
    alice: Any, spark_server: SparkConnectServer
) -> None:
    from pyspark.errors import AnalysisException

    with spark_session(f"{spark_server.url}/;user_id=alice") as direct:
        expected = _failure(direct)
    got = _failure(alice)
    assert isinstance(got, AnalysisException)
    assert type(got) is type(expected)
    assert got.getCondition() == expected.getCondition() == "UNRESOLVED_COLUMN.WITH_SUGGESTION"
    assert got.getSqlState() == expected.getSqlState()
    assert got.getMessageParameters() == expected.getMessageParameters()
    # Enriched details (FetchErrorDetails): the query context and the server-side stack trace.
    got_context = [(c.fragment(), c.startIndex()) for c in got.getQueryContext()]
    expected_context = [(c.fragment(), c.startIndex()) for c in expected.getQueryContext()]
    assert got_context == expected_context and got_context
    assert "JVM stacktrace" in str(got) or got.getSqlState() is not None


def test_artifacts_upload_and_status(alice: Any, tmp_path: Path) -> None:
    blob = bytes(range(256)) * 4096  # 1 MiB: several AddArtifacts chunks
    digest = alice._client.cache_artifact(blob)
    assert alice._client._artifact_manager.is_cached_artifact(digest)
    path = tmp_path / "data.txt"
    path.write_text("hello\n")
    alice.addArtifacts(str(path), file=True)


def test_interrupt_all_stops_a_running_query(alice: Any) -> None:
    outcome: list[BaseException | None] = []

    def long_query() -> None:
        try:
            alice.range(0, 4 * 10**9, 1, 2).selectExpr("sum(id % 7)").collect()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=long_query)
    worker.start()
    interrupted: list[str] = []
    deadline = time.monotonic() + 30
    while not interrupted and time.monotonic() < deadline:
        time.sleep(0.3)
        interrupted = alice.interruptAll()
    worker.join(60)
    assert interrupted, "the query never appeared as running"
    assert outcome and outcome[0] is not None
    assert "OPERATION_CANCELED" in str(outcome[0]) or "cancel" in str(outcome[0]).lower()


def test_stop_without_unimplemented_warnings(
    kbproxy: KbproxyServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with spark_session(proxy_url(kbproxy, ALICE_TOKEN)) as spark:
        spark.range(1).collect()
    assert "UNIMPLEMENTED" not in caplog.text
    kbproxy.wait_for_log(lambda text: "ReleaseSession OK" in text)


def test_messages_beyond_grpcs_4_mib_default_pass_both_ways(alice: Any) -> None:
    size = 20 * 1024 * 1024
    # A 20 MiB request (the query text) and a 20 MiB response (one row, one Arrow batch).
    query = f"SELECT length(repeat('x', {size})) AS n /* {'y' * size} */"
    assert alice.sql(query).collect()[0].n == size
    assert len(alice.sql(f"SELECT repeat('x', {size}) AS s").collect()[0].s) == size
