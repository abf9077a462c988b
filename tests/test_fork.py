"""Restore as a new kernel ("fork"): the snapshot runs beside the original kernel,
in a network namespace of its own, through a real server and real CRIU."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import struct
import subprocess
import tempfile
import threading

import pytest

from .client import KernelSocket, api, restore, snapshot

pytestmark = pytest.mark.criu


async def fork(jp_fetch, snapshot_id: str, **body) -> dict:
    status, out = await api(
        jp_fetch, "POST", "api", "ckpt", "snapshots", snapshot_id, "restore", body={"mode": "new", **body}
    )
    assert status == 201, out
    assert out["mode"] == "new"
    return out


async def connect(jp_ws_fetch, kernel_id: str) -> KernelSocket:
    sock = KernelSocket(await jp_ws_fetch("api", "kernels", kernel_id, "channels"))
    await sock.wait_ready()
    return sock


def netns_of(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


async def test_fork_runs_beside_the_original_and_diverges(jp_fetch, jp_ws_fetch, start_kernel, jp_serverapp):
    kernel_id, sock = await start_kernel()
    await sock.execute("x = 'snapshot'; import os")
    snap = await snapshot(jp_fetch, kernel_id)

    out = await fork(jp_fetch, snap["id"], path="branch.ipynb")
    fork_id = out["kernel_id"]
    assert fork_id != kernel_id and out["path"] == "branch.ipynb"
    forked = await connect(jp_ws_fetch, fork_id)
    assert await forked.value("x") == "'snapshot'"

    # Both answer; their states diverge.
    await sock.execute("x = 'original'")
    await forked.execute("x = 'fork'")
    assert await sock.value("x") == "'original'"
    assert await forked.value("x") == "'fork'"

    status, kernels = await api(jp_fetch, "GET", "api", "kernels")
    assert {k["id"] for k in kernels} == {kernel_id, fork_id}
    status, sessions = await api(jp_fetch, "GET", "api", "sessions")
    assert [(s["path"], s["kernel"]["id"]) for s in sessions] == [("branch.ipynb", fork_id)]

    # The original keeps the host's network; the fork has a namespace of its own.
    km = jp_serverapp.kernel_manager
    original_pid = km.get_kernel(kernel_id).provisioner.tree.init_pid
    fork_prov = km.get_kernel(fork_id).provisioner
    assert netns_of(original_pid) == netns_of(os.getpid())
    assert netns_of(fork_prov.tree.init_pid) != netns_of(os.getpid())
    status, model = await api(jp_fetch, "GET", "api", "ckpt", "kernels", fork_id, "snapshots")
    assert status == 200

    # A fork can be snapshotted and restored in place like any kernel.
    fork_snap = await snapshot(jp_fetch, fork_id)
    await forked.execute("x = 'changed in the fork'")
    await restore(jp_fetch, fork_snap["id"])
    assert await forked.value("x") == "'fork'"
    assert await sock.value("x") == "'original'"

    # Shutting the fork down removes its namespace.
    netns = fork_prov.tree.network.path
    assert netns.exists()
    status, _ = await api(jp_fetch, "DELETE", "api", "kernels", fork_id)
    assert status == 204
    assert not netns.exists()
    assert await sock.value("x") == "'original'"


async def test_three_forks_of_one_snapshot_at_once(jp_fetch, jp_ws_fetch, start_kernel, jp_serverapp):
    kernel_id, sock = await start_kernel()
    await sock.execute("import os; seed = 7")
    snap = await snapshot(jp_fetch, kernel_id)
    outs = await asyncio.gather(*(fork(jp_fetch, snap["id"]) for _ in range(3)))
    ids = {o["kernel_id"] for o in outs}
    assert len(ids) == 3 and kernel_id not in ids
    km = jp_serverapp.kernel_manager
    pids = {km.get_kernel(k).provisioner.tree.init_pid for k in ids}
    assert len(pids) == 3  # each its own tree (pid namespace), no pid collision
    for n, fork_id in enumerate(sorted(ids)):
        forked = await connect(jp_ws_fetch, fork_id)
        assert await forked.value("seed") == "7"
        await forked.execute(f"seed = {n}")
        assert await forked.value("seed") == str(n)
    assert await sock.value("seed") == "7"


SERVE = """
import http.server, threading
class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"served by {who}".encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
who = "snapshot"
httpd = http.server.HTTPServer(("127.0.0.1", 0), Hello)
port = httpd.server_address[1]
threading.Thread(target=httpd.serve_forever, daemon=True).start()
"""

FETCH = "import urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{port}', timeout=5).read().decode()"


async def test_fork_of_a_kernel_holding_a_listening_tcp_socket(jp_fetch, jp_ws_fetch, start_kernel):
    kernel_id, sock = await start_kernel()
    await sock.execute(SERVE)
    port = int(await sock.value("port"))
    snap = await snapshot(jp_fetch, kernel_id)
    await sock.execute("who = 'original'")

    forked = await connect(jp_ws_fetch, (await fork(jp_fetch, snap["id"]))["kernel_id"])
    await forked.execute("who = 'fork'")
    # Each kernel's server thread runs on, on the same port, in its own namespace.
    assert await forked.value(FETCH) == "'served by fork'"
    assert await sock.value(FETCH) == "'served by original'"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:  # the host sees the original's
        conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
        reply = b""
        while chunk := conn.recv(4096):
            reply += chunk
        assert reply.endswith(b"served by original")


def host_address() -> str:
    """This host's main IPv4 address (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))
        return s.getsockname()[0]


