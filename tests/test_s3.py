"""The store on S3-compatible object storage, against a real S3-protocol
server (moto in server mode, on loopback)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from jupyter_ckpt.bundle import export_bundle, import_bundle
from jupyter_ckpt.store import SnapshotStore

from .client import api, restore, snapshot
from .test_store import commit


def test_store_on_s3_commit_list_materialize_gc(s3_store_options, tmp_path):
    bucket, opts = s3_store_options
    url = f"s3://{bucket}/team"
    store = SnapshotStore(url, state_dir=tmp_path / "state", key_path=tmp_path / "s3.key", storage_options=opts)
    assert store.backend == "s3"
    first = commit(store, seed=1)
    again = commit(store, seed=1)
    assert again.stored_bytes < 0.03 * first.stored_bytes
    # Another server with the same key and a cold local cache sees and reads it all.
    other = SnapshotStore(url, state_dir=tmp_path / "state2", key_path=tmp_path / "s3.key", storage_options=opts)
    assert {r.id for r in other.list()} == {first.id, again.id}
    dest = tmp_path / "out"
    dest.mkdir()
    other.materialize(first.id, dest)
    assert (dest / "inventory.img").read_bytes() == b"inventory"
    other.delete(first.id)
    other.delete(again.id)
    deleted, freed = other.gc()
    assert deleted >= 1 and freed > 0
    store.close()
    other.close()


def test_bundle_from_local_store_into_s3(s3_store_options, tmp_path):
    bucket, opts = s3_store_options
    local = SnapshotStore(tmp_path / "local", key_path=tmp_path / "k.key")
    record = commit(local, seed=5)
    bundle = tmp_path / "b.jckpt"
    with open(bundle, "wb") as out:
        export_bundle(local, record.id, out)
    remote = SnapshotStore(
        f"s3://{bucket}/x", state_dir=tmp_path / "st", key_path=tmp_path / "k.key", storage_options=opts
    )
    with open(bundle, "rb") as src:
        assert import_bundle(remote, src).restorable
    local.close()
    remote.close()


@pytest.fixture
def jp_server_config(store_root, s3_store_options, tmp_path):
    bucket, opts = s3_store_options
    return {
        "ServerApp": {"jpserver_extensions": {"jupyter_ckpt": True}},
        "CheckpointApp": {
            "store_root": f"s3://{bucket}/snapshots",
            "store_state_dir": str(tmp_path / "local-state"),
            "store_key_path": str(tmp_path / "s3-store.key"),
            "store_options": opts,
        },
    }


@pytest.mark.criu
async def test_server_snapshot_and_restore_reading_only_from_s3(jp_fetch, jp_serverapp, start_kernel, tmp_path):
    status, body = await api(jp_fetch, "GET", "api", "ckpt", "status")
    assert body["store"]["backend"] == "s3"
    kernel_id, sock = await start_kernel()
    await sock.execute("import numpy as np; a = np.random.default_rng(3).random(3_000_000); x = 1")
    snap = await snapshot(jp_fetch, kernel_id)
    await sock.execute("x = 2; a[:] = 0")

    # A cold local cache and no kept images: every chunk location and byte
    # must come from S3.
    store = jp_serverapp.web_app.settings["ckpt_manager"].store
    for pack in store.chunks.index.known_packs():
        store.chunks.index.drop_pack(pack)
    shutil.rmtree(tmp_path / "local-state" / "images" / kernel_id / snap["id"])
    local_files = [p for p in (tmp_path / "local-state").rglob("*") if p.is_file()]
    assert not [p for p in local_files if p.suffix in (".pack", ".img")]

    await restore(jp_fetch, snap["id"])
    assert await sock.value("x") == "1"
    expected = round(float(np.random.default_rng(3).random(3_000_000).sum()))  # computed here, not by the kernel
    assert await sock.value("round(float(a.sum()))") == str(expected)


async def test_the_server_answers_while_a_listing_waits_on_s3(
    jp_fetch, jp_serverapp, s3_server, s3_store_options, tmp_path
):
    """Reading the store runs in a worker thread: while the S3 server does not
    answer at all (its process stopped), a listing waits and the server keeps
    answering other requests. No timing: each answer must come while the
    listing is still waiting, which a listing on the event loop would prevent."""
    import asyncio
    import os
    import signal
    import threading

    from jupyter_ckpt import manifest
    from jupyter_ckpt.records import SnapshotRecord, new_snapshot_id
    from jupyter_ckpt.store import SnapshotStore

    bucket, opts = s3_store_options
    s3_process = s3_server[1]
    # Another store on the same bucket and key (a second server, say) writes them.
    writer = SnapshotStore(f"s3://{bucket}/snapshots", tmp_path / "writer-state", tmp_path / "s3-store.key", opts)
    manifests = {}
    for n in range(20):
        record = SnapshotRecord(id=new_snapshot_id(), kernel_id="k", label=f"#{n}", status="complete")
        manifests[f"{writer.root}/manifests/{record.id}.manifest"] = manifest.encode(record.to_json(), [], writer.key)
    writer.fs.pipe(manifests)
    writer.close()

    os.kill(s3_process.pid, signal.SIGSTOP)
    # Should the listing block the event loop, S3 comes back after a while and
    # the test fails on its assertions rather than hanging.
    safety = threading.Timer(60, os.kill, (s3_process.pid, signal.SIGCONT))
    safety.start()
    try:
        listing = asyncio.ensure_future(api(jp_fetch, "GET", "api", "ckpt", "snapshots"))
        for _ in range(5):
            await asyncio.sleep(0.2)
            resp = await jp_fetch("api", "status", request_timeout=120)
            assert resp.code == 200
            assert not listing.done(), "the server answered only once the listing had read S3"
    finally:
        os.kill(s3_process.pid, signal.SIGCONT)
        safety.cancel()
    status, listed = await listing
    assert status == 200 and sorted(s["label"] for s in listed) == sorted(f"#{n}" for n in range(20))


async def test_a_server_on_a_shared_store_does_not_collect_by_itself(jp_fetch, jp_serverapp):
    """On S3 (a store other servers may be storing into), a delete leaves the
    chunks for `jupyter ckpt gc`: the server schedules no gc of its own."""
    from .client import api

    manager = jp_serverapp.web_app.settings["ckpt_manager"]
    store = manager.store
    kept, deleted = commit(store, seed=1), commit(store, seed=2)
    packs = store.fs.ls(f"{store.root}/packs", detail=False)
    status, _ = await api(jp_fetch, "DELETE", "api", "ckpt", "snapshots", deleted.id)
    assert status == 204
    assert manager._gc_task is None  # nothing scheduled (a local store's delete schedules one)
    assert store.fs.ls(f"{store.root}/packs", detail=False) == packs
    objects, freed = store.gc()  # what `jupyter ckpt gc` does, when no server stores into it
    assert objects >= 1 and freed > 0
    assert store.get(kept.id).status == "complete"
