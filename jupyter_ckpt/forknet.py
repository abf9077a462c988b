"""A network namespace for each forked kernel.

A fork is restored while the original kernel runs on, so every TCP port the
original listens on (its five ZMQ ports, and any server the user's code started)
is taken in the host's namespace. The fork therefore gets a namespace of its own,
joined to the server's namespace by a veth pair on a /30 of ``10.213.0.0/16``:

- the server reaches the fork's ZMQ listeners at the namespace's address (the
  listeners are moved there in the images, see ``engine.move_listeners``);
- the user's listeners keep their address and port, inside the namespace;
- outbound, the fork reaches this host's own addresses through the veth pair
  (with ``outbound="host"``, routes to those addresses are all it has); with
  ``outbound="nat"`` its traffic is also masqueraded to the outside world
  (this turns on IPv4 forwarding on the host, once).

Kernels that were not forked (launched, or restored in place) never use this:
they stay in the server's namespace with the host's network as it is.

Needs root, ``ip`` (iproute2) and, for NAT, ``nft`` (nftables).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from .errors import RestoreFailed

NETWORK = ipaddress.IPv4Network("10.213.0.0/16")


def in_fork_network(connection: dict) -> bool:
    """Does a kernel with these connection details live in a fork's namespace?"""
    try:
        return ipaddress.IPv4Address(connection.get("ip", "127.0.0.1")) in NETWORK
    except ValueError:
        return False


NETNS_DIR = Path("/run/netns")
NAME_PREFIX = "ckpt-fork-"
# The two ends of each fork's veth pair (names have at most 15 characters).
HOST_INTERFACE_PREFIX = "ckh"
KERNEL_INTERFACE_PREFIX = "ckk"  # also how a kernel tells it is a fork (magic.in_fork)
_NFT_TABLE = "jupyter_ckpt"
_allocating = threading.Lock()
log = logging.getLogger(__name__)


def _run(*cmd: str, input: str | None = None) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, input=input, timeout=30)
    if proc.returncode != 0:
        raise RestoreFailed(
            f"cannot set up the network namespace of the new kernel ({' '.join(cmd)}: {proc.stderr.strip() or proc.returncode}); "
            "restoring as a new kernel needs root, iproute2 and nftables"
        )


@dataclass
class ForkNetwork:
    index: int

    @property
    def name(self) -> str:
        return f"{NAME_PREFIX}{self.index}"

    @property
    def path(self) -> Path:
        return NETNS_DIR / self.name

    @property
    def host_interface(self) -> str:
        return f"{HOST_INTERFACE_PREFIX}{self.index}"

    @property
    def kernel_interface(self) -> str:
        return f"{KERNEL_INTERFACE_PREFIX}{self.index}"

    @property
    def host_address(self) -> str:
        return str(NETWORK.network_address + 4 * self.index + 1)

    @property
    def kernel_address(self) -> str:
        """Where the server reaches the fork, and the fork's address."""
        return str(NETWORK.network_address + 4 * self.index + 2)

    @classmethod
    def create(cls, outbound: str = "nat") -> ForkNetwork:
        """A fresh namespace with loopback up and a veth pair to this one."""
        with _allocating:  # this server's forks; another server's may race us for a name
            for index in range(NETWORK.num_addresses // 4):
                net = cls(index)
                if (
                    _free(index)
                    and subprocess.run(["ip", "netns", "add", net.name], capture_output=True).returncode == 0
                ):
                    break
            else:
                raise RestoreFailed("no free network namespace for a new kernel: every fork address is taken")
        try:
            ns = ("ip", "-n", net.name)
            _run(
                "ip",
                "link",
                "add",
                net.host_interface,
                "type",
                "veth",
                "peer",
                "name",
                net.kernel_interface,
                "netns",
                net.name,
            )
            _run("ip", "addr", "add", f"{net.host_address}/30", "dev", net.host_interface)
            _run("ip", "link", "set", net.host_interface, "up")
            _run(*ns, "link", "set", "lo", "up")
            _run(*ns, "addr", "add", f"{net.kernel_address}/30", "dev", net.kernel_interface)
            _run(*ns, "link", "set", net.kernel_interface, "up")
            if outbound == "nat":
                _run(*ns, "route", "add", "default", "via", net.host_address)
                _enable_nat()
            else:
                # Routes to this host's own addresses only: the outside world is
                # unreachable even where forwarding and NAT are on for others.
                for address in _host_addresses():
                    _run(*ns, "route", "replace", f"{address}/32", "via", net.host_address)
        except BaseException:
            net.close()
            raise
        return net

    @classmethod
    def from_name(cls, name: str) -> ForkNetwork | None:
        index = name[len(NAME_PREFIX) :] if name.startswith(NAME_PREFIX) else ""
        return cls(int(index)) if index.isdigit() and len(index) < 6 else None

    @classmethod
    def remove(cls, name: str) -> bool:
        """End every process in a fork's namespace (a fork cut short by a server
        that died), then remove the namespace. False if ``name`` is not one."""
        net = cls.from_name(name)
        if net is None:
            return False
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, timeout=30)
        for pid in pids.stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        net.close()
        return True

    def close(self) -> None:
        """Remove the namespace (its end of the veth pair, and so the pair, goes with it)."""
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", self.host_interface], capture_output=True, timeout=30)