async def test_fork_opens_outbound_connections_to_this_host(jp_fetch, jp_ws_fetch, start_kernel):
    listener = socket.create_server(("0.0.0.0", 0))
    port = listener.getsockname()[1]
    got: list[bytes] = []

    def accept() -> None:
        conn, _ = listener.accept()
        with conn:
            got.append(conn.recv(100))
            conn.sendall(b"pong")

    threading.Thread(target=accept, daemon=True).start()
    kernel_id, sock = await start_kernel()
    await sock.execute("import socket")
    snap = await snapshot(jp_fetch, kernel_id)
    forked = await connect(jp_ws_fetch, (await fork(jp_fetch, snap["id"]))["kernel_id"])
    code = (
        f"c = socket.create_connection(({host_address()!r}, {port}), timeout=10); c.sendall(b'ping from the fork'); "
        "c.recv(10).decode()"
    )
    assert await forked.value(code) == "'pong'"
    assert got == [b"ping from the fork"]
    listener.close()


class NameServer:
    """A DNS server on ``address``:53 that answers every A query with
    ``answer`` (and any other query with no record)."""

    def __init__(self, address: str, answer: str):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((address, 53))
        self.answer = socket.inet_aton(answer)
        self.asked: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                query, peer = self.sock.recvfrom(512)
            except OSError:
                return
            end = query.index(b"\0", 12) + 5  # the question: its name, type and class
            question = query[12:end]
            name, i = [], 0
            while question[i]:
                name.append(question[i + 1 : i + 1 + question[i]].decode())
                i += 1 + question[i]
            self.asked.append(".".join(name))
            is_a = struct.unpack(">H", question[-4:-2])[0] == 1
            header = query[:2] + b"\x81\x80" + struct.pack(">HHHH", 1, int(is_a), 0, 0)
            record = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + self.answer if is_a else b""
            self.sock.sendto(header + question + record, peer)

    def close(self) -> None:
        self.sock.close()


def host_pid_in(namespace_inode: int, kind: str) -> int:
    """A host pid of a process in the ``kind`` namespace with that inode."""
    for p in os.listdir("/proc"):
        try:
            if p.isdigit() and os.stat(f"/proc/{p}/ns/{kind}").st_ino == namespace_inode:
                return int(p)
        except OSError:
            pass
    raise AssertionError(f"no process in {kind} namespace {namespace_inode}")


