"""Property-based tests (hypothesis): hostile input is refused, never crashes.

1. The bundle reader, fed random bytes, damaged real bundles and forged
   manifests (trusted), raises only InvalidRequest or SnapshotNotRestorable and
   writes nothing outside its store, nor leaves scratch files or a listed
   snapshot behind when it refuses.
2. Every route of the REST API, against one real server with one real kernel
   and one real snapshot, answers generated bodies, queries and path
   parameters with a status below 500, and a 4xx with a JSON message; the
   refused requests change nothing.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import string
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from jupyter_ckpt import handlers
from jupyter_ckpt.bundle import export_bundle, import_bundle
from jupyter_ckpt.errors import InvalidRequest, SnapshotNotRestorable
from jupyter_ckpt.manager import RESTORE_MODES
from jupyter_ckpt.records import SNAPSHOT_ID, SnapshotRecord, new_snapshot_id
from jupyter_ckpt.store import SnapshotStore

from .servers import TOKEN, Server, take
from .test_bundle import forged_bundle

pytestmark = [pytest.mark.criu, pytest.mark.slow]

# No example database: nothing is written into the repository.
FAST = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
SENTINEL = "@SENTINEL@"  # replaced by the absolute path of the sentinel folder next to the store

# -- shared strategies ---------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=16,
)
hostile_names = st.sampled_from(
    [
        "",
        ".",
        "..",
        "../x",
        "a/b",
        "/etc/passwd",
        "core-1.img\0",
        "\0",
        "x" * 300,
        "x" * 5000,
        "pages-1.img/..",
        "..img",
        "core-1.img",
        "pages-1.img",
        "pages-2.img",
        "../../../../sentinel/evil",
        "../../../sentinel/evil",
        f"{SENTINEL}/evil",
        "%2F",
        "..%2F..%2Fx",
        "\u2603.img",
        "a\nb",
        "-",
    ]
) | st.text(max_size=30)
confused_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([-1, 0, 1, 4, 4096, 1 << 20, 2**31, 2**32, 2**63, 2**64, 10**30]),
    st.floats(),
    hostile_names,
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)


# == 1. the bundle reader =============================================================

FILES = {"core-1.img": b"core" * 300, "pages-1.img": bytes(range(256)) * 16 + bytes(4096)}
ENTRY_FIELDS = ["name", "size", "chunk_size", "chunks", "digest", "extra"]
RECORD_FIELDS = [*SnapshotRecord.__dataclass_fields__, "extra"]


@dataclass
class Valid:
    """A real exported bundle, signed with a key the target may share."""

    data: bytes
    key_path: Path


@pytest.fixture(scope="module")
def scratch_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("properties-bundles")


@pytest.fixture(scope="module")
def valid(scratch_root) -> Valid:
    key_path = scratch_root / "shared.key"
    source = SnapshotStore(scratch_root / "source", key_path=key_path)
    record = SnapshotRecord(id=new_snapshot_id(), kernel_id="k1", label="exported", status="dumping")
    images = source.create(record)
    for name, data in FILES.items():
        (images / name).write_bytes(data)
    record = source.commit(record)
    out = io.BytesIO()
    export_bundle(source, record.id, out)
    source.close()
    return Valid(out.getvalue(), key_path)


def files_under(root: Path, skip: Path | None = None) -> list[str]:
    return sorted(str(p) for p in root.rglob("*") if skip is None or skip not in (p, *p.parents))


def check_import(root: Path, data: bytes | None, trust: bool, key_path: Path | None = None, build=None) -> str:
    """Import ``data`` (or ``build(run)``, the bundle made knowing the run's
    folder) into a fresh store; returns "imported" or "refused" and checks
    that nothing was written outside the store, nor left behind in it."""
    run = Path(tempfile.mkdtemp(dir=root))
    sentinel = run / "sentinel"
    sentinel.mkdir()
    (sentinel / "keep").write_bytes(b"keep")
    store = SnapshotStore(run / "store", key_path=key_path)
    try:
        if build is not None:
            data = build(run)
        outside, in_sentinel = files_under(run, skip=run / "store"), files_under(sentinel)
        try:
            record = import_bundle(store, io.BytesIO(data), trust=trust)
        except (InvalidRequest, SnapshotNotRestorable):
            record = None
        assert files_under(run, skip=run / "store") == outside, "written next to the store"
        assert files_under(sentinel) == in_sentinel
        assert not any((store.state / "tmp").iterdir()), "scratch left behind"
        assert not any((store.state / "staging").iterdir()), "staging left behind"
        listed = store.list()
        if record is None:
            assert listed == [], "a refused import is listed"
            event("refused")
            return "refused"
        event("imported")
        assert [r.id for r in listed] == [record.id] and listed[0].status == "complete"
        return "imported"
    finally:
        store.close()
        shutil.rmtree(run, ignore_errors=True)


@FAST
@given(data=st.binary(max_size=512), prefix=st.sampled_from([b"", b"JCKPT-BUNDLE-1\n"]), trust=st.booleans())
def test_random_bytes_are_refused(scratch_root, data, prefix, trust):
    assert check_import(scratch_root, prefix + data, trust) == "refused"


mutations = st.lists(
    st.one_of(
        st.tuples(st.just("flip"), st.integers(0, 1 << 20), st.integers(1, 255)),
        st.tuples(st.just("truncate"), st.integers(0, 1 << 20)),
        st.tuples(st.just("insert"), st.integers(0, 1 << 20), st.binary(min_size=1, max_size=64)),
        st.tuples(st.just("delete"), st.integers(0, 1 << 20), st.integers(1, 64)),
    ),
    max_size=4,
)


def mutate(data: bytes, ops) -> bytes:
    out = bytearray(data)
    for op, pos, *arg in ops:
        pos %= len(out) + 1
        if op == "flip" and pos < len(out):
            out[pos] ^= arg[0]
        elif op == "truncate":
            del out[pos:]
        elif op == "insert":
            out[pos:pos] = arg[0]
        elif op == "delete":
            del out[pos : pos + arg[0]]
    return bytes(out)


@FAST
@given(ops=mutations, trust=st.booleans(), shared_key=st.booleans())
def test_a_damaged_real_bundle_is_refused_or_imported_whole(scratch_root, valid, ops, trust, shared_key):
    damaged = mutate(valid.data, ops)
    outcome = check_import(scratch_root, damaged, trust, key_path=valid.key_path if shared_key else None)
    if damaged == valid.data:
        assert outcome == ("imported" if shared_key or trust else "refused")


def placed(value: Any, run: Path) -> Any:
    """The sentinel placeholder, wherever it is, made the run's absolute path."""
    if isinstance(value, str):
        return value.replace(SENTINEL, str(run / "sentinel"))
    if isinstance(value, list):
        return [placed(v, run) for v in value]
    if isinstance(value, dict):
        return {placed(k, run): placed(v, run) for k, v in value.items()}
    return value


