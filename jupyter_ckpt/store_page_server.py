"""A lazy restore's memory served straight from the store's chunks.

A snapshot with no kept images (an older one, or one over the kept-image
budget) is reassembled from chunks before CRIU can read it: for a kernel of
1 GiB, writing its pages file is most of the restore. CRIU's lazy restore can
take the memory from a page server instead (`criu lazy-pages --page-server`,
the post-copy migration protocol of criu/page-xfer.c): for each page fault,
then in the background until all is back, `criu lazy-pages` asks for a run of
pages of a process and reads back a header and the pages.

``prepare`` writes the images CRIU reads itself (every file but the lazy runs
of the pages files, which stay holes) and a plan: where each lazy page's chunk
is. A serving process of its own (``ServingMemory``; the kernel's memory must
not depend on the server staying up) answers CRIU from the plan, every chunk
checked against its hash before it is sent. A chunk that does not match is
never answered: the process waiting for it stays stopped until the restore
has put the kernel back (see ``ServingMemory``).

Local stores only: the packs are opened when the serving starts, while gc
waits, so a pack that gc replaces meanwhile stays readable.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np

from .chunks import ChunkStore
from .criu_images import edit_image
from .errors import SnapshotNotRestorable
from .pack_format import PAGE_CHUNK, RAW_FRAME, StoredFile, chunk_hash
from .pack_reader import FrameReader
from .page_layout import PAGE, PE_LAZY, PE_PRESENT

# struct page_server_iov { u32 cmd; u64 nr_pages; u64 vaddr; u64 dst_id; } (x86-64 padding)
_IOV = struct.Struct("<I4xQQQ")
PS_IOV_GET = 7
PS_IOV_ADD_F = 6
PS_IOV_CLOSE = 0x1023
PS_IOV_FORCE_CLOSE = 0x1024
PS_CMD_BITS = 16

PLAN = "store-pages-plan.json"
SERVE_LOG = "store-pages.log"  # why the serving failed
SERVE_ERRORS = "store-pages-errors.log"  # the serving process's stderr (a crash's traceback)


# Runs shorter than this are written out and restored by CRIU itself, not
# served: the interpreter's own pages (small mappings, touched first thing
# after the restore) would otherwise cost a round trip each before the kernel
# answers; a kernel's data is in large mappings.
LAZY_RUN_MIN_BYTES = 2 << 20


def lazy_runs(images: Path) -> dict[str, tuple[int, np.ndarray, int]]:
    """For each pages file of ``images``: the pid its pagemap belongs to, the
    runs left to the serving process (vaddr, nr_pages, first page in the file)
    and its page count."""
    found = {}
    for pagemap in images.glob("pagemap-*.img"):
        pid = pagemap.name[len("pagemap-") : -len(".img")]
        if pid.isdigit():  # not shared memory (pagemap-shmem-*): restored as it is read, never lazily
            name, runs, count = _keep_large_runs_lazy(pagemap)
            found[name] = (int(pid), runs, count)
    return found


def _keep_large_runs_lazy(pagemap: Path) -> tuple[str, np.ndarray, int]:
    """Make CRIU's lazy runs shorter than LAZY_RUN_MIN_BYTES eager in
    ``pagemap``; its pages file's name, the runs left lazy and its page count."""
    runs: list[tuple[int, int, int]] = []
    layout = {"name": "", "count": 0}

    def edit(entries: list[dict]) -> int:
        head, *rest = entries
        # Lazy entries, merged where one goes on where the previous ended (CRIU
        # cuts a mapping's pages into entries of at most a pipe's worth).
        merged: list[tuple[int, int, int, list[dict]]] = []  # vaddr, pages, first page, entries
        page = 0
        for e in rest:
            flags, n = int(e.get("flags", 0)), int(e["nr_pages"])
            if not flags & PE_PRESENT:
                continue
            if flags & PE_LAZY:
                vaddr = int(e["vaddr"])
                if merged and merged[-1][0] + merged[-1][1] * PAGE == vaddr and merged[-1][2] + merged[-1][1] == page:
                    start, count, first, members = merged[-1]
                    merged[-1] = (start, count + n, first, [*members, e])
                else:
                    merged.append((vaddr, n, page, [e]))
            page += n
        changed = 0
        for start, count, first, members in merged:
            if count * PAGE >= LAZY_RUN_MIN_BYTES:
                runs.append((start, count, first))
                continue
            for e in members:
                e["flags"] = int(e["flags"]) & ~PE_LAZY
                changed += 1
        layout["name"], layout["count"] = f"pages-{int(head['pages_id'])}.img", page
        return changed

    edit_image(pagemap, edit)
    return str(layout["name"]), np.array(runs, np.uint64).reshape(-1, 3), int(layout["count"])


