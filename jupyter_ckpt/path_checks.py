"""What in a set of images CRIU would create, bind, chown or open *by path*,
as root, on the host's mounts: the helper (helper.py) lets none of it happen
for an ordinary user.

A path the user controls can be swapped for a symlink between any check and
CRIU's use of it, so a check of the path is not enough. Instead:

- regular files and folders of the host that the tree has open (libraries, its
  working directory, the user's data files) must open for the user the same
  way (helper_callers.check_files), and CRIU then opens them without following any
  symlink (``restore_no_symlinks``, our patch to CRIU): a path swapped after
  the check fails the restore. Without symlinks a swap can only bring in a
  file the user owns or a hard link the user was allowed to make
  (``fs.protected_hardlinks``, which the helper requires);
- everything else CRIU would make by path is refused when it lies on a host
  mount (``unsafe_paths``): unix sockets bound to a path, deleted files CRIU
  recreates beside the original ("ghost" and link-remap files), named pipes. On
  the tree's own tmpfs (its /dev/shm, created empty by the restore) they are
  safe, provided what CRIU extracts into it holds no links, devices or
  set-id files: checked here too.

Kernels started through the helper get ``TMPDIR=/dev/shm`` (their own tmpfs),
so the sockets of multiprocessing's managers and temporary files are there.
"""

from __future__ import annotations

import posixpath
import quopri
import stat
import tarfile
from pathlib import Path

from .criu_images import load_entries, own_mounts

_TAR_PATTERN = "tmpfs-dev-*.tar.gz.img"


def unix_socket_path(usk: dict) -> str | None:
    """The path a unix socket is bound to ('' for none or an abstract name)."""
    raw = usk.get("name") or ""
    name = quopri.decodestring(raw.encode()) if isinstance(raw, str) else bytes(raw)
    if not name or name.startswith(b"\0"):
        return None
    return name.rstrip(b"\0").decode(errors="replace")


def unsafe_paths(images: Path, uid: int) -> list[str]:
    """One line per object CRIU would make by path on a host mount, or per
    unsafe member of the tree's own tmpfs; empty if there is none."""
    mounts = own_mounts(images)
    own = set(mounts)
    # CRIU binds a socket again by the name given to bind(), following links:
    # the name itself must lie on the tree's own tmpfs, with no way out of it.
    own_tmpfs = [m["mountpoint"].rstrip("/") + "/" for m in mounts.values() if m.get("fstype") in (5, "TMPFS")]
    problems: list[str] = []
    entries = load_entries(images, "files.img")
    regs = {e["reg"]["id"]: e["reg"] for e in entries if e.get("type") == "REG" and e.get("reg")}
    for entry in entries:
        usk = entry.get("usk") if entry.get("type") == "UNIXSK" else None
        path = unix_socket_path(usk) if usk else None
        canonical = bool(path) and path.startswith("/") and posixpath.normpath(path) == path and "//" not in path
        inside = canonical and any(path.startswith(prefix) for prefix in own_tmpfs)
        if path and (usk.get("mnt_id", -1) not in own or not inside):
            problems.append(
                f"a unix socket bound at {path}, outside the kernel's own /dev/shm (set TMPDIR=/dev/shm "
                "for the kernel, where multiprocessing puts its managers' sockets)"
            )
        notify = entry.get("ify") or entry.get("ffy") or {}
        if entry.get("type") in ("INOTIFY", "FANOTIFY") and (notify.get("wd") or notify.get("mark")):
            # CRIU adds the watches again as root, by the paths recorded at the dump.
            problems.append("a file-system watch (inotify or fanotify): stop it before taking a snapshot")
        fifo = entry.get("fifo") if entry.get("type") == "FIFO" else None
        if fifo and regs.get(fifo.get("regf_id"), {}).get("mnt_id") not in own:
            problems.append(f"a named pipe, {regs.get(fifo.get('regf_id'), {}).get('name', '?')}")
    for remap in load_entries(images, "remap-fpath.img"):
        reg = regs.get(remap.get("orig_id"), {})
        if reg.get("mnt_id") not in own:
            problems.append(
                f"{reg.get('name', 'a file')}, deleted while open ({remap.get('remap_type', '').lower()} file): "
                "only files of the kernel's own /dev/shm (or TMPDIR) can be brought back for you"
            )
    for tar in sorted(images.glob(_TAR_PATTERN)):
        problems += _unsafe_members(tar, uid)
    if any(images.glob("userns-*.img")):
        problems.append("a user namespace of the kernel's own (its mounts would be restored by root)")
    return problems


def _unsafe_members(path: Path, uid: int) -> list[str]:
    """What CRIU's tar (as root) must not extract into the restored tmpfs."""
    problems = []
    try:
        with tarfile.open(path, mode="r:gz") as archive:
            for member in archive:
                name = member.name
                if name.startswith("/") or ".." in Path(name).parts:
                    problems.append(f"{name} in the kernel's /dev/shm: a name outside it")
                elif member.issym() or member.islnk():
                    problems.append(f"{name} in the kernel's /dev/shm is a link ({member.linkname})")
                elif not (member.isfile() or member.isdir()):
                    problems.append(f"{name} in the kernel's /dev/shm is a device or pipe")
                elif member.mode & (stat.S_ISUID | stat.S_ISGID):
                    problems.append(f"{name} in the kernel's /dev/shm is set-user-id or set-group-id")
                elif member.uid != uid and not (member.isdir() and member.uid == 0):
                    problems.append(f"{name} in the kernel's /dev/shm belongs to uid {member.uid}")
    except (tarfile.TarError, OSError, EOFError) as e:
        problems.append(f"the kernel's /dev/shm cannot be read from the images ({e})")
    return problems