def header_edit(draw_entries, record_changes, record_drops, order):
    def tamper(header: dict) -> dict:
        entries = [dict(e) for e in header["files"]]
        entries = [entries[i % len(entries)] for i in order] if order is not None else entries
        for index, name, value in draw_entries:
            if entries:
                entries[index % len(entries)][name] = value
        record = {k: v for k, v in header["record"].items() if k not in record_drops}
        record.update(record_changes)
        return {**header, "record": record, "files": entries}

    return tamper


@FAST
@given(header=json_values | st.dictionaries(st.sampled_from(["record", "files", "signer"]), json_values))
def test_a_trusted_manifest_of_arbitrary_json_is_refused(scratch_root, header):
    def build(run: Path) -> bytes:
        return forged_bundle(FILES, tamper=lambda _: placed(header, run))

    check_import(scratch_root, None, trust=True, build=build)


@FAST
@given(
    entries=st.lists(st.tuples(st.integers(0, 3), st.sampled_from(ENTRY_FIELDS), confused_values), max_size=4),
    record_changes=st.dictionaries(st.sampled_from(RECORD_FIELDS), confused_values, max_size=3),
    record_drops=st.sets(st.sampled_from(RECORD_FIELDS), max_size=2),
    order=st.none() | st.lists(st.integers(0, 3), max_size=4),
)
def test_a_trusted_manifest_with_type_confused_fields_is_refused(
    scratch_root, entries, record_changes, record_drops, order
):
    def build(run: Path) -> bytes:
        edit = header_edit(placed(entries, run), placed(record_changes, run), record_drops, order)
        return forged_bundle(FILES, tamper=edit)

    outcome = check_import(scratch_root, None, trust=True, build=build)
    if not (entries or record_changes or record_drops or order is not None):
        assert outcome == "imported"  # the forged bundle itself is sound


