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


# -- hostile bundles: trust accepts the signer, it skips no check ----------------


def forged_bundle(files: dict[str, bytes], record: dict | None = None, tamper=None) -> bytes:
    """A bundle signed with a key nobody shares (imported only with trust),
    whose manifest says what the caller wants; ``tamper`` edits its header."""
    import json
    import os
    import struct

    import zstandard

    from jupyter_ckpt import manifest
    from jupyter_ckpt.pack_format import StoredFile, chunk_hash, chunk_size_for

    stored = []
    for name, data in files.items():
        step = chunk_size_for(name)
        chunks = [chunk_hash(data[i : i + step]) for i in range(0, len(data), step)]
        stored.append(StoredFile(name, len(data), step, chunks))
    record = record or SnapshotRecord(id=new_snapshot_id(), kernel_id="k1", status="complete").to_json()
    data = manifest.encode(record, stored, os.urandom(32))
    if tamper is not None:
        (length,) = struct.unpack_from("<I", data, len(manifest.MAGIC))
        start = len(manifest.MAGIC) + 4
        header = tamper(json.loads(data[start : start + length]))
        header = header if isinstance(header, bytes) else json.dumps(header).encode()
        data = manifest.MAGIC + struct.pack("<I", len(header)) + header + data[start + length :]
    body = zstandard.ZstdCompressor().compress(b"".join(files.values()))
    return b"JCKPT-BUNDLE-1\n" + struct.pack("<Q", len(data)) + data + body


def every_file(root):
    return sorted(str(p) for p in root.rglob("*") if p.is_file())


@pytest.fixture
def target(tmp_path):
    s = SnapshotStore(tmp_path / "target")
    yield s
    s.close()


@pytest.mark.parametrize("name", ["/tmp/x", "../../kernel-credentials.key", "..", "a/b", "", ".hidden", "x" * 300])
def test_a_trusted_bundle_cannot_name_a_path(target, tmp_path, name):
    before = every_file(tmp_path)
    bundle = forged_bundle({"core-1.img": b"core", name: b"evil"})
    with pytest.raises(InvalidRequest, match="only plain file names"):
        import_bundle(target, io.BytesIO(bundle), trust=True)
    assert every_file(tmp_path) == before  # nothing written, not even in the store's scratch
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda h: {**h, "files": [{**h["files"][0], "chunk_size": 2 << 30}]}, "chunk size"),
        (lambda h: {**h, "files": [{**h["files"][0], "chunk_size": -4096}]}, "whole number"),
        (lambda h: {**h, "files": [{**h["files"][0], "size": 2 << 30}]}, "chunks do not make"),
        (lambda h: {**h, "files": [{**h["files"][0], "size": "big"}]}, "whole number"),
        (lambda h: {**h, "files": "all"}, "no record or no file list"),
        (lambda h: {**h, "record": {**h["record"], "kernel_id": ["a"]}}, "kernel_id"),
        (lambda h: {**h, "record": {**h["record"], "id": "../x"}}, "not a snapshot id"),
        (lambda h: {**h, "record": {**h["record"], "memory_bytes": True}}, "memory_bytes"),
        (lambda h: b"{not json", "unreadable header"),
        (lambda h: [], "no record or no file list"),
    ],
)
def test_a_malformed_trusted_manifest_is_a_bad_request(target, tmp_path, tamper, message):
    before = every_file(tmp_path)
    bundle = forged_bundle({"pages-1.img": bytes(8192)}, tamper=tamper)
    with pytest.raises(InvalidRequest, match=message):
        import_bundle(target, io.BytesIO(bundle), trust=True)
    assert every_file(tmp_path) == before


def test_decompression_is_bounded_by_the_declared_sizes_and_the_maximum(target, tmp_path):
    # 64 MiB of zeros compress to a few KiB: refused before anything is staged.
    bundle = forged_bundle({"pages-1.img": bytes(64 << 20)})
    assert len(bundle) < 1 << 20  # its chunk hashes, mostly
    before = every_file(tmp_path)
    with pytest.raises(InvalidRequest, match="more than 1048576 bytes"):
        import_bundle(target, io.BytesIO(bundle), trust=True, max_bytes=1 << 20)
    assert every_file(tmp_path) == before
    # Data past what the manifest declares is refused, not written.
    import zstandard

    honest = forged_bundle({"pages-1.img": bytes(8192)})
    head = honest[: honest.index(b"\x28\xb5\x2f\xfd")]  # magic and manifest, before the zstd frame
    stuffed = head + zstandard.ZstdCompressor().compress(bytes(8192) + bytes(1 << 20))
    with pytest.raises(InvalidRequest, match="more data than its manifest"):
        import_bundle(target, io.BytesIO(stuffed), trust=True)
    assert target.list() == []


