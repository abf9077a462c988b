"""``jupyter ckpt``: the snapshot store from a terminal.

Works on the store directly (no server needed), except ``restore``, which asks
a running Jupyter server to restore a snapshot into one of its kernels.

Exit codes: 0 done; 1 failed (the reason is printed); 2 bad usage; 3 no such
snapshot; 4 CRIU unusable (``check``).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict
from typing import BinaryIO

from jupyter_core.paths import jupyter_data_dir

from .engine import CriuEngine
from .errors import CheckpointError, SnapshotNotFound
from .helper_client import DEFAULT_SOCKET, HelperEngine
from .manager import CheckpointManager
from .private_files import private_opener
from .records import SnapshotRecord
from .store import SnapshotStore

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_NO_CRIU = 0, 1, 2, 3, 4


def _manager(args: argparse.Namespace) -> CheckpointManager:
    """The facade over the store, without a server (no kernels)."""
    options = json.loads(args.store_options) if args.store_options else None
    store = SnapshotStore(args.store, args.state_dir, args.key, options)
    return CheckpointManager(kernel_manager=None, engine=CriuEngine(), store=store)


def _run(args: argparse.Namespace, call) -> object:
    """Run one facade call (a coroutine function of the manager) to its end."""
    manager = _manager(args)
    try:
        return asyncio.run(call(manager))
    finally:
        manager.close()


def _size(n: int | None) -> str:
    n = n or 0
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _table(records: list[SnapshotRecord]) -> str:
    rows = [("ID", "CREATED", "TRIGGER", "STATUS", "MEMORY", "STORED", "FROZEN", "KERNEL", "LABEL")]
    for r in records:
        frozen = f"{r.freeze_seconds:.2f}s" if r.freeze_seconds is not None else "-"
        rows.append(
            (
                r.id,
                r.created[:19].replace("T", " "),
                r.trigger,
                r.status,
                _size(r.memory_bytes),
                _size(r.stored_bytes),
                frozen,
                r.kernel_id[:8],
                r.label or r.path or "",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)


class _Progress:
    """A one-line byte counter on stderr, when it is a terminal."""

    def __init__(self, stream: BinaryIO, what: str, total: int | None = None):
        self.stream, self.what, self.total, self.done = stream, what, total, 0
        self.show = sys.stderr.isatty()

    def _draw(self) -> None:
        if self.show:
            pct = f" {100 * self.done / self.total:5.1f}%" if self.total else ""
            sys.stderr.write(f"\r{self.what}: {_size(self.done)}{pct}")
            sys.stderr.flush()

    def write(self, data: bytes) -> int:
        self.stream.write(data)
        self.done += len(data)
        self._draw()
        return len(data)

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.done += len(data)
        self._draw()
        return data

    def flush(self) -> None:
        self.stream.flush()

    def close(self) -> None:
        if self.show:
            sys.stderr.write("\n")


# -- commands ---------------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    records = _run(args, lambda m: m.list_snapshots(kernel_id=args.kernel, path=args.path))
    print(json.dumps([r.public_json() for r in records], indent=1) if args.json else _table(records))
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    record = _run(args, lambda m: m.get(args.id))
    if args.json:
        print(json.dumps(record.public_json(), indent=1))
    else:
        for key, value in record.public_json().items():
            print(f"{key:16} {value}")
    return EXIT_OK


def cmd_delete(args: argparse.Namespace) -> int:
    async def delete_all(manager: CheckpointManager) -> None:
        for snapshot_id in args.ids:
            await manager.delete(snapshot_id)
            if not args.json:
                print(f"deleted {snapshot_id}")

    _run(args, delete_all)
    if args.json:
        print(json.dumps({"deleted": args.ids}))
    return EXIT_OK


def cmd_prune(args: argparse.Namespace) -> int:
    if not (args.kernel or args.path):
        print("prune needs --kernel or --path", file=sys.stderr)
        return EXIT_USAGE
    deleted = _run(
        args, lambda m: m.prune(kernel_id=args.kernel, path=args.path, keep_auto=args.keep, byte_budget=args.budget)
    )
    print(json.dumps({"deleted": deleted}) if args.json else f"pruned {len(deleted)} automatic snapshot(s)")
    return EXIT_OK


def cmd_gc(args: argparse.Namespace) -> int:
    objects, freed = _run(args, lambda m: m.gc())
    print(
        json.dumps({"objects_deleted": objects, "bytes_freed": freed})
        if args.json
        else f"gc: deleted {objects} object(s), freed {_size(freed)}"
    )
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    out_path = args.output or f"{args.id}.jckpt"

    async def export(manager: CheckpointManager) -> int:
        await manager.get(args.id)  # no file for a snapshot that does not exist
        # Created 0600: a bundle holds all of a kernel's memory, and its key.
        with open(out_path, "wb", opener=private_opener) as raw:
            os.fchmod(raw.fileno(), 0o600)  # also when it existed before
            progress = _Progress(raw, "exporting", None)
            size = await manager.export_bundle(args.id, progress)  # type: ignore[arg-type]
            progress.close()
        return size

    size = _run(args, export)
    print(json.dumps({"file": out_path, "bytes": size}) if args.json else f"wrote {out_path} ({_size(size)})")
    return EXIT_OK


def cmd_import(args: argparse.Namespace) -> int:
    async def import_(manager: CheckpointManager) -> SnapshotRecord:
        with open(args.file, "rb") as raw:
            progress = _Progress(raw, "importing", os.path.getsize(args.file))
            record = await manager.import_bundle(progress, trust=args.trust)  # type: ignore[arg-type]
            progress.close()
        return record

    record = _run(args, import_)
    print(json.dumps(record.public_json()) if args.json else f"imported {record.id} ({record.status})")
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    if os.geteuid() == 0:
        health = CriuEngine(args.criu or None).health()
    else:
        health = HelperEngine(socket_path=args.helper_socket).health()
    if args.json:
        print(json.dumps(asdict(health)))
    else:
        print(f"CRIU {health.version} at {health.path}: OK" if health.available else f"CRIU unusable: {health.reason}")
    return EXIT_OK if health.available else EXIT_NO_CRIU


def cmd_restore(args: argparse.Namespace) -> int:
    url, token = args.url, args.token
    if not url:
        from jupyter_server.serverapp import list_running_servers

        servers = list(list_running_servers())
        if not servers:
            print("no running Jupyter server found; pass --url and --token", file=sys.stderr)
            return EXIT_FAILED
        url, token = servers[0]["url"], token or servers[0].get("token", "")
    body = {"mode": "replace"}  # into the kernel it was taken from (started again if gone)
    req = urllib.request.Request(
        f"{url.rstrip('/')}/api/ckpt/snapshots/{args.id}/restore",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Authorization": f"token {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=3600) as resp:
            outcome = json.loads(resp.read())
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read()).get("message", str(e))
        except ValueError:
            message = str(e)
        print(f"restore failed ({e.code}): {message}", file=sys.stderr)
        return EXIT_NOT_FOUND if e.code == 404 else EXIT_FAILED
    except urllib.error.URLError as e:
        print(f"cannot reach the server at {url}: {e.reason}", file=sys.stderr)
        return EXIT_FAILED
    print(
        json.dumps(outcome)
        if args.json
        else f"kernel {outcome['kernel_id']} restored from {outcome['snapshot_id']} in {outcome['total_seconds']:.2f} s"
    )
    return EXIT_OK


# -- parser -----------------------------------------------------------------------


def _add_common_options(parser: argparse.ArgumentParser, default: object) -> None:
    """The options every command takes, before or after the command's name."""

    def given(value: object) -> object:
        return value if default is None else default

    parser.add_argument(
        "--store",
        default=given(os.path.join(jupyter_data_dir(), "ckpt")),
        help="store directory or fsspec URL (default: the server's default store)",
    )
    parser.add_argument("--state-dir", default=given(None), help="local state directory (remote stores)")
    parser.add_argument("--key", default=given(None), help="manifest key (default: <store>.key)")
    parser.add_argument("--store-options", default=given(None), help="fsspec options as JSON (remote stores)")
    parser.add_argument("--json", action="store_true", default=given(False), help="machine-readable output")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    _add_common_options(common, argparse.SUPPRESS)  # after the subcommand: only when given
    parser = argparse.ArgumentParser(prog="jupyter ckpt", description="Manage jupyter-ckpt snapshots.")
    _add_common_options(parser, None)
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser = functools.partial(sub.add_parser, parents=[common])

    p = add_parser("list", help="snapshots, newest first")
    p.add_argument("--kernel")
    p.add_argument("--path", help="notebook path")
    p.set_defaults(func=cmd_list)
    p = add_parser("show", help="one snapshot")
    p.add_argument("id")
    p.set_defaults(func=cmd_show)
    p = add_parser("delete", help="delete snapshots (space returns at the next gc)")
    p.add_argument("ids", nargs="+")
    p.set_defaults(func=cmd_delete)
    p = add_parser("prune", help="keep a kernel's or notebook's newest automatic snapshots")
    p.add_argument("--kernel")
    p.add_argument("--path")
    p.add_argument("--keep", type=int, default=10)
    p.add_argument("--budget", type=int, default=None, help="byte budget for the group")
    p.set_defaults(func=cmd_prune)
    p = add_parser("gc", help="reclaim space no snapshot uses")
    p.set_defaults(func=cmd_gc)
    p = add_parser("export", help="write a snapshot as one bundle file")
    p.add_argument("id")
    p.add_argument("-o", "--output")
    p.set_defaults(func=cmd_export)
    p = add_parser("import", help="import a bundle file")
    p.add_argument("file")
    p.add_argument("--trust", action="store_true", help="accept a bundle signed with another store's key")
    p.set_defaults(func=cmd_import)
    p = add_parser("check", help="is CRIU usable here (for a user other than root: through the helper)?")
    p.add_argument("--criu", default=None, help="the criu binary")
    p.add_argument("--helper-socket", default=DEFAULT_SOCKET, help="the helper's socket (users other than root)")
    p.set_defaults(func=cmd_check)
    p = add_parser("restore", help="restore a snapshot through a running server")
    p.add_argument("id")
    p.add_argument("--url", help="server URL (default: the first running server)")
    p.add_argument("--token", default="", help="server token")
    p.set_defaults(func=cmd_restore)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SnapshotNotFound as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except (CheckpointError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as e:  # a store backend's own (botocore's, say): the reason, not a traceback
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
