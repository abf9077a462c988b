"""Error paths a user can reach: each answers a clear status and message, the
kernel keeps running, and nothing already saved is lost."""

from __future__ import annotations

import json
import os
import socket

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from .client import api, restore, snapshot, wait_for_snapshot
from .servers import cmdline, descendants

pytestmark = pytest.mark.criu

UNKNOWN_KERNEL = "00000000-0000-0000-0000-000000000000"
UNKNOWN_SNAPSHOT = "01M8G6NHZS1PKW09RTTN07H2K4"


async def test_unknown_kernel_is_404(jp_fetch):
    status, body = await api(jp_fetch, "POST", "api", "ckpt", "kernels", UNKNOWN_KERNEL, "snapshots")
    assert status == 404
    assert UNKNOWN_KERNEL in body["message"]


async def test_unknown_snapshot_is_404(jp_fetch):
    for snapshot_id in (UNKNOWN_SNAPSHOT, "not-an-id", "..%2F..%2Fetc"):
        status, body = await api(jp_fetch, "GET", "api", "ckpt", "snapshots", snapshot_id)
        assert status == 404, snapshot_id
        assert "no snapshot" in body["message"]
    status, body = await api(
        jp_fetch, "POST", "api", "ckpt", "snapshots", UNKNOWN_SNAPSHOT, "restore", body={"mode": "replace"}
    )
    assert status == 404


async def test_unauthenticated_requests_are_refused(jp_serverapp, http_server_client, jp_http_port, jp_base_url):
    client = AsyncHTTPClient()
    for method, path, body in (
        ("GET", "api/ckpt/status", None),
        ("GET", "api/ckpt/snapshots", None),
        ("POST", f"api/ckpt/kernels/{UNKNOWN_KERNEL}/snapshots", "{}"),
        ("POST", f"api/ckpt/snapshots/{UNKNOWN_SNAPSHOT}/restore", "{}"),
        ("PATCH", f"api/ckpt/snapshots/{UNKNOWN_SNAPSHOT}", '{"label": "x"}'),
        ("DELETE", f"api/ckpt/snapshots/{UNKNOWN_SNAPSHOT}", None),
        ("GET", f"api/ckpt/snapshots/{UNKNOWN_SNAPSHOT}/bundle", None),
        ("POST", "api/ckpt/bundles", "JCKPT-BUNDLE-1\n"),
    ):
        url = f"http://127.0.0.1:{jp_http_port}{jp_base_url}{path}"
        try:
            resp = await client.fetch(url, method=method, body=body, raise_error=False)
        except HTTPClientError as e:
            resp = e.response
        assert resp.code == 403, (method, path, resp.code)


async def test_bad_requests_are_400(jp_fetch, start_kernel):
    kernel_id, sock = await start_kernel()
    status, body = await api(jp_fetch, "POST", "api", "ckpt", "kernels", kernel_id, "snapshots", body={"label": "a\nb"})
    assert status == 400 and "label" in body["message"]
    snap = await snapshot(jp_fetch, kernel_id)
    status, body = await api(
        jp_fetch, "POST", "api", "ckpt", "snapshots", snap["id"], "restore", body={"mode": "sideways"}
    )
    assert status == 400 and "mode" in body["message"]