def test_a_damaged_compressed_stream_is_a_bad_request(source, tmp_path):
    record = commit(source)
    buf = io.BytesIO()
    export_bundle(source, record.id, buf)
    data = bytearray(buf.getvalue())
    start = data.index(b"\x28\xb5\x2f\xfd")  # the zstd frame after the signed manifest
    data[start + 5 : start + 40] = bytes(35)
    target = SnapshotStore(tmp_path / "e", key_path=tmp_path / "shared.key")  # signed here: no trust needed
    with pytest.raises(InvalidRequest):
        import_bundle(target, io.BytesIO(bytes(data)))
    assert target.list() == []
    target.close()


def test_an_import_records_its_signer_and_never_takes_a_running_kernels_id(source, tmp_path):
    from jupyter_ckpt.private_files import key_fingerprint

    record = commit(source)
    buf = io.BytesIO()
    export_bundle(source, record.id, buf)
    other = SnapshotStore(tmp_path / "f")
    imported = import_bundle(other, io.BytesIO(buf.getvalue()), trust=True, running_kernels={"k1"})
    assert imported.imported["signer"] == key_fingerprint(source.key) != key_fingerprint(other.key)
    assert imported.imported["verified"] is False and imported.imported["at"].endswith("Z")
    assert imported.kernel_id != "k1"  # k1 runs here: the import is not listed as k1's
    assert other.list(kernel_id="k1") == []
    again = other.get(record.id)
    assert again.imported == imported.imported and again.restorable  # kept, signed here
    other.close()
    shared = SnapshotStore(tmp_path / "g", key_path=tmp_path / "shared.key")
    verified = import_bundle(shared, io.BytesIO(buf.getvalue()))
    assert verified.imported["verified"] is True and verified.kernel_id == "k1"
    shared.close()


# -- each refusal's reason, and what an import keeps -------------------------------


def bundle_of(store, record) -> bytes:
    buf = io.BytesIO()
    export_bundle(store, record.id, buf)
    return buf.getvalue()


def refusal(store, data: bytes, **kw) -> str:
    with pytest.raises((InvalidRequest, SnapshotNotRestorable)) as e:
        import_bundle(store, io.BytesIO(data), **kw)
    assert store.list() == []
    return str(e.value)


def test_the_reason_for_each_refusal(source, target, tmp_path):
    import struct

    from jupyter_ckpt.bundle import _MAX_MANIFEST, MAGIC

    data = bundle_of(source, commit(source, size=4096))
    assert refusal(target, b"JCKPT-BUNDLE-0\n" + data[15:]) == "not a jupyter-ckpt bundle"
    assert refusal(target, data[:18]) == "bundle is truncated"
    too_big = MAGIC + struct.pack("<Q", _MAX_MANIFEST + 1)
    assert refusal(target, too_big) == "bundle manifest is implausibly large"
    assert refusal(target, MAGIC + struct.pack("<Q", _MAX_MANIFEST)) == "bundle is truncated"  # as large as allowed
    assert refusal(target, data) == (
        "the bundle is signed with another store's key: share the key between the servers, "
        "or import it explicitly trusting its origin"
    )
    twice = forged_bundle({"core-1.img": b"c"}, tamper=lambda h: {**h, "files": h["files"] * 2})
    assert (
        refusal(target, twice, trust=True)
        == "the bundle cannot be imported: the bundle's manifest lists 'core-1.img' twice"
    )
    wrong = forged_bundle({"core-1.img": b"abc"})
    wrong = wrong.replace(zstandard_frame(b"abc"), zstandard_frame(b"abd"))
    assert refusal(target, wrong, trust=True) == "bundle: core-1.img chunk 0 does not match its hash"
    more = forged_bundle({"core-1.img": b"abc"})
    more = more.replace(zstandard_frame(b"abc"), zstandard_frame(b"abcd"))
    assert refusal(target, more, trust=True) == "bundle: it holds more data than its manifest lists"
    frame = data.index(b"\x28\xb5\x2f\xfd")
    damaged = data[: frame + 5] + bytes(35) + data[frame + 40 :]
    shared = SnapshotStore(tmp_path / "shared-store", key_path=tmp_path / "shared.key")
    assert refusal(shared, damaged).startswith("bundle: its compressed data is damaged (")
    shared.close()


