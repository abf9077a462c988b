"""`jupyter ckpt` commands, run as real processes."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import subprocess
import sys

import pytest

from jupyter_ckpt import cli
from jupyter_ckpt.records import SnapshotRecord, new_snapshot_id
from jupyter_ckpt.store import SnapshotStore

from .client import snapshot
from .test_store import commit


def ckpt(store_dir, *args: str) -> subprocess.CompletedProcess:
    """One `jupyter ckpt` command, run in this process (its exit code, stdout and
    stderr); the tests below that need a real process say so."""
    argv = ["--store", str(store_dir), *args]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as e:  # argparse's bad usage
            code = e.code
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def ckpt_process(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jupyter_ckpt.cli", *args], capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def filled(tmp_path):
    store = SnapshotStore(tmp_path / "store")
    t = 1_800_000_000.0
    records = [commit(store, trigger="auto", seed=i, when=t + i) for i in range(3)]
    records.append(commit(store, trigger="manual", seed=9, when=t + 9))
    store.close()
    return tmp_path / "store", records


def test_list_and_show(filled):
    store_dir, records = filled
    out = ckpt(store_dir, "list")
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    assert lines[0].split()[:4] == ["ID", "CREATED", "TRIGGER", "STATUS"]
    assert [line.split()[0] for line in lines[1:]] == [r.id for r in reversed(records)]
    as_json = json.loads(ckpt(store_dir, "--json", "list", "--kernel", "k1").stdout)
    assert len(as_json) == 4 and "stdio_keys" not in as_json[0]
    shown = json.loads(ckpt(store_dir, "--json", "show", records[0].id).stdout)
    assert shown["id"] == records[0].id and shown["status"] == "complete"
    missing = ckpt(store_dir, "show", "01M8G6NHZS1PKW09RTTN07H2K4")
    assert missing.returncode == 3 and "no snapshot" in missing.stderr


def test_prune_delete_gc(filled):
    store_dir, records = filled
    out = ckpt(store_dir, "--json", "prune", "--kernel", "k1", "--keep", "1")
    assert json.loads(out.stdout)["deleted"] == [records[1].id, records[0].id]
    assert ckpt(store_dir, "prune").returncode == 2
    assert ckpt(store_dir, "delete", records[3].id).returncode == 0
    freed = json.loads(ckpt(store_dir, "--json", "gc").stdout)
    assert freed["objects_deleted"] >= 1 and freed["bytes_freed"] > 0
    assert [r["id"] for r in json.loads(ckpt(store_dir, "--json", "list").stdout)] == [records[2].id]


def test_export_import(filled, tmp_path):
    store_dir, records = filled
    bundle = tmp_path / "one.jckpt"
    out = ckpt(store_dir, "export", records[0].id, "-o", str(bundle))
    assert out.returncode == 0 and bundle.stat().st_size > 0
    other = tmp_path / "other"
    refused = ckpt(other, "import", str(bundle))
    assert refused.returncode == 1 and "another store's key" in refused.stderr
    assert ckpt(other, "import", str(bundle), "--trust").returncode == 0
    assert [r["id"] for r in json.loads(ckpt(other, "--json", "list").stdout)] == [records[0].id]


@pytest.mark.criu
def test_check():
    out = ckpt("/tmp", "check")
    assert out.returncode == 0 and "OK" in out.stdout
    bad = ckpt("/tmp", "check", "--criu", "/nonexistent/criu")
    assert bad.returncode == 4 and "not installed" in bad.stdout


@pytest.mark.criu
async def test_restore_through_a_running_server(jp_fetch, jp_serverapp, start_kernel, jp_http_port, jp_base_url):
    kernel_id, sock = await start_kernel()
    await sock.execute("x = 'saved'")
    snap = await snapshot(jp_fetch, kernel_id)
    await sock.execute("x = 'changed'")
    url = f"http://127.0.0.1:{jp_http_port}{jp_base_url}"
    token = jp_serverapp.identity_provider.token
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "jupyter_ckpt.cli",
        "restore",
        snap["id"],
        "--url",
        url,
        "--token",
        token,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err
    assert f"restored from {snap['id']}" in out.decode()
    assert await sock.value("x") == "'saved'"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "jupyter_ckpt.cli",
        "restore",
        "01M8G6NHZS1PKW09RTTN07H2K4",
        "--url",
        url,
        "--token",
        token,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 3 and b"404" in err


@pytest.mark.process
def test_options_work_on_either_side_of_the_command(filled):
    store_dir, records = filled
    for args in (["list", "--json"], ["--json", "list"]):
        out = ckpt(store_dir, *args)
        assert out.returncode == 0, (args, out.stderr)
        assert sorted(s["id"] for s in json.loads(out.stdout)) == sorted(r.id for r in records)
    out = subprocess.run(
        [sys.executable, "-m", "jupyter_ckpt.cli", "show", records[0].id, "--store", str(store_dir), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and json.loads(out.stdout)["id"] == records[0].id, out.stderr


@pytest.mark.process
def test_the_jupyter_ckpt_command(filled):
    """`jupyter ckpt` finds the `jupyter-ckpt` entry point as Jupyter's subcommand."""
    import os

    store_dir, records = filled
    jupyter = os.path.join(os.path.dirname(sys.executable), "jupyter")
    out = subprocess.run(
        [jupyter, "ckpt", "--store", str(store_dir), "list", "--json"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)) == len(records)


