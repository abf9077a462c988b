"""Bad requests get a 4xx with a message, never a 500, and change nothing."""

from __future__ import annotations

import json

import pytest
from tornado.httpclient import HTTPClientError

from .client import api
from .test_store import commit


@pytest.fixture
def store(jp_serverapp):
    return jp_serverapp.web_app.settings["ckpt_manager"].store


async def raw(jp_fetch, method: str, *parts: str, body: bytes | None = None) -> tuple[int, dict]:
    try:
        resp = await jp_fetch(*parts, method=method, body=body, allow_nonstandard_methods=True)
    except HTTPClientError as e:
        resp = e.response
    return resp.code, json.loads(resp.body or b"{}")


async def test_a_body_that_is_not_utf8_json_is_a_bad_request(jp_fetch, store, start_kernel):
    kernel_id, _ = await start_kernel()
    snap = commit(store)
    routes = [
        ("POST", "api", "ckpt", "kernels", kernel_id, "snapshots"),
        ("PATCH", "api", "ckpt", "snapshots", snap.id),
        ("POST", "api", "ckpt", "snapshots", snap.id, "restore"),
        ("PUT", "api", "ckpt", "kernels", kernel_id, "schedule"),
    ]
    for method, *parts in routes:
        for body in (b"\xff\xfe{}", b"{not json", b'"a string"', b"[1]", b'{"label": NaN}'):
            status, answer = await raw(jp_fetch, method, *parts, body=body)
            assert status == 400, (method, parts, body, status, answer)
            assert "body" in answer["message"], answer
    assert [r.id for r in store.list()] == [snap.id]  # nothing was taken, changed or restored


@pytest.mark.parametrize(
    "body, message",
    [
        ({"kernel_id": ["a"]}, "kernel_id must be a string"),
        ({"kernel_id": {"a": 1}}, "kernel_id must be a string"),
        ({"mode": "new", "path": ["a"]}, "path must be a string"),
        ({"mode": "new", "path": 3}, "path must be a string"),
        ({"mode": ["replace"]}, "mode must be"),
        ({"mode": "sideways"}, "mode must be"),
        # Its processes keep their kernel's message key: never into another kernel.
        ({"kernel_id": "another-kernel"}, "was taken from kernel k1: it restores in place only into that kernel"),
    ],
)
async def test_restore_fields_of_the_wrong_type_are_bad_requests(jp_fetch, store, body, message):
    import os

    snap = commit(store)
    namespaces = sorted(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else []
    status, answer = await api(jp_fetch, "POST", "api", "ckpt", "snapshots", snap.id, "restore", body=body)
    assert status == 400 and message in answer["message"], answer
    assert (await api(jp_fetch, "GET", "api", "kernels"))[1] == []  # no fork was started
    assert (sorted(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else []) == namespaces


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"interval_seconds": NaN}', "not JSON"),
        ('{"interval_seconds": Infinity}', "not JSON"),
        ('{"interval_seconds": 1e400}', "interval_seconds must be a number from 1"),
        ('{"interval_seconds": true}', "interval_seconds must be a number from 1"),
        ('{"interval_seconds": 0.5}', "interval_seconds must be a number from 1"),
        ('{"keep": false}', "keep must be a whole number"),
        ('{"keep": 2.5}', "keep must be a whole number"),
        ('{"enabled": "yes"}', "enabled must be true or false"),
        ('{"every": 3}', "unknown schedule fields"),
    ],
)
async def test_the_schedule_takes_only_finite_numbers(jp_fetch, start_kernel, text, message):
    kernel_id, _ = await start_kernel()
    status, answer = await raw(jp_fetch, "PUT", "api", "ckpt", "kernels", kernel_id, "schedule", body=text.encode())
    assert status == 400 and message in answer["message"], answer
    status, schedule = await api(jp_fetch, "GET", "api", "ckpt", "kernels", kernel_id, "schedule")
    assert status == 200 and schedule["interval_seconds"] == 1800.0  # unchanged, and valid JSON


async def test_a_damaged_snapshot_is_listed_failed_and_cannot_be_relabelled(jp_fetch, store):
    good, damaged = commit(store), commit(store, seed=1)
    path = store.state.parent / "manifests" / f"{damaged.id}.manifest"
    data = bytearray(path.read_bytes())
    data[60] ^= 1
    path.write_bytes(bytes(data))
    status, listed = await api(jp_fetch, "GET", "api", "ckpt", "snapshots")
    assert status == 200 and {s["id"]: s["status"] for s in listed} == {good.id: "complete", damaged.id: "failed"}
    status, answer = await api(jp_fetch, "PATCH", "api", "ckpt", "snapshots", damaged.id, body={"label": "x"})
    assert status == 409 and "signature" in answer["message"], answer
    assert not list((store.state / "records").iterdir())  # no stray record written


async def test_an_unreadable_manifest_entry_does_not_break_the_listing(jp_fetch, store, tmp_path):
    import subprocess
    import sys

    from jupyter_ckpt.records import new_snapshot_id

    good = commit(store)
    odd = new_snapshot_id()
    (store.state.parent / "manifests" / f"{odd}.manifest").mkdir()  # a directory where a file belongs
    status, listed = await api(jp_fetch, "GET", "api", "ckpt", "snapshots")
    assert status == 200 and {s["id"]: s["status"] for s in listed} == {good.id: "complete", odd: "failed"}
    failed = next(s for s in listed if s["id"] == odd)
    assert "cannot be read" in failed["error"]
    status, answer = await api(jp_fetch, "GET", "api", "ckpt", "snapshots", odd)
    assert status == 200 and answer["status"] == "failed"
    for args in (["list"], ["gc"], ["--json", "list"]):
        out = subprocess.run(
            [sys.executable, "-m", "jupyter_ckpt.cli", "--store", str(store.state.parent), *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, (args, out.stderr)
    status, _ = await api(jp_fetch, "DELETE", "api", "ckpt", "snapshots", odd)
    assert status == 204 and [s.id for s in store.list()] == [good.id]


async def test_the_listing_filters_by_notebook_and_kernel_newest_first(jp_fetch, store):
    from jupyter_ckpt.records import SnapshotRecord, new_snapshot_id

    made = []
    for n, (kernel_id, path) in enumerate([("k1", "a.ipynb"), ("k2", "b.ipynb"), ("k1", "a.ipynb"), ("k3", "a.ipynb")]):
        record = SnapshotRecord(
            id=new_snapshot_id(1_800_000_000.0 + n), kernel_id=kernel_id, path=path, status="dumping"
        )
        (store.create(record) / "pages-1.img").write_bytes(bytes([n]) * 4096)
        made.append(store.commit(record).id)

    async def listed(**query):
        status, body = await api(jp_fetch, "GET", "api", "ckpt", "snapshots", **query)
        assert status == 200
        return [s["id"] for s in body]

    assert await listed() == made[::-1]
    assert await listed(path="a.ipynb") == [made[3], made[2], made[0]]
    assert await listed(path="b.ipynb") == [made[1]]
    assert await listed(kernel_id="k1") == [made[2], made[0]]
    assert await listed(kernel_id="k1", path="b.ipynb") == []
    assert await listed(path="c.ipynb") == []
