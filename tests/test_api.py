"""The REST API beyond snapshot and restore: asynchronous creation with
progress and events, relabel, delete, bundle download and upload."""

from __future__ import annotations

import asyncio
import json

import pytest

from .client import api, restore, snapshot, wait_for_snapshot
from .test_requests import raw

pytestmark = pytest.mark.criu


async def test_post_answers_202_and_progress_shows_in_get_and_events(jp_fetch, events, start_kernel):
    kernel_id, sock = await start_kernel()
    await sock.execute("import numpy as np; a = np.ones(10_000_000)")
    resp = await jp_fetch(
        "api", "ckpt", "kernels", kernel_id, "snapshots", method="POST", body=json.dumps({"label": "l1"})
    )
    assert resp.code == 202
    model = json.loads(resp.body)
    assert model["status"] == "pending" and model["label"] == "l1"
    assert resp.headers["Location"].endswith(f"/api/ckpt/snapshots/{model['id']}")
    seen: set[str] = set()
    now = await wait_for_snapshot(jp_fetch, model["id"], seen=seen)
    assert now["status"] == "complete" and now["freeze_seconds"] > 0 and now["stored_bytes"] > 0
    assert seen & {"dumping", "storing"}  # progress was visible
    completed = await events.wait_for_action("completed", snapshot_id=model["id"])
    assert events.actions(model["id"]) == ["started", "storing", "completed"]
    assert completed["memory_bytes"] > 80_000_000 and completed["freeze_seconds"] > 0

    # A second snapshot while one runs is refused, not queued.
    status, first = await api(jp_fetch, "POST", "api", "ckpt", "kernels", kernel_id, "snapshots")
    status2, body2 = await api(jp_fetch, "POST", "api", "ckpt", "kernels", kernel_id, "snapshots")
    assert (status, status2) == (202, 409) and "already running" in body2["message"]
    await wait_for_snapshot(jp_fetch, first["id"])


async def test_relabel_and_delete(jp_fetch, jp_serverapp, start_kernel):
    kernel_id, sock = await start_kernel()
    snap = await snapshot(jp_fetch, kernel_id, label="before")
    status, model = await api(jp_fetch, "PATCH", "api", "ckpt", "snapshots", snap["id"], body={"label": "after"})
    assert status == 200 and model["label"] == "after"
    status, model = await api(jp_fetch, "GET", "api", "ckpt", "snapshots", snap["id"])
    assert model["label"] == "after" and model["status"] == "complete"
    status, body = await api(jp_fetch, "PATCH", "api", "ckpt", "snapshots", snap["id"], body={"kernel_id": "x"})
    assert status == 400 and "label" in body["message"]
    status, _ = await api(
        jp_fetch, "PATCH", "api", "ckpt", "snapshots", "01M8G6NHZS1PKW09RTTN07H2K4", body={"label": "x"}
    )
    assert status == 404
    status, _ = await api(jp_fetch, "DELETE", "api", "ckpt", "snapshots", snap["id"])
    assert status == 204
    status, _ = await api(jp_fetch, "GET", "api", "ckpt", "snapshots", snap["id"])
    assert status == 404
    # A snapshot still being taken cannot be deleted yet.
    await sock.execute("import numpy as np; big = np.random.default_rng(0).random(40_000_000)")  # 320 MB
    status, running = await api(jp_fetch, "POST", "api", "ckpt", "kernels", kernel_id, "snapshots")
    status, body = await api(jp_fetch, "DELETE", "api", "ckpt", "snapshots", running["id"])
    assert status == 409 and "still being taken" in body["message"]
    assert (await wait_for_snapshot(jp_fetch, running["id"]))["status"] == "complete"
    status, _ = await api(jp_fetch, "DELETE", "api", "ckpt", "snapshots", snap["id"])
    assert status == 404


async def test_bundle_download_then_upload_and_restore(jp_fetch, start_kernel):
    kernel_id, sock = await start_kernel()
    await sock.execute("x = 'from the bundle'")
    snap = await snapshot(jp_fetch, kernel_id)
    resp = await jp_fetch("api", "ckpt", "snapshots", snap["id"], "bundle")
    assert resp.code == 200 and resp.headers["Content-Type"] == "application/octet-stream"
    bundle = resp.body
    assert bundle.startswith(b"JCKPT-BUNDLE-1\n")

    status, body = await api(jp_fetch, "POST", "api", "ckpt", "bundles", body=None)
    assert status == 400  # an empty upload is not a bundle
    status, body = await raw(jp_fetch, "POST", "api", "ckpt", "bundles", body=bundle)
    assert status == 400 and "already" in body["message"], body  # the same snapshot twice
    await api(jp_fetch, "DELETE", "api", "ckpt", "snapshots", snap["id"])
    resp = await jp_fetch("api", "ckpt", "bundles", method="POST", body=bundle)
    assert resp.code == 201
    assert json.loads(resp.body)["id"] == snap["id"]

    status, kernel = await api(jp_fetch, "GET", "api", "ckpt", "kernels", kernel_id)
    memory = kernel.pop("memory_bytes")
    assert kernel == {
        "id": kernel_id,
        "checkpointable": True,
        "reason": "",
        "busy": False,
        "restored_from": None,
        "hibernated": False,
        "hibernated_snapshot": None,
    }
    assert memory > 20 * 2**20  # a Python kernel's processes
    await sock.execute("x = 'changed'")
    await restore(jp_fetch, snap["id"])
    assert await sock.value("x") == "'from the bundle'"
    status, kernel = await api(jp_fetch, "GET", "api", "ckpt", "kernels", kernel_id)
    assert kernel["restored_from"] == snap["id"]
    assert (await api(jp_fetch, "GET", "api", "ckpt", "kernels", "nope"))[0] == 404


