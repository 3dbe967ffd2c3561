"""A real older pyspark client through kbproxy: token-less FetchErrorDetails in the field.

pyspark 4.0.0.dev1 (the first Spark 4.0 preview, still in use in some notebook images) sends
FetchErrorDetails without the URL's metadata, so without the token; released pyspark 4.0.0 and
later send it. ``make venv`` installs that client's pure-Python package (pyspark-connect) into a
directory of its own, and the test runs it in a child interpreter with that directory first on
its path, beside the venv's grpcio, pandas and pyarrow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.proxy import KbproxyServer
from tests.conftest import ALICE_TOKEN
from tests.server.conftest import proxy_url

pytestmark = pytest.mark.slow

OLD_VERSION = "4.0.0.dev1"
OLD_CLIENT = Path(__file__).resolve().parents[2] / ".venv" / "old-clients" / "pyspark-connect"

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


@pytest.fixture(scope="module")
def old_pyspark() -> Path:
    if not (OLD_CLIENT / "pyspark").is_dir():
        pytest.fail(
            f"the pyspark {OLD_VERSION} client is missing: run `make venv`, or "
            f".venv/bin/pip install --no-deps --target {OLD_CLIENT} pyspark-connect=={OLD_VERSION}"
        )
    return OLD_CLIENT


def test_pyspark_4_0_preview_gets_enriched_errors_through_the_proxy(
    kbproxy: KbproxyServer, old_pyspark: Path
) -> None:
    log_before = len(kbproxy.child.log_text())
    env = dict(os.environ, PYTHONPATH=str(old_pyspark))
    run = subprocess.run(
        [sys.executable, "-c", CLIENT, proxy_url(kbproxy, ALICE_TOKEN)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.splitlines()[-1])

    assert out["client"] == OLD_VERSION
    assert out["count"] == 5
    assert out["sqlstate"] == "42P01"
    assert out["parameters"]["relationName"] == "`no_such_table`"
    # The error's details were fetched without a token, routed by the session of earlier calls.
    fetches = [
        line
        for line in kbproxy.child.log_text()[log_before:].splitlines()
        if "FetchErrorDetails" in line
    ]
    assert fetches and all(" alice FetchErrorDetails OK " in line for line in fetches), fetches
    assert all("routed_by=session" in line for line in fetches), fetches
    assert ALICE_TOKEN not in kbproxy.child.log_text()
