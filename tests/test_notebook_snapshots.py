"""Each snapshot keeps the notebook it belongs to: stored, served, restored
with the kernel, copied into a fork, carried by bundles. Real server, real
kernels, real CRIU; store-level checks on a real store."""

from __future__ import annotations

import io
import json

import nbformat
import pytest

from jupyter_ckpt.bundle import export_bundle, import_bundle
from jupyter_ckpt.errors import SnapshotNotFound
from jupyter_ckpt.records import SnapshotRecord, new_snapshot_id
from jupyter_ckpt.store import NOTEBOOK_FILE, SnapshotStore

from .client import KernelSocket, api, restore, snapshot, wait_for_snapshot


def notebook(*sources: str) -> dict:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(s) for s in sources]
    return json.loads(nbformat.writes(nb))


def sources(document: dict) -> list[str]:
    return ["".join(c["source"]) for c in document["cells"]]


# -- the store ----------------------------------------------------------------------


def commit(store: SnapshotStore, document: bytes | None, path: str | None = "a.ipynb") -> SnapshotRecord:
    record = SnapshotRecord(id=new_snapshot_id(), kernel_id="k1", path=path, status="dumping")
    images = store.create(record)
    (images / "core-1.img").write_bytes(b"core" * 1000)
    if document is not None:
        store.stage_notebook(record, document)
        record.notebook = "saved"
    return store.commit(record)


