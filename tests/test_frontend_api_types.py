"""The frontend's API types (labextension/src/api.ts) match the server's
OpenAPI description (jupyter_ckpt/openapi.yaml), field by field.

Both files are parsed here, with no Node.js: the YAML with pyyaml, the
TypeScript interfaces and type aliases with a small parser that knows what
api.ts uses (primitives, string literals, unions, `null`, arrays, inline object
types, index signatures, Record<string, T>, references to other interfaces
and aliases).

Rules, per mapped interface and schema:
- every property of the schema is a field of the interface, and vice versa;
- required vs optional: a schema's `required` list when it has one. Without
  one, a *response* model counts every property as always present (the
  server serializes whole dataclasses / dicts), so the TypeScript field must
  not be optional; a *request* body follows OpenAPI (not listed = optional),
  and the client may still declare a field it always sends as required;
- types: string -> string (with `enum`: exactly that union of string literals),
  integer and number -> number, boolean -> boolean, `nullable: true` <->
  `| null`, array -> T[] / Array<T>, $ref -> the interface mapped to that
  schema, inline object -> an inline object type (or a mapped interface),
  additionalProperties -> an index signature or Record<string, T>.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "jupyter_ckpt" / "openapi.yaml"
API_TS = ROOT / "labextension" / "src" / "api.ts"

# The interfaces of api.ts that are API models, and the schema each one is:
# (direction, JSON pointer into openapi.yaml). "response": what the server
# sends; "request": what the client sends.
_KERNEL = "/paths/~1api~1ckpt~1kernels~1{kernel_id}/get/responses/200/content/application~1json/schema"
_RESTORE = "/paths/~1api~1ckpt~1snapshots~1{snapshot_id}~1restore/post/requestBody/content/application~1json/schema"
MODELS: dict[str, tuple[str, str]] = {
    "ISnapshot": ("response", "/components/schemas/Snapshot"),
    "IRestoreOutcome": ("response", "/components/schemas/RestoreOutcome"),
    "ISchedule": ("response", "/components/schemas/Schedule"),
    "IServerStatus": ("response", "/components/schemas/Status"),
    "IKernelState": ("response", _KERNEL),
    "IRestoreOptions": ("request", _RESTORE),
    "IImport": ("response", "/components/schemas/Snapshot/properties/imported"),
    "IPreviousRunKernel": ("response", "/components/schemas/Status/properties/previous_run/items"),
    "IHibernation": ("response", "/components/schemas/Hibernation"),
}
# Interfaces of api.ts that are deliberately not API models: nbformat's
# notebook document, described by nbformat's own schema, not openapi.yaml.
NOT_MODELS: set[str] = {"INotebookDocument"}


# --------------------------------------------------------------------------
# openapi.yaml


def load_spec() -> dict[str, Any]:
    return yaml.safe_load(SPEC.read_text())


def resolve(spec: dict[str, Any], pointer: str) -> Any:
    node: Any = spec
    for part in pointer.lstrip("#").strip("/").split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def describe(schema: Any) -> str:
    """A schema, shortly, for failure messages."""
    if not isinstance(schema, dict):
        return repr(schema)
    if "$ref" in schema:
        text = f"$ref {schema['$ref'].rsplit('/', 1)[-1]}"
    elif "enum" in schema:
        text = f"{schema.get('type', '')} enum [{', '.join(map(str, schema['enum']))}]".strip()
    elif schema.get("type") == "array":
        text = f"array of {describe(schema.get('items'))}"
    elif schema.get("type") == "object" or "properties" in schema:
        parts = [f"{name}: {describe(sub)}" for name, sub in schema.get("properties", {}).items()]
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            parts.append(f"[key]: {describe(extra)}")
        text = "object {" + ", ".join(parts) + "}"
    else:
        text = str(schema.get("type", "any"))
    return text + (" (nullable)" if schema.get("nullable") else "")


# --------------------------------------------------------------------------
# api.ts

_COMMENT_OR_STRING = re.compile(
    r"""('(?:\\.|[^'\\\n])*'|"(?:\\.|[^"\\\n])*"|`(?:\\.|[^`\\])*`)|(/\*.*?\*/|//[^\n]*)""", re.S
)
_TOKEN = re.compile(r"""\s*(?:('(?:\\.|[^'\\])*'|"(?:\\.|[^"\\])*")|([A-Za-z_$][\w$]*)|(-?\d+(?:\.\d+)?)|(\S))""")


