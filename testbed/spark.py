"""A real Spark Connect server from the pyspark package's own jars (Java 17)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from testbed.procs import ChildProcess, free_port, port_open

SERVER_CLASS = "org.apache.spark.sql.connect.service.SparkConnectServer"
MAX_MESSAGE = 256 * 1024 * 1024


def spark_home() -> Path:
    """The pyspark package directory, which holds bin/, sbin/ and jars/."""
    try:
        import pyspark
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError("pyspark is not installed: run `make venv`") from exc
    home = Path(pyspark.__file__).parent
    if not any((home / "jars").glob("spark-connect_*.jar")):
        raise RuntimeError(f"{home}/jars has no spark-connect jar: reinstall 'pyspark[connect]'")
    return home


def require_java() -> str:
    java = shutil.which("java")
    if java is None:
        raise RuntimeError(
            "Java 17 runs the Spark Connect server: apt-get install openjdk-17-jre-headless"
        )
    return java


@dataclass
class SparkConnectServer:
    """A running Spark Connect server on 127.0.0.1:port."""

    port: int
    child: ChildProcess

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"sc://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.child.stop()


def start_spark_connect(
    workdir: Path,
    *,
    port: int | None = None,
    driver_memory: str = "1g",
    extra_conf: dict[str, str] | None = None,
    timeout: float = 120.0,
) -> SparkConnectServer:
    """Start a Spark Connect server and wait until it accepts connections."""
    require_java()
    home = spark_home()
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    conf = {
        "spark.connect.grpc.binding.address": "127.0.0.1",
        "spark.connect.grpc.binding.port": str(port),
        "spark.connect.grpc.maxInboundMessageSize": str(MAX_MESSAGE),
        "spark.driver.memory": driver_memory,
        "spark.driver.host": "127.0.0.1",
        "spark.driver.bindAddress": "127.0.0.1",
        "spark.ui.enabled": "false",
        "spark.sql.shuffle.partitions": "4",
        "spark.sql.warehouse.dir": str(workdir / "warehouse"),
        "spark.local.dir": str(workdir / "tmp"),
        "spark.driver.extraJavaOptions": f"-Dderby.system.home={workdir}",
    }
    conf.update(extra_conf or {})
    argv = [str(home / "bin" / "spark-submit"), "--class", SERVER_CLASS, "--master", "local[2]"]
    for key, value in conf.items():
        argv += ["--conf", f"{key}={value}"]
    argv += ["--name", f"Spark Connect server {port}", "spark-internal"]
    env = dict(os.environ)
    env.update(
        SPARK_HOME=str(home),
        SPARK_LOCAL_IP="127.0.0.1",
        SPARK_LOG_DIR=str(workdir / "logs"),
        SPARK_CONF_DIR=str(workdir / "conf"),
        PYSPARK_PYTHON=env.get("PYSPARK_PYTHON", "python3"),
    )
    env.pop("SPARK_CONNECT_MODE_ENABLED", None)
    env.pop("SPARK_REMOTE", None)
    (workdir / "conf").mkdir(exist_ok=True)
    child = ChildProcess(argv, log_path=workdir / "spark-connect.log", env=env, cwd=workdir)
    try:
        child.wait_until(
            lambda: port_open("127.0.0.1", port), timeout=timeout, what="Spark Connect server"
        )
    except BaseException:
        child.stop()
        raise
    return SparkConnectServer(port=port, child=child)