def zstandard_frame(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor().compress(data)


def test_max_bytes_bounds_verified_and_trusted_imports(source, tmp_path):
    record = commit(source, size=4096)
    data = bundle_of(source, record)
    size = 2 * 4096 + 4004  # the pages image and the core image
    message = f"the bundle cannot be imported: the bundle's manifest describes more than {size - 1} bytes of files, the most accepted here"
    shared = SnapshotStore(tmp_path / "s", key_path=tmp_path / "shared.key")
    assert refusal(shared, data, max_bytes=size - 1) == message
    assert import_bundle(shared, io.BytesIO(data), max_bytes=size).id == record.id
    shared.close()
    other = SnapshotStore(tmp_path / "o")
    assert refusal(other, data, trust=True, max_bytes=size - 1) == message
    other.close()


def test_an_import_needs_room_for_its_images(source, target, monkeypatch):
    """The free space is a stand-in here (shutil.disk_usage): a full disk cannot be made for a unit test."""
    import shutil

    from jupyter_ckpt import bundle

    record = commit(source, size=4096)
    data = bundle_of(source, record)
    needed = 2 * 4096 + 4004
    real = shutil.disk_usage
    monkeypatch.setattr(bundle.shutil, "disk_usage", lambda p: real(p)._replace(free=needed - 1))
    assert (
        refusal(target, data, trust=True)
        == f"the bundle holds {needed} bytes of images; {needed - 1} bytes are free here"
    )
    monkeypatch.setattr(bundle.shutil, "disk_usage", lambda p: real(p)._replace(free=needed))
    assert import_bundle(target, io.BytesIO(data), trust=True).id == record.id


def test_a_verified_import_keeps_its_kernel_id_and_names_this_store_as_signer(source, tmp_path):
    import uuid

    from jupyter_ckpt.private_files import key_fingerprint

    data = bundle_of(source, commit(source, size=4096))
    shared = SnapshotStore(tmp_path / "s", key_path=tmp_path / "shared.key")
    verified = import_bundle(shared, io.BytesIO(data), running_kernels={"k1"})
    assert verified.kernel_id == "k1"  # signed with this store's key: it is this server's kernel
    assert verified.imported["signer"] == key_fingerprint(shared.key) and verified.imported["verified"] is True
    shared.close()
    other = SnapshotStore(tmp_path / "o")
    trusted = import_bundle(other, io.BytesIO(data), trust=True, running_kernels={"k1"})
    assert str(uuid.UUID(trusted.kernel_id)) == trusted.kernel_id  # a fresh kernel id
    other.close()


def test_files_unpack_privately_and_whole(source, target, tmp_path, monkeypatch):
    """A file of several chunks with a short last one comes back byte for byte;
    the files are 0600 while they wait in the scratch folder."""
    import os

    tail = b"t" * 10
    record = SnapshotRecord(id=new_snapshot_id(), kernel_id="k1", status="dumping")
    images = source.create(record)
    content = np.random.default_rng(1).bytes(2 << 20) + tail  # core images are cut per MiB
    (images / "core-1.img").write_bytes(content)
    source.commit(record)
    modes = []
    real_commit = target.commit_imported

    def checking(record, directory, expected):
        modes.extend(os.stat(p).st_mode & 0o777 for p in directory.iterdir())
        return real_commit(record, directory, expected)

    monkeypatch.setattr(target, "commit_imported", checking)
    import_bundle(target, io.BytesIO(bundle_of(source, record)), trust=True)
    assert modes == [0o600]
    assert materialized(target, record.id, tmp_path / "out") == {"core-1.img": content}


def test_export_refuses_what_it_cannot_verify(source):
    from jupyter_ckpt.manifest import SignatureMismatch

    record = commit(source, size=4096)
    [manifest_path] = [p for p in (source.state.parent / "manifests").iterdir() if record.id in p.name]
    data = bytearray(manifest_path.read_bytes())
    data[30] ^= 1
    manifest_path.write_bytes(bytes(data))
    with pytest.raises(SignatureMismatch) as e:
        export_bundle(source, record.id, io.BytesIO())
    assert str(e.value).startswith(f"the manifest of snapshot {record.id} failed its signature check")
