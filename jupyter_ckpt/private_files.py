"""Files only their owner may read: a snapshot holds all of a kernel's memory,
secrets included, and the keys sign what root will restore.

Used by the store, the server's state (running kernels, the server URL) and the
keys; nothing here knows about snapshots.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import tempfile
from pathlib import Path

KEY_BYTES = 32


def private_dir(path: str | os.PathLike[str]) -> Path:
    """A directory (and its missing parents) that only its owner can enter (0700)."""
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def private_opener(path: str, flags: int) -> int:
    """For ``open(..., opener=private_opener)``: created 0600, never with the umask."""
    return os.open(path, flags, 0o600)


def write_private_atomic(path: Path, data: bytes) -> None:
    """A 0600 file that readers see whole or not at all, durably: temporary
    file, fsync, rename, fsync of the directory."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.part-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename or a new file in ``path`` durable."""
    fd = os.open(path, os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_or_create_key(path: str | os.PathLike[str]) -> bytes:
    """A secret key kept in a 0600 file, created (random) on first use."""
    path = Path(path)
    if not path.exists():
        if not path.parent.exists():
            private_dir(path.parent)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(KEY_BYTES))
            f.flush()
            os.fsync(f.fileno())
    key = path.read_bytes()
    if len(key) < KEY_BYTES:
        raise ValueError(f"key {path} is shorter than {KEY_BYTES} bytes")
    if os.stat(path).st_mode & 0o077:
        os.chmod(path, 0o600)
    return key


def key_fingerprint(key: bytes) -> str:
    """A short public name for a secret key (what a bundle says signed it)."""
    return hashlib.sha256(b"jupyter-ckpt key fingerprint\0" + key).hexdigest()[:16]
