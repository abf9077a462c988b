"""The OpenAPI description shipped in the package matches the routes served."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

import jupyter_ckpt
from jupyter_ckpt.handlers import default_handlers
from jupyter_ckpt.records import SnapshotRecord

SPEC = Path(jupyter_ckpt.__file__).parent / "openapi.yaml"


def test_every_route_is_described_and_nothing_else():
    spec = yaml.safe_load(SPEC.read_text())
    described = set(spec["paths"])
    served = {re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", pattern) for pattern, _ in default_handlers}
    assert described == served


def test_snapshot_schema_lists_the_model_fields():
    spec = yaml.safe_load(SPEC.read_text())
    fields = set(spec["components"]["schemas"]["Snapshot"]["properties"])
    model = set(SnapshotRecord.__dataclass_fields__) - {"stdio_keys", "connection"}
    assert fields == model
