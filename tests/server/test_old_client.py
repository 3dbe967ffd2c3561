"""A real older pyspark client through kbproxy: token-less FetchErrorDetails in the field.

pyspark 4.0.0.dev1 (the first Spark 4.0 preview) sends FetchErrorDetails without the URL's
metadata, so without the token; released pyspark 4.0.0 and later send it. kbproxy refuses every
token-less call, so that client's errors stay typed but lose their enrichment. The client runs in
a child interpreter (testbed/oldclients.py), on both data planes.
"""

from __future__ import annotations

import json

import pytest

from testbed import oldclients
from testbed.proxy import KbproxyServer
from tests.conftest import ALICE_TOKEN
from tests.server.conftest import proxy_url

pytestmark = pytest.mark.slow

CLIENT = """
import json, sys
from pyspark.errors import AnalysisException
from pyspark.sql import SparkSession
import pyspark

spark = SparkSession.builder.remote(sys.argv[1]).getOrCreate()
out = {"client": pyspark.__version__, "count": spark.range(5).count()}
try:
    spark.sql("SELECT * FROM no_such_table").collect()
except AnalysisException as exc:
    out["sqlstate"] = exc.getSqlState()
    out["parameters"] = exc.getMessageParameters()
    out["message"] = str(exc)
spark.stop()
print(json.dumps(out))
"""


def test_pyspark_4_0_preview_keeps_typed_errors_without_enrichment(
    kbproxy: KbproxyServer,
) -> None:
    log_before = len(kbproxy.child.log_text())
    run = oldclients.run("pyspark-connect", CLIENT, proxy_url(kbproxy, ALICE_TOKEN))
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.splitlines()[-1])

    assert out["client"] == "4.0.0.dev1"
    assert out["count"] == 5
    assert out["sqlstate"] == "42P01"  # still an AnalysisException with its SQL state
    # Its details were asked for without a token, and refused.
    text = kbproxy.wait_for_log(lambda text: "FetchErrorDetails" in text[log_before:])
    fetches = [line for line in text[log_before:].splitlines() if "FetchErrorDetails" in line]
    assert fetches and all(" UNAUTHENTICATED " in line for line in fetches), fetches
    assert all("[kbproxy:NO_TOKEN]" in line for line in fetches), fetches
    assert ALICE_TOKEN not in kbproxy.child.log_text()