@settings(FAST, max_examples=5)
@given(depth=st.integers(10_000, 200_000), opener=st.sampled_from(["[", '{"a": ', '{"record": {"a": [']))
def test_a_deeply_nested_trusted_manifest_is_refused(scratch_root, depth, opener):
    """JSON nested deeper than Python's recursion limit (a few KiB of header)."""
    header = (opener * depth).encode()
    check_import(scratch_root, None, trust=True, build=lambda run: forged_bundle(FILES, tamper=lambda _: header))


# == 2. the REST API ==================================================================

ORIGINAL_LABEL = "the original"
SNAPSHOT_CAP = 3  # snapshots of the real kernel the generated requests may start
FIELDS = ["label", "mode", "kernel_id", "path", "copy", "enabled", "interval_seconds", "keep", "trust"]


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # a 3xx is an answer, not something to follow


OPENER = urllib.request.build_opener(NoRedirect)


@dataclass
class Live:
    server: Server
    kernel_id: str
    snapshot_id: str
    started: list[str] = field(default_factory=list)  # snapshots the generated requests started

    def files_outside_store(self) -> set[Path]:
        """Files in the server's folder (its HOME) but not in its store or runtime folder."""
        home = self.server.runtime.parent
        inside = {str(home / "store"), str(self.server.runtime)}
        found = set()
        for top, dirs, files in os.walk(home):  # the server writes and removes files in its store meanwhile
            dirs[:] = [d for d in dirs if os.path.join(top, d) not in inside]
            found.update(Path(top, name) for name in [*dirs, *files])
        return found

    def request(self, method: str, path: str, body: bytes | None = None, auth: str | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(
            f"http://{self.server.host}:{self.server.port}{path}",
            data=body,
            method=method,
            headers={"Authorization": auth if auth is not None else f"token {TOKEN}"},
        )
        try:
            with OPENER.open(req, timeout=60) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("properties-server"), "--CheckpointApp.auto_backup=False")
    try:
        kernel_id = server.call("POST", "/api/kernels", {"name": "python3"})["id"]
        server.client(kernel_id).stop_channels()  # ready
        snapshot = take(server, kernel_id, label=ORIGINAL_LABEL)
        yield Live(server, kernel_id, snapshot["id"])
    finally:
        server.kill()


def route_methods():
    for pattern, cls in handlers.default_handlers:
        own = [c for c in cls.__mro__ if c.__module__ == handlers.__name__]
        for method in ("get", "post", "put", "patch", "delete"):
            if any(method in vars(c) for c in own):
                name = re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", pattern)
                yield pytest.param(pattern, method.upper(), id=f"{method.upper()} {name}")


PARAM = re.compile(r"\(\?P<(\w+)>[^)]*\)")
SPECIAL_IDS = ["..", ".", "../", "..%2F", "%2F", "%2e%2e", "a" * 3000, "\u2603", "\u00e9/../x", "%00", "%ff", " ", "~"]
header_text = st.text(alphabet=string.ascii_letters + string.digits + string.punctuation + " ", max_size=60)