async def test_dump_refused_by_criu_leaves_kernel_running(jp_fetch, start_kernel, tmp_path, store_root):
    # A unix stream connection to a process outside the kernel: CRIU cannot
    # dump half of it and refuses the whole dump.
    server_path = str(tmp_path / "outside.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(server_path)
    listener.listen(1)
    kernel_id, sock = await start_kernel()
    await sock.execute(f"import socket; x = 7; s = socket.socket(socket.AF_UNIX); s.connect({server_path!r})")
    peer, _ = listener.accept()

    status, body = await api(jp_fetch, "POST", "api", "ckpt", "kernels", kernel_id, "snapshots")
    assert status == 202
    failed = await wait_for_snapshot(jp_fetch, body["id"])
    assert failed["status"] == "failed"
    assert "unix" in failed["error"].lower()  # CRIU's own reason, from its log

    assert await sock.value("x") == "7"
    status, listed = await api(jp_fetch, "GET", "api", "ckpt", "snapshots", kernel_id=kernel_id)
    assert [s["status"] for s in listed] == ["failed"]
    assert "unix" in listed[0]["error"].lower()
    # Partial images are gone; the record alone stays, private.
    assert not (store_root / "state" / "staging" / listed[0]["id"]).exists()
    record = store_root / "state" / "records" / f"{listed[0]['id']}.json"
    assert os.stat(record).st_mode & 0o777 == 0o600
    peer.close()
    listener.close()


async def test_a_grown_open_file_is_refused_before_anything_is_touched(jp_fetch, start_kernel, tmp_path):
    # A file the kernel holds open read-write grows after the snapshot: CRIU
    # cannot restore a file whose size changed, and the check before the
    # restore says so without touching the kernel.
    data = tmp_path / "grows.txt"
    data.write_text("first line\n")
    kernel_id, sock = await start_kernel()
    await sock.execute(f"fh = open({str(data)!r}, 'r+'); x = 1")
    snap = await snapshot(jp_fetch, kernel_id)
    await sock.execute("x = 2")
    with open(data, "a") as f:
        f.write("appended after the snapshot\n")

    status, body = await api(
        jp_fetch, "POST", "api", "ckpt", "snapshots", snap["id"], "restore", body={"mode": "replace"}
    )
    assert status == 409
    assert f"{data} (file): 39 bytes here, 11 in the snapshot" in body["message"]
    assert await sock.value("x") == "2"
    # The snapshot itself is untouched and restores once the file is as it was.
    data.write_text("first line\n")
    await restore(jp_fetch, snap["id"])
    assert await sock.value("x") == "1"


async def test_failed_restore_brings_the_kernel_back(jp_fetch, start_kernel):
    # The kernel listened on a port (without SO_REUSEADDR) when the snapshot was
    # taken; by the time of the restore, another process holds that port.
    # CRIU fails half-way, after the kernel was stopped: its state from just
    # before is restored instead.
    kernel_id, sock = await start_kernel()
    await sock.execute(
        "import socket; srv = socket.socket(); srv.bind(('127.0.0.1', 0)); srv.listen(); port = srv.getsockname()[1]; x = 1"
    )
    port = int(await sock.value("port"))
    snap = await snapshot(jp_fetch, kernel_id)
    await sock.execute("srv.close(); x = 2")
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", port))
    squatter.listen()

    status, body = await api(
        jp_fetch, "POST", "api", "ckpt", "snapshots", snap["id"], "restore", body={"mode": "replace"}
    )
    assert status == 500
    assert "Address already in use" in body["message"]
    assert "put back as it was" in body["message"]
    # The same kernel, with the state it had just before the attempt.
    assert await sock.value("x") == "2"
    status, kernels = await api(jp_fetch, "GET", "api", "kernels")
    assert [k["id"] for k in kernels] == [kernel_id]
    squatter.close()
    await restore(jp_fetch, snap["id"])
    assert await sock.value("x") == "1"
    assert await sock.value("srv.getsockname()[1] == port") == "True"


async def test_snapshot_files_are_private(jp_fetch, start_kernel, store_root):
    kernel_id, sock = await start_kernel()
    snap = await snapshot(jp_fetch, kernel_id)
    key = store_root.parent / "ckpt-store.key"
    for path in [store_root, key, *store_root.rglob("*")]:
        mode = os.stat(path).st_mode & 0o777
        assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))
    assert (store_root / "manifests" / f"{snap['id']}.manifest").exists()
    assert list((store_root / "packs").glob("*.pack"))


async def test_kernel_is_stopped_when_its_memory_cannot_come_back(jp_fetch, jp_serverapp, events, start_kernel):
    """A lazy restore's memory transfer that dies (here: `criu lazy-pages`
    killed while it still has pages to bring) must not leave the kernel running
    on memory that never arrived: it is stopped, and the reason is published."""
    import asyncio
    import signal

    kernel_id, sock = await start_kernel()
    await sock.execute("import numpy as np; a = np.full(200_000_000, 1.5); x = 1")  # 1.6 GB to bring back
    snap = await snapshot(jp_fetch, kernel_id)
    await sock.execute("x = 2")
    out = await restore(jp_fetch, snap["id"])
    assert out["lazy"] is True
    restored_pid = jp_serverapp.kernel_manager.get_kernel(kernel_id).provisioner.tree.init_pid
    # The server's own `criu lazy-pages` child, found by pid (never by name).
    daemons = [pid for pid in descendants(os.getpid()) if "lazy-pages" in " ".join(cmdline(pid))]
    assert daemons, "the memory transfer ended before the test could cut it"
    for pid in daemons:
        os.kill(pid, signal.SIGKILL)
    failure = await events.wait_for_action("restore_failed", timeout=10)
    assert "memory" in failure["message"] and "stopped" in failure["message"], failure
    for _ in range(100):
        if not os.path.exists(f"/proc/{restored_pid}") or open(f"/proc/{restored_pid}/stat").read().split()[2] == "Z":
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the kernel whose memory did not come back still runs")
    # Jupyter's restarter starts it afresh; let that finish before the server stops.
    km = jp_serverapp.kernel_manager.get_kernel(kernel_id)
    for _ in range(600):
        if km.ready.done() and (km.provisioner.tree is None or km.provisioner.tree.init_pid != restored_pid):
            break
        await asyncio.sleep(0.05)
    await asyncio.wait_for(asyncio.shield(km.ready), 30)