def test_a_notebook_snapshotted_100_times_unchanged_is_stored_once(tmp_path):
    store = SnapshotStore(tmp_path / "s")
    document = nbformat.writes(nbformat.from_dict(notebook("x = 1", "print(x)" * 5000))).encode()
    first = commit(store, document)
    assert first.stored_bytes > 0
    later = [commit(store, document) for _ in range(99)]
    assert [r.stored_bytes for r in later] == [0] * 99  # neither the images nor the notebook added a byte
    assert all(store.notebook(r.id) == document for r in (first, later[-1]))
    # CRIU never sees it: a restore's images are the images only.
    dest = tmp_path / "images"
    dest.mkdir()
    store.materialize(first.id, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["core-1.img"]
    store.close()


def test_a_bundle_carries_the_notebook_and_its_absence_is_explained(tmp_path):
    a = SnapshotStore(tmp_path / "a", key_path=tmp_path / "k")
    b = SnapshotStore(tmp_path / "b", key_path=tmp_path / "k")
    document = nbformat.writes(nbformat.from_dict(notebook("y = 2"))).encode()
    record = commit(a, document)
    buf = io.BytesIO()
    export_bundle(a, record.id, buf)
    imported = import_bundle(b, io.BytesIO(buf.getvalue()))
    assert imported.notebook == "saved" and b.notebook(imported.id) == document
    bare = commit(a, None, path=None)
    with pytest.raises(SnapshotNotFound, match="holds no notebook: it was taken of a kernel with no notebook"):
        a.notebook(bare.id)
    assert NOTEBOOK_FILE not in [f.name for f in a.read_manifest(bare.id)[1]]
    a.close()
    b.close()


# -- through the server -------------------------------------------------------------


async def open_notebook(jp_fetch, jp_ws_fetch, path: str) -> tuple[str, KernelSocket]:
    status, session = await api(
        jp_fetch,
        "POST",
        "api",
        "sessions",
        body={"path": path, "name": path, "type": "notebook", "kernel": {"name": "python3"}},
    )
    assert status == 201, session
    kernel_id = session["kernel"]["id"]
    sock = KernelSocket(await jp_ws_fetch("api", "kernels", kernel_id, "channels"))
    await sock.wait_ready()
    return kernel_id, sock


async def save(jp_fetch, path: str, document: dict) -> None:
    status, out = await api(
        jp_fetch, "PUT", "api", "contents", path, body={"type": "notebook", "format": "json", "content": document}
    )
    assert status in (200, 201), out


async def stored_notebook(jp_fetch, snapshot_id: str) -> tuple[int, dict]:
    return await api(jp_fetch, "GET", "api", "ckpt", "snapshots", snapshot_id, "notebook")


@pytest.mark.criu
async def test_restore_with_the_notebook_puts_back_kernel_and_document(jp_fetch, jp_ws_fetch, jp_root_dir, events):
    await save(jp_fetch, "analysis.ipynb", notebook("x = 1"))
    kernel_id, sock = await open_notebook(jp_fetch, jp_ws_fetch, "analysis.ipynb")
    await sock.execute("x = 1")
    first = await snapshot(jp_fetch, kernel_id)
    assert first["notebook"] == "saved"
    status, document = await stored_notebook(jp_fetch, first["id"])
    assert status == 200 and sources(document) == ["x = 1"]

    # The user goes on: a new cell, saved; the kernel changes.
    await save(jp_fetch, "analysis.ipynb", notebook("x = 1", "x = 2"))
    await sock.execute("x = 2")

    out = await restore(jp_fetch, first["id"], notebook=True)
    assert out["notebook"] is True and out["path"] == "analysis.ipynb"
    assert await sock.value("x") == "1"
    status, model = await api(jp_fetch, "GET", "api", "contents", "analysis.ipynb")
    assert sources(model["content"]) == ["x = 1"]
    # File > Revert Notebook to Checkpoint brings back what the restore replaced.
    status, checkpoints = await api(jp_fetch, "GET", "api", "contents", "analysis.ipynb", "checkpoints")
    assert status == 200 and len(checkpoints) == 1
    kept = json.loads((jp_root_dir / ".ipynb_checkpoints" / "analysis-checkpoint.ipynb").read_text())
    assert sources(kept) == ["x = 1", "x = 2"]
    [event] = events.of("notebook_restored")
    assert event["path"] == "analysis.ipynb" and event["kernel_id"] == kernel_id


@pytest.mark.criu
async def test_the_browser_document_unsaved_edits_included_and_refusals(jp_fetch, jp_ws_fetch, start_kernel):
    await save(jp_fetch, "draft.ipynb", notebook("saved = 1"))
    kernel_id, sock = await open_notebook(jp_fetch, jp_ws_fetch, "draft.ipynb")
    shown = notebook("saved = 1", "unsaved = 2")
    status, model = await api(
        jp_fetch, "POST", "api", "ckpt", "kernels", kernel_id, "snapshots", body={"notebook": shown}
    )
    assert status == 202, model
    model = await wait_for_snapshot(jp_fetch, model["id"])
    assert model["status"] == "complete" and model["notebook"] == "browser"
    status, document = await stored_notebook(jp_fetch, model["id"])
    assert sources(document) == ["saved = 1", "unsaved = 2"]

    # Not a notebook at all: refused before anything is taken.
    for bad in ({"cells": "no"}, ["cells"]):
        body = {"notebook": bad}
        status, out = await api(jp_fetch, "POST", "api", "ckpt", "kernels", kernel_id, "snapshots", body=body)
        assert status == 400 and "notebook must be a notebook document" in out["message"], (bad, out)
    # A document nbformat does not accept: the snapshot is taken, with the saved file instead.
    for odd in ({"cells": [], "nbformat": 3}, {"cells": [{"cell_type": "alien"}], "nbformat": 4}):
        body = {"notebook": odd}
        status, out = await api(jp_fetch, "POST", "api", "ckpt", "kernels", kernel_id, "snapshots", body=body)
        assert status == 202, out
        out = await wait_for_snapshot(jp_fetch, out["id"])
        assert out["status"] == "complete" and out["notebook"] == "saved", odd

    # A kernel without a notebook: its snapshots hold none, and say why.
    bare_id, _ = await start_kernel()
    bare = await snapshot(jp_fetch, bare_id)
    assert bare["notebook"] is None
    status, out = await stored_notebook(jp_fetch, bare["id"])
    assert status == 404 and "holds no notebook" in out["message"]
    status, out = await api(
        jp_fetch, "POST", "api", "ckpt", "snapshots", bare["id"], "restore", body={"mode": "replace", "notebook": True}
    )
    assert status == 400 and "holds no notebook to restore" in out["message"]
    assert await sock.value("1 + 1") == "2"  # the kernel never noticed


@pytest.mark.criu
async def test_a_fork_into_a_copy_copies_the_notebook_as_it_was(jp_fetch, jp_ws_fetch, jp_root_dir):
    await save(jp_fetch, "study.ipynb", notebook("v = 'then'"))
    kernel_id, sock = await open_notebook(jp_fetch, jp_ws_fetch, "study.ipynb")
    await sock.execute("v = 'then'")
    snap = await snapshot(jp_fetch, kernel_id)
    await save(jp_fetch, "study.ipynb", notebook("v = 'then'", "v = 'now'"))

    status, out = await api(
        jp_fetch, "POST", "api", "ckpt", "snapshots", snap["id"], "restore", body={"mode": "new", "copy": True}
    )
    assert status == 201, out
    status, copy = await api(jp_fetch, "GET", "api", "contents", out["path"])
    assert out["path"] != "study.ipynb" and sources(copy["content"]) == ["v = 'then'"]
    status, original = await api(jp_fetch, "GET", "api", "contents", "study.ipynb")
    assert sources(original["content"]) == ["v = 'then'", "v = 'now'"]
    await api(jp_fetch, "DELETE", "api", "kernels", out["kernel_id"])


@pytest.mark.criu
async def test_trust_marks_are_dropped_and_an_oversized_document_falls_back(jp_fetch, jp_ws_fetch, jp_root_dir):
    from jupyter_ckpt.store import MAX_NOTEBOOK_BYTES

    await save(jp_fetch, "t.ipynb", notebook("a = 1"))
    kernel_id, sock = await open_notebook(jp_fetch, jp_ws_fetch, "t.ipynb")
    shown = notebook("a = 1", "b = 2")
    # An output only a trusted notebook shows as is (HTML), marked trusted by the sender.
    html = {"output_type": "display_data", "metadata": {}, "data": {"text/html": "<script>alert(1)</script>"}}
    shown["cells"][1]["outputs"] = [html]
    for cell in shown["cells"]:
        cell["metadata"]["trusted"] = True
    status, model = await api(
        jp_fetch, "POST", "api", "ckpt", "kernels", kernel_id, "snapshots", body={"notebook": shown}
    )
    model = await wait_for_snapshot(jp_fetch, model["id"])
    status, document = await stored_notebook(jp_fetch, model["id"])
    assert sources(document) == ["a = 1", "b = 2"]
    assert not [c for c in document["cells"] if "trusted" in c["metadata"]]
    await restore(jp_fetch, model["id"], notebook=True)
    written = json.loads((jp_root_dir / "t.ipynb").read_text())
    assert sources(written) == ["a = 1", "b = 2"] and not [c for c in written["cells"] if "trusted" in c["metadata"]]
    status, served = await api(jp_fetch, "GET", "api", "contents", "t.ipynb")
    assert served["content"]["cells"][1]["metadata"]["trusted"] is False  # the server's to give

    # Larger than the limit: the snapshot is taken, with the server's copy.
    huge = notebook("a = 1", "#" * (MAX_NOTEBOOK_BYTES + 1))
    status, model = await api(
        jp_fetch, "POST", "api", "ckpt", "kernels", kernel_id, "snapshots", body={"notebook": huge}
    )
    assert status == 202, model
    model = await wait_for_snapshot(jp_fetch, model["id"])
    assert model["status"] == "complete" and model["notebook"] == "saved"
    status, document = await stored_notebook(jp_fetch, model["id"])
    assert sources(document) == ["a = 1", "b = 2"]  # the file as the restore wrote it


@pytest.mark.criu
async def test_a_fork_copy_of_a_snapshot_without_a_notebook_copies_the_current_file(
    jp_fetch, jp_ws_fetch, jp_serverapp
):
    await save(jp_fetch, "plain.ipynb", notebook("p = 1"))
    kernel_id, sock = await open_notebook(jp_fetch, jp_ws_fetch, "plain.ipynb")
    snap = await snapshot(jp_fetch, kernel_id)
    # As a snapshot stored before notebooks were kept: the record names the path, holds none.
    store = jp_serverapp.web_app.settings["ckpt_manager"].store
    record = store.get(snap["id"])
    record.notebook = None
    store.save(record)
    await save(jp_fetch, "plain.ipynb", notebook("p = 1", "p = 2"))
    status, out = await api(
        jp_fetch, "POST", "api", "ckpt", "snapshots", snap["id"], "restore", body={"mode": "new", "copy": True}
    )
    assert status == 201, out
    status, copy = await api(jp_fetch, "GET", "api", "contents", out["path"])
    assert out["path"] != "plain.ipynb" and sources(copy["content"]) == ["p = 1", "p = 2"]
    await api(jp_fetch, "DELETE", "api", "kernels", out["kernel_id"])
