"""kbclient with the oldest pyspark it supports (``pyspark[connect]>=4.0``): pyspark-client 4.0.0.

The test suite's own pyspark is the newest; this one runs in a child interpreter that imports
pyspark 4.0.0 instead (testbed/oldclients.py), against the same kbproxy and Spark servers.
"""

from __future__ import annotations

import json

import pytest

from testbed import oldclients
from testbed.auth import DevAuthServer
from testbed.proxy import KbproxyServer
from tests.conftest import ALICE_TOKEN, EXPIRED_TOKEN

pytestmark = pytest.mark.slow

CLIENT = """
import json, sys
import pyspark
from pyspark.errors import AnalysisException
import kbclient

port, auth_url, token, expired = sys.argv[1:5]
where = dict(host="127.0.0.1", port=int(port), use_ssl=False, auth_url=auth_url)
spark = kbclient.create_spark_session(
    token=token, app_name="oldest", spark_config={"spark.sql.shuffle.partitions": "3"}, **where
)
out = {"client": pyspark.__version__, "sum": spark.range(10).groupBy().sum("id").first()[0]}
out["partitions"] = spark.conf.get("spark.sql.shuffle.partitions")
try:
    spark.sql("SELECT nope FROM range(1)").collect()
except AnalysisException as exc:
    out["sqlstate"] = exc.getSqlState()
spark.stop()
try:
    kbclient.create_spark_session(token=expired, **where)
except kbclient.KBaseError as exc:
    out["expired"] = [type(exc).__name__, str(exc)]
print(json.dumps(out))
"""


def test_sessions_queries_and_errors_with_pyspark_4_0_0(
    kbproxy: KbproxyServer, auth: DevAuthServer
) -> None:
    run = oldclients.run(
        "pyspark-client", CLIENT, str(kbproxy.port), auth.url, ALICE_TOKEN, EXPIRED_TOKEN
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.splitlines()[-1])

    assert out["client"] == "4.0.0"
    assert out["sum"] == 45
    assert out["partitions"] == "3"
    assert out["sqlstate"] == "42703"  # UNRESOLVED_COLUMN, typed through the proxy
    kind, message = out["expired"]
    assert kind == "InvalidTokenError" and "expired" in message
    assert EXPIRED_TOKEN not in message and ALICE_TOKEN not in run.stderr
