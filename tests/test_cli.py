"""`jupyter ckpt` commands, run as real processes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from jupyter_ckpt.store import SnapshotStore

from .client import snapshot
from .test_store import commit


def ckpt(store_dir, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jupyter_ckpt.cli", "--store", str(store_dir), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def filled(tmp_path):
    store = SnapshotStore(tmp_path / "store")
    t = 1_800_000_000.0
    records = [commit(store, trigger="auto", seed=i, when=t + i) for i in range(3)]
    records.append(commit(store, trigger="manual", seed=9, when=t + 9))
    store.close()
    return tmp_path / "store", records


def test_list_and_show(filled):
    store_dir, records = filled
    out = ckpt(store_dir, "list")
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    assert lines[0].split()[:4] == ["ID", "CREATED", "TRIGGER", "STATUS"]
    assert [line.split()[0] for line in lines[1:]] == [r.id for r in reversed(records)]
    as_json = json.loads(ckpt(store_dir, "--json", "list", "--kernel", "k1").stdout)
    assert len(as_json) == 4 and "stdio_keys" not in as_json[0]
    shown = json.loads(ckpt(store_dir, "--json", "show", records[0].id).stdout)
    assert shown["id"] == records[0].id and shown["status"] == "complete"
    missing = ckpt(store_dir, "show", "01M8G6NHZS1PKW09RTTN07H2K4")
    assert missing.returncode == 3 and "no snapshot" in missing.stderr


def test_prune_delete_gc(filled):
    store_dir, records = filled
    out = ckpt(store_dir, "--json", "prune", "--kernel", "k1", "--keep", "1")
    assert json.loads(out.stdout)["deleted"] == [records[1].id, records[0].id]
    assert ckpt(store_dir, "prune").returncode == 2
    assert ckpt(store_dir, "delete", records[3].id).returncode == 0
    freed = json.loads(ckpt(store_dir, "--json", "gc").stdout)
    assert freed["objects_deleted"] >= 1 and freed["bytes_freed"] > 0
    assert [r["id"] for r in json.loads(ckpt(store_dir, "--json", "list").stdout)] == [records[2].id]


def test_export_import(filled, tmp_path):
    store_dir, records = filled
    bundle = tmp_path / "one.jckpt"
    out = ckpt(store_dir, "export", records[0].id, "-o", str(bundle))
    assert out.returncode == 0 and bundle.stat().st_size > 0
    other = tmp_path / "other"
    refused = ckpt(other, "import", str(bundle))
    assert refused.returncode == 1 and "another store's key" in refused.stderr
    assert ckpt(other, "import", str(bundle), "--trust").returncode == 0
    assert [r["id"] for r in json.loads(ckpt(other, "--json", "list").stdout)] == [records[0].id]


@pytest.mark.criu
def test_check():
    out = ckpt("/tmp", "check")
    assert out.returncode == 0 and "OK" in out.stdout
    bad = ckpt("/tmp", "check", "--criu", "/nonexistent/criu")
    assert bad.returncode == 4 and "not installed" in bad.stdout


@pytest.mark.criu
async def test_restore_through_a_running_server(jp_fetch, jp_serverapp, start_kernel, jp_http_port, jp_base_url):
    kernel_id, sock = await start_kernel()
    await sock.execute("x = 'saved'")
    snap = await snapshot(jp_fetch, kernel_id)
    await sock.execute("x = 'changed'")
    url = f"http://127.0.0.1:{jp_http_port}{jp_base_url}"
    token = jp_serverapp.identity_provider.token
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "jupyter_ckpt.cli",
        "restore",
        snap["id"],
        "--url",
        url,
        "--token",
        token,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err
    assert f"restored from {snap['id']}" in out.decode()
    assert await sock.value("x") == "'saved'"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "jupyter_ckpt.cli",
        "restore",
        "01M8G6NHZS1PKW09RTTN07H2K4",
        "--url",
        url,
        "--token",
        token,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 3 and b"404" in err
