"""The store on S3-compatible object storage, against a real S3-protocol
server (moto in server mode, on loopback)."""

from __future__ import annotations

import shutil

import pytest

from jupyter_ckpt.bundle import export_bundle, import_bundle
from jupyter_ckpt.store import SnapshotStore

from .conftest import api, needs_root, restore, snapshot
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
    remote = SnapshotStore(f"s3://{bucket}/x", state_dir=tmp_path / "st", key_path=tmp_path / "k.key", storage_options=opts)
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


@needs_root
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
    assert await sock.value("round(float(a.sum()))") != "0"