@contextlib.contextmanager
def resolv_conf(pid: int, nameserver: str):
    """/etc/resolv.conf naming ``nameserver`` as process ``pid`` sees it (a
    bind mount in its mount namespace: kernels have their own)."""
    with tempfile.NamedTemporaryFile("w", suffix=".conf", delete=False) as f:
        f.write(f"nameserver {nameserver}\noptions timeout:1 attempts:1\n")
    os.chmod(f.name, 0o644)
    try:
        subprocess.run(
            ["nsenter", "-t", str(pid), "-m", "-p", "mount", "--bind", f.name, "/etc/resolv.conf"], check=True
        )
        yield
    finally:
        # Not checked: a failure inside must not be hidden by this one.
        subprocess.run(["nsenter", "-t", str(pid), "-m", "-p", "umount", "/etc/resolv.conf"], capture_output=True)
        os.unlink(f.name)


async def test_name_resolution_in_a_fork(jp_fetch, jp_ws_fetch, start_kernel):
    """A name server /etc/resolv.conf names on this host's address answers the
    fork; one on the host's 127.0.0.1 does not (the fork's loopback is its own)."""
    kernel_id, sock = await start_kernel()
    await sock.execute("import os, socket")
    snap = await snapshot(jp_fetch, kernel_id)
    forked = await connect(jp_ws_fetch, (await fork(jp_fetch, snap["id"]))["kernel_id"])
    fork_pid = host_pid_in(int(await forked.value("os.stat('/proc/self/ns/mnt').st_ino")), "mnt")
    lookup = "socket.gethostbyname('db.ckpt-test.example')"
    for address, reached in ((host_address(), True), ("127.0.0.1", False)):
        server = NameServer(address, "203.0.113.7")
        try:
            with resolv_conf(fork_pid, address):
                if reached:
                    assert await forked.value(lookup) == "'203.0.113.7'"
                    assert "db.ckpt-test.example" in server.asked
                else:
                    await forked.execute(
                        f"try:\n    r = {lookup}\nexcept socket.gaierror as e:\n    r = 'no: ' + str(e)"
                    )
                    assert (await forked.value("r")).startswith("'no: "), await forked.value("r")
                    assert server.asked == []
        finally:
            server.close()


async def test_fork_into_a_copy_of_the_notebook(jp_fetch, jp_ws_fetch, start_kernel, jp_root_dir):
    (jp_root_dir / "analysis.ipynb").write_text('{"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}')
    status, session = await api(
        jp_fetch,
        "POST",
        "api",
        "sessions",
        body={"path": "analysis.ipynb", "name": "analysis.ipynb", "type": "notebook", "kernel": {"name": "python3"}},
    )
    kernel_id = session["kernel"]["id"]
    sock = await connect(jp_ws_fetch, kernel_id)
    await sock.execute("y = 5")
    snap = await snapshot(jp_fetch, kernel_id)
    assert snap["path"] == "analysis.ipynb"
    out = await fork(jp_fetch, snap["id"], copy=True)
    assert out["path"] != "analysis.ipynb" and (jp_root_dir / out["path"]).exists()
    status, sessions = await api(jp_fetch, "GET", "api", "sessions")
    assert {(s["path"], s["kernel"]["id"]) for s in sessions} == {
        ("analysis.ipynb", kernel_id),
        (out["path"], out["kernel_id"]),
    }


