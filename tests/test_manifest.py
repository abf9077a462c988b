"""The manifest format on its own: what decode accepts, and the exact reason
for everything it refuses. Manifests are built here byte by byte, so each
check is reached alone (the same refusals through bundles and a server are in
tests/test_bundle.py and tests/test_properties.py)."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest

from jupyter_ckpt import manifest
from jupyter_ckpt.errors import SnapshotNotRestorable
from jupyter_ckpt.manifest import MAGIC, MAX_FILES, MalformedManifest, SignatureMismatch, claimed_signer
from jupyter_ckpt.pack_format import OTHER_CHUNK, PAGE_CHUNK, StoredFile
from jupyter_ckpt.private_files import key_fingerprint

KEY = b"k" * 32
H = [bytes([i]) * 32 for i in range(8)]  # chunk hashes


def raw(header: object, hashes: bytes = b"", key: bytes = KEY, length: int | None = None) -> bytes:
    """A manifest as the format lays it out, for any header at all."""
    text = json.dumps(header).encode()
    n = len(text) if length is None else length
    body = MAGIC + n.to_bytes(4, "little") + text + hashes
    return body + hmac.new(key, body, hashlib.sha256).digest()


def entry(name="core-1.img", size=10, chunk_size=OTHER_CHUNK, chunks=1, **more) -> dict:
    return {"name": name, "size": size, "chunk_size": chunk_size, "chunks": chunks, **more}


def refused(data: bytes, message: str, key: bytes | None = KEY, **kw) -> None:
    with pytest.raises(MalformedManifest) as e:
        manifest.decode(data, key, name="m", **kw)
    assert str(e.value) == message


def test_a_round_trip_keeps_record_files_and_chunks():
    files = [
        StoredFile("pages-1.img", 2 * PAGE_CHUNK + 1, PAGE_CHUNK, H[:3], "ab" * 32),
        StoredFile("core-1.img", 0, OTHER_CHUNK, [], ""),
        StoredFile("inventory.img", OTHER_CHUNK, OTHER_CHUNK, H[3:4]),
    ]
    data = manifest.encode({"id": "s1", "label": "é"}, files, KEY)
    record, decoded = manifest.decode(data, KEY)
    assert record == {"id": "s1", "label": "é"}
    assert decoded == files
    assert claimed_signer(data) == key_fingerprint(KEY)
    assert manifest.decode(data, None) == (record, decoded)  # trusted: no signature check, same result


def test_the_header_is_written_in_one_order():
    a = manifest.encode({"b": 1, "a": 2}, [], KEY)
    b = manifest.encode({"a": 2, "b": 1}, [], KEY)
    assert a == b  # equal records sign the same bytes
    length = int.from_bytes(a[len(MAGIC) : len(MAGIC) + 4], "little")
    assert a[len(MAGIC) + 4 : len(MAGIC) + 4 + length].startswith(b'{"files": [], "record": {"a": 2, "b": 1}')


def test_what_is_not_a_manifest():
    good = manifest.encode({}, [], KEY)
    shortest = MAGIC + (0).to_bytes(4, "little") + b"x" * 32
    for data in (b"", MAGIC, shortest[:-1], b"X" + good[1:]):
        with pytest.raises(SnapshotNotRestorable) as e:
            manifest.decode(data, KEY, name="m")
        assert str(e.value) == "m is not a jupyter-ckpt manifest (damaged or truncated)"
    # The shortest that is one: magic, a length, a signature; its header is then unreadable.
    refused(shortest, "m has an unreadable header: Expecting value: line 1 column 1 (char 0)", key=None)


def test_a_signature_from_another_key_or_a_changed_byte():
    data = manifest.encode({"id": "s"}, [], KEY)
    for key, changed in ((b"o" * 32, data), (KEY, data[:20] + b"X" + data[21:])):
        with pytest.raises(SignatureMismatch) as e:
            manifest.decode(changed, key, name="m")
        assert str(e.value) == "m failed its signature check: it was modified, or signed with another key"


@pytest.mark.parametrize(
    "header", [[], {"files": []}, {"record": {}}, {"record": [], "files": []}, {"record": {}, "files": {}}]
)
def test_a_header_without_record_or_file_list(header):
    refused(raw(header), "m has no record or no file list")


def test_the_number_of_files_is_bounded():
    at_most = [entry(f"f{i}", 0, OTHER_CHUNK, 0) for i in range(MAX_FILES)]
    record, files = manifest.decode(raw({"record": {}, "files": at_most}), KEY)
    assert len(files) == MAX_FILES
    refused(
        raw({"record": {}, "files": [*at_most, entry("one-more", 0, OTHER_CHUNK, 0)]}),
        f"m lists {MAX_FILES + 1} files, more than {MAX_FILES}",
    )


def test_a_file_listed_twice():
    twice = [entry("a", 0, OTHER_CHUNK, 0), entry("a", 0, OTHER_CHUNK, 0)]
    refused(raw({"record": {}, "files": twice}), "m lists 'a' twice")


def test_the_files_add_up_to_at_most_max_bytes():
    files = [entry("a", 6, OTHER_CHUNK, 1), entry("b", 4, OTHER_CHUNK, 1)]
    data = raw({"record": {}, "files": files}, H[0] + H[1])
    assert [f.size for f in manifest.decode(data, KEY, max_bytes=10)[1]] == [6, 4]  # exactly the most
    refused(data, "m describes more than 9 bytes of files, the most accepted here", max_bytes=9)
    refused(data, "m describes more than 5 bytes of files, the most accepted here", max_bytes=5)  # the first alone


def test_chunk_counts_must_match_the_hashes_held():
    files = [entry("pages-1.img", 2 * PAGE_CHUNK, PAGE_CHUNK, 2), entry("core-1.img", 1, OTHER_CHUNK, 1)]
    header = {"record": {}, "files": files}
    _, decoded = manifest.decode(raw(header, b"".join(H[:3])), KEY)
    assert [f.chunks for f in decoded] == [H[:2], H[2:3]]
    refused(raw(header, b"".join(H[:2])), "m lists more chunks than it holds")
    refused(raw(header, b"".join(H[:4])), "m lists 3 chunks but holds 4")
    refused(raw(header, b"".join(H[:3]) + b"x" * 16), "m lists 3 chunks but holds 3")  # a partial hash


def test_an_entry_that_is_not_an_object():
    refused(raw({"record": {}, "files": ["core-1.img"]}), "m has a file entry that is not an object")


@pytest.mark.parametrize("name", ["../etc/passwd", "a/b", "a..b", ".hidden", "", None, 3, "x" * 201])
def test_only_plain_file_names(name):
    refused(
        raw({"record": {}, "files": [entry(name, 0, OTHER_CHUNK, 0)]}),
        f"m names a file {name!r}: only plain file names are allowed",
    )


def test_the_longest_plain_name_is_accepted():
    name = "x" * 200
    assert manifest.decode(raw({"record": {}, "files": [entry(name, 0, OTHER_CHUNK, 0)]}), KEY)[1][0].name == name


@pytest.mark.parametrize("field", ["size", "chunk_size", "chunks"])
@pytest.mark.parametrize("value", [-1, True, 1.0, "1", None])
def test_sizes_and_counts_are_whole_numbers(field, value):
    bad = {**entry("core-1.img", 10, OTHER_CHUNK, 1), field: value}
    refused(raw({"record": {}, "files": [bad]}, H[0]), f"m: core-1.img: {field} must be a whole number, not {value!r}")


def test_zero_sizes_are_whole_numbers_too():
    _, files = manifest.decode(raw({"record": {}, "files": [entry("core-1.img", 0, OTHER_CHUNK, 0)]}), KEY)
    assert files == [StoredFile("core-1.img", 0, OTHER_CHUNK, [], "")]


def test_chunk_size_and_count_follow_the_format():
    refused(
        raw({"record": {}, "files": [entry("pages-1.img", 10, OTHER_CHUNK, 1)]}, H[0]),
        f"m: pages-1.img: chunk size {OTHER_CHUNK}, this format uses {PAGE_CHUNK}",
    )
    refused(
        raw({"record": {}, "files": [entry("core-1.img", OTHER_CHUNK + 1, OTHER_CHUNK, 1)]}, H[0]),
        f"m: core-1.img: 1 chunks do not make {OTHER_CHUNK + 1} bytes",
    )


@pytest.mark.parametrize("digest", ["AB" * 32, "ab" * 31, "xy" * 32, 7, None])
def test_a_digest_is_a_blake3_hex_digest(digest):
    refused(
        raw({"record": {}, "files": [entry(digest=digest)]}, H[0]),
        "m: core-1.img: the digest is not a BLAKE3 hex digest",
    )


def test_a_digest_may_be_absent():
    _, [stored] = manifest.decode(raw({"record": {}, "files": [entry()]}, H[0]), KEY)
    assert stored.digest == "" and stored.chunks == [H[0]]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        MAGIC,
        MAGIC + (5).to_bytes(4, "little") + b"[1,2]",
        MAGIC + (12).to_bytes(4, "little") + b'{"signer": 1}',
        MAGIC + (21).to_bytes(4, "little") + b'{"signer": "ABCDEF"}',
        raw({"signer": "0123456789abcdef0"}),
        raw({"signer": "0123456789abcdeg"}),
    ],
)
def test_the_claimed_signer_is_unknown_unless_it_is_a_fingerprint(data):
    assert claimed_signer(data) == "unknown"


def test_the_claimed_signer_is_read_without_the_key():
    assert claimed_signer(raw({"signer": "0123456789abcdef"}, key=b"other")) == "0123456789abcdef"
