"""%checkpoint and checkpoint() in real kernels, with the kernel's own credential."""

from __future__ import annotations

import ast

import pytest
from tornado.httpclient import AsyncHTTPClient

from .client import api, restore

pytestmark = pytest.mark.criu


async def test_magic_snapshots_and_returns_twice(jp_fetch, start_kernel):
    kernel_id, sock = await start_kernel()
    await sock.execute("x = 'at the checkpoint'")
    run = await sock.execute(
        "cp = %checkpoint before the change\nprint('restored' if cp.restored else 'original', cp.id)"
    )
    assert run.stdout.startswith("Snapshot ") and "MiB" in run.stdout and "frozen" in run.stdout
    assert "original" in run.stdout
    snapshot_id = run.stdout.split()[-1]
    status, snap = await api(jp_fetch, "GET", "api", "ckpt", "snapshots", snapshot_id)
    assert snap["trigger"] == "magic" and snap["label"] == "before the change"

    await sock.execute("x = 'later'")
    # Restore: the restored kernel is inside that %checkpoint call, which
    # returns again, this time saying it is the restored copy.
    run.stdout, run.status, run.idle = "", None, False
    await restore(jp_fetch, snapshot_id)
    await sock.finish(run, timeout=60)
    assert "Restored from snapshot" in run.stdout and f"restored {snapshot_id}" in run.stdout
    assert await sock.value("x") == "'at the checkpoint'"


async def test_checkpoint_inside_a_running_loop(jp_fetch, start_kernel):
    kernel_id, sock = await start_kernel()
    code = (
        "import jupyter_ckpt\n"
        "ids = []\n"
        "for epoch in range(3):\n"
        "    state = epoch * 10\n"
        "    ids.append(jupyter_ckpt.checkpoint(f'epoch {epoch}').id)\n"
        "print('ids', ids)"
    )
    run = await sock.execute(code, timeout=120)
    ids = ast.literal_eval(run.stdout.split("ids ", 1)[1])
    assert len(ids) == 3
    status, listed = await api(jp_fetch, "GET", "api", "ckpt", "snapshots", kernel_id=kernel_id)
    assert [s["label"] for s in listed] == ["epoch 2", "epoch 1", "epoch 0"]
    assert all(s["trigger"] == "magic" and s["status"] == "complete" for s in listed)


async def test_list_and_auto_subcommands(jp_fetch, start_kernel):
    kernel_id, sock = await start_kernel()
    await sock.execute("%checkpoint first")
    out = (await sock.execute("%checkpoint list")).stdout
    assert "magic" in out and "first" in out and "complete" in out
    assert "every 600 s" in (await sock.execute("%checkpoint auto 600")).stdout
    status, schedule = await api(jp_fetch, "GET", "api", "ckpt", "kernels", kernel_id, "schedule")
    assert schedule["enabled"] and schedule["interval_seconds"] == 600
    assert "off" in (await sock.execute("%checkpoint auto off")).stdout


async def test_kernel_credential_is_limited_to_its_own_kernel(jp_fetch, start_kernel, jp_http_port, jp_base_url):
    kernel_a, sock_a = await start_kernel()
    kernel_b, sock_b = await start_kernel()
    token_a = ast.literal_eval(await sock_a.value("__import__('os').environ['JUPYTER_CKPT_KERNEL_TOKEN']"))
    assert "JPY_" not in token_a
    client = AsyncHTTPClient()
    base = f"http://127.0.0.1:{jp_http_port}{jp_base_url}api/ckpt"

    async def code(method, path, token, body=None):
        resp = await client.fetch(
            f"{base}/{path}",
            method=method,
            body=body,
            raise_error=False,
            headers={"Authorization": f"ckpt-kernel {token}"},
        )
        return resp.code

    assert await code("GET", f"self/{kernel_a}", token_a) == 200
    assert await code("POST", f"self/{kernel_b}/snapshots", token_a, "{}") == 403  # another kernel
    assert await code("GET", "snapshots", token_a) == 403  # the user's API
    assert await code("GET", f"kernels/{kernel_a}/snapshots", token_a) == 403
    assert await code("GET", f"self/{kernel_a}", "forged") == 403
    # Nor the user's own credential (the server token, as a browser's session would be).
    for method, path, body in (("GET", f"self/{kernel_a}", None), ("POST", f"self/{kernel_a}/snapshots", "{}")):
        resp = await jp_fetch("api", "ckpt", *path.split("/"), method=method, body=body, raise_error=False)
        assert resp.code == 403, (method, path, resp.code)
    # And the kernel does not hold the user's server token.
    env = await sock_a.value("sorted(k for k in __import__('os').environ if 'TOKEN' in k)")
    assert env == "['JUPYTER_CKPT_KERNEL_TOKEN']"


def test_the_magic_loads_in_any_ipython_and_says_why_it_cannot_snapshot():
    """`%load_ext jupyter_ckpt` outside a kernel the server started: the magic
    is there, and says why this IPython cannot snapshot itself."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTER_CKPT_")}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "IPython",
            "--quick",
            "--colors=NoColor",
            "-c",
            "%load_ext jupyter_ckpt\n%checkpoint list",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    text = out.stdout + out.stderr
    assert "UsageError: Line magic function" not in text  # the magic exists
    assert "was not started by a Jupyter server with jupyter-ckpt, so it cannot snapshot itself" in text, text
