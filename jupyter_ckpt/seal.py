"""What the privileged helper checks in a set of CRIU images before root
restores them for an ordinary user (see helper.py).

CRIU restores as root and then takes on the credentials, files, mounts and
sockets the images describe. An image a user edited could therefore make root
create a process with uid 0, open another user's files, or mount over the
system. Two checks stand in the way:

- a *seal*: when the helper dumps a user's kernel it records every image file's
  size and digest with an HMAC (a key only the helper reads) bound to that
  user's uid. A restore for a uid needs a seal that verifies for that uid over
  the very bytes restored: images the user changed, images of another user, and
  images no helper with this key made are refused.
- the *credentials* in the images: every task and thread runs as the caller's
  uid, with gids among the caller's groups and no capabilities. Checked right
  after each dump (a process of the tree could have executed a setuid program
  while it was dumped) and again before each restore.

Content not sealed: the memory pages (``pages-N.img``). They become the memory
of the user's own process, which that user's code can write anyway; where they
go (pagemap, mm) and their sizes are sealed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from .errors import ImagesRefused

SEAL_FILE = "helper-seal.json"
SEAL_VERSION = 1
UNSEALED_CONTENT = re.compile(r"pages-\d+\.img")
# Logs and statistics CRIU writes beside the images are not needed to restore.
NOT_IMAGES = re.compile(r".*\.log|stats-(dump|restore)|" + re.escape(SEAL_FILE))
_UID_FIELDS = ("uid", "euid", "suid", "fsuid")
_GID_FIELDS = ("gid", "egid", "sgid", "fsgid")
_CAPABILITY_SETS = ("cap_inh", "cap_prm", "cap_eff", "cap_amb")


def file_digest(fd: int) -> str:
    """SHA-256 of an open file's content, read from its start."""
    h = hashlib.sha256()
    os.lseek(fd, 0, os.SEEK_SET)
    while chunk := os.read(fd, 1 << 20):
        h.update(chunk)
    return h.hexdigest()


def describe(name: str, fd: int) -> dict:
    """What the seal records of one image file."""
    entry: dict = {"size": os.fstat(fd).st_size}
    if not UNSEALED_CONTENT.fullmatch(name):
        entry["sha256"] = file_digest(fd)
    return entry


def _mac(key: bytes, uid: int, files: dict[str, dict]) -> str:
    message = json.dumps({"version": SEAL_VERSION, "uid": uid, "files": files}, sort_keys=True).encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def seal(images: Path, key: bytes, uid: int) -> dict[str, dict]:
    """Seal the images in ``images`` for ``uid``: writes SEAL_FILE there."""
    files: dict[str, dict] = {}
    for entry in sorted(os.scandir(images), key=lambda e: e.name):
        if entry.is_file(follow_symlinks=False) and not NOT_IMAGES.fullmatch(entry.name):
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                files[entry.name] = describe(entry.name, fd)
            finally:
                os.close(fd)
    body = {"version": SEAL_VERSION, "uid": uid, "files": files, "mac": _mac(key, uid, files)}
    (images / SEAL_FILE).write_text(json.dumps(body, indent=1))
    return files


def read_seal(text: bytes, key: bytes, uid: int) -> dict[str, dict]:
    """The sealed file list, if the seal is intact and made for ``uid``."""
    try:
        body = json.loads(text)
        files, mac = body["files"], body["mac"]
        if not isinstance(files, dict) or not isinstance(mac, str):
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise ImagesRefused("the snapshot's seal is unreadable: its images cannot be restored here") from None
    if body.get("uid") != uid:
        raise ImagesRefused("the snapshot was taken of another user's kernel: it is not restored for you")
    if not hmac.compare_digest(_mac(key, uid, files), mac):
        raise ImagesRefused(
            "the snapshot's seal does not verify: its images were changed after the dump, or were made by a "
            "helper with another key (see 'Deploying for many users' in the README)"
        )
    for name in files:
        if "/" in name or name in (".", "..") or NOT_IMAGES.fullmatch(name):
            raise ImagesRefused(f"the snapshot's seal names a file that is not an image: {name!r}")
    return files


def check_file(name: str, fd: int, sealed: dict) -> None:
    """One copied image file against its entry in the seal."""
    if describe(name, fd) != sealed:
        raise ImagesRefused(f"image {name} differs from the one the helper dumped: it was changed")


def check_credentials(images: Path, uid: int, gids: Iterable[int]) -> None:
    """Every task and thread of the images runs as ``uid``, with gids among
    ``gids`` and no capabilities (ImagesRefused otherwise)."""
    import pycriu

    allowed = set(gids)
    cores = sorted(images.glob("core-*.img"))
    if not cores:
        raise ImagesRefused("the images hold no process")
    for path in cores:
        with open(path, "rb") as f:
            entries = pycriu.images.load(f)["entries"]
        for core in entries:
            creds = (core.get("thread_core") or {}).get("creds")
            if creds is None:
                raise ImagesRefused(f"{path.name} has no credentials")
            wrong = [f"{k}={creds.get(k)}" for k in _UID_FIELDS if creds.get(k) != uid]
            wrong += [f"{k}={creds.get(k)}" for k in _GID_FIELDS if creds.get(k) not in allowed]
            wrong += [f"groups={g}" for g in creds.get("groups", []) if g not in allowed]
            wrong += [f"{k}={creds.get(k)}" for k in _CAPABILITY_SETS if any(creds.get(k) or [])]
            if wrong:
                raise ImagesRefused(
                    f"a process in the images does not run as you (uid {uid}): {path.name} has {', '.join(wrong)}"
                )
