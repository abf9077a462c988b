"""Snapshot records and the versioned store that keeps them.

Layout of a store (directories 0700, files 0600: a snapshot holds all of a
kernel's memory, secrets included)::

    <root>/manifests/<id>.manifest   committed snapshots, signed (manifest.py)
    <root>/packs/                    their deduplicated chunks (chunks.py)
    <state>/records/<id>.json        snapshots being dumped or stored, or failed
    <state>/staging/<id>/            CRIU's images before they are stored
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

import ctypes
import functools
import json
import os
import re
import secrets
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import fsspec

from . import manifest
from .chunks import ChunkStore, StoredFile, _is_local, file_digest, map_file, write_private_atomic
from .errors import InvalidRequest, SnapshotNotFound, SnapshotNotRestorable


# Crockford's base32: ids sort by creation time as plain strings (ULID layout:
# 48 bits of milliseconds, then 80 random bits).
_B32 = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_ID = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")
_KERNEL_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
# Images of the latest snapshots kept next to the store, for quick restores.
DEFAULT_IMAGE_CACHE_BYTES = 8 << 30

STATUSES = ("pending", "dumping", "storing", "complete", "failed")
INTERNAL_FIELDS = ("stdio_keys", "connection")


def new_snapshot_id(now: float | None = None) -> str:
    ms = int((time.time() if now is None else now) * 1000)
    value = (ms << 80) | secrets.randbits(80)
    return "".join(_B32[(value >> shift) & 31] for shift in range(125, -1, -5))


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class SnapshotRecord:
    """One snapshot of one kernel, as listed and returned by the API."""

    id: str
    kernel_id: str
    kernel_name: str = ""
    path: str | None = None  # notebook path, when the server knows it
    label: str = ""
    trigger: str = "manual"  # manual, magic or auto
    parent_id: str | None = None
    created: str = field(default_factory=_now_iso)
    status: str = "pending"
    error: str | None = None
    memory_bytes: int = 0
    stored_bytes: int = 0
    freeze_seconds: float | None = None
    total_seconds: float | None = None
    execution_count: int | None = None
    criu_version: str | None = None
    # Engine data needed to restore: CRIU's names of the pipes that carried the
    # kernel's stdout/stderr, re-attached to fresh pipes on restore.
    stdio_keys: dict[str, str] = field(default_factory=dict)
    # The kernel's ports and message key (secret: never in the API), so that a
    # kernel gone since can be started again with what the snapshot listens on.
    connection: dict[str, Any] = field(default_factory=dict)

    @property
    def restorable(self) -> bool:
        return self.status == "complete"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def public_json(self) -> dict[str, Any]:
        """The API's model: without the engine's data and the kernel's key."""
        data = self.to_json()
        for name in INTERNAL_FIELDS:
            data.pop(name, None)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "SnapshotRecord":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class SnapshotStore:
    """Versioned snapshots: committed ones as signed manifests over shared,
    deduplicated chunks on a backend (a local directory, or any fsspec URL such
    as s3://bucket/prefix); in-flight and failed ones as local records.

    A snapshot is restorable only once its manifest is written, after its
    chunks: a crash at any moment leaves no half snapshot listed as complete,
    and at worst chunks that ``gc`` reclaims.
    """

    def __init__(
        self,
        url: str | os.PathLike[str],
        state_dir: str | os.PathLike[str] | None = None,
        key_path: str | os.PathLike[str] | None = None,
        storage_options: dict[str, Any] | None = None,
        image_cache_bytes: int = DEFAULT_IMAGE_CACHE_BYTES,
    ):
        self.url = str(url)
        self.image_cache_bytes = image_cache_bytes
        self.fs, root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        self.root = root.rstrip("/")
        local = _is_local(self.fs)
        if local:
            Path(self.root).mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.root, 0o700)
        if state_dir is None:
            if not local:
                raise ValueError("a store on a remote backend needs a local state_dir")
            state_dir = Path(self.root) / "state"
        self.state = Path(state_dir)
        # The key must not live in the store: write access to the store alone
        # must not be enough to forge a snapshot.
        self.key_path = Path(key_path) if key_path else Path(f"{self.root if local else self.state}.key")
        for d in (self.state, self.state / "records", self.state / "staging", self.state / "images", self.state / "tmp"):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(d, 0o700)
        self.key = manifest.load_or_create_key(self.key_path)
        self.chunks = ChunkStore(self.fs, self.root, self.state / "cache")
        self.chunks.makedirs("manifests")

    @property
    def backend(self) -> str:
        """'local', or the fsspec protocol of a remote store ('s3', ...)."""
        if _is_local(self.fs):
            return "local"
        protocol = self.fs.protocol
        return protocol if isinstance(protocol, str) else protocol[0]

    # -- paths --------------------------------------------------------------------

    @staticmethod
    def _check_id(snapshot_id: str) -> str:
        # Ids come from URLs: never let one name a path outside the store.
        if not _ID.match(snapshot_id or ""):
            raise SnapshotNotFound(f"no snapshot with id {snapshot_id!r}")
        return snapshot_id

    def _manifest_path(self, snapshot_id: str) -> str:
        return f"{self.root}/manifests/{self._check_id(snapshot_id)}.manifest"

    def _record_path(self, snapshot_id: str) -> Path:
        return self.state / "records" / f"{self._check_id(snapshot_id)}.json"

    def staging_dir(self, snapshot_id: str) -> Path:
        return self.state / "staging" / self._check_id(snapshot_id)

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
            _, files = self._read_manifest(record.id)
            self._write_manifest(record, files)
        else:
            write_private_atomic(self._record_path(record.id), json.dumps(record.to_json(), indent=1).encode())

    def commit(self, record: SnapshotRecord, started: float | None = None) -> SnapshotRecord:
        """Chunk, compress and store the staged images, then write the manifest.

        Returns the complete record; ``record`` itself is left as it was, so
        nobody sees "complete" before the manifest is durably written.
        ``started`` (time.monotonic()) sets the record's total_seconds."""
        staging = self.staging_dir(record.id)
        files, stats = self.chunks.put_files(staging)
        done = SnapshotRecord.from_json({**record.to_json(), "status": "complete", "error": None})
        done.stored_bytes = stats.new_bytes
        if started is not None:
            done.total_seconds = round(time.monotonic() - started, 4)
        self._write_manifest(done, files)
        self._keep_images(done, staging)
        self._record_path(record.id).unlink(missing_ok=True)
        return done

    def fail(self, record: SnapshotRecord, reason: str) -> None:
        """Keep the record with its reason; drop whatever images were written."""
        shutil.rmtree(self.staging_dir(record.id), ignore_errors=True)
        record.status, record.error = "failed", reason
        self.save(record)

    def _write_manifest(self, record: SnapshotRecord, files: list[StoredFile]) -> None:
        data = manifest.encode(record.to_json(), files, self.key)
        self.chunks._write_atomic(f"manifests/{record.id}.manifest", data)

    def _read_manifest(self, snapshot_id: str) -> tuple[SnapshotRecord, list[StoredFile]]:
        try:
            data = self.fs.cat_file(self._manifest_path(snapshot_id))
        except FileNotFoundError:
            raise SnapshotNotFound(f"no snapshot with id {snapshot_id!r}") from None
        fields_, files = manifest.decode(data, self.key, name=f"the manifest of snapshot {snapshot_id}")
        return SnapshotRecord.from_json(fields_), files

    def get(self, snapshot_id: str) -> SnapshotRecord:
        path = self._manifest_path(snapshot_id)
        if self.fs.exists(path):
            try:
                return self._read_manifest(snapshot_id)[0]
            except SnapshotNotRestorable as e:
                return SnapshotRecord(id=snapshot_id, kernel_id="", status="failed", error=str(e))
        try:
            return SnapshotRecord.from_json(json.loads(self._record_path(snapshot_id).read_text()))
        except FileNotFoundError:
            raise SnapshotNotFound(f"no snapshot with id {snapshot_id!r}") from None

    def ids(self) -> list[str]:
        committed = {os.path.basename(p)[: -len(".manifest")] for p in self.chunks.ls("manifests") if p.endswith(".manifest")}
        local = {p.stem for p in (self.state / "records").glob("*.json")}
        return sorted((i for i in committed | local if _ID.match(i)), reverse=True)

    def list(self, kernel_id: str | None = None, path: str | None = None) -> list[SnapshotRecord]:
        """Newest first."""
        out = []
        for snapshot_id in self.ids():
            try:
                rec = self.get(snapshot_id)
            except (SnapshotNotFound, ValueError):
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
        if self.fs.exists(path):
            self.fs.rm_file(path)
            found = True
        record = self._record_path(snapshot_id)
        if record.exists():
            record.unlink()
            found = True
        shutil.rmtree(self.staging_dir(snapshot_id), ignore_errors=True)
        for kept in (self.state / "images").glob(f"*/{snapshot_id}"):
            shutil.rmtree(kept, ignore_errors=True)
        if not found:
            raise SnapshotNotFound(f"no snapshot with id {snapshot_id!r}")

    def recover(self) -> list[str]:
        """After a crash or restart: snapshots left dumping or storing are failed."""
        failed = []
        for p in (self.state / "records").glob("*.json"):
            rec = SnapshotRecord.from_json(json.loads(p.read_text()))
            if rec.status in ("pending", "dumping", "storing"):
                self.fail(rec, "the server stopped before this snapshot was stored")
                failed.append(rec.id)
        for d in (self.state / "staging").iterdir():
            if not _ID.match(d.name) or not self._record_path(d.name).exists():
                shutil.rmtree(d, ignore_errors=True)
        for part in (self.state / "cache").glob("*.part"):
            part.unlink()  # a pack cut short before its upload
        for d in (self.state / "images").glob("*/*"):
            if not _ID.match(d.name) or not self.fs.exists(self._manifest_path(d.name)):
                shutil.rmtree(d, ignore_errors=True)  # kept for a snapshot deleted meanwhile
        return failed

    # -- restore ------------------------------------------------------------------

    def materialize(self, snapshot_id: str, dest: Path) -> SnapshotRecord:
        """Write the snapshot's images into ``dest``, every byte verified:
        linked from the local copy kept at commit when it still matches the
        manifest's digests, else assembled from the store's chunks."""
        record, files = self._read_manifest(snapshot_id)
        if not self._link_kept_images(record, files, dest):
            self.chunks.materialize(files, dest)
        return record

    # -- local copies of the latest images --------------------------------------------

    def _images_dir(self, record: SnapshotRecord) -> Path | None:
        if not _KERNEL_ID.match(record.kernel_id or ""):
            return None  # not a kernel id this server made: never a path
        return self.state / "images" / record.kernel_id / self._check_id(record.id)

    def _keep_images(self, record: SnapshotRecord, staging: Path) -> None:
        """Keep a committed snapshot's staged images (a rename) in place of
        the kernel's previous ones, then drop the oldest kept images beyond
        ``image_cache_bytes``. One copy per kernel: restores mostly go back
        to the latest snapshot, and the memory the previous copy held in the
        page cache serves the next snapshot's dump."""
        target = self._images_dir(record)
        if target is None or self.image_cache_bytes <= 0 or _dir_bytes(staging) > self.image_cache_bytes:
            shutil.rmtree(staging, ignore_errors=True)
            return
        for image in staging.iterdir():
            image.chmod(0o600)  # CRIU writes them 0644 (in a private directory)
            _start_writeback(image)
        for previous in target.parent.glob("*"):
            shutil.rmtree(previous, ignore_errors=True)
        target.parent.mkdir(mode=0o700, exist_ok=True)
        os.rename(staging, target)
        kept = sorted((d for d in (self.state / "images").glob("*/*") if _ID.match(d.name)), key=lambda d: d.name)
        sizes = [_dir_bytes(d) for d in kept]
        total = sum(sizes)
        for d, size in zip(kept, sizes):  # oldest first: ids sort by time
            if total <= self.image_cache_bytes:
                break
            total -= size
            shutil.rmtree(d, ignore_errors=True)

    def _link_kept_images(self, record: SnapshotRecord, files: list[StoredFile], dest: Path) -> bool:
        """Hard-link the kept images into ``dest`` if every file is there and
        matches its digest in the (verified) manifest. A restore may rewrite
        files in ``dest``, always by replacing them: the kept copy stays as is.
        A copy that does not match is dropped; the caller uses the chunks."""
        kept = self._images_dir(record)
        if kept is None or not kept.is_dir():
            return False
        try:
            for stored in files:
                path = kept / stored.name
                if not stored.digest or path.stat().st_size != stored.size or file_digest(map_file(path)) != stored.digest:
                    raise ValueError(f"{path} does not match the snapshot's manifest")
            for stored in files:
                os.link(kept / stored.name, dest / stored.name)
        except (OSError, ValueError):
            shutil.rmtree(kept, ignore_errors=True)
            for stored in files:
                (dest / stored.name).unlink(missing_ok=True)
            return False
        return True

    # -- space --------------------------------------------------------------------

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
        """Reclaim chunks no manifest refers to; returns (objects deleted, bytes freed)."""
        referenced: set[bytes] = set()
        for snapshot_id in self.ids():
            if self.fs.exists(self._manifest_path(snapshot_id)):
                try:
                    _, files = self._read_manifest(snapshot_id)
                except SnapshotNotRestorable:
                    continue  # a damaged manifest protects nothing
                referenced.update(h for f in files for h in f.chunks)
        for stray in self.chunks.ls("manifests"):
            if ".part-" in stray:
                self.fs.rm_file(stray)
        return self.chunks.gc(referenced)

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


def _start_writeback(path: Path) -> None:
    """Have the kernel start writing a file's dirty pages to disk now, in the
    background, rather than during the next snapshot's freeze, where the
    writeback competes with CRIU. The pages stay cached (sync_file_range)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        _libc().sync_file_range(fd, ctypes.c_int64(0), ctypes.c_int64(0), _SYNC_FILE_RANGE_WRITE)
    except (OSError, AttributeError):
        pass  # not Linux's libc: the kernel writes them back in its own time
    finally:
        os.close(fd)


_SYNC_FILE_RANGE_WRITE = 2


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())


def validate_label(label: Any) -> str:
    if label is None:
        return ""
    if not isinstance(label, str) or len(label) > 200 or any(c in label for c in "\n\r\0"):
        raise InvalidRequest("label must be a single line of at most 200 characters")
    return label.strip()