async def test_files_gone_since_the_snapshot_are_refused_by_name(jp_fetch, jp_data_dir, start_kernel, tmp_path):
    """A data file the kernel holds, its working directory and its Python
    program, each gone (or another build) at restore time: 409 naming each,
    the kernel untouched; the snapshot restores once they are back."""
    import shutil
    import sys

    # A kernel run by a Python program of its own, so the test can take it away.
    python = tmp_path / "bin" / "python3"
    python.parent.mkdir()
    shutil.copy2(os.path.realpath(sys.executable), python)
    spec = jp_data_dir / "kernels" / "ownpython"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Python (own program)",
                "language": "python",
                "env": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
            }
        )
    )
    workdir, data = tmp_path / "work", tmp_path / "data.csv"
    workdir.mkdir()
    data.write_text("a,b\n1,2\n")
    kernel_id, sock = await start_kernel("ownpython")
    await sock.execute(f"import os; os.chdir({str(workdir)!r}); fh = open({str(data)!r}); x = 1")
    snap = await snapshot(jp_fetch, kernel_id)
    await sock.execute("x = 2")

    data.rename(tmp_path / "data.csv.away")
    workdir.rename(tmp_path / "work.away")
    python.rename(tmp_path / "python3.away")
    shutil.copy2("/bin/true", python)  # another program at the same path
    status, body = await api(
        jp_fetch, "POST", "api", "ckpt", "snapshots", snap["id"], "restore", body={"mode": "replace"}
    )
    assert status == 409, body
    assert f"{data} (file): missing here" in body["message"]
    assert f"{workdir} (working directory): missing here" in body["message"]
    program_size = (tmp_path / "python3.away").stat().st_size
    assert f"{python} (program): {python.stat().st_size} bytes here, {program_size} in the snapshot" in body["message"]
    assert await sock.value("x") == "2"

    (tmp_path / "data.csv.away").rename(data)
    (tmp_path / "work.away").rename(workdir)
    (tmp_path / "python3.away").replace(python)
    await restore(jp_fetch, snap["id"])
    assert await sock.value("x") == "1"
    assert await sock.value("os.getcwd()") == repr(str(workdir))


async def test_a_file_on_a_mount_this_machine_lacks_is_refused_by_name(jp_fetch, start_kernel, tmp_path):
    """A data disk of the original that is not mounted where the kernel is
    restored: a file the kernel holds on it is named, nothing is touched."""
    import subprocess

    disk = tmp_path / "data-disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], check=True)
    mounted = True
    try:
        (disk / "table.csv").write_text("a,b\n")
        kernel_id, sock = await start_kernel()  # its mount namespace has the disk
        await sock.execute(f"fh = open({str(disk / 'table.csv')!r}); x = 1")
        snap = await snapshot(jp_fetch, kernel_id)
        await sock.execute("x = 2")
        subprocess.run(["umount", "-l", str(disk)], check=True)  # gone from this machine
        mounted = False
        status, body = await api(jp_fetch, "POST", "api", "ckpt", "snapshots", snap["id"], "restore", body={})
        assert status == 409 and f"{disk / 'table.csv'} (file): missing here" in body["message"], body
        assert await sock.value("x") == "2"
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(disk)])


async def test_a_deleted_file_over_4_gib_is_refused_by_name(jp_fetch, start_kernel, tmp_path):
    # CRIU copies a file deleted while open into the snapshot whole; past its
    # ghost limit (4 GiB of data) it refuses. fallocate gives the file 4 GiB
    # of blocks in an instant, which CRIU counts as data like written ones.
    path = tmp_path / "scratch.bin"
    kernel_id, sock = await start_kernel()
    await sock.execute(
        f"import os; big = open({str(path)!r}, 'w+b'); os.posix_fallocate(big.fileno(), 0, (4 << 30) + (1 << 20));"
        f" os.unlink({str(path)!r}); x = 7"
    )
    status, body = await api(jp_fetch, "POST", "api", "ckpt", "kernels", kernel_id, "snapshots")
    assert status == 202
    failed = await wait_for_snapshot(jp_fetch, body["id"])
    assert failed["status"] == "failed"
    assert str(path) in failed["error"] and "at most 4 GiB" in failed["error"], failed["error"]
    assert await sock.value("x") == "7"
    await sock.execute("big.truncate(64 << 20)")  # a smaller one is taken
    assert (await snapshot(jp_fetch, kernel_id))["status"] == "complete"
    await sock.execute("big.close()")
