"""How the tests talk to a server, as its clients do: REST calls, a kernel's
websocket (the notebook's side), and the snapshot event stream.

Shared by every test module; fixtures that build on it live in conftest.py.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tornado.httpclient import HTTPClientError

SNAPSHOT_EVENTS = "https://events.jupyter.org/jupyter_ckpt/snapshot/v1"


async def api(jp_fetch, method: str, *parts: str, body: Any = None, **params: str) -> tuple[int, Any]:
    """Call the server as a client does; returns (status, decoded JSON or None).

    Error statuses are returned, not raised, so tests assert them directly."""
    kwargs: dict[str, Any] = {"method": method}
    if body is not None:
        kwargs["body"] = json.dumps(body)
    elif method in ("POST", "PUT", "PATCH"):
        kwargs["body"] = "{}"
    if params:
        kwargs["params"] = params
    try:
        resp = await jp_fetch(*parts, **kwargs)
    except HTTPClientError as e:
        resp = e.response
        assert resp is not None, e
    text = resp.body.decode() if resp.body else ""
    return resp.code, (json.loads(text) if text else None)


@dataclass
class Execution:
    msg_id: str
    stdout: str = ""
    stderr: str = ""
    result: str | None = None
    status: str | None = None  # of the execute_reply
    error: str | None = None  # ename: evalue
    idle: bool = False


@dataclass
class KernelSocket:
    """The notebook's side of a kernel: one websocket through the server."""

    ws: Any
    session: str = field(default_factory=lambda: uuid.uuid4().hex)
    runs: dict[str, Execution] = field(default_factory=dict)

    async def send_execute(self, code: str) -> Execution:
        msg_id = uuid.uuid4().hex
        msg = {
            "header": {
                "msg_id": msg_id,
                "msg_type": "execute_request",
                "session": self.session,
                "username": "test",
                "version": "5.3",
                "date": "",
            },
            "parent_header": {},
            "metadata": {},
            "content": {
                "code": code,
                "silent": False,
                "store_history": True,
                "user_expressions": {},
                "allow_stdin": False,
            },
            "channel": "shell",
            "buffers": [],
        }
        run = self.runs[msg_id] = Execution(msg_id)
        await self.ws.write_message(json.dumps(msg))
        return run

    async def _read_one(self, timeout: float) -> None:
        raw = await asyncio.wait_for(self.ws.read_message(), timeout)
        if raw is None:
            raise ConnectionError("websocket closed")
        msg = json.loads(raw)
        parent = msg.get("parent_header", {}).get("msg_id")
        run = self.runs.get(parent)
        if run is None:
            return
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            if content["name"] == "stdout":
                run.stdout += content["text"]
            else:
                run.stderr += content["text"]
        elif kind == "execute_result":
            run.result = content["data"].get("text/plain")
        elif kind == "error":
            run.error = f"{content['ename']}: {content['evalue']}"
        elif kind == "execute_reply":
            run.status = content["status"]
        elif kind == "status" and content["execution_state"] == "idle":
            run.idle = True

    async def wait_until(self, predicate, timeout: float = 60) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError("kernel did not answer in time")
            try:
                await self._read_one(remaining)
            except asyncio.TimeoutError:
                raise TimeoutError("kernel did not answer in time") from None

    async def finish(self, run: Execution, timeout: float = 60) -> Execution:
        await self.wait_until(lambda: run.status is not None and run.idle, timeout)
        return run

    async def execute(self, code: str, timeout: float = 60) -> Execution:
        run = await self.finish(await self.send_execute(code), timeout)
        assert run.status == "ok", f"{code!r} failed: {run.error}\n{run.stderr}"
        return run

    async def wait_ready(self, timeout: float = 60) -> None:
        """After a restart, as a frontend does: probe until the kernel answers
        on shell and on IOPub (messages published before its subscribers
        reconnect are lost, with any provisioner)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                await self.finish(await self.send_execute("None"), timeout=2)
                return
            except TimeoutError:
                if loop.time() > deadline:
                    raise

    async def value(self, expr: str, timeout: float = 60) -> str | None:
        return (await self.execute(expr, timeout)).result


async def wait_for_snapshot(jp_fetch, snapshot_id: str, timeout: float = 120, seen: set | None = None) -> dict:
    """Poll the snapshot until it is complete or failed, as a script would
    (TimeoutError past ``timeout``); ``seen`` collects the statuses it passed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        status, model = await api(jp_fetch, "GET", "api", "ckpt", "snapshots", snapshot_id)
        assert status == 200, model
        if seen is not None:
            seen.add(model["status"])
        if model["status"] in ("complete", "failed"):
            return model
        if loop.time() > deadline:
            raise TimeoutError(f"snapshot {snapshot_id} still {model['status']} after {timeout:.0f} s")
        await asyncio.sleep(0.02)


async def snapshot(jp_fetch, kernel_id: str, label: str = "") -> dict:
    status, model = await api(jp_fetch, "POST", "api", "ckpt", "kernels", kernel_id, "snapshots", body={"label": label})
    assert status == 202, model
    model = await wait_for_snapshot(jp_fetch, model["id"])
    assert model["status"] == "complete", model
    return model


async def restore(jp_fetch, snapshot_id: str, **body: Any) -> dict:
    status, out = await api(
        jp_fetch, "POST", "api", "ckpt", "snapshots", snapshot_id, "restore", body={"mode": "replace", **body}
    )
    assert status == 200, out
    return out


class EventRecorder:
    """The snapshot events a server published, as the frontend receives them."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self._changed = asyncio.Event()

    async def listener(self, logger: Any, schema_id: str, data: dict) -> None:
        self.events.append(data)
        self._changed.set()

    def actions(self, snapshot_id: str | None = None) -> list[str]:
        return [e["action"] for e in self.events if snapshot_id is None or e.get("snapshot_id") == snapshot_id]

    def of(self, action: str) -> list[dict]:
        return [e for e in self.events if e["action"] == action]

    async def wait_for(self, predicate: Callable[[list[dict]], Any], timeout: float = 30) -> Any:
        """Until ``predicate(events)`` is true (returned); TimeoutError past ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not (result := predicate(self.events)):
            self._changed.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"no such event within {timeout:.0f} s; seen: {self.actions()}")
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                pass
        return result

    async def wait_for_action(self, action: str, timeout: float = 30, **match: Any) -> dict:
        """The first event with this action (and the given fields)."""

        def found(events: list[dict]) -> dict | None:
            return next(
                (e for e in events if e["action"] == action and all(e.get(k) == v for k, v in match.items())), None
            )

        return await self.wait_for(found, timeout)
