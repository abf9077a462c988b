"""Migration: a snapshot taken on server A restores on server B, a separate
`jupyter server` process with its own root, runtime dir and store, running in a
network namespace of its own (standing for another host). Through a bundle, and
through a shared S3 store; B refuses a snapshot whose files differ, saying which."""

from __future__ import annotations

import json
import subprocess
import uuid

import pytest
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

from jupyter_ckpt import forknet

from .client import KernelSocket
from .servers import TOKEN, Server, take, value

pytestmark = [pytest.mark.criu, pytest.mark.slow, pytest.mark.timeout(300)]


class OtherHost:
    """A network namespace joined to this one by a veth pair: 10.215.N.1 here,
    10.215.N.2 there."""

    def __init__(self) -> None:
        n = uuid.uuid4().int % 250 + 1
        self.name, self.here, self.there = f"ckpt-test-{n}", f"10.215.{n}.1", f"10.215.{n}.2"
        host_if, peer_if = f"cth{n}", f"ctp{n}"
        for cmd in (
            f"ip netns add {self.name}",
            f"ip link add {host_if} type veth peer name {peer_if} netns {self.name}",
            f"ip addr add {self.here}/30 dev {host_if}",
            f"ip link set {host_if} up",
            f"ip -n {self.name} link set lo up",
            f"ip -n {self.name} addr add {self.there}/30 dev {peer_if}",
            f"ip -n {self.name} link set {peer_if} up",
            f"ip -n {self.name} route add default via {self.here}",
        ):
            subprocess.run(cmd.split(), check=True)

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name])


class TwoServers:
    """Server A on this host's network, server B in its own namespace."""

    def __init__(self, tmp_path) -> None:
        self.tmp_path = tmp_path
        self.other = OtherHost()
        self.servers: list[Server] = []

    def start(self, name: str, config: dict | None = None, elsewhere: bool = False) -> Server:
        home = self.tmp_path / name
        (home / ".jupyter").mkdir(parents=True)
        (home / ".jupyter" / "jupyter_server_config.json").write_text(json.dumps(config or {}))
        kwargs = {"netns": self.other.name, "host": self.other.there} if elsewhere else {}
        server = Server(home, local_store="store_root" not in (config or {}).get("CheckpointApp", {}), **kwargs)
        self.servers.append(server)
        return server

    def close(self) -> None:
        for server in self.servers:
            server.kill()
        self.other.close()
        forknet.remove_stale()


@pytest.fixture
def two_servers(tmp_path):
    servers = TwoServers(tmp_path)
    yield servers
    servers.close()


async def kernel_socket(server: Server, kernel_id: str) -> KernelSocket:
    """B's kernel as a notebook reaches it: through B's websocket."""
    url = f"ws://{server.host}:{server.port}/api/kernels/{kernel_id}/channels"
    ws = await websocket_connect(HTTPRequest(url, headers={"Authorization": f"token {TOKEN}"}))
    sock = KernelSocket(ws)
    await sock.wait_ready()
    return sock


