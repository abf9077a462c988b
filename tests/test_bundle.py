"""Export and import of snapshot bundles between stores."""

from __future__ import annotations

import io

import numpy as np
import pytest

from jupyter_ckpt.bundle import export_bundle, import_bundle
from jupyter_ckpt.errors import InvalidRequest, SnapshotNotRestorable
from jupyter_ckpt.records import SnapshotRecord, new_snapshot_id
from jupyter_ckpt.store import SnapshotStore


def commit(store, size=3 << 20):
    record = SnapshotRecord(id=new_snapshot_id(), kernel_id="k1", label="exported", status="dumping")
    images = store.create(record)
    (images / "pages-1.img").write_bytes(np.random.default_rng(0).bytes(size) + bytes(size))
    (images / "core-1.img").write_bytes(b"core" * 1000 + b"tail")
    return store.commit(record)


@pytest.fixture
def source(tmp_path):
    s = SnapshotStore(tmp_path / "a", key_path=tmp_path / "shared.key")
    yield s
    s.close()


def materialized(store, snapshot_id, dest):
    dest.mkdir()
    store.materialize(snapshot_id, dest)
    return {p.name: p.read_bytes() for p in dest.iterdir()}


def test_bundle_round_trip_with_shared_key(source, tmp_path):
    record = commit(source)
    bundle = tmp_path / "snap.jckpt"
    with open(bundle, "wb") as out:
        size = export_bundle(source, record.id, out)
    assert size == bundle.stat().st_size < 4 << 20  # the zero half compresses away
    target = SnapshotStore(tmp_path / "b", key_path=tmp_path / "shared.key")
    with open(bundle, "rb") as src:
        imported = import_bundle(target, src)
    assert imported.id == record.id and imported.label == "exported" and imported.restorable
    assert materialized(target, record.id, tmp_path / "mb") == materialized(source, record.id, tmp_path / "ma")
    with open(bundle, "rb") as src, pytest.raises(InvalidRequest, match="already"):
        import_bundle(target, src)
    target.close()


def test_other_key_needs_explicit_trust(source, tmp_path):
    record = commit(source)
    buf = io.BytesIO()
    export_bundle(source, record.id, buf)
    other = SnapshotStore(tmp_path / "c")  # a key of its own
    with pytest.raises(SnapshotNotRestorable, match="another store's key"):
        import_bundle(other, io.BytesIO(buf.getvalue()))
    assert other.list() == []
    imported = import_bundle(other, io.BytesIO(buf.getvalue()), trust=True)
    assert imported.restorable  # re-signed with this store's key
    assert materialized(other, record.id, tmp_path / "mc") == materialized(source, record.id, tmp_path / "ma")
    other.close()


@pytest.mark.parametrize("where", ["manifest", "body", "truncated"])
def test_damaged_bundle_is_refused(source, tmp_path, where):
    record = commit(source)
    buf = io.BytesIO()
    export_bundle(source, record.id, buf)
    data = bytearray(buf.getvalue())
    if where == "manifest":
        data[40] ^= 1
    elif where == "body":
        data[-1000] ^= 1
    else:
        data = data[: len(data) // 2]
    target = SnapshotStore(tmp_path / "d", key_path=tmp_path / "shared.key")
    with pytest.raises((SnapshotNotRestorable, InvalidRequest)):
        import_bundle(target, io.BytesIO(bytes(data)))
    assert target.list() == []  # nothing half-imported is listed
    assert not any((tmp_path / "d" / "state" / "staging").iterdir())
    target.close()
