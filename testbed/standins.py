"""Stand-in Spark Connect backends that answer Config with their own identity.

How it works::

    Config(get "spark.connect.grpc.binding.port") --> ConfigResponse(pairs=[(that key, identity)])

A real Spark Connect server answers that Config call with its own port, so a caller can tell
which server answered (tests/server/conftest.py ``config_request``/``config_port``); a stand-in
answers with the identity it was given (its port unless told otherwise, always a number). Any
other method is UNIMPLEMENTED. ``python -m testbed.standins --count N --ports-file F`` serves N
stand-ins on free loopback ports in one helper process (grpc.aio, one event loop) and writes
their ports to F, one a line, when all listen; ``start_standins`` runs that as a child.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from testbed.procs import ChildProcess

SERVICE = "spark.connect.SparkConnectService"
IDENTITY_KEY = "spark.connect.grpc.binding.port"  # what a real server answers with its port
MAX_MESSAGE = 256 * 1024 * 1024


def _config_answer(request: bytes, identity: str) -> bytes:
    from pyspark.sql.connect.proto import base_pb2

    parsed = base_pb2.ConfigRequest.FromString(request)
    answer = base_pb2.ConfigResponse(session_id=parsed.session_id)
    answer.pairs.add(key=IDENTITY_KEY, value=identity)
    data: bytes = answer.SerializeToString()
    return data


class IdentityBackend(grpc.GenericRpcHandler):  # type: ignore[misc]
    """Sync gRPC handler: Config answers ``identity``; other methods are UNIMPLEMENTED."""

    def __init__(self, identity: str) -> None:
        self.identity = identity
        self.calls = 0

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        if details.method != f"/{SERVICE}/Config":
            return None

        def answer(request: bytes, context: grpc.ServicerContext) -> bytes:
            self.calls += 1
            return _config_answer(request, self.identity)

        return grpc.unary_unary_rpc_method_handler(answer)


def _options() -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
    ]


@contextlib.contextmanager
def identity_backend(host: str = "127.0.0.1", port: int = 0, identity: str = "") -> Iterator[int]:
    """One stand-in in this process (threads); yields its port. ``identity`` defaults to it."""
    server = grpc.server(futures.ThreadPoolExecutor(8), options=_options())
    bound = server.add_insecure_port(f"{host}:{port}")
    server.add_generic_rpc_handlers((IdentityBackend(identity or str(bound)),))
    server.start()
    try:
        yield bound
    finally:
        server.stop(0)


class _AioIdentity(grpc.GenericRpcHandler):  # type: ignore[misc]
    def __init__(self, identity: str) -> None:
        self.identity = identity

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        if details.method != f"/{SERVICE}/Config":
            return None

        async def answer(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
            return _config_answer(request, self.identity)

        return grpc.unary_unary_rpc_method_handler(answer)


async def _serve_many(count: int, ports_file: Path) -> None:
    servers = []
    ports = []
    for _ in range(count):
        server = grpc.aio.server(options=_options())
        port = server.add_insecure_port("127.0.0.1:0")
        server.add_generic_rpc_handlers((_AioIdentity(str(port)),))
        await server.start()
        servers.append(server)
        ports.append(port)
    tmp = ports_file.with_suffix(".tmp")
    tmp.write_text("".join(f"{p}\n" for p in ports), encoding="utf-8")
    tmp.replace(ports_file)
    await asyncio.gather(*(s.wait_for_termination() for s in servers))


@dataclass
class StandinFleet:
    """Stand-ins in a helper process; each answers with its own port."""

    ports: list[int]
    child: ChildProcess

    def stop(self) -> None:
        self.child.stop()


def start_standins(workdir: Path, count: int, *, timeout: float = 60) -> StandinFleet:
    """Start ``count`` stand-ins in one child process; returns when all listen."""
    workdir.mkdir(parents=True, exist_ok=True)
    ports_file = workdir / "standin-ports.txt"
    ports_file.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "testbed.standins", "--count", str(count)]
    argv += ["--ports-file", str(ports_file)]
    child = ChildProcess(argv, log_path=workdir / "standins.log")
    try:
        child.wait_until(ports_file.exists, timeout=timeout, what="stand-in backends")
    except BaseException:
        child.stop()
        raise
    ports = [int(line) for line in ports_file.read_text(encoding="utf-8").split()]
    return StandinFleet(ports=ports, child=child)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--ports-file", type=Path, required=True)
    args = parser.parse_args(argv)
    started = time.monotonic()
    asyncio.run(_serve_many(args.count, args.ports_file))
    print(f"stand-ins served for {time.monotonic() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