@pytest.mark.process
def test_an_export_is_private_from_its_first_byte(filled, tmp_path):
    """The bundle holds all of a kernel's memory: created 0600, never with the umask."""
    store_dir, records = filled
    target = tmp_path / "out.jckpt"
    target.write_bytes(b"old")
    os_umask = __import__("os").umask(0)
    try:
        out = ckpt(store_dir, "export", records[0].id, "-o", str(target))
    finally:
        __import__("os").umask(os_umask)
    assert out.returncode == 0, out.stderr
    assert target.stat().st_mode & 0o777 == 0o600
    # Seen while it is being written, by a process with umask 0: already private.
    import time

    big_store = SnapshotStore(tmp_path / "big")
    big = commit(big_store, seed=5, size=96 << 20)
    big_store.close()
    fresh = tmp_path / "fresh.jckpt"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyter_ckpt.cli",
            "--store",
            str(tmp_path / "big"),
            "export",
            big.id,
            "-o",
            str(fresh),
        ],
        preexec_fn=lambda: __import__("os").umask(0),
    )
    deadline = time.monotonic() + 60
    while not fresh.exists():
        assert time.monotonic() < deadline and proc.poll() is None, "the export never created its file"
        time.sleep(0.001)
    assert fresh.stat().st_mode & 0o777 == 0o600
    assert proc.wait(timeout=120) == 0 and fresh.stat().st_size > 90 << 20
    missing = ckpt(store_dir, "export", "01M8G6NHZS1PKW09RTTN07H2K4", "-o", str(tmp_path / "none.jckpt"))
    assert missing.returncode == 3 and not (tmp_path / "none.jckpt").exists()


def test_the_table_and_show_for_people(filled):
    store_dir, records = filled
    lines = ckpt(store_dir, "list").stdout.splitlines()
    newest = lines[1].split()
    assert newest[0] == records[3].id and newest[3:5] == ["manual", "complete"]
    assert newest[5:7] == ["0", "B"]  # no memory measured: not taken by CRIU
    assert newest[7:9] == [f"{records[3].stored_bytes / 1024:.1f}", "KiB"] and newest[9] == "-"
    shown = ckpt(store_dir, "show", records[0].id).stdout.splitlines()
    assert f"{'id':16} {records[0].id}" in shown and f"{'trigger':16} auto" in shown


def test_list_and_prune_by_notebook_path(tmp_path):
    store = SnapshotStore(tmp_path / "store")
    t = 1_800_000_000.0
    made = {}
    for n, (path, trigger) in enumerate(
        [("a.ipynb", "auto"), ("b.ipynb", "auto"), ("a.ipynb", "auto"), ("a.ipynb", "manual")]
    ):
        record = SnapshotRecord(
            id=new_snapshot_id(t + n), kernel_id=f"k{n}", trigger=trigger, path=path, status="dumping"
        )
        (store.create(record) / "pages-1.img").write_bytes(bytes([n]) * 4096)
        made[n] = store.commit(record)
    store.close()
    listed = json.loads(ckpt(tmp_path / "store", "--json", "list", "--path", "a.ipynb").stdout)
    assert [r["id"] for r in listed] == [made[3].id, made[2].id, made[0].id]
    out = ckpt(tmp_path / "store", "--json", "prune", "--path", "a.ipynb", "--keep", "1")
    assert json.loads(out.stdout)["deleted"] == [made[0].id]  # the older automatic one; manual ones stay
    remaining = [r["id"] for r in json.loads(ckpt(tmp_path / "store", "--json", "list").stdout)]
    assert remaining == [made[3].id, made[2].id, made[1].id]


