"""Fixtures: a real jupyter_server (pytest-jupyter) with jupyter_ckpt enabled,
real ipykernel processes started through the REST API, and a websocket client
that talks to them the way the notebook frontend does."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest
from tornado.httpclient import HTTPClientError

pytest_plugins = ["pytest_jupyter.jupyter_server"]

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="CRIU needs root")


@pytest.fixture
def store_root(tmp_path):
    return tmp_path / "ckpt-store"


@pytest.fixture
def jp_server_config(store_root):
    return {
        "ServerApp": {"jpserver_extensions": {"jupyter_ckpt": True}},
        "CheckpointApp": {"store_root": str(store_root)},
    }


async def api(jp_fetch, method: str, *parts: str, body: Any = None, **params: str) -> tuple[int, Any]:
    """Call the server as a client does; returns (status, decoded JSON or None).

    Error statuses are returned, not raised, so tests assert them directly."""
    kwargs: dict[str, Any] = {"method": method}
    if body is not None:
        kwargs["body"] = json.dumps(body)
    elif method in ("POST", "PUT", "PATCH"):
        kwargs["body"] = "{}"
    if params:
        kwargs["params"] = params
    try:
        resp = await jp_fetch(*parts, **kwargs)
    except HTTPClientError as e:
        resp = e.response
        assert resp is not None, e
    text = resp.body.decode() if resp.body else ""
    return resp.code, (json.loads(text) if text else None)


@dataclass
class Execution:
    msg_id: str
    stdout: str = ""
    stderr: str = ""
    result: str | None = None
    status: str | None = None  # of the execute_reply
    error: str | None = None  # ename: evalue
    idle: bool = False


@dataclass
class KernelSocket:
    """The notebook's side of a kernel: one websocket through the server."""

    ws: Any
    session: str = field(default_factory=lambda: uuid.uuid4().hex)
    runs: dict[str, Execution] = field(default_factory=dict)

    async def send_execute(self, code: str) -> Execution:
        msg_id = uuid.uuid4().hex
        msg = {
            "header": {
                "msg_id": msg_id,
                "msg_type": "execute_request",
                "session": self.session,
                "username": "test",
                "version": "5.3",
                "date": "",
            },
            "parent_header": {},
            "metadata": {},
            "content": {"code": code, "silent": False, "store_history": True, "user_expressions": {}, "allow_stdin": False},
            "channel": "shell",
            "buffers": [],
        }
        run = self.runs[msg_id] = Execution(msg_id)
        await self.ws.write_message(json.dumps(msg))
        return run

    async def _read_one(self, timeout: float) -> None:
        raw = await asyncio.wait_for(self.ws.read_message(), timeout)
        if raw is None:
            raise ConnectionError("websocket closed")
        msg = json.loads(raw)
        parent = msg.get("parent_header", {}).get("msg_id")
        run = self.runs.get(parent)
        if run is None:
            return
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            if content["name"] == "stdout":
                run.stdout += content["text"]
            else:
                run.stderr += content["text"]
        elif kind == "execute_result":
            run.result = content["data"].get("text/plain")
        elif kind == "error":
            run.error = f"{content['ename']}: {content['evalue']}"
        elif kind == "execute_reply":
            run.status = content["status"]
        elif kind == "status" and content["execution_state"] == "idle":
            run.idle = True

    async def wait_until(self, predicate, timeout: float = 60) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError("kernel did not answer in time")
            try:
                await self._read_one(remaining)
            except asyncio.TimeoutError:
                raise TimeoutError("kernel did not answer in time") from None

    async def finish(self, run: Execution, timeout: float = 60) -> Execution:
        await self.wait_until(lambda: run.status is not None and run.idle, timeout)
        return run

    async def execute(self, code: str, timeout: float = 60) -> Execution:
        run = await self.finish(await self.send_execute(code), timeout)
        assert run.status == "ok", f"{code!r} failed: {run.error}\n{run.stderr}"
        return run

    async def wait_ready(self, timeout: float = 60) -> None:
        """After a restart, as a frontend does: probe until the kernel answers
        on shell and on IOPub (messages published before its subscribers
        reconnect are lost, with any provisioner)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                await self.finish(await self.send_execute("None"), timeout=2)
                return
            except TimeoutError:
                if loop.time() > deadline:
                    raise

    async def value(self, expr: str, timeout: float = 60) -> str | None:
        return (await self.execute(expr, timeout)).result


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


async def wait_for_snapshot(jp_fetch, snapshot_id: str, timeout: float = 120) -> dict:
    """Poll the snapshot until it is complete or failed, as a script would."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        status, model = await api(jp_fetch, "GET", "api", "ckpt", "snapshots", snapshot_id)
        assert status == 200, model
        if model["status"] in ("complete", "failed") or loop.time() > deadline:
            return model
        await asyncio.sleep(0.05)


async def snapshot(jp_fetch, kernel_id: str, label: str = "") -> dict:
    status, model = await api(jp_fetch, "POST", "api", "ckpt", "kernels", kernel_id, "snapshots", body={"label": label})
    assert status == 202, model
    model = await wait_for_snapshot(jp_fetch, model["id"])
    assert model["status"] == "complete", model
    return model


async def restore(jp_fetch, snapshot_id: str, **body: Any) -> dict:
    status, out = await api(jp_fetch, "POST", "api", "ckpt", "snapshots", snapshot_id, "restore", body={"mode": "replace", **body})
    assert status == 200, out
    return out


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """A real S3-protocol server process (moto's server mode)."""
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
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "0.0.0.0", "-p", str(port)], stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait()


@pytest.fixture
def s3_store_options(s3_endpoint):
    import uuid

    import s3fs

    opts = {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"}
    bucket = f"ckpt-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(**opts).mkdir(bucket)
    return bucket, opts