async def test_events_for_failure_restore_delete_and_schedule(jp_fetch, events, start_kernel, tmp_path):
    import socket

    kernel_id, sock = await start_kernel()
    snap = await snapshot(jp_fetch, kernel_id)
    await restore(jp_fetch, snap["id"])
    await api(jp_fetch, "PUT", "api", "ckpt", "kernels", kernel_id, "schedule", body={"interval_seconds": 99})
    await api(jp_fetch, "DELETE", "api", "ckpt", "snapshots", snap["id"])
    listener_sock = socket.socket(socket.AF_UNIX)
    listener_sock.bind(str(tmp_path / "s"))
    listener_sock.listen(1)
    await sock.execute(f"import socket; s = socket.socket(socket.AF_UNIX); s.connect({str(tmp_path / 's')!r})")
    peer, _ = listener_sock.accept()  # an accepted connection to outside: CRIU refuses
    status, body = await api(jp_fetch, "POST", "api", "ckpt", "kernels", kernel_id, "snapshots")
    await wait_for_snapshot(jp_fetch, body["id"])
    failed = await events.wait_for_action("failed")
    for expected in ("restored", "schedule_changed", "deleted"):
        assert expected in events.actions(), events.actions()
    assert "unix" in failed["message"].lower()
    peer.close()
    listener_sock.close()


async def test_deleting_snapshots_reclaims_their_space(jp_fetch, jp_serverapp, start_kernel, store_root):
    """A server collects deleted snapshots' chunks by itself (a local store):
    what only they used goes, from disk and from the chunk index, also from
    packs that other snapshots still use in part (their live chunks are copied)."""
    kernel_id, sock = await start_kernel()
    await sock.execute("import numpy as np; a = np.random.default_rng(1).random(12_000_000)")  # 96 MB
    first = await snapshot(jp_fetch, kernel_id)
    await sock.execute("a = np.random.default_rng(2).random(12_000_000)")
    second = await snapshot(jp_fetch, kernel_id)

    def pack_bytes() -> int:
        return sum(p.stat().st_size for p in (store_root / "packs").glob("*.pack"))

    store = jp_serverapp.web_app.settings["ckpt_manager"].store
    before = pack_bytes()
    assert (await api(jp_fetch, "DELETE", "api", "ckpt", "snapshots", first["id"]))[0] == 204
    deadline = asyncio.get_running_loop().time() + 30

    def indexed_as_on_disk() -> bool:
        return store.chunks.index.known_packs() == {p.stem for p in (store_root / "packs").glob("*.pack")}

    while pack_bytes() > before - 90_000_000 or not indexed_as_on_disk():  # the first array's pages are gone
        assert asyncio.get_running_loop().time() < deadline, f"{before - pack_bytes()} bytes reclaimed"
        await asyncio.sleep(0.05)
    await sock.execute("a = None")
    await restore(jp_fetch, second["id"])  # what is left is whole
    assert await sock.value("round(float(a.sum()))") == str(
        round(float(__import__("numpy").random.default_rng(2).random(12_000_000).sum()))
    )


async def test_a_kernel_being_restored_refuses_other_operations(jp_fetch, start_kernel):
    """409 for a snapshot, another restore and a hibernation of a kernel while
    a restore holds it; the restore itself ends as asked."""
    kernel_id, sock = await start_kernel()
    await sock.execute("import numpy as np; a = np.random.default_rng(5).random(64_000_000); x = 1")  # 512 MB
    snap = await snapshot(jp_fetch, kernel_id)
    await sock.execute("x = 2")
    restoring = asyncio.ensure_future(restore(jp_fetch, snap["id"]))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while not (await api(jp_fetch, "GET", "api", "ckpt", "kernels", kernel_id))[1]["busy"]:
        assert not restoring.done() and loop.time() < deadline, "never saw the restore hold the kernel"
        await asyncio.sleep(0.01)
    kernel = ("api", "ckpt", "kernels", kernel_id)
    attempts = {
        "snapshot": await api(jp_fetch, "POST", *kernel, "snapshots", body={}),
        "restore": await api(jp_fetch, "POST", "api", "ckpt", "snapshots", snap["id"], "restore", body={}),
        "hibernate": await api(jp_fetch, "POST", *kernel, "hibernate", body={}),
    }
    assert not restoring.done(), "the restore ended before every request was made: too quick to tell"
    for what, (status, body) in attempts.items():
        assert status == 409, (what, status, body)
        assert kernel_id in body["message"] and "restor" in body["message"], (what, body)
    await restoring
    assert await sock.value("x") == "1"
    status, listed = await api(jp_fetch, "GET", "api", "ckpt", "snapshots", kernel_id=kernel_id)
    assert [s["trigger"] for s in listed if s["id"] != snap["id"]] == []  # nothing else was taken
