"""criu_images on images written here (no CRIU): what a restore needs from
the machine."""

from __future__ import annotations

from pathlib import Path

from jupyter_ckpt.criu_images import host_files

OWN_SHM, HOST_ROOT = 67, 44
FOWN = {"uid": 0, "euid": 0, "signum": 0, "pid_type": 0, "pid": 0}


def write(folder: Path, name: str, magic: str, entries: list[dict]) -> None:
    import pycriu

    with open(folder / name, "wb") as f:
        pycriu.images.dump({"magic": magic, "entries": entries}, f)


def reg(file_id: int, name: str, mnt_id: int | None) -> dict:
    entry = {"id": file_id, "flags": 2, "pos": 0, "fown": FOWN, "name": name}
    if mnt_id is not None:
        entry["mnt_id"] = mnt_id
    return {"type": "REG", "id": file_id, "reg": entry}


def mount(mnt_id: int, mountpoint: str, ext_key: str | None = None) -> dict:
    entry = {
        "fstype": 1,
        "mnt_id": mnt_id,
        "root_dev": 1,
        "parent_mnt_id": HOST_ROOT,
        "flags": 0,
        "root": "/",
        "mountpoint": mountpoint,
        "source": "none",
        "options": "",
    }
    if ext_key:
        entry["ext_key"] = ext_key
    return entry


def test_a_ghost_remaps_number_is_not_a_files_id(tmp_path):
    """A semaphore's link remap file (id 15) lives on the kernel's own
    /dev/shm; a file deleted while open in /tmp has ghost file number 15. The
    ghost's number must not make the link remap file look like the host's
    (it did, in some runs, depending on the order of the remaps)."""
    write(
        tmp_path,
        "files.img",
        "FILES",
        [
            reg(14, "/dev/shm/sem.Gk53PB", OWN_SHM),
            reg(15, "/dev/shm/link_remap.15", None),
            reg(317, "/tmp/#2146584", HOST_ROOT),
            reg(318, "/usr/lib/libc.so.6", HOST_ROOT),
        ],
    )
    write(
        tmp_path,
        "remap-fpath.img",
        "REMAP_FPATH",
        [
            {"orig_id": 14, "remap_id": 15, "remap_type": "LINKED"},
            {"orig_id": 317, "remap_id": 15, "remap_type": "GHOST"},
        ],
    )
    write(tmp_path, "mountpoints-12.img", "MNTS", [mount(HOST_ROOT, "/", "root"), mount(OWN_SHM, "/dev/shm")])
    assert [path for path, _, _ in host_files(tmp_path)] == ["/usr/lib/libc.so.6"]
