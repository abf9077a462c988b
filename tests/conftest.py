"""Fixtures: a real jupyter_server (pytest-jupyter) with jupyter_ckpt enabled,
real ipykernel processes started through the REST API, and a websocket client
that talks to them the way the notebook frontend does."""

from __future__ import annotations

import os

import pytest

from .client import SNAPSHOT_EVENTS, EventRecorder, KernelSocket, api

pytest_plugins = ["pytest_jupyter.jupyter_server"]

# Tests of modules that run CRIU set ``pytestmark = pytest.mark.criu``; those
# that start server processes of their own add ``slow``, the UI's ``browser``.
# `make test-quick` runs what has none of these.


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("criu") and os.geteuid() != 0:
            item.add_marker(pytest.mark.skip(reason="CRIU needs root (the suite runs as root in CI)"))


@pytest.fixture
def events(jp_serverapp) -> EventRecorder:
    """The server's snapshot events, as the frontend sees them."""
    recorder = EventRecorder()
    jp_serverapp.event_logger.add_listener(schema_id=SNAPSHOT_EVENTS, listener=recorder.listener)
    yield recorder
    jp_serverapp.event_logger.remove_listener(schema_id=SNAPSHOT_EVENTS, listener=recorder.listener)


@pytest.fixture
def store_root(tmp_path):
    return tmp_path / "ckpt-store"


@pytest.fixture
def jp_server_config(store_root):
    return {
        "ServerApp": {"jpserver_extensions": {"jupyter_ckpt": True}},
        "CheckpointApp": {"store_root": str(store_root)},
    }


@pytest.fixture
def stock_kernelspec(jp_data_dir) -> str:
    """A kernelspec that names jupyter_client's stock provisioner (its kernels
    cannot be snapshotted); its name."""
    import json
    import sys

    spec = jp_data_dir / "kernels" / "stock"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Python (stock provisioner)",
                "language": "python",
                "metadata": {"kernel_provisioner": {"provisioner_name": "local-provisioner"}},
            }
        )
    )
    return "stock"


@pytest.fixture
def start_kernel(jp_fetch, jp_ws_fetch):
    """Start a kernel through the REST API and open a websocket to it."""
    started: list[str] = []

    async def start(name: str = "python3") -> tuple[str, KernelSocket]:
        status, model = await api(jp_fetch, "POST", "api", "kernels", body={"name": name})
        assert status == 201, model
        kernel_id = model["id"]
        started.append(kernel_id)
        ws = await jp_ws_fetch("api", "kernels", kernel_id, "channels")
        sock = KernelSocket(ws)
        await sock.execute("1")  # ready
        return kernel_id, sock

    return start


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-protocol server process (moto's server mode): its URL and process."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    # On every address: the migration tests reach it from another network namespace.
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "0.0.0.0", "-p", str(port)], stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    yield url, proc
    proc.terminate()
    proc.wait()


@pytest.fixture(scope="session")
def s3_endpoint(s3_server):
    return s3_server[0]


@pytest.fixture
def s3_store_options(s3_endpoint):
    import uuid

    import s3fs

    opts = {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"}
    bucket = f"ckpt-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(**opts).mkdir(bucket)
    return bucket, opts