def strip_comments(source: str) -> str:
    return _COMMENT_OR_STRING.sub(lambda m: m.group(1) or " ", source)


def tokenize(text: str) -> list[str]:
    tokens, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            break
        tokens.append(next(g for g in m.groups() if g is not None))
        pos = m.end()
    return tokens


# Parsed types: ("prim", name) | ("lit", value) | ("union", [types]) |
# ("array", type) | ("object", {field: (optional, type)}, index_type|None) |
# ("ref", name, [type args])


class _Parser:
    def __init__(self, tokens: list[str]):
        self.tokens, self.pos = tokens, 0

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        token = self.peek()
        if token is None or (expected is not None and token != expected):
            raise SyntaxError(f"expected {expected!r}, got {token!r} in {' '.join(self.tokens)}")
        self.pos += 1
        return token

    def type(self) -> tuple:
        if self.peek() == "|":
            self.take()
        members = [self.postfix()]
        while self.peek() == "|":
            self.take()
            members.append(self.postfix())
        return members[0] if len(members) == 1 else ("union", members)

    def postfix(self) -> tuple:
        t = self.primary()
        while self.peek() == "[" and self.pos + 1 < len(self.tokens) and self.tokens[self.pos + 1] == "]":
            self.take("[")
            self.take("]")
            t = ("array", t)
        return t

    def primary(self) -> tuple:
        token = self.take()
        if token == "(":
            t = self.type()
            self.take(")")
            return t
        if token == "{":
            return self.members("}")
        if token[0] in "'\"":
            return ("lit", token[1:-1])
        if token in ("string", "number", "boolean", "null", "undefined", "unknown", "any", "never"):
            return ("prim", token)
        if token in ("true", "false"):
            return ("lit", token == "true")
        if re.fullmatch(r"-?\d+(?:\.\d+)?", token):
            return ("lit", float(token))
        if re.fullmatch(r"[A-Za-z_$][\w$]*", token):
            args = []
            if self.peek() == "<":
                self.take("<")
                args.append(self.type())
                while self.peek() == ",":
                    self.take(",")
                    args.append(self.type())
                self.take(">")
            return ("ref", token, args)
        raise SyntaxError(f"unexpected {token!r} in {' '.join(self.tokens)}")

    def members(self, end: str) -> tuple:
        fields: dict[str, tuple[bool, tuple]] = {}
        index = None
        while self.peek() != end:
            if self.peek() == "readonly":
                self.take()
            if self.peek() == "[":
                self.take("[")
                self.take()  # the key's name
                self.take(":")
                self.take("string")
                self.take("]")
                self.take(":")
                index = self.type()
            else:
                name = self.take()
                if name[0] in "'\"":
                    name = name[1:-1]
                optional = self.peek() == "?"
                if optional:
                    self.take("?")
                self.take(":")
                fields[name] = (optional, self.type())
            if self.peek() in (";", ","):
                self.take()
        self.take(end)
        return ("object", fields, index)


def parse_type(text: str) -> tuple:
    parser = _Parser(tokenize(text))
    t = parser.type()
    if parser.peek() is not None:
        raise SyntaxError(f"trailing {parser.peek()!r} in {text!r}")
    return t


def _balanced(source: str, start: int) -> int:
    """The index just past the brace that closes the one at `start`."""
    depth = 0
    for i in range(start, len(source)):
        depth += {"{": 1, "}": -1}.get(source[i], 0)
        if depth == 0:
            return i + 1
    raise SyntaxError("unbalanced braces")


