"""Graceful shutdown of a real service process: on SIGTERM, health turns NOT_SERVING, the
call already in flight still completes, and the process exits cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from infermesh.up.supervisor import free_port
from services.genproto.infermesh.features.v1 import features_pb2, features_pb2_grpc
from services.runtime.topology import HEALTH_SERVICE_NAMES
from tests.conftest import RedisServer

FEATURES_HEALTH = HEALTH_SERVICE_NAMES["features"]


def wait_serving(address: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=FEATURES_HEALTH), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise AssertionError(f"features at {address} never became SERVING")


def test_in_flight_call_completes_while_health_reports_not_serving(
    redis_server: RedisServer, reference_data: Path, tmp_path: Path
) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    log = open(tmp_path / "features.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "services.features"],
        env={
            **os.environ,
            "FEATURES_PORT": str(port),
            "FEATURES_REDIS_URL": redis_server.url,
            "FEATURES_REDIS_TIMEOUT_SECONDS": "10",
            "FEATURES_DRAIN_SECONDS": "1.5",  # health says NOT_SERVING this long before the server stops accepting
            "FEATURES_GRACE_SECONDS": "10",
        },
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    admin = redis.Redis.from_url(redis_server.url)
    try:
        wait_serving(address)
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest(service=FEATURES_HEALTH), timeout=20)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING

            # Pause Redis so the next call is held in flight inside the service.
            admin.execute_command("CLIENT", "PAUSE", "2500", "ALL")
            result: dict[str, object] = {}

            def call() -> None:
                stub = features_pb2_grpc.FeatureServiceStub(channel)
                try:
                    result["reply"] = stub.GetFeatures(
                        features_pb2.GetFeaturesRequest(user_id="u7", item_ids=["i1", "i2", "i3"]), timeout=20
                    )
                except grpc.RpcError as error:
                    result["error"] = error

            caller = threading.Thread(target=call)
            caller.start()
            time.sleep(0.5)  # the call has reached the service and waits on Redis
            process.send_signal(signal.SIGTERM)

            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            check = health.Check(health_pb2.HealthCheckRequest(service=FEATURES_HEALTH), timeout=2)
            assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert process.poll() is None, "the service must wait for its in-flight call"

            caller.join(timeout=20)
            assert "error" not in result, result.get("error")
            reply = result["reply"]
            assert reply.model_input.rows == 3 and len(reply.model_input.data) == 3 * 64 * 4
        assert process.wait(timeout=20) == 0
        # All of it on uvloop, the default event loop (INFERMESH_EVENT_LOOP).
        lines = [
            json.loads(line) for line in (tmp_path / "features.log").read_text().splitlines() if line.startswith("{")
        ]
        assert [line["event_loop"] for line in lines if line.get("message") == "listening"] == ["uvloop"]
    finally:
        admin.execute_command("CLIENT", "UNPAUSE")
        admin.close()
        if process.poll() is None:
            process.kill()
        log.close()