def would_parse(body: bytes) -> Any:
    """The handler's reading of a body (CheckpointHandler.body); None if it is refused."""
    if not body.strip():
        return {}

    def no_constant(name):
        raise ValueError(name)

    try:
        data = json.loads(body.decode("utf-8"), parse_constant=no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def valid_label(value: Any) -> bool:
    return value is None or (isinstance(value, str) and len(value) <= 200 and not any(c in value for c in "\n\r\0"))


def restore_would_run(body: bytes) -> bool:
    data = would_parse(body)
    return (
        data is not None
        and isinstance(data.get("mode", "replace"), str)
        and data.get("mode", "replace") in RESTORE_MODES
        and isinstance(data.get("kernel_id"), (str, type(None)))
        and isinstance(data.get("path"), (str, type(None)))
    )


def relabel_would_change(body: bytes) -> bool:
    data = would_parse(body)
    return data is not None and not set(data) - {"label"} and valid_label(data.get("label"))


def snapshot_would_start(body: bytes) -> bool:
    data = would_parse(body)
    return data is not None and valid_label(data.get("label", ""))


def bodies(live: Live, pattern: str) -> st.SearchStrategy[bytes]:
    values = confused_values | st.sampled_from(
        ["replace", "new", "a label", live.kernel_id, live.snapshot_id, True, False, 1800, 60.5, 10, "true"]
    )
    kinds = [
        st.just(b""),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.dictionaries(st.sampled_from(FIELDS), values, max_size=4).map(lambda d: json.dumps(d).encode()),
        st.binary(max_size=64).map(lambda b: b"\xff" + b),  # never UTF-8
        st.sampled_from([b"{not json", b'{"label": NaN}', b'{"keep": Infinity}', b"\xfe\xff{}", b"   "]),
    ]
    if pattern == "/api/ckpt/bundles":
        kinds += [
            st.binary(max_size=256),
            st.binary(max_size=256).map(lambda b: b"JCKPT-BUNDLE-1\n" + b),
            json_values.map(lambda h: forged_bundle(FILES, tamper=lambda _: h)),
            st.just(forged_bundle(FILES)),  # sound (with trust): imported
        ]
    return st.one_of(kinds)


def queries(live: Live) -> st.SearchStrategy[str]:
    values = st.text(max_size=20) | st.sampled_from(
        [live.kernel_id, "true", "1", "yes", "false", "../", "%2F", "a" * 3000, "\u2603"]
    )
    return st.one_of(
        st.just(""),
        st.dictionaries(st.sampled_from(["kernel_id", "path", "trust", "other"]), values, max_size=3).map(
            urllib.parse.urlencode
        ),
        st.tuples(st.sampled_from(["kernel_id", "path", "trust"]), st.binary(max_size=8)).map(
            lambda kv: f"{kv[0]}={urllib.parse.quote_from_bytes(kv[1])}"  # not UTF-8, often
        ),
    )


def path_values(live: Live, name: str) -> st.SearchStrategy[str]:
    real = live.kernel_id if name == "kernel_id" else live.snapshot_id
    other = live.snapshot_id if name == "kernel_id" else live.kernel_id
    # Traversals decoded from %2F: to the server's folder, to a folder in it, and an absolute path there.
    home = live.server.runtime.parent
    escapes = ["../../../../escaped", "../../../../root/escaped", "../" * 12 + f"{home}/escaped", f"{home}/escaped"]
    return st.one_of(
        st.just(real),
        st.just(other),
        st.sampled_from(escapes),
        st.from_regex(SNAPSHOT_ID, fullmatch=True),
        st.uuids().map(str),
        st.sampled_from(SPECIAL_IDS),
        st.text(min_size=1, max_size=40),
    )


def encode(value: str, raw: bool) -> str:
    """Percent-encoded all through, or keeping '/', '%' and '.' as they are."""
    return urllib.parse.quote(value, safe="/%." if raw else "")


def utf8(encoded: str) -> bool:
    try:
        urllib.parse.unquote_to_bytes(encoded).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def unknown_id() -> str:
    return new_snapshot_id()


@pytest.mark.parametrize("pattern, method", list(route_methods()))
@settings(FAST, max_examples=60)
@given(data=st.data())
def test_no_request_gets_a_server_error(live, pattern, method, data):
    params = {name: data.draw(path_values(live, name), label=name) for name in PARAM.findall(pattern)}
    body = data.draw(bodies(live, pattern), label="body") if method in ("POST", "PUT", "PATCH") else None
    # Requests that would restore, relabel or delete the real snapshot, or start
    # too many snapshots, go to an unknown id instead: slow, or not refused.
    real_snapshot = params.get("snapshot_id") == live.snapshot_id
    if real_snapshot and (
        method == "DELETE"
        or (pattern.endswith("/restore") and restore_would_run(body))
        or (method == "PATCH" and relabel_would_change(body))
    ):
        params["snapshot_id"] = unknown_id()
    real_kernel_snapshot = (
        pattern.startswith("/api/ckpt/kernels/")
        and pattern.endswith("/snapshots")
        and method == "POST"
        and params["kernel_id"] == live.kernel_id
    )
    if real_kernel_snapshot and snapshot_would_start(body) and len(live.started) >= SNAPSHOT_CAP:
        params["kernel_id"] = str(uuid.uuid4())
        real_kernel_snapshot = False
    raw = data.draw(st.booleans(), label="raw path")
    path = PARAM.sub(lambda m: encode(params[m.group(1)], raw), pattern)
    query = data.draw(queries(live), label="query")
    own_route = re.fullmatch(pattern, path) is not None  # else another route, or none, answers
    self_route = pattern.startswith("/api/ckpt/self/")
    auth = data.draw(header_text | header_text.map("ckpt-kernel ".__add__), label="auth") if self_route else None

    before = live.files_outside_store()

    status, answer = live.request(method, path + (f"?{query}" if query else ""), body, auth)

    event(f"{status} {'this route' if own_route else 'another route or none'}")
    stray = sorted(str(p) for p in live.files_outside_store() - before)
    assert not stray, f"written outside the store: {stray}"
    assert status < 500, (status, answer[:2000])
    if own_route and 400 <= status < 500:
        message = json.loads(answer).get("message")
        assert isinstance(message, str) and message, answer
    if own_route and self_route:
        # A path parameter that is not UTF-8 once decoded is refused (400) before any handler code runs.
        undecodable = not all(utf8(encode(v, raw)) for v in params.values())
        assert status == (400 if undecodable else 403), (status, answer[:2000])
    if real_kernel_snapshot:
        assert status in (202, 409, 400), (status, answer[:2000])
        if status == 202:
            live.started.append(json.loads(answer)["id"])
    if status == 200 and own_route and pattern.endswith("/schedule") and method == "PUT":
        live.request("PUT", path, b'{"enabled": false}')  # no auto-backups from a generated schedule


JSON_BODY_ROUTES = [
    ("PATCH", "/api/ckpt/snapshots/{snapshot_id}"),
    ("POST", "/api/ckpt/snapshots/{snapshot_id}/restore"),
    ("POST", "/api/ckpt/kernels/{kernel_id}/snapshots"),
    ("PUT", "/api/ckpt/kernels/{kernel_id}/schedule"),
]


@pytest.mark.parametrize("method, route", JSON_BODY_ROUTES)
@settings(FAST, max_examples=3)
@given(depth=st.integers(10_000, 100_000), opener=st.sampled_from(["[", '{"label": ']))
def test_a_deeply_nested_json_body_is_a_bad_request(live, method, route, depth, opener):
    # An unknown snapshot id: nothing real is relabelled or restored if this is accepted.
    path = route.format(snapshot_id=unknown_id(), kernel_id=live.kernel_id)
    status, answer = live.request(method, path, (opener * depth).encode())
    assert status == 400, (status, answer[:2000])


def test_refused_requests_changed_nothing(live):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the snapshots the generated requests started: let them end
        listed = json.loads(live.request("GET", "/api/ckpt/snapshots")[1])
        if not any(s["status"] in ("pending", "dumping", "storing") for s in listed):
            break
        time.sleep(0.1)
    mine = [s for s in listed if s["id"] == live.snapshot_id]
    assert len(mine) == 1 and mine[0]["status"] == "complete" and mine[0]["label"] == ORIGINAL_LABEL, mine
    status, snapshot = live.request("GET", f"/api/ckpt/snapshots/{live.snapshot_id}")
    assert status == 200 and json.loads(snapshot)["label"] == ORIGINAL_LABEL
    assert live.server.call("GET", f"/api/kernels/{live.kernel_id}")["id"] == live.kernel_id
    assert len(live.started) <= SNAPSHOT_CAP
