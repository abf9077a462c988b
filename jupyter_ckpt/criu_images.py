"""CRIU's image files: reading and editing them, and checking them against this machine.

Edits (made before a restore, on verified copies):
- ``allow_resized_files``: drop CRIU's size check for files that may grow (IPython's history);
- ``move_listeners``: make dumped TCP listeners listen elsewhere (a fork's address).

Check: CRIU does not carry the files a process has open or mapped (its program,
the shared libraries, the working directory, data files): it reopens them by
path on restore and checks their size and, for ELF files, their build-id.
Restoring a snapshot taken on another machine, or after a package upgrade,
fails deep inside CRIU if one differs. ``differences`` makes the same checks up
front, from the images, and lists every difference in words.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import os
import stat
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path


def load_entries(images_dir: Path, name: str) -> list[dict]:
    """The entries of one image file, decoded by pycriu ([] if it is absent)."""
    import pycriu

    try:
        with open(images_dir / name, "rb") as f:
            return pycriu.images.load(f)["entries"]
    except FileNotFoundError:
        return []


def allow_resized_files(images_dir: Path, patterns: tuple[str, ...]) -> list[str]:
    """Drop CRIU's size check for open files matching ``patterns`` (fnmatch).

    CRIU refuses to restore a regular file whose size changed since the dump.
    That is right for user data, but IPython keeps its history database open in
    every kernel and it grows with every cell; SQLite re-reads a database that
    changed under it when it next takes a lock, so restoring over a grown one is
    safe. Returns the paths relaxed.
    """
    if not patterns:
        return []
    relaxed: list[str] = []

    def relax(entries: list[dict]) -> int:
        for entry in entries:
            reg = entry.get("reg") if entry.get("type") == "REG" else None
            if reg and "size" in reg and any(fnmatch.fnmatch(reg["name"], p) for p in patterns):
                del reg["size"]
                relaxed.append(reg["name"])
        return len(relaxed)

    _edit_files_image(images_dir, relax)
    return relaxed


def move_listeners(images_dir: Path, moves: Mapping[int, tuple[str, int]]) -> int:
    """Make the dumped IPv4 TCP listeners on the given ports listen at a new
    address and port on restore: ``{old_port: (address, new_port)}``.

    A fork's kernel lives in a network namespace of its own, where its ZMQ
    listeners are rebound to the address the server reaches that namespace at.
    Listeners on other ports (user code's servers) are left alone. Returns the
    number of listeners moved.
    """

    def move(entries: list[dict]) -> int:
        moved = 0
        for entry in entries:
            isk = entry.get("isk") if entry.get("type") == "INETSK" else None
            if isk and isk.get("state") == _TCP_LISTEN and isk.get("src_port") in moves:
                address, port = moves[isk["src_port"]]
                isk["src_addr"] = [int.from_bytes(ipaddress.IPv4Address(address).packed, "little")]
                isk["src_port"] = port
                moved += 1
        return moved

    return _edit_files_image(images_dir, move)


def close_outside_connections(images_dir: Path) -> int:
    """Restore as closed the dumped TCP connections whose other end is not in
    the tree; keep those between two of its processes. Returns how many closed.

    A kernel's connections to its server (ZMQ) cannot come back: the server
    reconnects instead. Connections inside the tree (a dask scheduler and its
    workers, a database and its client) come back established, with the bytes
    that were in flight, so the computation goes on as if never stopped.
    """

    def ends(isk: dict) -> tuple[tuple, tuple]:
        return (tuple(isk.get("src_addr", [])), isk.get("src_port")), (
            tuple(isk.get("dst_addr", [])),
            isk.get("dst_port"),
        )

    def close(entries: list[dict]) -> int:
        connected = [
            e["isk"]
            for e in entries
            if e.get("type") == "INETSK" and e["isk"].get("proto") == _TCP and e["isk"].get("dst_port")
        ]
        inside = {ends(isk) for isk in connected}
        closed = 0
        for isk in connected:
            here, there = ends(isk)
            if (there, here) in inside:
                continue
            # An unbound socket that never connected: its next read or write
            # fails, as on a connection the peer reset.
            isk.update(state=_TCP_CLOSE, src_port=0, dst_port=0)
            closed += 1
        return closed

    return _edit_files_image(images_dir, close)


def prune_absent_mounts(images_dir: Path) -> list[str]:
    """Leave out of the restored mount namespace the host mounts (dumped as
    external, bound back from this machine) that are not mounts here, with the
    mounts below them, unless a file of the tree lives on one. Returns their
    mount points.

    A kernel's mount namespace is a copy of its host's: restored elsewhere (a
    server in a container, another machine), some of those mounts (cgroup
    hierarchies, a data disk) may not exist, and CRIU would refuse the whole
    restore for them."""
    used = {
        reg.get("mnt_id")
        for e in load_entries(images_dir, "files.img")
        if e.get("type") == "REG" and (reg := e.get("reg"))
    }
    pruned: list[str] = []

    def prune(mounts: list[dict]) -> int:
        gone = {
            m["mnt_id"]
            for m in mounts
            if m.get("ext_key") and m.get("mnt_id") not in used and not os.path.ismount(m.get("mountpoint", ""))
        }
        grew = True
        while grew:  # and everything mounted below them
            below = {m["mnt_id"] for m in mounts if m.get("parent_mnt_id") in gone and m.get("mnt_id") not in used}
            grew = not below <= gone
            gone |= below
        pruned.extend(m.get("mountpoint", "?") for m in mounts if m["mnt_id"] in gone)
        mounts[:] = [m for m in mounts if m["mnt_id"] not in gone]
        return len(gone)

    for path in images_dir.glob("mountpoints-*.img"):
        edit_image(path, prune)
    return pruned


_TCP = 6
_TCP_CLOSE = 7
_TCP_LISTEN = 10


def _edit_files_image(images_dir: Path, edit: Callable[[list[dict]], int]) -> int:
    """Apply ``edit`` to the entries of ``files.img`` (see edit_image)."""
    return edit_image(images_dir / "files.img", edit)


def edit_image(path: Path, edit: Callable[[list[dict]], int]) -> int:
    """Apply ``edit`` to the entries of the image at ``path``; it returns how
    many it changed, and the image is rewritten (atomically, so a hard link to
    the old file keeps it) only if that is not 0."""
    import pycriu

    if not path.exists():
        return 0
    with open(path, "rb") as f:
        image = pycriu.images.load(f)
    changed = edit(image["entries"])
    if changed:
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            pycriu.images.dump(image, f)
        os.replace(tmp, path)
    return changed


_TMPFS = (5, "TMPFS")  # CRIU's fstype of a tmpfs, as pycriu decodes it (number or name)
_PT_NOTE = 4
_NT_GNU_BUILD_ID = 3


def own_mounts(images_dir: Path) -> dict[int, dict]:
    """The mounts the tree made itself (its /dev/shm tmpfs, its /proc), by
    mount id: not the host's, bound in as external, nor the root."""
    return {
        m["mnt_id"]: m
        for mounts in images_dir.glob("mountpoints-*.img")
        for m in load_entries(images_dir, mounts.name)
        if not m.get("ext_key") and m.get("mountpoint") != "/"
    }


def host_files(images_dir: Path) -> list[tuple[str, dict, str]]:
    """The files the restored tree opens from this machine: (path, CRIU's
    entry, its role: program, working directory, library or file). Left out:
    what the images carry themselves (deleted files, the tree's own tmpfs)."""

    def load(name: str) -> list[dict]:
        return load_entries(images_dir, name)

    # Deleted files that CRIU carries in the images itself need nothing here.
    remaps = load("remap-fpath.img")
    carried = {e.get("orig_id") for e in remaps}
    # So do files of the tree's own mounts (its /dev/shm, saved with its mount
    # namespace, and its /proc).
    carried_mounts = set(own_mounts(images_dir))
    roles: dict[int, str] = {}
    for mm_file in images_dir.glob("mm-*.img"):
        for mm in load(mm_file.name):
            roles[mm.get("exe_file_id", -1)] = "program"
    for fs_file in images_dir.glob("fs-*.img"):
        for fs in load(fs_file.name):
            roles[fs.get("cwd_id", -1)] = "working directory"

    regs = [e["reg"] for e in load("files.img") if e.get("type") == "REG" and e.get("reg")]
    # CRIU's link remap files (links it made to a deleted file during the dump)
    # name no mount; they live where the file they stand for did. Only a LINKED
    # remap's remap_id is a file's id: a GHOST one's is a ghost file's, another
    # numbering, where it would name some other file.
    mount_of = {reg.get("id"): reg.get("mnt_id") for reg in regs}
    for remap in remaps:
        if remap.get("remap_type", "LINKED") in ("LINKED", 0):
            mount_of[remap.get("remap_id")] = mount_of.get(remap.get("orig_id"))
    return [
        (reg["name"], reg, roles.get(reg["id"]) or ("library" if "build_id" in reg else "file"))
        for reg in regs
        if reg.get("id") not in carried
        and mount_of.get(reg.get("id")) not in carried_mounts
        and reg.get("name", "").startswith("/")
    ]


def differences(images_dir: Path) -> list[str]:
    """One line per file that is missing or differs here, empty if none does."""
    problems: dict[str, str] = {}
    for name, reg, role in host_files(images_dir):
        problem = _difference(name, reg)
        if problem and name not in problems:
            problems[name] = f"{name} ({role}): {problem}"
    return sorted(problems.values())


def _difference(name: str, reg: dict) -> str | None:
    try:
        st = os.stat(name)
    except FileNotFoundError:
        return "missing here"
    except OSError as e:
        return f"cannot be read here ({e.strerror})"
    if "size" in reg and stat.S_ISREG(st.st_mode) and st.st_size != reg["size"]:
        return f"{st.st_size} bytes here, {reg['size']} in the snapshot"
    if "build_id" in reg:
        # CRIU keeps the build-id as 32-bit words, its last one zero-padded.
        wanted = b"".join(int(w).to_bytes(4, "little") for w in reg["build_id"])
        here = build_id(Path(name))
        if here is None or wanted[: len(here)] != here or len(wanted) - len(here) >= 4:
            return f"another build here (build-id {here.hex() if here else 'none'}, {wanted.hex()} in the snapshot)"
    return None


def build_id(path: Path) -> bytes | None:
    """The GNU build-id note of a 64-bit little-endian ELF file, if it has one."""
    try:
        with open(path, "rb") as f:
            header = f.read(64)
            if header[:4] != b"\x7fELF" or header[4] != 2 or header[5] != 1:
                return None
            (phoff,) = struct.unpack_from("<Q", header, 0x20)
            phentsize, phnum = struct.unpack_from("<HH", header, 0x36)
            for i in range(phnum):
                f.seek(phoff + i * phentsize)
                ptype, _, offset, _, _, filesz = struct.unpack("<IIQQQQ", f.read(40))
                if ptype == _PT_NOTE:
                    f.seek(offset)
                    for ntype, name, desc in _notes(f.read(min(filesz, 1 << 16))):
                        if ntype == _NT_GNU_BUILD_ID and name == b"GNU\0":
                            return desc
    except (OSError, struct.error):
        return None
    return None


def _notes(data: bytes) -> Iterator[tuple[int, bytes, bytes]]:
    pos = 0
    while pos + 12 <= len(data):
        namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
        pos += 12
        name = data[pos : pos + namesz]
        pos += (namesz + 3) & ~3
        desc = data[pos : pos + descsz]
        pos += (descsz + 3) & ~3
        yield ntype, name, desc
