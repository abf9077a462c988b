"""store_page_server without CRIU: a plan made from images written here (a
pagemap made with pycriu, pages of random and of repetitive bytes: stored as
is and compressed), answered over a socket pair as `criu lazy-pages` asks
(criu/page-xfer.c: struct page_server_iov, PS_IOV_GET, the close)."""

from __future__ import annotations

import io
import socket
import struct
import threading

import fsspec
import numpy as np
import pycriu
import pytest

from jupyter_ckpt import store_page_server as sps
from jupyter_ckpt.chunks import ChunkStore
from jupyter_ckpt.errors import SnapshotNotRestorable

PAGE = 4096
PID = 7
LAZY_AT, LAZY_PAGES = 0x7F0000000000, 600  # over 2 MiB: served
SMALL_AT, SMALL_PAGES = 0x7F0000400000, 8  # CRIU's lazy, under 2 MiB: written out
SHARED_AT, SHARED_PAGES = 0x7F0000500000, 3  # not lazy
REQUEST = struct.Struct("<I4xQQQ")


def pagemap(entries: list[tuple[int, int, int]]) -> bytes:
    image = {
        "magic": "PAGEMAP",
        "entries": [{"pages_id": 1}]
        + [{"vaddr": v, "compat_nr_pages": 0, "nr_pages": n, "flags": f} for v, n, f in entries],
    }
    out = io.BytesIO()
    pycriu.images.dump(image, out)
    return out.getvalue()


@pytest.fixture
def planned(tmp_path):
    """A snapshot's images in a chunk store, prepared for serving."""
    rng = np.random.default_rng(3)
    lazy = rng.integers(0, 256, LAZY_PAGES * PAGE, np.uint8)
    lazy[300 * PAGE :] = np.arange(300 * PAGE, dtype=np.uint8) % 7  # compresses: a zstd frame
    small = rng.integers(0, 256, SMALL_PAGES * PAGE, np.uint8)
    shared = rng.integers(0, 256, SHARED_PAGES * PAGE, np.uint8)
    source = tmp_path / "source"
    source.mkdir()
    lazy_flags, eager_flags = sps.PE_PRESENT | sps.PE_LAZY, sps.PE_PRESENT
    (source / f"pagemap-{PID}.img").write_bytes(
        pagemap(
            [
                # One mapping CRIU cut into two entries: merged, and served as one run.
                (LAZY_AT, 400, lazy_flags),
                (LAZY_AT + 400 * PAGE, LAZY_PAGES - 400, lazy_flags),
                (SMALL_AT, SMALL_PAGES, lazy_flags),
                (SHARED_AT, SHARED_PAGES, eager_flags),
            ]
        )
    )
    (source / "pages-1.img").write_bytes(lazy.tobytes() + small.tobytes() + shared.tobytes())
    chunks = ChunkStore(fsspec.filesystem("file"), str(tmp_path / "store"), tmp_path / "cache")
    files, _ = chunks.put_files(source)
    dest, plan = tmp_path / "images", tmp_path / "plan"
    dest.mkdir()
    plan.mkdir()
    served = sps.prepare(chunks, files, dest, plan)
    yield chunks, dest, plan, served, lazy.tobytes(), small.tobytes() + shared.tobytes()
    chunks.index.close()


def test_prepare_writes_what_criu_reads_itself_and_plans_the_rest(planned):
    chunks, dest, _, served, _, eager = planned
    assert served == LAZY_PAGES * PAGE
    # The small lazy run is eager now; the large one (two entries) stays lazy.
    with open(dest / f"pagemap-{PID}.img", "rb") as f:
        flags = [int(e["flags"]) for e in pycriu.images.load(f)["entries"][1:]]
    assert [bool(f & sps.PE_LAZY) for f in flags] == [True, True, False, False]
    pages = (dest / "pages-1.img").read_bytes()
    assert pages[LAZY_PAGES * PAGE :] == eager
    assert pages[: LAZY_PAGES * PAGE] == bytes(LAZY_PAGES * PAGE)  # a hole, read back as zeros


def serve_in_thread(plan):
    ours, criu = socket.socketpair()
    server = sps.PlanServer(plan)
    errors: list[Exception] = []

    def run():
        try:
            server.serve(ours)
        except Exception as e:
            errors.append(e)
        finally:
            ours.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return criu, thread, errors