def test_prune_to_a_byte_budget(tmp_path):
    """--budget drops the oldest automatic snapshots until the group's stored bytes fit."""
    store = SnapshotStore(tmp_path / "store")
    t = 1_800_000_000.0
    records = [commit(store, trigger="auto", seed=i, when=t + i, size=64 * 1024) for i in range(4)]
    store.close()
    sizes = [r.stored_bytes for r in records]
    budget = sizes[2] + sizes[3]  # room for the newest two
    out = ckpt(tmp_path / "store", "--json", "prune", "--kernel", "k1", "--keep", "10", "--budget", str(budget))
    assert out.returncode == 0, out.stderr
    assert sorted(json.loads(out.stdout)["deleted"]) == sorted(r.id for r in records[:2])
    assert [r["id"] for r in json.loads(ckpt(tmp_path / "store", "--json", "list").stdout)] == [
        records[3].id,
        records[2].id,
    ]
    people = ckpt(tmp_path / "store", "prune", "--kernel", "k1", "--keep", "1")
    assert people.stdout.strip() == "pruned 1 automatic snapshot(s)"


def test_delete_several_and_an_unknown_one(filled):
    store_dir, records = filled
    out = ckpt(store_dir, "delete", records[0].id, records[1].id)
    assert out.returncode == 0 and out.stdout.splitlines() == [f"deleted {records[0].id}", f"deleted {records[1].id}"]
    out = ckpt(store_dir, "--json", "delete", records[2].id)
    assert json.loads(out.stdout) == {"deleted": [records[2].id]}
    missing = ckpt(store_dir, "delete", "01M8G6NHZS1PKW09RTTN07H2K4")
    assert missing.returncode == 3 and "no snapshot" in missing.stderr
    assert [r["id"] for r in json.loads(ckpt(store_dir, "--json", "list").stdout)] == [records[3].id]
    assert ckpt(store_dir, "delete").returncode == 2  # no id: bad usage


def test_gc_export_import_for_people(filled, tmp_path):
    store_dir, records = filled
    assert json.loads(ckpt(store_dir, "--json", "gc").stdout)["objects_deleted"] > 0  # small packs merged
    assert ckpt(store_dir, "gc").stdout.strip() == "gc: deleted 0 object(s), freed 0 B"
    bundle = tmp_path / "b.jckpt"
    out = ckpt(store_dir, "--json", "export", records[1].id, "-o", str(bundle))
    assert json.loads(out.stdout) == {"file": str(bundle), "bytes": bundle.stat().st_size}
    out = ckpt(tmp_path / "other", "--key", str(store_dir) + ".key", "import", str(bundle))
    assert out.returncode == 0 and out.stdout.strip() == f"imported {records[1].id} (complete)"
    damaged = tmp_path / "damaged.jckpt"
    damaged.write_bytes(bundle.read_bytes()[:-100])
    out = ckpt(tmp_path / "third", "import", str(damaged), "--trust")
    assert out.returncode == 1 and out.stderr.startswith("error: ")


def test_restore_needs_a_server(tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "no-servers"))
    out = ckpt(tmp_path / "store", "restore", "01M8G6NHZS1PKW09RTTN07H2K4")
    assert out.returncode == 1 and "no running Jupyter server found" in out.stderr
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = ckpt(tmp_path / "store", "restore", "01M8G6NHZS1PKW09RTTN07H2K4", "--url", f"http://127.0.0.1:{port}")
    assert out.returncode == 1 and f"cannot reach the server at http://127.0.0.1:{port}" in out.stderr


def test_the_servers_default_store_without_store(tmp_path, monkeypatch):
    """Without --store: <jupyter data dir>/ckpt, the server's default."""
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "data"))
    store = SnapshotStore(tmp_path / "data" / "ckpt")
    made = commit(store)
    store.close()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["--json", "list"]) == 0
    assert [r["id"] for r in json.loads(out.getvalue())] == [made.id]


