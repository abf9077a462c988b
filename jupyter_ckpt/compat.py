"""Can a snapshot's processes be restored on this machine?

CRIU does not carry the files a process has open or mapped (its program, the
shared libraries, the working directory, data files): it reopens them by path on
restore and checks their size and, for ELF files, their build-id. Restoring a
snapshot taken on another machine, or after a package upgrade, fails deep inside
CRIU if one differs. This module makes the same checks up front, from the images,
and lists every difference in words.
"""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path
from typing import Iterator

_PT_NOTE = 4
_NT_GNU_BUILD_ID = 3


def differences(images_dir: Path) -> list[str]:
    """One line per file that is missing or differs here, empty if none does."""
    import pycriu

    def load(name: str) -> list[dict]:
        try:
            with open(images_dir / name, "rb") as f:
                return pycriu.images.load(f)["entries"]
        except FileNotFoundError:
            return []

    # Deleted files that CRIU carries in the images itself need nothing here.
    carried = {e.get("orig_id") for e in load("remap-fpath.img")}
    roles: dict[int, str] = {}
    for mm_file in images_dir.glob("mm-*.img"):
        for mm in load(mm_file.name):
            roles[mm.get("exe_file_id", -1)] = "program"
    for fs_file in images_dir.glob("fs-*.img"):
        for fs in load(fs_file.name):
            roles[fs.get("cwd_id", -1)] = "working directory"

    problems: dict[str, str] = {}
    for entry in load("files.img"):
        reg = entry.get("reg") if entry.get("type") == "REG" else None
        if not reg or reg.get("id") in carried or not reg.get("name", "").startswith("/"):
            continue
        name = reg["name"]
        what = roles.get(reg["id"]) or ("library" if "build_id" in reg else "file")
        problem = _difference(name, reg)
        if problem and name not in problems:
            problems[name] = f"{name} ({what}): {problem}"
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
            phoff, = struct.unpack_from("<Q", header, 0x20)
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
        name = data[pos:pos + namesz]
        pos += (namesz + 3) & ~3
        desc = data[pos:pos + descsz]
        pos += (descsz + 3) & ~3
        yield ntype, name, desc
