"""The versioned store of snapshots (records: records.py).

Layout of a store (directories 0700, files 0600: a snapshot holds all of a
kernel's memory, secrets included)::

    <root>/manifests/<id>.manifest   committed snapshots, signed (manifest.py)
    <root>/packs/                    their deduplicated chunks (chunks.py)
    <state>/records/<id>.json        snapshots being dumped or stored, or failed
    <state>/staging/<id>/            CRIU's images before they are stored, and
                                     the snapshot's notebook (NOTEBOOK_FILE)
    <state>/images/<kernel>/<id>/    the same images after, for each kernel's
                                     latest snapshot (a restore from them skips
                                     the store's chunks; see image_cache_bytes)
    <state>/cache/                   the local index of the chunks
    <state>/tmp/                     scratch (images materialized for a restore)
    <root>.key                       the manifests' HMAC key, outside the store

<root> is a local directory or an fsspec URL (s3://...); <state> is local, by
default <root>/state. Usable without a server: the CLI and tests open a store
on a directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec

from . import manifest, store_page_server
from .chunks import Assembled, ChunkStore, Reference, StoredFile, is_local
from .dirty_tracking import IncrementalDump, WholePages, write_whole_pagemap, write_whole_pages
from .errors import CheckpointError, QuotaExceeded, SnapshotNotFound, SnapshotNotRestorable
from .image_cache import ImageCache
from .pack_format import file_digest
from .pack_reader import FileIdentity, file_identity, map_file
from .page_layout import PAGE, page_addresses, same_addresses
from .private_files import load_or_create_key, private_dir, write_private_atomic
from .records import SNAPSHOT_ID, SnapshotRecord, check_snapshot_id
from .store_page_server import ServingMemory

# Images of the latest snapshots kept next to the store, for quick restores.
DEFAULT_IMAGE_CACHE_BYTES = 8 << 30
# The notebook document a snapshot belongs to, stored beside its images (and so
# deduplicated, signed and carried by bundles like them); never given to CRIU.
NOTEBOOK_FILE = "notebook.ipynb"
MAX_NOTEBOOK_BYTES = 64 << 20  # held in memory when read: bounded


@dataclass
class _Unkept:
    """A snapshot stored from its incremental dump's plan, whose whole pages
    files are not written yet (SnapshotStore.keep_whole)."""

    files: list[StoredFile]
    hashed: dict[str, FileIdentity]  # what was hashed (the dump's own pages too), as it was then
    incremental: IncrementalDump
    # The parent pages files' links (inode, size, modification time), when
    # their chunks' hashes were taken as theirs.
    parents: dict[str, tuple[int, int, int]]


class SharedExclusive:
    """Many holders at once (storing, reading chunks) or one alone (gc, which
    deletes packs that nothing it can see refers to yet)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._waiting = 0  # for shared: they go first, gc can wait
        self._exclusive = False

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            self._cond.wait_for(lambda: not self._exclusive)
            self._waiting -= 1
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive and not self._shared and not self._waiting)
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