def raw(server: Server, method: str, path: str, data: bytes | None = None) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(
        f"http://{server.host}:{server.port}{path}",
        data=data,
        method=method,
        headers={"Authorization": f"token {TOKEN}"},
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


STATE = """
import threading, itertools, tempfile, os
x = 'computed on A'
counter = itertools.count(10); next(counter)
stop = threading.Event()
ticks = []
worker = threading.Thread(target=lambda: [ticks.append(1) or stop.wait(0.05) for _ in iter(stop.is_set, True)], daemon=True)
worker.start()
"""


async def test_migrate_through_a_bundle_and_refuse_a_differing_file(two_servers, tmp_path):
    a = two_servers.start("a")
    b = two_servers.start("b", elsewhere=True)
    kernel_id = a.call("POST", "/api/kernels", {"name": "python3"})["id"]
    client = a.client(kernel_id)
    value(client, STATE)
    snap = take(a, kernel_id)

    status, bundle = raw(a, "GET", f"/api/ckpt/snapshots/{snap['id']}/bundle")
    assert status == 200
    # B has a key of its own: it takes A's bundle only when told to trust it.
    status, body = raw(b, "POST", "/api/ckpt/bundles", bundle)
    assert status == 409, body
    status, body = raw(b, "POST", "/api/ckpt/bundles?trust=true", bundle)
    assert status == 201, body
    assert b.call("GET", "/api/kernels") == []

    # The kernel moves to B under its own id (B has no such kernel yet).
    outcome = b.call("POST", f"/api/ckpt/snapshots/{snap['id']}/restore", {"mode": "replace"})
    assert outcome["kernel_id"] == kernel_id
    sock = await kernel_socket(b, kernel_id)
    assert await sock.value("x") == "'computed on A'"
    assert await sock.value("next(counter)") == "11"
    assert (
        await sock.value("n = len(ticks); import time; time.sleep(0.3); len(ticks) > n and worker.is_alive()") == "True"
    )
    # A's kernel runs on, untouched.
    assert value(client, "next(counter)") == "11"

    # A file the kernel holds open changes after the snapshot: B refuses, and says which.
    data = tmp_path / "a" / "root" / "data.csv"
    data.write_text("a,b\n1,2\n")
    value(client, f"f = open({str(data)!r}); header = f.readline()")
    snap2 = take(a, kernel_id)
    data.write_text("a,b\n1,2\n3,4\n")
    status, bundle = raw(a, "GET", f"/api/ckpt/snapshots/{snap2['id']}/bundle")
    assert raw(b, "POST", "/api/ckpt/bundles?trust=true", bundle)[0] == 201
    status, body = raw(b, "POST", f"/api/ckpt/snapshots/{snap2['id']}/restore", json.dumps({"mode": "new"}).encode())
    message = json.loads(body)["message"]
    assert status == 409, message
    assert f"{data} (file): 12 bytes here, 8 in the snapshot" in message
    assert len(b.call("GET", "/api/kernels")) == 1  # nothing was started
    assert await sock.value("x") == "'computed on A'"
    client.stop_channels()


async def test_migrate_through_a_shared_s3_store(two_servers, s3_store_options, tmp_path):
    bucket, opts = s3_store_options

    def config(state: str, endpoint: str) -> dict:
        return {
            "CheckpointApp": {
                "store_root": f"s3://{bucket}/team",
                "store_state_dir": str(tmp_path / state),
                "store_key_path": str(tmp_path / "shared-store.key"),  # servers sharing a store share its key
                "store_options": {**opts, "endpoint_url": endpoint},
            }
        }

    a = two_servers.start("a", config("a-state", opts["endpoint_url"]))
    kernel_id = a.call("POST", "/api/kernels", {"name": "python3"})["id"]
    client = a.client(kernel_id)
    value(client, STATE)
    snap = take(a, kernel_id)

    # B reaches the S3 server through its namespace's route to this host.
    b_endpoint = opts["endpoint_url"].replace("127.0.0.1", two_servers.other.here)
    b = two_servers.start("b", config("b-state", b_endpoint), elsewhere=True)
    assert snap["id"] in [s["id"] for s in b.call("GET", "/api/ckpt/snapshots")]
    outcome = b.call("POST", f"/api/ckpt/snapshots/{snap['id']}/restore", {"mode": "new"})
    assert outcome["kernel_id"] != kernel_id
    sock = await kernel_socket(b, outcome["kernel_id"])
    assert await sock.value("x") == "'computed on A'"
    assert await sock.value("next(counter)") == "11"
    assert value(client, "next(counter)") == "11"
    client.stop_channels()


async def test_replace_on_another_server_of_this_machine_while_the_original_runs(two_servers):
    """Two users' servers on one machine: B restores A's snapshot under its own
    id while A's kernel, holding the snapshot's ports, runs on. B's kernel gets
    a network namespace of its own; each keeps its own state."""
    a = two_servers.start("a")
    b = two_servers.start("b")  # the same host, the same network
    kernel_id = a.call("POST", "/api/kernels", {"name": "python3"})["id"]
    client = a.client(kernel_id)
    value(client, STATE)
    snap = take(a, kernel_id)
    status, bundle = raw(a, "GET", f"/api/ckpt/snapshots/{snap['id']}/bundle")
    assert raw(b, "POST", "/api/ckpt/bundles?trust=true", bundle)[0] == 201
    status, body = raw(b, "POST", f"/api/ckpt/snapshots/{snap['id']}/restore", json.dumps({"mode": "replace"}).encode())
    assert status == 200, body
    assert json.loads(body)["kernel_id"] == kernel_id
    sock = await kernel_socket(b, kernel_id)
    assert await sock.value("x") == "'computed on A'"
    assert await sock.value("next(counter)") == "11"
    assert await sock.value("x = 'changed on B'; x") == "'changed on B'"
    assert value(client, "x") == "'computed on A'"  # A's kernel runs on with its own state
    client.stop_channels()