def parse_declarations(source: str) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """api.ts's interfaces (as object types) and type aliases, by name."""
    source = strip_comments(source)
    interfaces: dict[str, tuple] = {}
    bases: dict[str, list[str]] = {}
    for m in re.finditer(r"\binterface\s+(\w+)(?:\s+extends\s+([\w\s,]+?))?\s*\{", source):
        end = _balanced(source, m.end() - 1)
        interfaces[m.group(1)] = _Parser(tokenize(source[m.end() : end])).members("}")
        bases[m.group(1)] = [b.strip() for b in (m.group(2) or "").split(",") if b.strip()]
    aliases: dict[str, tuple] = {}
    for m in re.finditer(r"\btype\s+(\w+)\s*=", source):
        depth, i = 0, m.end()
        while i < len(source) and not (source[i] == ";" and depth == 0):
            depth += {"{": 1, "(": 1, "<": 1, "}": -1, ")": -1, ">": -1}.get(source[i], 0)
            i += 1
        aliases[m.group(1)] = parse_type(source[m.end() : i])
    for name, extends in bases.items():  # inherited fields (none in api.ts today)
        for base in extends:
            _, fields, index = interfaces[name]
            interfaces[name] = ("object", {**interfaces[base][1], **fields}, index or interfaces[base][2])
    return interfaces, aliases


def show(t: tuple) -> str:
    """A parsed type as TypeScript, for failure messages."""
    kind = t[0]
    if kind == "prim":
        return t[1]
    if kind == "lit":
        return f"'{t[1]}'" if isinstance(t[1], str) else str(t[1]).lower()
    if kind == "union":
        return " | ".join(show(m) for m in t[1])
    if kind == "array":
        inner = show(t[1])
        return f"({inner})[]" if t[1][0] == "union" else f"{inner}[]"
    if kind == "object":
        parts = [f"{n}{'?' if opt else ''}: {show(ft)}" for n, (opt, ft) in t[1].items()]
        if t[2] is not None:
            parts.append(f"[key: string]: {show(t[2])}")
        return "{ " + "; ".join(parts) + " }"
    return t[1] + (f"<{', '.join(show(a) for a in t[2])}>" if t[2] else "")


# --------------------------------------------------------------------------
# The comparison