@pytest.mark.process
def test_a_remote_store_with_its_state_dir_key_and_options(tmp_path, s3_store_options):
    """--store-options (fsspec's, as JSON), --state-dir and --key, on S3."""
    bucket, opts = s3_store_options
    url = f"s3://{bucket}/snapshots"
    store = SnapshotStore(url, tmp_path / "writer-state", tmp_path / "shared.key", opts)
    made = commit(store)
    store.close()
    common = ["--state-dir", str(tmp_path / "cli-state"), "--key", str(tmp_path / "shared.key")]
    out = ckpt(url, "--json", *common, "--store-options", json.dumps(opts), "show", made.id)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["id"] == made.id and (tmp_path / "cli-state").is_dir()
    # Another key: the manifest's signature does not verify.
    (tmp_path / "other.key").write_bytes(b"k" * 32)
    out = ckpt(
        url, "--json", *common[:2], "--key", str(tmp_path / "other.key"), "--store-options", json.dumps(opts), "list"
    )
    assert out.returncode == 0 and [r["status"] for r in json.loads(out.stdout)] == ["failed"]
    # The options are what reach the endpoint: another one, and nothing is found.
    elsewhere = {**opts, "endpoint_url": "http://127.0.0.1:9", "config_kwargs": {"retries": {"max_attempts": 1}}}
    out = ckpt(url, *common, "--store-options", json.dumps(elsewhere), "show", made.id)
    assert out.returncode == 1 and out.stderr.startswith("error: ")


# -- the texts people read, the defaults, and the restore client ----------------------


@pytest.mark.parametrize(
    "n, text",
    [
        (None, "0 B"),
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (1024**2 - 1, "1024.0 KiB"),
        (1024**2, "1.0 MiB"),
        (5 * 1024**3, "5.0 GiB"),
        (3 * 1024**4, "3072.0 GiB"),
    ],
)
def test_sizes_for_people(n, text):
    assert cli._size(n) == text


def test_the_table_shows_frozen_time_and_falls_back_to_the_path():
    record = SnapshotRecord(
        id="01M8G6NHZS1PKW09RTTN07H2K4",
        kernel_id="0123456789abcdef",
        created="2027-01-02T03:04:05.678Z",
        trigger="auto",
        status="complete",
        memory_bytes=3 << 20,
        stored_bytes=1536,
        freeze_seconds=0.4567,
        path="work/a.ipynb",
    )
    header, row = cli._table([record]).splitlines()
    assert header.split() == ["ID", "CREATED", "TRIGGER", "STATUS", "MEMORY", "STORED", "FROZEN", "KERNEL", "LABEL"]
    assert row.split() == [
        record.id,
        "2027-01-02",
        "03:04:05",
        "auto",
        "complete",
        "3.0",
        "MiB",
        "1.5",
        "KiB",
        "0.46s",
        "01234567",
        "work/a.ipynb",
    ]
    record.label = "before the risky step"
    assert cli._table([record]).splitlines()[1].endswith("01234567  before the risky step")


def test_json_output_is_indented_and_people_get_lines(filled, tmp_path):
    store_dir, records = filled
    out = ckpt(store_dir, "--json", "show", records[0].id)
    assert out.stdout == json.dumps(json.loads(out.stdout), indent=1) + "\n"
    listed = ckpt(store_dir, "--json", "list")
    assert listed.stdout == json.dumps(json.loads(listed.stdout), indent=1) + "\n"
    target = tmp_path / "b.jckpt"
    out = ckpt(store_dir, "export", records[0].id, "-o", str(target))
    assert out.stdout.strip() == f"wrote {target} ({cli._size(target.stat().st_size)})"
    assert cli._size(target.stat().st_size) != "0 B"


def test_prune_keeps_ten_by_default(tmp_path):
    store = SnapshotStore(tmp_path / "store")
    records = [commit(store, seed=i, when=1_800_000_000.0 + i, size=4096) for i in range(12)]
    store.close()
    out = ckpt(tmp_path / "store", "--json", "prune", "--kernel", "k1")
    assert sorted(json.loads(out.stdout)["deleted"]) == sorted(r.id for r in records[:2])


def test_usage_errors_exit_2():
    for argv in ([], ["no-such-command"], ["prune", "--keep", "many"]):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2 and err.getvalue().startswith("usage: jupyter ckpt")


def test_check_says_why_criu_is_unusable(tmp_path):
    out = ckpt(tmp_path, "check", "--criu", "/nonexistent/criu")
    assert out.returncode == 4 and out.stdout.startswith("CRIU unusable: ") and "not installed" in out.stdout
    out = ckpt(tmp_path, "--json", "check", "--criu", "/nonexistent/criu")
    health = json.loads(out.stdout)
    assert out.returncode == 4 and health["available"] is False and "not installed" in health["reason"]


