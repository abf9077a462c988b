"""Moving images between a caller's folders and the helper's own (helper.py):
the caller's folders come as open fds, names are created and never followed,
and what the helper restores from is a copy the caller cannot change."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from . import seal as sealing
from .errors import NotPermitted
from .helper_callers import Caller

MAX_SEAL_BYTES = 1 << 20
OPEN_IMAGE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def require_own_directory(fd: int, caller: Caller) -> None:
    st = os.fstat(fd)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != caller.uid:
        raise NotPermitted("the images directory must be a directory of yours")


def hand_over(images: Path, target: int, caller: Caller) -> None:
    """Move the sealed images into the caller's directory ``target`` (an open
    fd), owned by the caller. Names are created, never followed or reused."""
    for entry in os.scandir(images):
        os.chown(entry.path, caller.uid, caller.gid, follow_symlinks=False)
        os.chmod(entry.path, 0o600, follow_symlinks=False)
        try:
            os.link(entry.path, entry.name, dst_dir_fd=target, follow_symlinks=False)
        except OSError as e:
            if e.errno != errno.EXDEV:  # another filesystem: copy instead
                raise
            _copy_new(entry.path, target, entry.name)


def _copy_new(source: str, target_dir: int, name: str) -> None:
    src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        dst = os.open(name, flags, 0o600, dir_fd=target_dir)
        try:
            st = os.fstat(src)
            os.fchown(dst, st.st_uid, st.st_gid)
            _copy_fd(src, dst, st.st_size)
        finally:
            os.close(dst)
    finally:
        os.close(src)


def _copy_fd(src: int, dst: int, size: int) -> None:
    copied = 0
    while copied < size:
        n = os.copy_file_range(src, dst, size - copied)
        if n == 0:
            break
        copied += n


def take_over(source: int, images: Path, key: bytes, caller: Caller) -> None:
    """Copy the sealed images from the caller's directory ``source`` (an open
    fd) into ``images`` (root's), and check the copies against the seal."""
    fd = _open_caller_file(source, sealing.SEAL_FILE, caller)
    try:
        text = os.read(fd, MAX_SEAL_BYTES)
        if len(text) >= MAX_SEAL_BYTES:
            raise sealing.ImagesRefused("the snapshot's seal is too large")
    finally:
        os.close(fd)
    files = sealing.read_seal(text, key, caller.uid)
    for name, sealed in files.items():
        src = _open_caller_file(source, name, caller)
        try:
            size = os.fstat(src).st_size
            if sealing.UNSEALED_CONTENT.fullmatch(name):
                try:  # the same inode, where the caller cannot swap it: no copy of the memory
                    link_open_file(src, images, name)
                except OSError:
                    _copy_open(src, images / name, size)
            else:
                _copy_open(src, images / name, size)
        finally:
            os.close(src)
        copy = os.open(images / name, os.O_RDONLY | os.O_CLOEXEC)
        try:
            sealing.check_file(name, copy, sealed)
        finally:
            os.close(copy)


def link_open_file(fd: int, directory: Path, name: str) -> None:
    """A new name in ``directory`` for the open file ``fd`` (same filesystem).
    linkat() with AT_SYMLINK_FOLLOW through /proc/self/fd; os.link() uses
    link(), which would link the /proc entry itself, unless a dir fd is given."""
    dir_fd = os.open(directory, os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=dir_fd, follow_symlinks=True)
    finally:
        os.close(dir_fd)


def _open_caller_file(directory: int, name: str, caller: Caller) -> int:
    try:
        fd = os.open(name, OPEN_IMAGE, dir_fd=directory)
    except FileNotFoundError:
        raise sealing.ImagesRefused(f"image {name} is missing") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise sealing.ImagesRefused(f"image {name} is a symbolic link: the helper does not follow it") from None
        raise sealing.ImagesRefused(f"image {name} cannot be opened ({e.strerror})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != caller.uid:
        os.close(fd)
        raise sealing.ImagesRefused(f"image {name} is not a regular file of yours")
    return fd


def _copy_open(src: int, path: Path, size: int) -> None:
    dst = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.lseek(src, 0, os.SEEK_SET)
        _copy_fd(src, dst, size)
    finally:
        os.close(dst)
