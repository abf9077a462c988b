"""With jupyter-collaboration on the server, a snapshot taken without the
browser's document (the magic, auto-backup, the API) keeps the live shared
document: what collaborators see, saved or not.

The real jupyter-collaboration server extension (jupyter_server_ydoc, with its
file ids), installed by `make test` beside the venv and enabled only here. The
collaborator's edit is made in the room's shared document through the
extension's own API (what its websocket does for a browser), not through a
browser: the frontend half of jupyter-collaboration is not installed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest

from .client import KernelSocket, api, wait_for_snapshot

COLLABORATION = Path(__file__).resolve().parent.parent / ".venv" / "collaboration"
if not (COLLABORATION / "jupyter_server_ydoc").is_dir():
    raise RuntimeError(f"jupyter-collaboration's server extension is not in {COLLABORATION}: `make test` installs it")
sys.path.insert(0, str(COLLABORATION))

pytestmark = pytest.mark.criu


@pytest.fixture
def jp_server_config(store_root, tmp_path):
    return {
        "ServerApp": {
            "jpserver_extensions": {"jupyter_ckpt": True, "jupyter_server_ydoc": True, "jupyter_server_fileid": True}
        },
        "CheckpointApp": {"store_root": str(store_root)},
        # Never written to disk by the extension: the live document and the file differ.
        "YDocExtension": {"document_save_delay": None},
        "SQLiteYStore": {"db_path": str(tmp_path / "ystore.db")},
        "BaseFileIdManager": {"db_path": str(tmp_path / "file-ids.db")},
    }


async def test_a_snapshot_keeps_the_live_shared_document(jp_fetch, jp_ws_fetch, jp_serverapp, jp_root_dir):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("saved = 1")]
    (jp_root_dir / "shared.ipynb").write_text(nbformat.writes(nb))
    body = {"path": "shared.ipynb", "name": "shared.ipynb", "type": "notebook", "kernel": {"name": "python3"}}
    status, session = await api(jp_fetch, "POST", "api", "sessions", body=body)
    kernel_id = session["kernel"]["id"]
    sock = KernelSocket(await jp_ws_fetch("api", "kernels", kernel_id, "channels"))
    await sock.wait_ready()

    # No room yet (nobody has the notebook open collaboratively): the saved file.
    status, snap = await api(jp_fetch, "POST", "api", "ckpt", "kernels", kernel_id, "snapshots")
    snap = await wait_for_snapshot(jp_fetch, snap["id"])
    assert snap["status"] == "complete" and snap["notebook"] == "saved"

    # A collaborator adds a cell; it is in the shared document, not in the file.
    collaboration = jp_serverapp.web_app.settings["jupyter_server_ydoc"]
    shared = await collaboration.get_document(
        path="shared.ipynb", content_type="notebook", file_format="json", copy=False, create=True
    )
    shared.append_cell(
        {"cell_type": "code", "source": "live = 2", "metadata": {}, "outputs": [], "execution_count": None}
    )
    assert "live = 2" not in (jp_root_dir / "shared.ipynb").read_text()

    # The magic's route: the kernel's own credential, no document in the request.
    await sock.execute("import jupyter_ckpt; s = jupyter_ckpt.checkpoint('live')")
    status, listed = await api(jp_fetch, "GET", "api", "ckpt", "snapshots", kernel_id=kernel_id)
    magic = next(s for s in listed if s["trigger"] == "magic")
    assert magic["notebook"] == "live"
    status, document = await api(jp_fetch, "GET", "api", "ckpt", "snapshots", magic["id"], "notebook")
    assert ["".join(c["source"]) for c in document["cells"]] == ["saved = 1", "live = 2"]
    saved = json.loads((jp_root_dir / "shared.ipynb").read_text())
    assert ["".join(c["source"]) for c in saved["cells"]] == ["saved = 1"]