def test_progress_is_drawn_on_a_terminal_only(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    sink = io.BytesIO()
    progress = cli._Progress(sink, "exporting")
    assert progress.write(b"x" * 2048) == 2048
    progress.flush()
    progress.close()
    assert sink.getvalue() == b"x" * 2048
    assert screen.getvalue() == "\rexporting: 2.0 KiB\n"
    screen.truncate(0), screen.seek(0)
    reading = cli._Progress(io.BytesIO(b"y" * 512), "importing", total=1024)
    assert reading.read(256) == b"y" * 256 and reading.read() == b"y" * 256
    assert screen.getvalue() == "\rimporting: 256 B  25.0%\rimporting: 512 B  50.0%"
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal: nothing drawn
    quiet = cli._Progress(io.BytesIO(), "exporting")
    quiet.write(b"z")
    quiet.close()
    assert sys.stderr.getvalue() == ""


def test_a_store_given_by_url_with_its_options(tmp_path):
    import uuid

    url = f"memory://ckpt-{uuid.uuid4().hex}"
    options = json.dumps({"skip_instance_cache": True})
    store = SnapshotStore(url, tmp_path / "writer-state", tmp_path / "k.key")
    made = commit(store)
    store.close()
    out = ckpt(
        url,
        "--json",
        "--state-dir",
        str(tmp_path / "cli-state"),
        "--key",
        str(tmp_path / "k.key"),
        "--store-options",
        options,
        "list",
    )
    assert out.returncode == 0, out.stderr
    assert [r["id"] for r in json.loads(out.stdout)] == [made.id] and (tmp_path / "cli-state" / "records").is_dir()
    out = ckpt(url, "list")
    assert out.returncode == 1 and "a store on a remote backend needs a local state_dir" in out.stderr


class StubServer:
    """A stand-in for a Jupyter server's restore endpoint (the real one, with
    CRIU, is in test_restore_through_a_running_server): it records each request
    and answers what the test says."""

    def __init__(self, status: int, body: bytes):
        import http.server
        import threading

        self.requests: list[tuple[str, str, dict, bytes]] = []
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                data = self.rfile.read(int(self.headers["Content-Length"]))
                stub.requests.append((self.command, self.path, dict(self.headers), data))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/base/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_restore_asks_the_server_and_reports(tmp_path):
    snap = "01M8G6NHZS1PKW09RTTN07H2K4"
    outcome = {"kernel_id": "kid", "snapshot_id": snap, "total_seconds": 1.23456, "mode": "replace"}
    server = StubServer(200, json.dumps(outcome).encode())
    try:
        out = ckpt(tmp_path, "restore", snap, "--url", server.url, "--token", "secret")
        assert out.returncode == 0 and out.stdout.strip() == f"kernel kid restored from {snap} in 1.23 s"
        [(method, path, headers, body)] = server.requests
        assert (method, path) == ("POST", f"/base/api/ckpt/snapshots/{snap}/restore")
        assert headers["Authorization"] == "token secret" and headers["Content-Type"] == "application/json"
        assert json.loads(body) == {"mode": "replace"}
        out = ckpt(tmp_path, "--json", "restore", snap, "--url", server.url)
        assert json.loads(out.stdout) == outcome
        assert server.requests[-1][2]["Authorization"] == "token "
    finally:
        server.close()


@pytest.mark.parametrize(
    "status, body, code, message",
    [
        (404, b'{"message": "no snapshot with id x"}', 3, "restore failed (404): no snapshot with id x"),
        (409, b'{"message": "kernel k is busy"}', 1, "restore failed (409): kernel k is busy"),
        (500, b"<html>oops</html>", 1, "restore failed (500): HTTP Error 500: Internal Server Error"),
        (400, b'{"reason": "no message"}', 1, "restore failed (400): HTTP Error 400: Bad Request"),
    ],
)
def test_restore_reports_what_the_server_refused(tmp_path, status, body, code, message):
    server = StubServer(status, body)
    try:
        out = ckpt(tmp_path, "restore", "01M8G6NHZS1PKW09RTTN07H2K4", "--url", server.url)
    finally:
        server.close()
    assert out.returncode == code and out.stderr.strip() == message


def test_restore_finds_the_running_server(tmp_path, monkeypatch):
    snap = "01M8G6NHZS1PKW09RTTN07H2K4"
    server = StubServer(200, json.dumps({"kernel_id": "k", "snapshot_id": snap, "total_seconds": 1}).encode())
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    info = {"url": server.url, "token": "found-token", "pid": os.getpid(), "port": server.httpd.server_port}
    (runtime / "jpserver-1.json").write_text(json.dumps(info))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(runtime))
    try:
        out = ckpt(tmp_path, "restore", snap)
        assert out.returncode == 0, out.stderr
        assert server.requests[0][2]["Authorization"] == "token found-token"
        out = ckpt(tmp_path, "restore", snap, "--token", "given")
        assert server.requests[1][2]["Authorization"] == "token given"  # a token given wins
    finally:
        server.close()