async def test_fork_refusals(jp_fetch, start_kernel):
    kernel_id, sock = await start_kernel()
    snap = await snapshot(jp_fetch, kernel_id)
    status, out = await api(
        jp_fetch,
        "POST",
        "api",
        "ckpt",
        "snapshots",
        snap["id"],
        "restore",
        body={"mode": "new", "kernel_id": kernel_id},
    )
    assert status == 400 and "new kernel id" in out["message"]
    status, out = await api(
        jp_fetch, "POST", "api", "ckpt", "snapshots", snap["id"], "restore", body={"mode": "replace", "path": "x.ipynb"}
    )
    assert status == 400
    status, out = await api(
        jp_fetch, "POST", "api", "ckpt", "snapshots", snap["id"], "restore", body={"mode": "new", "copy": True}
    )
    assert status == 400 and "no notebook" in out["message"]
    status, out = await api(jp_fetch, "GET", "api", "ckpt", "status")
    assert out["features"]["restore_new"] is True


async def test_restore_refuses_a_library_of_another_build(jp_fetch, start_kernel, tmp_path):
    """The check before a restore compares build-ids too, not only sizes: a
    library rebuilt with the same size is refused, and the kernel runs on."""
    import shutil

    from jupyter_ckpt.criu_images import build_id

    lib = tmp_path / "libckpttest.so"
    shutil.copy("/usr/lib/x86_64-linux-gnu/libz.so.1", lib)
    kernel_id, sock = await start_kernel()
    await sock.execute(f"import ctypes; lib = ctypes.CDLL({str(lib)!r}); z = 'before'")
    snap = await snapshot(jp_fetch, kernel_id)
    await sock.execute("z = 'after'")
    at = lib.read_bytes().find(build_id(lib))
    with open(lib, "r+b") as f:  # in place: the kernel has it mapped
        f.seek(at)
        first = f.read(1)[0]
        f.seek(at)
        f.write(bytes([first ^ 0xFF]))  # same size, another build-id

    status, out = await api(
        jp_fetch, "POST", "api", "ckpt", "snapshots", snap["id"], "restore", body={"mode": "replace"}
    )
    assert status == 409, out
    assert f"{lib} (library): another build here" in out["message"]
    status, out = await api(jp_fetch, "POST", "api", "ckpt", "snapshots", snap["id"], "restore", body={"mode": "new"})
    assert status == 409 and "another build" in out["message"]
    assert await sock.value("z") == "'after'"
    status, kernels = await api(jp_fetch, "GET", "api", "kernels")
    assert [k["id"] for k in kernels] == [kernel_id]


async def test_fork_of_a_checkpoint_call_resumes_as_restored(jp_fetch, jp_ws_fetch, start_kernel):
    """checkpoint() returns twice, in forks too: the fork resumes inside the call
    and is told it was restored. Asked to snapshot itself, a fork says why it cannot."""
    kernel_id, sock = await start_kernel()
    await sock.execute("cp = checkpoint('from the magic'); where = 'restored' if cp.restored else 'original'")
    assert await sock.value("where") == "'original'"
    status, snaps = await api(jp_fetch, "GET", "api", "ckpt", "kernels", kernel_id, "snapshots")
    forked = await connect(jp_ws_fetch, (await fork(jp_fetch, snaps[0]["id"]))["kernel_id"])
    assert await forked.value("where") == "'restored'"
    run = await forked.execute("%checkpoint")
    assert "restored as a new kernel (a fork)" in run.stdout


async def test_restarting_a_fork_starts_a_fresh_kernel_in_the_servers_network(
    jp_fetch, jp_ws_fetch, start_kernel, jp_serverapp
):
    kernel_id, sock = await start_kernel()
    await sock.execute("x = 1")
    snap = await snapshot(jp_fetch, kernel_id)
    fork_id = (await fork(jp_fetch, snap["id"]))["kernel_id"]
    prov = jp_serverapp.kernel_manager.get_kernel(fork_id).provisioner
    netns = prov.tree.network.path
    status, _ = await api(jp_fetch, "POST", "api", "kernels", fork_id, "restart")
    assert status == 200
    assert not netns.exists()
    assert netns_of(prov.tree.init_pid) == netns_of(os.getpid())
    fresh = await connect(jp_ws_fetch, fork_id)
    assert await fresh.value("'x' in globals()") == "False"
    await fresh.execute("x = 2")
    assert await sock.value("x") == "1"
    assert (await snapshot(jp_fetch, fork_id))["status"] == "complete"