class SnapshotStore:
    """Versioned snapshots: committed ones as signed manifests over shared,
    deduplicated chunks on a backend (a local directory, or any fsspec URL such
    as s3://bucket/prefix); in-flight and failed ones as local records.

    A snapshot is restorable only once its manifest is written, after its
    chunks: a crash at any moment leaves no half snapshot listed as complete,
    and at worst chunks that ``gc`` reclaims. Every call blocks: the server
    runs them in worker threads.
    """

    def __init__(
        self,
        url: str | os.PathLike[str],
        state_dir: str | os.PathLike[str] | None = None,
        key_path: str | os.PathLike[str] | None = None,
        storage_options: dict[str, Any] | None = None,
        image_cache_bytes: int = DEFAULT_IMAGE_CACHE_BYTES,
        quota_bytes: int = 0,
    ):
        self.url = str(url)
        self.quota_bytes = quota_bytes  # 0: none
        self.fs, root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        self.root = root.rstrip("/")
        local = is_local(self.fs)
        if local:
            private_dir(self.root)
        if state_dir is None:
            if not local:
                raise ValueError("a store on a remote backend needs a local state_dir")
            state_dir = Path(self.root) / "state"
        self.state = Path(state_dir)
        # The key must not live in the store: write access to the store alone
        # must not be enough to forge a snapshot.
        self.key_path = Path(key_path) if key_path else Path(f"{self.root if local else self.state}.key")
        for d in (self.state, self.state / "records", self.state / "staging", self.state / "tmp"):
            private_dir(d)
        # Scratch a previous run left; this run's own goes when its operation ends.
        self._previous_scratch = list((self.state / "tmp").iterdir())
        self.key = load_or_create_key(self.key_path)
        self.chunks = ChunkStore(self.fs, self.root, self.state / "cache")
        self.chunks.makedirs("manifests")
        self.kept_images = ImageCache(self.state / "images", image_cache_bytes)
        # Within this process, gc never runs while chunks are stored or read.
        # (Another process's gc on the same store is not excluded: see gc.)
        self.gate = SharedExclusive()
        # A manifest read, changed and written again (a label, digests) is not
        # written over by another such change, nor brought back after a delete.
        self._manifest_edit = threading.Lock()
        self._unkept: dict[str, _Unkept] = {}  # by snapshot id, until keep_whole

    @property
    def backend(self) -> str:
        """'local', or the fsspec protocol of a remote store ('s3', ...)."""
        if self.chunks.local:
            return "local"
        protocol = self.fs.protocol
        return protocol if isinstance(protocol, str) else protocol[0]

    # -- paths --------------------------------------------------------------------

    def _manifest_path(self, snapshot_id: str) -> str:
        return f"{self.root}/manifests/{check_snapshot_id(snapshot_id)}.manifest"

    def _record_path(self, snapshot_id: str) -> Path:
        return self.state / "records" / f"{check_snapshot_id(snapshot_id)}.json"

    def staging_dir(self, snapshot_id: str) -> Path:
        return self.state / "staging" / check_snapshot_id(snapshot_id)

    # -- records ------------------------------------------------------------------

    def create(self, record: SnapshotRecord) -> Path:
        """Register a new snapshot; returns the empty local directory CRIU dumps into."""
        d = self.staging_dir(record.id)
        d.mkdir(mode=0o700)
        self.save(record)
        return d

    def save(self, record: SnapshotRecord) -> None:
        """Pending and failed records: a local file. Complete ones: re-sign the manifest."""
        if record.status == "complete":
            _, files = self.read_manifest(record.id)
            self._write_manifest(record, files)
        else:
            write_private_atomic(self._record_path(record.id), json.dumps(record.to_json(), indent=1).encode())

    def stage_notebook(self, record: SnapshotRecord, document: bytes) -> None:
        """Add the notebook document to a snapshot being taken (stored by commit)."""
        write_private_atomic(self.staging_dir(record.id) / NOTEBOOK_FILE, document)

    def notebook(self, snapshot_id: str) -> bytes:
        """The notebook document stored with a complete snapshot, verified;
        SnapshotNotFound (with the reason) when it has none."""
        record, files = self.read_manifest(snapshot_id)
        stored = next((f for f in files if f.name == NOTEBOOK_FILE), None)
        if stored is None:
            why = "it was taken of a kernel with no notebook" if not record.path else "it was taken without one"
            raise SnapshotNotFound(f"snapshot {snapshot_id} holds no notebook: {why}")
        if stored.size > MAX_NOTEBOOK_BYTES:  # an imported bundle may claim anything
            raise SnapshotNotRestorable(f"the notebook of snapshot {snapshot_id} is larger than notebooks are kept")
        return b"".join(bytes(chunk) for chunk in self.read_chunks(stored))

    def commit(
        self, record: SnapshotRecord, started: float | None = None, incremental: IncrementalDump | None = None
    ) -> SnapshotRecord:
        """Chunk, compress and store the staged images, then write the manifest.

        Returns the complete record; ``record`` itself is left as it was, so
        nobody sees "complete" before the manifest is durably written.
        ``started`` (time.monotonic()) sets the record's total_seconds.
        ``incremental``: the staged images hold only the pages written since
        the kernel's kept snapshot. Where that snapshot's pages files are as
        this process kept them, the whole pages files are stored from the plan
        (the unchanged pages are the kept snapshot's chunks, not read again)
        and written after the manifest, by ``keep_whole``, which the caller
        then runs (the kernel need not wait for it); otherwise they are made
        whole first."""
        staging = self.staging_dir(record.id)
        hashed: dict[str, FileIdentity] = {}
        assembled: dict[str, Assembled] = {}
        parents: dict[str, tuple[int, int, int]] = {}
        copies = None
        with self.gate.shared():  # until the manifest refers to the chunks: gc would take them
            if incremental is not None:
                assembled = self._assembled(record.kernel_id, staging, incremental, parents)
                copies = (incremental.base_id, self._make_whole(staging, incremental, assembled))
            # CRIU writes them 0644 (in a private directory). Before hashing: a
            # chmod changes a file's identity (ImageCache.keep compares it).
            for image in staging.iterdir():
                image.chmod(0o600)
            unstored = frozenset(a.source.name for a in assembled.values())
            references = self._kept_references(record.kernel_id, staging, copies, unstored)
            files, stats = self.chunks.put_files(staging, references, hashed, assembled)
            done = SnapshotRecord.from_json({**record.to_json(), "status": "complete", "error": None})
            done.stored_bytes = stats.new_bytes
            if started is not None:
                done.total_seconds = round(time.monotonic() - started, 4)
            self._write_manifest(done, files)
        if incremental is not None and assembled:
            self._unkept[done.id] = _Unkept(files, hashed, incremental, parents)
        else:
            self.kept_images.keep(done, staging, files, hashed)
        self._record_path(record.id).unlink(missing_ok=True)
        return done

    def _assembled(
        self, kernel_id: str, staging: Path, incremental: IncrementalDump, parents: dict[str, tuple[int, int, int]]
    ) -> dict[str, Assembled]:
        """The whole pages files of ``incremental``, to be stored from their
        pieces: only if each parent pages file is the kernel's latest kept one,
        as this process kept it with its manifest's digest (its chunks' hashes
        are then those of its bytes), and its link in ``incremental.parent`` is
        that very file (noted in ``parents``). Else none (they are made whole
        first)."""
        kept = self.kept_images.latest(kernel_id)
        if kept is None or kept[0] != incremental.base_id:
            return {}
        try:
            _, files = self.read_manifest(incremental.base_id)
        except CheckpointError:
            return {}
        by_name = {f.name: f for f in files}
        assembled = {}
        for plan in incremental.plans:
            stored = by_name.get(plan.parent_pages)
            path, link = kept[1] / plan.parent_pages, incremental.parent / plan.parent_pages
            try:
                if stored is None or stored.chunk_size != PAGE or not self.kept_images.holds(path, stored.digest):
                    return {}
                parents[plan.parent_pages] = file_identity(link)[:3]
                if parents[plan.parent_pages] != file_identity(path)[:3]:
                    return {}
            except OSError:
                return {}
            # parent_chunks() counts pages: chunks of pages files are pages.
            assembled[plan.name] = Assembled(plan.parent_chunks(), staging / plan.pages, stored)
        return assembled

    @staticmethod
    def _make_whole(staging: Path, incremental: IncrementalDump, assembled: dict[str, Assembled]) -> dict[str, Any]:
        """Before storing: the whole pagemaps, and the whole pages files not
        stored from their pieces. Returns which pages of those were copied."""
        copies = {}
        for plan in incremental.plans:
            if plan.name not in assembled:
                write_whole_pages(staging, incremental.parent, plan)
                copies[plan.name] = plan.copied()
            write_whole_pagemap(staging, plan)
            if plan.name not in assembled:
                (staging / plan.pages).unlink()
        (staging / "parent").unlink(missing_ok=True)
        return copies

    def waiting_to_keep(self, snapshot_id: str) -> bool:
        """Whether ``keep_whole`` is still to run for this snapshot."""
        return snapshot_id in self._unkept

    def keep_whole(self, done: SnapshotRecord) -> bool:
        """After ``commit`` stored an incremental dump's pages from its plan:
        write the whole pages files, add their digests to the manifest (a
        restore then checks a kept copy, or one assembled from the chunks, as
        a whole) and keep the images. The dump's pages must be as they were
        when hashed, and the parent's as when their hashes were taken, before
        and after the copy. False, with the staged images dropped, if not, or
        if the snapshot was deleted meanwhile; the snapshot stays complete
        (restorable from its chunks) either way."""
        unkept = self._unkept.pop(done.id, None)
        if unkept is None:
            return False
        staging, incremental, hashed = self.staging_dir(done.id), unkept.incremental, unkept.hashed

        def unchanged(plan: WholePages) -> bool:
            own = file_identity(staging / plan.pages) == hashed.get(plan.pages)
            return (
                own and file_identity(incremental.parent / plan.parent_pages)[:3] == unkept.parents[plan.parent_pages]
            )

        try:
            for plan in incremental.plans:
                if not unchanged(plan):
                    raise ValueError(f"{plan.pages} or {plan.parent_pages} changed since the snapshot was stored")
                write_whole_pages(staging, incremental.parent, plan)
                if not unchanged(plan):
                    raise ValueError(f"{plan.pages} or {plan.parent_pages} changed while they were copied")
                (staging / plan.pages).unlink()
            digests = {}
            for plan in incremental.plans:
                before = file_identity(staging / plan.name)
                digests[plan.name] = file_digest(map_file(staging / plan.name))
                if file_identity(staging / plan.name) == before:
                    hashed[plan.name] = before
            files = [dataclasses.replace(f, digest=digests.get(f.name, f.digest)) for f in unkept.files]
            with self._manifest_edit:
                record, _ = self.read_manifest(done.id)  # relabelled meanwhile: that label
                self._write_manifest(record, files)
        except (OSError, ValueError, CheckpointError):
            shutil.rmtree(staging, ignore_errors=True)
            return False
        self.kept_images.keep(done, staging, files, hashed)
        return True

    def link_kept(self, kernel_id: str, snapshot_id: str) -> Path | None:
        """Hard links to the kept images of ``snapshot_id``, if they are the
        kernel's latest kept ones, in a scratch directory the caller removes:
        an incremental dump's parent, which the cache may then drop meanwhile."""
        links = self.new_scratch_dir("parent-")
        if not self.kept_images.link_all(kernel_id, snapshot_id, links):
            shutil.rmtree(links, ignore_errors=True)
            return None
        return links

    def _kept_references(
        self,
        kernel_id: str,
        images: Path | None = None,
        copies: tuple[str, dict[str, Any]] | None = None,
        unstored: frozenset[str] = frozenset(),
    ) -> dict[str, Reference]:
        """The kernel's kept images of its previous snapshot, each checked
        against that snapshot's (verified) manifest, by file name: what the
        files of ``images`` are compared with before anything is hashed. A
        memory image is compared page by page with the pages at the same
        addresses in the kept one (page_layout), wherever they are in it.
        ``unstored``: files of ``images`` that are not stored as they are."""
        kept = self.kept_images.latest(kernel_id)
        if kept is None:
            return {}
        snapshot_id, folder = kept
        try:
            _, files = self.read_manifest(snapshot_id)
        except CheckpointError:  # deleted meanwhile, or damaged: hash everything
            return {}
        references: dict[str, Reference] = {}

        def reference(name: str) -> Reference | None:
            if name not in references and name in stored_files:
                path, stored = folder / name, stored_files[name]
                found = Reference.of(path, stored, self.kept_images.holds(path, stored.digest))
                if found is not None:
                    references[name] = found
            return references.get(name)

        stored_files = {stored.name: stored for stored in files}
        if images is None:
            return {name: r for name in stored_files if (r := reference(name)) is not None}
        # Only what the staged files are compared with is mapped (and checked).
        for staged in images.iterdir():
            if staged.name not in unstored:
                reference(staged.name)
        old_layout = {pagemap: (name, at) for name, (pagemap, at) in page_addresses(folder).items()}
        copied = copies[1] if copies is not None and copies[0] == snapshot_id else {}
        by_address = {}
        for name, (pagemap, addresses) in page_addresses(images).items():
            old_name, old_addresses = old_layout.get(pagemap, ("", None))
            old = reference(old_name) if old_addresses is not None else None
            if old is not None:
                marks = copied.get(name)
                by_address[name] = Reference(
                    old.data,
                    old.stored,
                    same_addresses(addresses, old_addresses),
                    marks if marks is not None and len(marks) == len(addresses) else None,
                )
        return {**references, **by_address}

    def commit_imported(self, record: SnapshotRecord, directory: Path, expected: list[StoredFile]) -> SnapshotRecord:
        """Store the verified files of an imported snapshot (in ``directory``),
        whose chunks must be exactly ``expected``, and sign its manifest here."""
        with self.gate.shared():  # until the manifest refers to the chunks: gc would take them
            files, stats = self.chunks.put_files(directory)
            if [f.chunks for f in files] != [f.chunks for f in expected]:
                raise SnapshotNotRestorable("bundle: its files do not match its manifest")
            record.stored_bytes = stats.new_bytes
            self._write_manifest(record, files)
        return record

    def exists(self, snapshot_id: str) -> bool:
        return self.fs.exists(self._manifest_path(snapshot_id)) or self._record_path(snapshot_id).exists()

    def fail(self, record: SnapshotRecord, reason: str) -> None:
        """Keep the record with its reason; drop whatever images were written."""
        self._unkept.pop(record.id, None)
        shutil.rmtree(self.staging_dir(record.id), ignore_errors=True)
        record.status, record.error = "failed", reason
        self.save(record)

    def relabel(self, snapshot_id: str, label: str) -> SnapshotRecord:
        """Change a snapshot's label; a damaged one is refused (nothing written)."""
        with self._manifest_edit:
            if self.fs.exists(self._manifest_path(snapshot_id)):
                record, files = self.read_manifest(snapshot_id)
                record.label = label
                self._write_manifest(record, files)
                return record
        path = self._record_path(snapshot_id)
        if not path.exists():
            raise SnapshotNotFound(f"no snapshot with id {snapshot_id!r}")
        record = self._read_record(path)
        record.label = label
        self.save(record)
        return record

    def _write_manifest(self, record: SnapshotRecord, files: list[StoredFile]) -> None:
        # Shared (callers may hold it already): gc removes stray manifest part files.
        data = manifest.encode(record.to_json(), files, self.key)
        with self.gate.shared():
            self.chunks.write_atomic(f"manifests/{record.id}.manifest", data)

    def manifest_bytes(self, snapshot_id: str) -> bytes:
        """The signed manifest as stored (a bundle carries it as is)."""
        try:
            return self.fs.cat_file(self._manifest_path(snapshot_id))
        except FileNotFoundError:
            raise SnapshotNotFound(f"no snapshot with id {snapshot_id!r}") from None
        except OSError as e:  # a directory in its place, unreadable, ...
            raise SnapshotNotRestorable(f"the manifest of snapshot {snapshot_id} cannot be read: {e}") from None

    def read_manifest(self, snapshot_id: str) -> tuple[SnapshotRecord, list[StoredFile]]:
        """The verified record and files of a committed snapshot."""
        data = self.manifest_bytes(snapshot_id)
        fields_, files = manifest.decode(data, self.key, name=f"the manifest of snapshot {snapshot_id}")
        return SnapshotRecord.from_json(fields_), files

    def read_chunks(self, stored: StoredFile) -> Iterator[memoryview]:
        """A stored file's bytes, chunk by chunk, each verified."""
        with self.gate.shared():
            yield from self.chunks.read_file(stored)

    @staticmethod
    def _read_record(path: Path) -> SnapshotRecord:
        try:
            return SnapshotRecord.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            raise
        except (OSError, ValueError, TypeError) as e:
            raise SnapshotNotRestorable(f"the record {path.name} cannot be read: {e}") from None

    def get(self, snapshot_id: str) -> SnapshotRecord:
        """Any snapshot; one whose manifest cannot be read or verified is
        returned as failed, with the reason."""
        path = self._manifest_path(snapshot_id)
        if self.fs.exists(path):
            try:
                return self.read_manifest(snapshot_id)[0]
            except SnapshotNotRestorable as e:
                return SnapshotRecord(id=snapshot_id, kernel_id="", status="failed", error=str(e))
        try:
            return self._read_record(self._record_path(snapshot_id))
        except FileNotFoundError:
            raise SnapshotNotFound(f"no snapshot with id {snapshot_id!r}") from None
        except SnapshotNotRestorable as e:
            return SnapshotRecord(id=snapshot_id, kernel_id="", status="failed", error=str(e))

    def ids(self) -> list[str]:
        committed = {
            os.path.basename(p)[: -len(".manifest")] for p in self.chunks.ls("manifests") if p.endswith(".manifest")
        }
        local = {p.stem for p in (self.state / "records").glob("*.json")}
        return sorted((i for i in committed | local if SNAPSHOT_ID.match(i)), reverse=True)

    def list(self, kernel_id: str | None = None, path: str | None = None) -> list[SnapshotRecord]:
        """Newest first."""
        out = []
        for snapshot_id in self.ids():
            try:
                rec = self.get(snapshot_id)
            except SnapshotNotFound:
                continue  # deleted meanwhile
            if kernel_id and rec.kernel_id != kernel_id:
                continue
            if path and rec.path != path:
                continue
            out.append(rec)
        return out

    def delete(self, snapshot_id: str) -> None:
        found = False
        path = self._manifest_path(snapshot_id)
        with self._manifest_edit:
            if self.fs.exists(path):
                if self.fs.isdir(path):
                    self.fs.rm(path, recursive=True)
                else:
                    self.fs.rm_file(path)
                found = True
        record = self._record_path(snapshot_id)
        if record.exists() or record.is_symlink():
            if record.is_dir() and not record.is_symlink():
                shutil.rmtree(record)
            else:
                record.unlink()
            found = True
        shutil.rmtree(self.staging_dir(snapshot_id), ignore_errors=True)
        self.kept_images.drop(snapshot_id)
        if not found:
            raise SnapshotNotFound(f"no snapshot with id {snapshot_id!r}")

    def dump_logs(self) -> list[Path]:
        """CRIU's logs of dumps a previous run left (read before recover() removes them)."""
        return sorted([*self.state.glob("staging/*/dump.log"), *self.state.glob("tmp/*/*/dump.log")])

    def recover(self) -> list[str]:
        """After a crash or restart: snapshots left dumping or storing are failed."""
        failed = []
        for p in (self.state / "records").glob("*.json"):
            try:
                rec = self._read_record(p)
            except (OSError, SnapshotNotRestorable):
                continue  # listed as failed, with the reason
            if rec.status in ("pending", "dumping", "storing"):
                self.fail(rec, "the server stopped before this snapshot was stored")
                failed.append(rec.id)
        for d in (self.state / "staging").iterdir():
            if not SNAPSHOT_ID.match(d.name) or not self._record_path(d.name).exists():
                shutil.rmtree(d, ignore_errors=True)
        for part in (self.state / "cache").glob("*.part"):
            part.unlink()  # a pack cut short before its upload
        self.kept_images.drop_unless(lambda snapshot_id: self.fs.exists(self._manifest_path(snapshot_id)))
        return failed

    # -- restore ------------------------------------------------------------------

    def materialize(self, snapshot_id: str, dest: Path) -> SnapshotRecord:
        """Write the snapshot's images into ``dest``, every byte verified:
        linked from the local copy kept at commit when it still matches the
        manifest's digests, else assembled from the store's chunks and the
        kernel's latest kept images (where they hold the same chunks)."""
        record, files = self.read_manifest(snapshot_id)
        files = [f for f in files if f.name != NOTEBOOK_FILE]
        if not self.kept_images.link(record, files, dest):
            with self.gate.shared():  # an older snapshot: the latest's kept images hold most of it
                self.chunks.materialize(files, dest, self._kept_references(record.kernel_id))
        return record

    def materialize_serving_memory(self, snapshot_id: str, dest: Path, work: Path) -> ServingMemory | None:
        """For a lazy restore of a snapshot with no kept images: write into
        ``dest`` the images CRIU reads itself (checked), and start serving the
        rest of its memory from the store's chunks (store_page_server), with
        its plan in ``work``. None where the images are kept, the store is not
        on a local disk, or the snapshot has no memory to serve: the images are
        then all in ``dest``, as ``materialize`` leaves them."""
        if not self.chunks.local:
            self.materialize(snapshot_id, dest)
            return None
        record, files = self.read_manifest(snapshot_id)
        files = [f for f in files if f.name != NOTEBOOK_FILE]
        if self.kept_images.link(record, files, dest):
            return None
        with self.gate.shared():  # the serving process maps the packs before gc may replace them
            if not store_page_server.prepare(self.chunks, files, dest, work):
                return None  # all written
            return ServingMemory(work)

    # -- space --------------------------------------------------------------------

    def used_bytes(self) -> int:
        """What the complete snapshots added to the store (chunks shared are counted once)."""
        return sum(r.stored_bytes for r in self.list() if r.status == "complete")

    def require_room(self) -> None:
        """QuotaExceeded if the store already holds its quota of bytes."""
        if self.quota_bytes and (used := self.used_bytes()) >= self.quota_bytes:
            raise QuotaExceeded(
                f"the snapshot store is full: it holds {used / 2**20:.1f} MiB of its {self.quota_bytes / 2**20:.1f} "
                "MiB quota; delete snapshots you no longer need (or ask for a larger quota) to take new ones"
            )

    def prune(
        self,
        kernel_id: str | None = None,
        path: str | None = None,
        keep_auto: int = 10,
        byte_budget: int | None = None,
    ) -> list[str]:
        """Retention for one kernel (or notebook): keep its newest ``keep_auto``
        automatic snapshots; manual and magic ones stay until deleted. With a
        ``byte_budget``, also drop the oldest automatic ones while the group's
        stored bytes exceed it. Returns the ids deleted; their chunks stay until
        ``gc``, and only the ones no other snapshot uses go then."""
        group = [r for r in self.list(kernel_id=kernel_id, path=path) if r.status == "complete"]
        auto = [r for r in group if r.trigger == "auto"]  # newest first
        doomed = auto[keep_auto:]
        if byte_budget is not None:
            kept = [r for r in group if r not in doomed]
            total = sum(r.stored_bytes for r in kept)
            for r in reversed([r for r in kept if r.trigger == "auto"]):
                if total <= byte_budget:
                    break
                doomed.append(r)
                total -= r.stored_bytes
        for r in doomed:
            self.delete(r.id)
        return [r.id for r in doomed]

    def gc(self) -> tuple[int, int]:
        """Reclaim chunks no manifest refers to; returns (objects deleted, bytes freed).

        Waits for snapshots being stored and reads of this process. It must not
        run while another process stores into the same store (a server sharing
        it): chunks that process is about to refer to would go."""
        with self.gate.exclusive():
            return self._gc()

    def _gc(self) -> tuple[int, int]:
        referenced: set[bytes] = set()
        for snapshot_id in self.ids():
            if self.fs.exists(self._manifest_path(snapshot_id)):
                try:
                    _, files = self.read_manifest(snapshot_id)
                except SnapshotNotRestorable:
                    continue  # a damaged manifest protects nothing
                except SnapshotNotFound:
                    continue  # deleted since it was listed: it protects nothing either
                referenced.update(h for f in files for h in f.chunks)
        for stray in self.chunks.ls("manifests"):
            if ".part-" in stray:
                self.fs.rm_file(stray)
        return self.chunks.gc(referenced)

    def clear_scratch(self) -> None:
        """At start, once a previous run's leftovers are used: scratch is per run."""
        for d in self._previous_scratch:  # never an operation of this run's (requests come meanwhile)
            shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink(missing_ok=True)
        self._previous_scratch = []

    def new_scratch_dir(self, prefix: str = "op-") -> Path:
        """A private local directory; the caller removes it."""
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.state / "tmp"))

    @contextmanager
    def scratch_dir(self, prefix: str = "op-") -> Iterator[Path]:
        """A private local directory, removed afterwards."""
        d = self.new_scratch_dir(prefix)
        try:
            yield d
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def close(self) -> None:
        self.chunks.close()
