"""Reading needs the `read` permission on kernels, changing needs `write`,
with an authorizer that answers asynchronously."""

from __future__ import annotations

import pytest
from jupyter_server.auth.authorizer import Authorizer

from .client import api
from .test_requests import raw
from .test_store import commit

UNKNOWN_KERNEL = "00000000-0000-0000-0000-000000000000"


@pytest.fixture
def store(jp_serverapp):
    return jp_serverapp.web_app.settings["ckpt_manager"].store


class ReadOnly(Authorizer):
    """A user who may read but not change anything, answered asynchronously (as
    an authorizer that asks a service would)."""

    async def is_authorized(self, handler, user, action, resource):
        return action == "read"


@pytest.fixture
def jp_server_config(store_root):
    return {
        "ServerApp": {"jpserver_extensions": {"jupyter_ckpt": True}, "authorizer_class": ReadOnly},
        "CheckpointApp": {"store_root": str(store_root)},
    }


async def test_reading_needs_read_and_changing_needs_write(jp_fetch, store):
    snap = commit(store)
    assert (await api(jp_fetch, "GET", "api", "ckpt", "snapshots"))[0] == 200
    assert (await api(jp_fetch, "GET", "api", "ckpt", "snapshots", snap.id))[0] == 200
    assert (await api(jp_fetch, "GET", "api", "ckpt", "status"))[0] == 200
    for method, *parts in (
        ("POST", "api", "ckpt", "kernels", UNKNOWN_KERNEL, "snapshots"),
        ("PATCH", "api", "ckpt", "snapshots", snap.id),
        ("DELETE", "api", "ckpt", "snapshots", snap.id),
        ("POST", "api", "ckpt", "snapshots", snap.id, "restore"),
        ("PUT", "api", "ckpt", "kernels", UNKNOWN_KERNEL, "schedule"),
        ("POST", "api", "ckpt", "kernels", UNKNOWN_KERNEL, "hibernate"),
        ("POST", "api", "ckpt", "kernels", UNKNOWN_KERNEL, "wake"),
    ):
        status, _ = await api(jp_fetch, method, *parts, body={"label": "x"} if method == "PATCH" else None)
        assert status == 403, (method, parts)
    assert store.get(snap.id).label == "" and store.get(snap.id).restorable


class KernelsOnly(Authorizer):
    """May read and change kernels, but not contents (notebooks)."""

    async def is_authorized(self, handler, user, action, resource):
        return resource == "kernels"


async def test_a_snapshots_notebook_is_contents(jp_fetch, jp_serverapp, store):
    """The notebook kept with a snapshot is read with contents:read, and
    written back (restore with the notebook, fork into a copy) with contents:write."""
    jp_serverapp.web_app.settings["authorizer"] = KernelsOnly(parent=jp_serverapp)
    snap = commit(store)
    status, out = await api(jp_fetch, "GET", "api", "ckpt", "snapshots", snap.id, "notebook")
    assert status == 403 and "not authorized to read notebooks" in out["message"]
    for body in ({"mode": "replace", "notebook": True}, {"mode": "new", "copy": True}):
        status, out = await api(jp_fetch, "POST", "api", "ckpt", "snapshots", snap.id, "restore", body=body)
        assert status == 403 and "not authorized to write notebooks" in out["message"], body


async def test_an_async_authorizer_refuses_an_upload_before_its_body_is_stored(jp_fetch, store):
    status, answer = await raw(jp_fetch, "POST", "api", "ckpt", "bundles", body=b"JCKPT-BUNDLE-1\n" + bytes(8 << 20))
    assert status == 403 and "not authorized to upload" in answer["message"], answer
    assert not list((store.state / "tmp").iterdir())