def prepare(chunks: ChunkStore, files: list[StoredFile], dest: Path, plan_dir: Path) -> int:
    """Write ``files`` into ``dest`` for a lazy restore whose lazy pages come
    from the serving process: the other files whole (checked against their
    digests), the pages files with only their pages that are not lazy (each
    checked against its hash) and holes where the lazy ones go. Writes the
    plan into ``plan_dir``; returns the bytes left to the serving process."""
    pages = [f for f in files if f.name.startswith("pages-")]
    chunks.materialize([f for f in files if not f.name.startswith("pages-")], dest)
    layout = lazy_runs(dest)
    plan: dict[str, object] = {"files": []}
    lazy_bytes = 0
    for stored in pages:
        if stored.name not in layout:
            chunks.materialize([stored], dest)  # no lazy runs (shared memory): written whole
            continue
        pid, runs, count = layout[stored.name]
        if count * PAGE_CHUNK != stored.size or len(stored.chunks) != count:
            raise SnapshotNotRestorable(f"{stored.name}: its pagemap does not lay out its {stored.size} bytes")
        lazy = np.zeros(count, bool)
        for _vaddr, n, first in runs.tolist():
            lazy[first : first + n] = True
        _write_eager_pages(chunks, stored, lazy, dest / stored.name)
        packs, rows = chunks.locate_all(stored)
        hashes = np.frombuffer(b"".join(stored.chunks), np.uint8).reshape(-1, 32)
        base = plan_dir / f"store-pages-{pid}"
        np.save(f"{base}-runs.npy", runs)
        np.save(f"{base}-rows.npy", rows)
        np.save(f"{base}-hashes.npy", hashes)
        paths = {name: chunks.pack_path(name) for name in packs}
        plan["files"].append({"pid": pid, "name": stored.name, "base": str(base), "packs": packs, "paths": paths})  # type: ignore[attr-defined]
        lazy_bytes += int(lazy.sum()) * PAGE_CHUNK
    (plan_dir / PLAN).write_text(json.dumps(plan))
    return lazy_bytes


def _write_eager_pages(chunks: ChunkStore, stored: StoredFile, lazy: np.ndarray, target: Path) -> None:
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, stored.size)  # the lazy runs stay holes
        for n, data in chunks.read_chunks(stored, np.flatnonzero(~lazy)):
            os.pwrite(fd, data, n * PAGE_CHUNK)
    finally:
        os.close(fd)


class ServedFile(NamedTuple):
    """One process's pages file, as the plan describes it."""

    runs: np.ndarray  # (n, 3) uint64: vaddr, nr_pages, first page in the file; in address order
    rows: np.ndarray  # per page: its pack (index into packs), frame offset and length, start, size
    hashes: np.ndarray  # (pages, 32) uint8: each page's BLAKE3
    packs: list[str]
    name: str