async def test_a_refused_fork_into_a_copy_leaves_no_copy(jp_fetch, jp_ws_fetch, jp_root_dir, tmp_path):
    (jp_root_dir / "lib.ipynb").write_text('{"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}')
    status, session = await api(
        jp_fetch,
        "POST",
        "api",
        "sessions",
        body={"path": "lib.ipynb", "name": "lib.ipynb", "type": "notebook", "kernel": {"name": "python3"}},
    )
    sock = await connect(jp_ws_fetch, session["kernel"]["id"])
    data = tmp_path / "held-open.txt"
    data.write_text("8 bytes\n")
    await sock.execute(f"f = open({str(data)!r})")
    snap = await snapshot(jp_fetch, session["kernel"]["id"])
    data.write_text("now 12 bytes")
    status, out = await api(
        jp_fetch, "POST", "api", "ckpt", "snapshots", snap["id"], "restore", body={"mode": "new", "copy": True}
    )
    assert status == 409 and "held-open.txt" in out["message"]
    assert sorted(p.name for p in jp_root_dir.glob("*.ipynb")) == ["lib.ipynb"]


async def test_connections_to_the_outside_are_closed_in_a_fork_and_after_a_restore(jp_fetch, jp_ws_fetch, start_kernel):
    """A TCP connection to a server outside the kernel (a database, say): the
    snapshot takes it; the fork finds it closed while the original's still
    works; a restore in place finds it closed and the kernel runs on."""
    outside = socket.socket()
    outside.bind(("127.0.0.1", 0))
    outside.listen()
    port = outside.getsockname()[1]
    kernel_id, sock = await start_kernel()
    await sock.execute(f"import socket; db = socket.create_connection(('127.0.0.1', {port})); x = 1")
    peer, _ = outside.accept()
    snap = await snapshot(jp_fetch, kernel_id)

    probe = (
        "def probe(c):\n"
        "    c.settimeout(10)\n"
        "    try:\n"
        "        return c.recv(5)\n"
        "    except OSError as e:\n"
        "        return f'{type(e).__name__} {e.errno}'\n"
    )
    forked = await connect(jp_ws_fetch, (await fork(jp_fetch, snap["id"]))["kernel_id"])
    await forked.execute(probe)
    not_connected = f"'OSError {errno.ENOTCONN}'"  # closed: CRIU restores it unconnected
    assert await forked.value("probe(db)") == not_connected
    peer.sendall(b"hello")  # the original's connection is untouched
    await sock.execute(probe)
    assert await sock.value("probe(db)") == "b'hello'"

    await restore(jp_fetch, snap["id"])
    await sock.execute(probe)
    assert await sock.value("probe(db)") == not_connected
    assert await sock.value("x") == "1"  # and the kernel runs on
    peer.close()
    outside.close()


def unused_network() -> tuple[str, str]:
    """A /24 (of the documentation ranges) this host has no address or route in:
    (the far end's address, the host's)."""
    import subprocess

    routes = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True).stdout
    routes += subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True).stdout
    for prefix in ("203.0.113", "198.51.100", "192.0.2"):
        if f"{prefix}." not in routes:
            return f"{prefix}.1", f"{prefix}.2"
    raise AssertionError("every documentation range is in use on this host")