def _free(index: int) -> bool:
    net = ForkNetwork(index)
    return not net.path.exists() and not Path(f"/sys/class/net/{net.host_interface}").exists()


def _host_addresses() -> list[str]:
    """This host's own IPv4 addresses, but loopback and the forks' own."""
    out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, timeout=30).stdout
    addresses = []
    for line in out.splitlines():
        fields = line.split()
        if "inet" in fields:
            address = ipaddress.IPv4Address(fields[fields.index("inet") + 1].split("/")[0])
            if not address.is_loopback and address not in NETWORK:
                addresses.append(str(address))
    return addresses


def _enable_nat() -> None:
    """Masquerade the forks' traffic leaving through any other interface."""
    forward = Path("/proc/sys/net/ipv4/ip_forward")
    if forward.read_text().strip() != "1":
        log.warning("jupyter_ckpt: turning on IPv4 forwarding so that forked kernels reach the network")
        forward.write_text("1\n")
    probe = subprocess.run(["nft", "list", "table", "ip", _NFT_TABLE], capture_output=True, timeout=30)
    if probe.returncode == 0:
        return
    _run(
        "nft",
        "-f",
        "-",
        input=(
            f"table ip {_NFT_TABLE} {{\n"
            "  chain postrouting {\n"
            "    type nat hook postrouting priority srcnat; policy accept;\n"
            f'    ip saddr {NETWORK} oifname != "{HOST_INTERFACE_PREFIX}*" masquerade\n'
            "  }\n"
            "}\n"
        ),
    )


def for_address(address: str) -> ForkNetwork | None:
    """The fork network whose kernel end has ``address``, if it is one."""
    try:
        offset = int(ipaddress.IPv4Address(address)) - int(NETWORK.network_address)
    except ValueError:
        return None
    return ForkNetwork(offset // 4) if 0 <= offset < NETWORK.num_addresses and offset % 4 == 2 else None


def remove_stale() -> list[str]:
    """Remove every fork namespace without a process in it. Only for a machine
    where no server is setting up a fork (tests, maintenance): a namespace being
    set up has no process yet. Servers remove their own (recovery.py)."""
    removed = []
    if not NETNS_DIR.is_dir():
        return removed
    for entry in NETNS_DIR.iterdir():
        if entry.name.startswith(NAME_PREFIX):
            pids = subprocess.run(["ip", "netns", "pids", entry.name], capture_output=True, text=True, timeout=30)
            index = entry.name[len(NAME_PREFIX) :]
            if index.isdigit() and pids.returncode == 0 and not pids.stdout.strip():
                ForkNetwork(int(index)).close()
                removed.append(entry.name)
    return removed