class PlanServer:
    """Answers `criu lazy-pages` from a plan (see ``prepare``)."""

    def __init__(self, plan_dir: Path):
        plan = json.loads((plan_dir / PLAN).read_text())
        # Opened now, while the caller keeps gc away: a pack replaced later stays
        # readable. Read with pread, not mapped: a page is copied before it is
        # checked, and a disk error is an error, not a SIGBUS.
        self.packs: dict[str, BinaryIO] = {}
        self.files: dict[int, ServedFile] = {}
        for f in plan["files"]:
            for name in f["packs"]:
                if name not in self.packs:
                    self.packs[name] = open(f["paths"][name], "rb", buffering=0)  # noqa: SIM115 (kept open)
            base = f["base"]
            served = ServedFile(
                np.load(f"{base}-runs.npy"),
                np.load(f"{base}-rows.npy"),
                np.load(f"{base}-hashes.npy"),
                f["packs"],
                f["name"],
            )
            # Packs cut short are found now, before anything is restored.
            sizes = np.array([os.fstat(self.packs[p].fileno()).st_size for p in served.packs], np.uint64)
            ends = served.rows["offset"] + (served.rows["length"] & ~np.uint32(RAW_FRAME)).astype(np.uint64)
            if len(served.rows) and (ends > sizes[served.rows["pack"]]).any():
                raise SnapshotNotRestorable(f"{served.name}: a pack it needs is shorter than its index says")
            self.files[int(f["pid"])] = served
        self.frames = FrameReader(self.packs.__getitem__)

    def pages(self, pid: int, vaddr: int, nr_pages: int) -> tuple[int, list[memoryview]]:
        """Up to ``nr_pages`` pages from ``vaddr`` (those of one run), checked."""
        if pid not in self.files:
            raise SnapshotNotRestorable(f"no memory of process {pid} in this snapshot")
        runs, rows, hashes, packs, name = self.files[pid]  # pid: as CRIU's images name the process
        run_starts = runs[:, 0]  # in address order, as the pagemap lists them
        at = int(np.searchsorted(run_starts, np.uint64(vaddr), side="right")) - 1
        if at < 0 or vaddr >= int(run_starts[at]) + int(runs[at, 1]) * PAGE:
            raise SnapshotNotRestorable(f"process {pid} has no lazy page at {vaddr:#x}")
        run_vaddr, run_pages, run_first = (int(x) for x in runs[at])
        skip = (vaddr - run_vaddr) // PAGE
        count = min(nr_pages, run_pages - skip)
        first = run_first + skip
        rows = rows[first : first + count]  # field by field: numpy scalars one by one cost more than the hashing
        numbers, offsets, lengths = rows["pack"].tolist(), rows["offset"].tolist(), rows["length"].tolist()
        starts, sizes = rows["start"].tolist(), rows["size"].tolist()
        expected = hashes[first : first + count].tobytes()
        out: list[memoryview] = []
        i = 0
        while i < count:
            pack, offset, length = packs[numbers[i]], offsets[i], lengths[i]
            if length & RAW_FRAME:
                # Stored as is: read just the pages asked for, one read for those
                # that follow each other in the frame (a fault asks for one).
                end = i + 1
                while (
                    end < count
                    and (numbers[end], offsets[end]) == (numbers[i], offset)
                    and starts[end] == starts[end - 1] + sizes[end - 1]
                ):
                    end += 1
                span = starts[end - 1] + sizes[end - 1] - starts[i]
                data = memoryview(os.pread(self.packs[pack].fileno(), span, offset + starts[i]))
                if len(data) != span:
                    raise SnapshotNotRestorable(f"{name}: pack {pack} ends before chunk {first + i}")
                pieces = [data[starts[k] - starts[i] : starts[k] - starts[i] + sizes[k]] for k in range(i, end)]
            else:
                frame = self.frames.get(pack, offset, length)  # decompressed whole, the last few kept
                end, pieces = i + 1, [frame[starts[i] : starts[i] + sizes[i]]]
            for k, piece in enumerate(pieces, start=i):
                if sizes[k] != PAGE or chunk_hash(piece) != expected[32 * k : 32 * k + 32]:
                    raise SnapshotNotRestorable(
                        f"{name}: chunk {first + k} is corrupt (its content does not match its hash)"
                    )
            out += pieces
            i = end
        return count, out

    def serve(self, sock: socket.socket) -> None:
        """Until CRIU says it has all it needs (it then waits for our answer)."""
        while True:
            header = _recv_exactly(sock, _IOV.size)
            if header is None:
                return  # CRIU went away
            cmd, nr_pages, vaddr, pid = _IOV.unpack(header)
            if cmd in (PS_IOV_CLOSE, PS_IOV_FORCE_CLOSE):
                sock.sendall(struct.pack("<i", 0))
                return
            if cmd != PS_IOV_GET:
                raise SnapshotNotRestorable(f"unexpected page server request {cmd:#x}")
            count, pages = self.pages(pid, vaddr, nr_pages)  # (the whole answer checked before any of it is sent)
            sock.sendall(b"".join([_IOV.pack(PS_IOV_ADD_F | (PE_PRESENT << PS_CMD_BITS), count, vaddr, pid), *pages]))