def ask(criu, vaddr, nr_pages, pid=PID):
    criu.sendall(REQUEST.pack(sps.PS_IOV_GET, nr_pages, vaddr, pid))
    header = recv_exactly(criu, REQUEST.size)
    cmd, count, at, who = REQUEST.unpack(header)
    return cmd, count, at, who, recv_exactly(criu, count * PAGE)


def recv_exactly(sock, n):
    data = b""
    while len(data) < n:
        more = sock.recv(n - len(data))
        assert more, "the serving side closed the connection"
        data += more
    return data


def test_answers_as_criu_lazy_pages_expects(planned):
    _, _, plan, _, lazy, _ = planned
    criu, thread, errors = serve_in_thread(plan)
    # A fault: one page, echoed address and pid, PS_IOV_ADD_F with PE_PRESENT in the flags.
    cmd, count, at, who, data = ask(criu, LAZY_AT + 5 * PAGE, 1)
    assert (cmd & 0xFFFF, cmd >> 16, count, at, who) == (sps.PS_IOV_ADD_F, sps.PE_PRESENT, 1, LAZY_AT + 5 * PAGE, PID)
    assert data == lazy[5 * PAGE : 6 * PAGE]
    # A background transfer across CRIU's two entries and through the compressed frame.
    _, count, _, _, data = ask(criu, LAZY_AT + 250 * PAGE, 300)
    assert count == 300 and data == lazy[250 * PAGE : 550 * PAGE]
    # Asked past the run's end: fewer pages, as CRIU allows.
    _, count, _, _, data = ask(criu, LAZY_AT + 590 * PAGE, 64)
    assert count == 10 and data == lazy[590 * PAGE :]
    criu.sendall(REQUEST.pack(sps.PS_IOV_FORCE_CLOSE, 0, 0, 0))
    assert struct.unpack("<i", recv_exactly(criu, 4)) == (0,)
    thread.join(10)
    assert not errors


@pytest.mark.parametrize(
    "vaddr, pid", [(SMALL_AT, PID), (SHARED_AT, PID), (LAZY_AT, PID + 1)], ids=["eager", "not-lazy", "other-pid"]
)
def test_a_request_for_a_page_it_does_not_serve_ends_the_serving(planned, vaddr, pid):
    _, _, plan, _, _, _ = planned
    criu, thread, errors = serve_in_thread(plan)
    criu.sendall(REQUEST.pack(sps.PS_IOV_GET, 1, vaddr, pid))
    thread.join(10)
    assert len(errors) == 1 and isinstance(errors[0], SnapshotNotRestorable)
    assert criu.recv(1) == b""  # nothing was answered


def test_a_damaged_compressed_frame_is_refused(planned):
    chunks, _, plan, _, _, _ = planned
    server = sps.PlanServer(plan)
    runs, rows, hashes, packs, name = server.files[PID]
    hashes[400] ^= 1  # the compressed part: as if its bytes no longer matched
    with pytest.raises(SnapshotNotRestorable, match="chunk 400 is corrupt"):
        server.pages(PID, LAZY_AT + 390 * PAGE, 20)
    assert len(server.pages(PID, LAZY_AT, 20)[1]) == 20


def test_a_pack_cut_short_is_refused_before_serving(planned, tmp_path):
    _, _, plan, _, _, _ = planned
    for pack in (tmp_path / "store" / "packs").glob("*.pack"):
        with open(pack, "r+b") as f:
            f.truncate(pack.stat().st_size // 2)
    with pytest.raises(SnapshotNotRestorable, match="shorter than its index says"):
        sps.PlanServer(plan)


def test_an_unknown_request_and_a_pack_cut_short_while_serving_end_the_serving(planned, tmp_path):
    _, _, plan, _, _, _ = planned
    criu, thread, errors = serve_in_thread(plan)
    criu.sendall(REQUEST.pack(3, 1, LAZY_AT, PID))  # PS_IOV_OPEN: a dump's request, never a restore's
    thread.join(10)
    assert "unexpected page server request 0x3" in str(errors[0])
    server = sps.PlanServer(plan)  # the packs whole when it starts, then cut short
    for pack in (tmp_path / "store" / "packs").glob("*.pack"):
        with open(pack, "r+b") as f:
            f.truncate(1)
    with pytest.raises(SnapshotNotRestorable, match="ends before chunk 0"):
        server.pages(PID, LAZY_AT, 1)
