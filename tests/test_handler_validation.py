"""What the REST handlers make of a request before the manager sees it: the
JSON body, the query flags, and the status of each error. The same rules
through a real server are in tests/test_requests.py and tests/test_properties.py."""

from __future__ import annotations

import pytest
from tornado import web

from jupyter_ckpt import errors
from jupyter_ckpt.request_checks import parse_json_body, query_flag, status_for


@pytest.mark.parametrize("raw", [b"", b"  \n\t"])
def test_no_body_is_an_empty_object(raw):
    assert parse_json_body(raw) == {}


def test_a_json_object_is_the_body():
    assert parse_json_body(b'{"label": "ok", "n": 1.5, "x": [null, true]}') == {
        "label": "ok",
        "n": 1.5,
        "x": [None, True],
    }
    assert parse_json_body(' {"é": "ü"} '.encode()) == {"é": "ü"}


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"\xff\xfe{}", "the request body is not JSON (UTF-8) of a reasonable depth: 'utf-8' codec"),
        (b"{not json", "the request body is not JSON (UTF-8) of a reasonable depth: Expecting property name"),
        (b'{"n": NaN}', "the request body is not JSON (UTF-8) of a reasonable depth: NaN is not a JSON number"),
        (b'{"n": -Infinity}', "the request body is not JSON (UTF-8) of a reasonable depth: -Infinity is not a JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "the request body is not JSON (UTF-8) of a reasonable depth: maximum"),
        (b'"a string"', "the request body must be a JSON object"),
        (b"[1]", "the request body must be a JSON object"),
        (b"null", "the request body must be a JSON object"),
        (b"3", "the request body must be a JSON object"),
    ],
)
def test_anything_else_is_a_400_with_the_reason(raw, message):
    with pytest.raises(web.HTTPError) as e:
        parse_json_body(raw)
    assert e.value.status_code == 400
    assert e.value.log_message.startswith(message), e.value.log_message


@pytest.mark.parametrize(
    "error, status",
    [
        (errors.InvalidRequest, 400),
        (errors.NotPermitted, 403),
        (errors.SnapshotNotFound, 404),
        (errors.KernelNotFound, 404),
        (errors.KernelNotCheckpointable, 409),
        (errors.OperationInProgress, 409),
        (errors.SnapshotNotRestorable, 409),
        (errors.DumpFailed, 500),
        (errors.RestoreFailed, 500),
        (errors.NotSupported, 501),
        (errors.CriuUnavailable, 503),
        (errors.QuotaExceeded, 507),
        (errors.CheckpointError, 500),  # any other
    ],
)
def test_each_error_has_its_status(error, status):
    assert status_for(error("why")) == status


def test_a_subclass_gets_its_base_class_status():
    class Gone(errors.SnapshotNotFound):
        pass

    assert status_for(Gone("x")) == 404


@pytest.mark.parametrize("value", ["1", "true", "True", "YES", "yes"])
def test_yes_flags(value):
    assert query_flag(value) is True


@pytest.mark.parametrize("value", ["0", "false", "no", "", "trust", "y"])
def test_no_flags(value):
    assert query_flag(value) is False