class ServingMemory:
    """The serving process of a plan, seen from the restore.

    Between the two, a tree pipe (the restore writes) and the process's
    stdout (it writes):

    - stdout: "ready" once the packs are open (else the restore is refused);
      later "failed" if a chunk does not match, or the process ends: with
      status 0 once CRIU has all of the memory.
    - tree pipe: the restored tree's root pid ("0": the restore failed),
      then "handled" once the restore has stopped that tree.

    A page that fails its check is never answered, and the connection stays
    open (this side holds the serving end too, should the serving process
    die): the process waiting for the page stays stopped. With the
    connection closed, CRIU would let it run on over a page of zeros. Should
    the server go away instead, the serving process kills the tree's root."""

    def __init__(self, plan_dir: Path):
        self.log, self.errors = plan_dir / SERVE_LOG, plan_dir / SERVE_ERRORS
        self._ours, self.criu_socket = socket.socketpair()
        tree_r, self._tree_w = os.pipe()
        try:
            with open(self.errors, "wb") as errors:
                self.process = subprocess.Popen(
                    [sys.executable, "-m", __name__, str(plan_dir), str(self._ours.fileno()), str(tree_r)],
                    cwd=plan_dir,  # private: nothing there to import in place of the real modules
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=errors,
                    pass_fds=(self._ours.fileno(), tree_r),
                    start_new_session=True,  # the kernel's memory must not depend on the server staying up
                )
        except BaseException:
            self._close_sockets()
            os.close(self._tree_w)
            raise
        finally:
            os.close(tree_r)
        assert self.process.stdout is not None
        if self.process.stdout.readline().strip() != b"ready":  # refused before anything was restored
            self.restored(None)
            raise SnapshotNotRestorable(self.reason())

    @property
    def page_server(self) -> int:
        """The socket for `criu lazy-pages` (engine.restore's page_server)."""
        return self.criu_socket.fileno()

    def restored(self, pid: int | None) -> None:
        """After the restore: the tree's root (None: the restore failed, and
        the serving ends)."""
        self.criu_socket.close()  # criu lazy-pages holds its own
        self._tell(f"{pid or 0}\n")
        if pid is None:
            self.stop()

    def succeeded(self) -> bool:
        """Blocking: True once all of the memory was served; False when a
        chunk did not match or the serving process died (the tree waits,
        stopped: see ``handled``)."""
        assert self.process.stdout is not None
        failed = self.process.stdout.readline().strip() == b"failed"
        if not failed:
            self.process.wait()
        return not failed and self.process.returncode == 0

    def handled(self) -> None:
        """The tree that waited is gone: the serving may end."""
        self._tell("handled\n")
        self.stop()

    def reason(self) -> str:
        for path in (self.log, self.errors):
            try:
                lines = path.read_text(errors="replace").strip().splitlines()
            except OSError:
                continue
            if lines:
                return lines[-1]
        if self.process.poll() not in (None, 0, 1):
            return f"serving the kernel's memory from the store ended (status {self.process.returncode})"
        return "serving the kernel's memory from the store failed"

    def stop(self) -> None:
        """Blocking (up to a few seconds): end the serving."""
        self.criu_socket.close()  # with no restore to serve, its connection ends here
        if self._tree_w >= 0:
            os.close(self._tree_w)  # a serving process that failed ends on this
            self._tree_w = -1
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._close_sockets()
        if self.process.stdout is not None:
            self.process.stdout.close()

    def _close_sockets(self) -> None:
        self.criu_socket.close()
        self._ours.close()  # CRIU sees the connection end only now

    def _tell(self, line: str) -> None:
        if self._tree_w < 0:
            return
        try:
            os.write(self._tree_w, line.encode())
        except OSError:
            pass  # it ended already (its log says why)


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(1 << 16):
            pass
    except OSError:
        pass


def _recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        more = sock.recv(n - len(data))
        if not more:
            return None
        data += more
    return data


def main(argv: list[str]) -> int:
    """``python -m jupyter_ckpt.store_page_server PLAN_DIR SOCKET_FD TREE_FD``
    (see ServingMemory)."""
    plan_dir, sock, tree_fd = Path(argv[0]), socket.socket(fileno=int(argv[1])), int(argv[2])
    try:
        server = PlanServer(plan_dir)
        print("ready", flush=True)
        server.serve(sock)
        return 0
    except Exception as e:
        # CRIU's later requests are read and dropped: with its socket full,
        # criu lazy-pages would give up (and the waiting process run on zeros).
        threading.Thread(target=_drain, args=(sock,), daemon=True).start()
        try:
            (plan_dir / SERVE_LOG).write_text(f"serving the kernel's memory from the store failed: {e}\n")
            print("failed", flush=True)
        except OSError:
            pass  # the server and its folder are gone: below, the tree is stopped all the same
        with os.fdopen(tree_fd) as tree:
            root, rest = tree.readline().strip(), tree.read()  # until the restore is done with the tree
        if "handled" not in rest and root.isdigit() and int(root) > 0:
            try:  # the server went away: nobody else will stop it
                os.kill(int(root), signal.SIGKILL)
            except ProcessLookupError:
                pass
        return 1
    finally:
        sock.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
