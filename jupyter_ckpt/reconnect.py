"""Waiting until a restored kernel's clients are back and it answers.

The clients (the notebook's sockets, through the server) reconnect within
ZMQ's retry interval. What the kernel sends before they are back is lost: a
reply, output, the 'idle' status that ends a busy indicator. A kernel restored
inside ``checkpoint()`` waits for this too (the server's ``settled``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
from collections.abc import Callable
from typing import Any

from jupyter_client.session import Session

from .provisioner import ZMQ_PORTS


async def wait_until_answering(
    km: Any,
    before: dict[int, int],
    log: logging.Logger,
    reconnected: Callable[[], None] = lambda: None,
    timeout: float = 10.0,
) -> None:
    """Return once as many clients are connected to each kernel port as
    ``before`` counted (``reconnected`` is called then), and (unless it is busy
    running a cell) the kernel answers on shell and IOPub."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    ports = list(before)
    # A fresh subscriber seeing an answer also tells that IOPub publishes
    # again. It connects while the others come back (counted among this
    # server's connections). A session of its own: km.client() would share
    # the kernel manager's ZMQ identity with other clients and take over their route.
    probe = km.client(session=Session(config=km.session.config, key=km.session.key))
    probe.start_channels(shell=True, iopub=True, stdin=False, hb=False, control=False)
    expected = {p: before[p] + (p in (km.shell_port, km.iopub_port)) for p in ports}
    try:
        try:
            while loop.time() < deadline:
                now = client_connections(km.ip, ports)
                if all(now[p] >= expected[p] for p in ports):
                    break
                await asyncio.sleep(0.02)
            else:
                log.warning(
                    "jupyter_ckpt: not every client of a restored kernel reconnected within %.0f s "
                    "(connections per port: %s before, %s now)",
                    timeout,
                    before,
                    now,
                )
            await asyncio.sleep(0.05)  # their SUBSCRIBE and identity, sent right after connecting
        finally:
            reconnected()
        probe_end = loop.time() + 2.0
        wait = 0.05  # a request sent before the probe's own subscription took is not seen: ask again, later each time
        asked: set[str] = set()
        while loop.time() < probe_end:
            # Not kernel_info: IPython's banner draws a random "tip" from the
            # user's global `random`, which would change the restored state.
            asked.add(probe.comm_info())
            round_end = min(probe_end, loop.time() + wait)
            wait = min(2 * wait, 0.4)
            while loop.time() < round_end:
                try:
                    msg = await probe.get_iopub_msg(timeout=max(0.01, round_end - loop.time()))
                except Exception:  # queue.Empty: this round's request went unseen
                    break
                if msg.get("parent_header", {}).get("msg_id") in asked:  # a slow answer to an earlier one counts
                    return
        # Busy running the cell it was restored in: it will answer after.
    finally:
        probe.stop_channels()


def client_connections(address: str, ports: list[int]) -> dict[int, int]:
    """This server's established TCP connections to each port of ``address``
    (IPv4). Only its own: a kernel's processes may be clients of its ports too
    (a worker process connecting back), and those come back with the kernel."""
    counts = dict.fromkeys(ports, 0)
    try:
        wanted = ipaddress.IPv4Address(address).packed[::-1].hex().upper()
    except ValueError:
        return counts
    ours = _socket_inodes()
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                cols = line.split()
                if cols[3] == "01" and cols[9] in ours:  # ESTABLISHED, a socket of this process
                    addr, port_hex = cols[2].split(":")
                    port = int(port_hex, 16)
                    if addr == wanted and port in counts:
                        counts[port] += 1
    except (OSError, StopIteration, IndexError):
        pass
    return counts


def _socket_inodes() -> set[str]:
    inodes = set()
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def kernel_ports(km: Any) -> list[int]:
    """The ports whose clients lose what the kernel sends before they are
    back: IOPub's subscribers its output and status, shell's and stdin's
    their replies and prompts. Not control (nothing comes on it unasked; its
    clients were seen to reconnect up to 0.15 s after the others) nor the
    heartbeat (it reconnects on its own)."""
    if getattr(km, "transport", "tcp") != "tcp":
        return []
    return [port for name in ZMQ_PORTS if name not in ("control_port", "hb_port") and (port := getattr(km, name))]