class Checker:
    def __init__(
        self,
        spec: dict[str, Any],
        interfaces: dict[str, tuple],
        aliases: dict[str, tuple],
        models: dict[str, tuple[str, str]],
    ):
        self.spec, self.interfaces, self.aliases = spec, interfaces, aliases
        self.by_pointer = {pointer: name for name, (_, pointer) in models.items()}
        self.errors: list[str] = []

    def expand(self, t: tuple, seen: tuple[str, ...] = ()) -> tuple:
        """Resolves aliases, Array<T> and Record<string, T> (not interfaces)."""
        if t[0] == "ref":
            name, args = t[1], t[2]
            if name in self.aliases and name not in seen:
                return self.expand(self.aliases[name], seen + (name,))
            if name == "Array" and len(args) == 1:
                return ("array", args[0])
            if name == "Record" and len(args) == 2 and args[0] == ("prim", "string"):
                return ("object", {}, args[1])
        if t[0] == "union":
            flat = []
            for member in t[1]:
                member = self.expand(member, seen)
                flat.extend(member[1] if member[0] == "union" else [member])
            return ("union", flat) if len(flat) > 1 else flat[0]
        return t

    def fail(self, where: str, problem: str) -> None:
        self.errors.append(f"{where}: {problem}")

    def compare(self, where: str, schema: dict[str, Any], ts: tuple, direction: str) -> None:
        pair = f"openapi {describe(schema)} vs api.ts {show(ts)}"
        t = self.expand(ts)
        members = t[1] if t[0] == "union" else [t]
        if ("prim", "undefined") in members:
            self.fail(where, f"`undefined` in a type: make the field optional instead ({pair})")
        has_null = ("prim", "null") in members
        if bool(schema.get("nullable")) != has_null:
            self.fail(
                where,
                f"{'nullable' if schema.get('nullable') else 'not nullable'} in openapi, "
                f"{'' if has_null else 'no '}`| null` in api.ts ({pair})",
            )
        rest = [m for m in members if m not in (("prim", "null"), ("prim", "undefined"))]
        if not rest:
            self.fail(where, f"no type besides null ({pair})")
            return
        t = rest[0] if len(rest) == 1 else ("union", rest)

        if "$ref" in schema:
            pointer = schema["$ref"].lstrip("#")
            expected = self.by_pointer.get(pointer)
            if expected is not None:
                if t[:2] != ("ref", expected):
                    self.fail(where, f"expected the interface {expected} ({pair})")
                return
            schema = resolve(self.spec, pointer)
        kind = schema.get("type") or ("object" if "properties" in schema else None)

        if kind == "string" and "enum" in schema:
            lits = [m for m in (t[1] if t[0] == "union" else [t])]
            if not all(m[0] == "lit" for m in lits) or {m[1] for m in lits} != set(schema["enum"]):
                self.fail(where, f"type differs ({pair})")
        elif kind in ("string", "number", "integer", "boolean"):
            want = {"string": "string", "number": "number", "integer": "number", "boolean": "boolean"}[kind]
            if t != ("prim", want):
                self.fail(where, f"type differs: openapi {kind} needs `{want}` ({pair})")
        elif kind == "array":
            if t[0] != "array":
                self.fail(where, f"type differs: expected an array ({pair})")
            else:
                self.compare(f"{where}[]", schema.get("items", {}), t[1], direction)
        elif kind == "object":
            if t[0] == "ref" and t[1] in self.interfaces:
                t = self.interfaces[t[1]]
            if t[0] != "object":
                self.fail(where, f"type differs: expected an object type ({pair})")
            else:
                self.compare_object(where, schema, t, direction)
        else:
            self.fail(where, f"the test does not know openapi type {kind!r} ({pair})")

    def compare_object(self, where: str, schema: dict[str, Any], ts: tuple, direction: str) -> None:
        _, fields, index = ts
        props: dict[str, Any] = schema.get("properties", {})
        required = (
            set(schema["required"]) if "required" in schema else (set(props) if direction == "response" else set())
        )
        for name, sub in props.items():
            if name not in fields:
                self.fail(f"{where}.{name}", f"in openapi as {describe(sub)}, missing from api.ts")
                continue
            optional, field_type = fields[name]
            if name in required and optional:
                self.fail(
                    f"{where}.{name}",
                    f"required in openapi ({describe(sub)}), optional in api.ts ({name}?: {show(field_type)})",
                )
            if name not in required and not optional and direction == "response":
                self.fail(
                    f"{where}.{name}",
                    f"optional in openapi ({describe(sub)}), required in api.ts ({name}: {show(field_type)})",
                )
            self.compare(f"{where}.{name}", sub, field_type, direction)
        for name, (optional, field_type) in fields.items():
            if name not in props:
                self.fail(
                    f"{where}.{name}",
                    f"in api.ts as {name}{'?' if optional else ''}: {show(field_type)}, "
                    f"not in openapi {describe(schema)}",
                )
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            if index is None:
                self.fail(
                    f"{where}[key]",
                    f"openapi additionalProperties {describe(extra)}, "
                    f"no index signature / Record<string, T> in api.ts ({show(ts)})",
                )
            else:
                self.compare(f"{where}[key]", extra, index, direction)
        elif index is not None:
            self.fail(
                f"{where}[key]",
                f"index signature {show(index)} in api.ts, "
                f"no additionalProperties schema in openapi {describe(schema)}",
            )

    def check(self, interface: str, direction: str, pointer: str) -> list[str]:
        self.errors = []
        schema = resolve(self.spec, pointer)
        self.compare_object(interface, schema, self.interfaces[interface], direction)
        return self.errors


def _checker() -> Checker:
    interfaces, aliases = parse_declarations(API_TS.read_text())
    return Checker(load_spec(), interfaces, aliases, MODELS)


# --------------------------------------------------------------------------
# Tests


def test_every_model_is_mapped():
    interfaces, _ = parse_declarations(API_TS.read_text())
    unmapped = set(interfaces) - set(MODELS) - NOT_MODELS
    assert not unmapped, f"api.ts interfaces neither in MODELS nor NOT_MODELS: {sorted(unmapped)}"
    assert not set(MODELS) - set(interfaces), (
        f"MODELS names interfaces api.ts lacks: {sorted(set(MODELS) - set(interfaces))}"
    )
    schemas = {f"/components/schemas/{name}" for name in load_spec()["components"]["schemas"]}
    mapped = {pointer for _, pointer in MODELS.values()}
    assert schemas <= mapped, f"component schemas with no interface in api.ts: {sorted(schemas - mapped)}"