@pytest.fixture
def outside_world():
    """A machine beyond this host, as far as a fork can tell: a network
    namespace on a documentation /24 joined to the host by a veth pair, with a
    TCP server that answers each client with the address it sees. The outside
    has no route back to the forks' 10.213.0.0/16, so only masqueraded traffic
    is answered. Yields (its address, the host's address on that link, port)."""
    import subprocess
    import sys

    ns, host_end, far_end = "ckpt-test-outside", "ckt-host", "ckt-far"
    far, near = unused_network()

    def sh(*cmd):
        subprocess.run(cmd, check=True, capture_output=True, timeout=30)

    subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    subprocess.run(["ip", "link", "del", host_end], capture_output=True)
    sh("ip", "netns", "add", ns)
    server = None
    try:
        sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", far_end, "netns", ns)
        sh("ip", "addr", "add", f"{near}/24", "dev", host_end)
        sh("ip", "link", "set", host_end, "up")
        sh("ip", "-n", ns, "link", "set", far_end, "up")
        sh("ip", "-n", ns, "addr", "add", f"{far}/24", "dev", far_end)
        code = (
            "import socket\n"
            f"s = socket.socket(); s.bind(({far!r}, 7000)); s.listen()\n"
            "print('ready', flush=True)\n"
            "while True:\n"
            "    c, peer = s.accept(); c.sendall(peer[0].encode()); c.close()\n"
        )
        server = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", code], stdout=subprocess.PIPE)
        assert server.stdout.readline().strip() == b"ready"
        yield far, near, 7000
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(["ip", "link", "del", host_end], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


REACH = (
    "def reach(host, port):\n"
    "    import socket\n"
    "    try:\n"
    "        with socket.create_connection((host, port), timeout=5) as c:\n"
    "            return c.recv(100).decode() or 'connected'\n"
    "    except OSError as e:\n"
    "        return f'{type(e).__name__} {e.errno}'\n"
)


async def test_a_fork_reaches_the_outside_world_through_nat(jp_fetch, jp_ws_fetch, start_kernel, outside_world):
    """fork_outbound = "nat" (the default): masqueraded through the host."""
    kernel_id, sock = await start_kernel()
    await sock.execute(REACH)
    snap = await snapshot(jp_fetch, kernel_id)
    forked = await connect(jp_ws_fetch, (await fork(jp_fetch, snap["id"]))["kernel_id"])
    far, near, port = outside_world
    assert await forked.value(f"reach({far!r}, {port})") == repr(near)  # seen as the host
    assert open("/proc/sys/net/ipv4/ip_forward").read().strip() == "1"
    import subprocess

    table = subprocess.run(["nft", "list", "table", "ip", "jupyter_ckpt"], capture_output=True, text=True)
    assert table.returncode == 0 and "masquerade" in table.stdout


class TestHostOnly:
    @pytest.fixture
    def jp_server_config(self, store_root):
        return {
            "ServerApp": {"jpserver_extensions": {"jupyter_ckpt": True}},
            "CheckpointApp": {"store_root": str(store_root), "fork_outbound": "host"},
        }

    async def test_a_fork_reaches_this_host_and_nothing_beyond(
        self, jp_fetch, jp_ws_fetch, start_kernel, outside_world
    ):
        """fork_outbound = "host": the host's own addresses only, also where
        another server's forks have NAT (the table from the test above)."""
        from jupyter_ckpt.forknet import _enable_nat

        _enable_nat()  # forwarding and NAT on, as another server's forks would have them
        far, near, port = outside_world
        on_host = socket.socket()
        on_host.bind((near, 0))  # one of this host's addresses
        on_host.listen()
        accepted = threading.Thread(target=lambda: on_host.accept()[0].sendall(b"host"), daemon=True)
        accepted.start()
        kernel_id, sock = await start_kernel()
        await sock.execute(REACH)
        snap = await snapshot(jp_fetch, kernel_id)
        forked = await connect(jp_ws_fetch, (await fork(jp_fetch, snap["id"]))["kernel_id"])
        assert await forked.value(f"reach({near!r}, {on_host.getsockname()[1]})") == "'host'"
        assert await forked.value(f"reach({far!r}, {port})") == f"'OSError {errno.ENETUNREACH}'"
        assert await sock.value(f"reach({far!r}, {port})") == repr(near)  # the original: the host's network
        on_host.close()