@pytest.mark.parametrize("interface", sorted(MODELS))
def test_interface_matches_schema(interface):
    direction, pointer = MODELS[interface]
    errors = _checker().check(interface, direction, pointer)
    if errors:
        pytest.fail(f"api.ts {interface} vs openapi.yaml {pointer}:\n  " + "\n  ".join(errors), pytrace=False)


# The checker itself, on small made-up cases: it must catch each kind of drift.
_SPEC = {
    "components": {
        "schemas": {
            "Thing": {
                "type": "object",
                "properties": {
                    "id": {"type": "string"},
                    "size": {"type": "integer", "nullable": True},
                    "state": {"type": "string", "enum": ["a", "b"]},
                    "tags": {"type": "array", "items": {"type": "string"}},
                    "parts": {"type": "array", "items": {"$ref": "#/components/schemas/Part"}},
                    "meta": {"type": "object", "properties": {"ok": {"type": "boolean"}}},
                    "flags": {"type": "object", "additionalProperties": {"type": "boolean"}},
                },
            },
            "Part": {"type": "object", "properties": {"n": {"type": "number"}}},
        }
    }
}
_GOOD = """
export type State = 'a' | 'b';
export interface IPart { n: number; }
export interface IThing {
  id: string;
  size: number | null;  // bytes
  state: State;
  tags: Array<string>;
  parts: IPart[];
  /** nested */
  meta: { ok: boolean };
  flags: Record<string, boolean>;
}
"""
_DRIFTS = [
    ("id: string;", "ident: string;", ["IThing.id: in openapi", "IThing.ident: in api.ts"]),
    ("id: string;", "id?: string;", ["IThing.id: required in openapi"]),
    ("id: string;", "id: number;", ["IThing.id: type differs: openapi string needs `string`"]),
    ("size: number | null;", "size: number;", ["IThing.size: nullable in openapi"]),
    ("size: number | null;", "size: string | null;", ["IThing.size: type differs"]),
    ("'a' | 'b'", "'a' | 'c'", ["IThing.state: type differs"]),
    ("Array<string>", "string", ["IThing.tags: type differs: expected an array"]),
    ("parts: IPart[];", "parts: IThing[];", ["IThing.parts[]: expected the interface IPart"]),
    ("{ ok: boolean }", "{ ok: boolean; extra: string }", ["IThing.meta.extra: in api.ts"]),
    ("Record<string, boolean>", "{ [k: string]: string }", ["IThing.flags[key]: type differs"]),
    ("Record<string, boolean>", "{ a: boolean }", ["IThing.flags.a: in api.ts", "IThing.flags[key]: openapi"]),
]


def _check_made_up(source: str) -> list[str]:
    interfaces, aliases = parse_declarations(source)
    models = {"IThing": ("response", "/components/schemas/Thing"), "IPart": ("response", "/components/schemas/Part")}
    return Checker(_SPEC, interfaces, aliases, models).check("IThing", "response", "/components/schemas/Thing")


def test_checker_accepts_a_matching_interface():
    assert _check_made_up(_GOOD) == []


@pytest.mark.parametrize("old,new,expected", _DRIFTS)
def test_checker_catches_drift(old, new, expected):
    assert old in _GOOD
    errors = _check_made_up(_GOOD.replace(old, new, 1))
    for start in expected:
        assert any(e.startswith(start) for e in errors), (start, errors)
    assert len(errors) == len(expected), errors


def test_request_bodies_may_require_what_openapi_leaves_optional():
    spec = {"components": {"schemas": {"Body": {"type": "object", "properties": {"mode": {"type": "string"}}}}}}
    interfaces, aliases = parse_declarations("interface IBody { mode: string }")
    checker = Checker(spec, interfaces, aliases, {})
    assert checker.check("IBody", "request", "/components/schemas/Body") == []
    assert checker.check("IBody", "response", "/components/schemas/Body") == []
    spec["components"]["schemas"]["Body"]["required"] = ["mode"]
    interfaces, aliases = parse_declarations("interface IBody { mode?: string }")
    errors = Checker(spec, interfaces, aliases, {}).check("IBody", "request", "/components/schemas/Body")
    assert errors and errors[0].startswith("IBody.mode: required in openapi"), errors
