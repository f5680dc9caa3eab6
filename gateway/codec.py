"""The wire codec: JSON text frames <-> the protocol's attrs classes, checked against spec/v1.

Everything expensive happens once, at import: the schemas are read from `spec_root()`, compiled
by fastjsonschema with `$ref`s resolved only from the local spec files, and the one cattrs
converter generates its structure/unstructure functions. Decoding a frame is then: a strict
`json` parse, the envelope validator, the channel's payload validator and its structure function.

`decode` never raises: any input gives a `Decoded` command or a `DecodeError` whose `ErrorPayload`
names the broken rule and the JSON pointer of the first violation, and never a value from the
frame (a value may be a secret).
"""

from __future__ import annotations

import functools
import json
import re
import typing
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, date, datetime, timedelta
from itertools import accumulate
from typing import Any, Final
from urllib.parse import unquote, urldefrag, urljoin, urlsplit

import attrs
import fastjsonschema
import orjson
from attrs import frozen
from cattrs import Converter
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override
from fastjsonschema import JsonSchemaValueException

from gateway import strictjson
from gateway.specfiles import spec_root
from statemachine import messages as m
from statemachine.messages import Channel, ErrorCode, ErrorPayload, Millis

SPEC_BASE_URL: Final = "https://agent-service.spec/v1/"
"""The `$id` prefix of every schema in spec/v1; it maps onto the files under spec/v1/."""

DEFAULT_MAX_BYTES: Final = 1 << 20
"""Frames larger than this (UTF-8 bytes) get `payload_too_large` without being parsed."""

MAX_DEPTH: Final = 32
"""Deepest nesting of arrays/objects accepted (the envelope is level 1): bounds every recursion
downstream (schema checks, orjson's own 255-level limit, stores) whatever the sender does."""

Validator = Callable[[Any], Any]


class SpecError(Exception):
    """The spec files are missing or broken, or a `$ref` points outside spec/v1."""


class FrameRejected(ValueError):
    """A frame from the gateway broke the protocol (raised by `decode_server_frame`)."""

    def __init__(self, request_id: str | None, error: ErrorPayload) -> None:
        super().__init__(f"{error.code.value}: {error.message} (at {error.path!r})")
        self.request_id = request_id
        self.error = error


@frozen
class Decoded:
    """A command read off the wire: what the core's `CommandReceived` is built from."""

    channel: Channel
    request_id: str
    command: m.Command


@frozen
class DecodeError:
    """Why a frame was refused, ready to send back on `runtime.session.error`."""

    request_id: str | None
    error: ErrorPayload


BINARY_FRAME: Final = DecodeError(
    None,
    ErrorPayload.of(ErrorCode.INVALID_FRAME, "binary frames are not part of the protocol"),
)
"""The answer to a binary WebSocket frame: the protocol is UTF-8 JSON text only."""


# --- loading and compiling the schemas ---------------------------------------------------------


def _load_spec_document(uri: str) -> Any:
    """Read the schema a `$ref` names, refusing anything that is not a file under spec/v1."""
    parts = urlsplit(uri)
    if (
        parts.scheme != "https"
        or parts.netloc != urlsplit(SPEC_BASE_URL).netloc
        or parts.query
        or parts.fragment
        or not parts.path.startswith("/v1/")
    ):
        raise SpecError(f"$ref outside {SPEC_BASE_URL}: {uri!r}")
    relative = parts.path[len("/v1/") :]
    segments = relative.split("/")
    if "%" in relative or "\\" in relative or any(s in ("", ".", "..") for s in segments):
        raise SpecError(f"$ref with an unsafe path: {uri!r}")
    root = (spec_root() / "v1").resolve()
    path = root.joinpath(*segments).resolve()
    if not path.is_relative_to(root) or path.suffix != ".json" or not path.is_file():
        raise SpecError(f"$ref to a file that is not a schema under spec/v1: {uri!r}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SpecError(f"unreadable schema {path}: {exc}") from exc


class _LocalOnly(Mapping[str, Callable[[str], Any]]):
    """A `$ref` handler claiming every URL scheme, so no URL can ever reach urllib.

    fastjsonschema fetches any scheme missing from `handlers` (even "", a relative ref without
    a base) with urllib.request.urlopen; this mapping contains every scheme.
    """

    def __getitem__(self, scheme: str) -> Callable[[str], Any]:
        return _load_spec_document

    def __contains__(self, scheme: object) -> bool:
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(("https", "http"))

    def __len__(self) -> int:
        return 2


_DATA_KEYWORDS: Final = frozenset({"enum", "const", "default", "examples"})
_MAX_REF_DEPTH: Final = 64


def _inline_refs(node: Any, scope: str, depth: int = 0) -> Any:
    """Replace every `$ref` by the local schema it names, to make validators faster.

    The compiled validator then runs straight-line code instead of one function call per
    reference (a third of the cost of validating a small frame). spec/v1 uses only JSON-pointer
    refs and root-level `$id`s; anything else is refused rather than half-supported.
    """
    if depth > _MAX_REF_DEPTH:
        raise SpecError("$refs nest too deeply (a reference cycle?)")
    if isinstance(node, list):
        return [_inline_refs(item, scope, depth + 1) for item in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if isinstance(ref, str):
        if len(node) > 1:
            raise SpecError(f"keywords beside $ref {ref!r} would be ignored by fastjsonschema")
        document_uri, fragment = urldefrag(urljoin(scope, ref))
        if fragment and not fragment.startswith("/"):
            raise SpecError(f"only JSON-pointer $refs are supported: {ref!r}")
        document = _load_spec_document(document_uri)
        if document.get("$id") != document_uri:
            raise SpecError(f"{document_uri} does not declare itself as its $id")
        target = document
        for token in fragment.split("/")[1:]:
            token = unquote(token).replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or token not in target:
                raise SpecError(f"$ref to nothing: {ref!r} from {scope}")
            target = target[token]
        return _inline_refs(target, document_uri, depth + 1)
    if "$id" in node and depth > 0:
        raise SpecError("$id is only supported at the root of a schema file")
    return {
        key: value if key in _DATA_KEYWORDS else _inline_refs(value, scope, depth + 1)
        for key, value in node.items()
        if key not in ("$id", "$schema")
    }


def compile_schema(schema: Mapping[str, Any], base_uri: str = "") -> Validator:
    """Compile a schema whose `$ref`s may only reach spec/v1 (never the network or other files)."""
    inlined = _inline_refs(dict(schema), urljoin(base_uri, schema.get("$id", "")))
    try:
        return fastjsonschema.compile(
            inlined,
            handlers=_LocalOnly(),  # a second lock: no $ref is left, but none could escape
            use_default=False,  # validation must not add keys to the frame
            use_formats=False,  # the spec uses explicit patterns, never `format`
        )
    except fastjsonschema.JsonSchemaDefinitionException as exc:
        raise SpecError(f"schema does not compile: {exc}") from exc


def compile_def(ref: str) -> Validator:
    """Compile one definition named relative to spec/v1/schemas/, e.g. `envelope.json#/$defs/X`."""
    return compile_schema({"$ref": SPEC_BASE_URL + "schemas/" + ref})


PAYLOAD_SCHEMAS: Final[Mapping[Channel, str]] = {
    Channel.ATTACH: "commands/runtime-session.json#/$defs/RuntimeAttachRequest",
    Channel.ATTACH_REPLY: "commands/runtime-session.json#/$defs/RuntimeAttachResponse",
    Channel.HEARTBEAT: "commands/runtime-session.json#/$defs/HeartbeatCommand",
    Channel.HEARTBEAT_REPLY: "commands/runtime-session.json#/$defs/HeartbeatResponse",
    Channel.RECOVER: "commands/runtime-session.json#/$defs/RecoverConnectionsCommand",
    Channel.RECOVER_REPLY: "commands/runtime-session.json#/$defs/RecoverConnectionsResponse",
    Channel.SECRETS_GET: "commands/runtime-session.json#/$defs/GetSecretsCommand",
    Channel.SECRETS_GET_REPLY: "commands/runtime-session.json#/$defs/GetSecretsResponse",
    Channel.CONFIG_GET: "commands/runtime-session.json#/$defs/GetConfigCommand",
    Channel.CONFIG_GET_REPLY: "commands/runtime-session.json#/$defs/GetConfigResponse",
    Channel.KV_GET: "commands/runtime-session.json#/$defs/GetKVCommand",
    Channel.KV_GET_REPLY: "commands/runtime-session.json#/$defs/GetKVResponse",
    Channel.KV_SET: "commands/runtime-session.json#/$defs/SetKVCommand",
    Channel.KV_SET_REPLY: "commands/runtime-session.json#/$defs/SetKVResponse",
    Channel.OUTPUT: "commands/runtime-session.json#/$defs/PublishOutputEventsRequest",
    Channel.OUTPUT_REPLY: "commands/runtime-session.json#/$defs/PublishOutputEventsResponse",
    Channel.INPUT: "events/input-event.json#/$defs/TaskInputDelivery",
    Channel.INPUT_ACK: "commands/extensions.json#/$defs/AckInputCommand",
    Channel.INPUT_ACK_REPLY: "commands/extensions.json#/$defs/AckInputResponse",
    Channel.ERROR: "envelope.json#/$defs/ErrorFrame",
}
"""Each channel's payload schema, relative to spec/v1/schemas/ (as in the AsyncAPI document)."""

ENVELOPE_SCHEMA: Final = "envelope.json#/$defs/Envelope"
COMMAND_ENVELOPE_SCHEMA: Final = "envelope.json#/$defs/CommandEnvelope"
_ENVELOPE: Final = compile_def(ENVELOPE_SCHEMA)
_COMMAND_ENVELOPE: Final = compile_def(COMMAND_ENVELOPE_SCHEMA)
_REQUEST_ID: Final = compile_def("envelope.json#/$defs/RequestId")
_PAYLOAD_VALIDATORS: Final = {ch: compile_def(ref) for ch, ref in PAYLOAD_SCHEMAS.items()}


# --- timestamps --------------------------------------------------------------------------------

_TIMESTAMP = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,9})?Z")
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS: Final = timedelta(milliseconds=1)
_EPOCH_ORDINAL: Final = date(1970, 1, 1).toordinal()
_SECONDS_PER_DAY: Final = 86_400


def parse_timestamp(text: str) -> Millis:
    """RFC 3339 UTC (`...Z`, 0-9 fraction digits) to epoch millis; ValueError if no such instant."""
    # The regex fixes the shape (fromisoformat alone accepts many more); the range checks keep
    # Python versions that read "24:00" as next midnight from disagreeing with the schema.
    if _TIMESTAMP.fullmatch(text) is None or (
        text[11:13] > "23" or text[14:16] > "59" or text[17:19] > "59"
    ):
        raise ValueError("not an RFC 3339 UTC timestamp")
    # fromisoformat (C) checks the date exists; it keeps microseconds, floored to whole ms here.
    return Millis((datetime.fromisoformat(text) - _EPOCH) // _ONE_MS)


@functools.lru_cache(maxsize=256)
def _second_prefix(seconds: int) -> str:
    """`YYYY-MM-DDTHH:MM:SS.` of a second since the epoch: the timestamps of a second share it.

    Replies carry deadlines a fixed interval after now, so the same few seconds recur thousands
    of times; only the milliseconds are formatted per frame.
    """
    days, rest = divmod(seconds, _SECONDS_PER_DAY)
    minutes, second = divmod(rest, 60)
    hour, minute = divmod(minutes, 60)
    day = date.fromordinal(_EPOCH_ORDINAL + days)
    return f"{day.year:04d}-{day.month:02d}-{day.day:02d}T{hour:02d}:{minute:02d}:{second:02d}."


def format_millis(value: Millis) -> str:
    """Epoch millis to the wire's `YYYY-MM-DDTHH:MM:SS.mmmZ`."""
    seconds, millis = divmod(value, 1000)
    return f"{_second_prefix(seconds)}{millis:03d}Z"


# --- the one converter -------------------------------------------------------------------------


def _camel(name: str) -> str:
    """The seed's camelCase spelling of a snake_case field name."""
    head, *rest = name.split("_")
    return head + "".join(word.capitalize() for word in rest)


def _passthrough(value: Any, _: Any = None) -> Any:
    """Keep a schema-checked JSON value as it is: copying free-form maps costs and buys nothing."""
    return value


def _make_converter() -> Converter:
    """The single place that says how the protocol's classes look as JSON."""
    conv = Converter(detailed_validation=False)  # the schemas already checked every field

    def camel_names(cls: type[Any]) -> dict[str, Any]:
        return {a.name: override(rename=_camel(a.name)) for a in attrs.fields(cls)}

    def structure_factory(cls: type[Any]) -> Callable[[Any, Any], Any]:
        return make_dict_structure_fn(cls, conv, **camel_names(cls))

    def unstructure_factory(cls: type[Any]) -> Callable[[Any], Any]:
        # Optional fields are not nullable in the schemas: leave them out when at their default.
        return make_dict_unstructure_fn(cls, conv, _cattrs_omit_if_default=True, **camel_names(cls))

    conv.register_structure_hook_factory(attrs.has, structure_factory)
    conv.register_unstructure_hook_factory(attrs.has, unstructure_factory)
    conv.register_structure_hook(Millis, lambda value, _: parse_timestamp(value))
    conv.register_unstructure_hook(Millis, format_millis)
    # Generic aliases are not classes: cattrs takes hooks for them through predicates.
    # The schemas have already checked these values' types, so structuring them is a no-op (or a
    # tuple() for arrays); `| None` variants are only structured when the key is present.
    as_is = (dict[str, Any], dict[str, str], dict[str, Any] | None, str | None)
    as_tuple = (tuple[str, ...], tuple[str, ...] | None)

    def free_form(hint: Any) -> bool:
        return any(hint == known for known in as_is)

    def names(hint: Any) -> bool:
        return any(hint == known for known in as_tuple)

    conv.register_structure_hook_func(free_form, _passthrough)
    conv.register_unstructure_hook_func(free_form, _passthrough)
    conv.register_structure_hook_func(names, lambda value, _: tuple(value))
    conv.register_unstructure_hook_func(names, list)
    return conv


CONVERTER: Final = _make_converter()
"""Structures payload dicts into messages classes and back (camelCase, RFC 3339 timestamps)."""


def _millis_paths(cls: type[Any]) -> list[tuple[str, ...]]:
    """Where `Millis` fields sit in a payload ("*" = every array item), to locate a bad date."""
    hints = typing.get_type_hints(cls)
    paths: list[tuple[str, ...]] = []
    for field in attrs.fields(cls):
        hint, key = hints[field.name], _camel(field.name)
        if hint is Millis:
            paths.append((key,))
        elif typing.get_origin(hint) is tuple and attrs.has(typing.get_args(hint)[0]):
            paths.extend((key, "*", *sub) for sub in _millis_paths(typing.get_args(hint)[0]))
    return paths


@frozen
class _Route:
    """What one channel's payload needs: its validator, its class and that class's hook."""

    channel: Channel
    validate: Validator
    cls: type[Any]
    structure: Callable[[Any, Any], Any]
    millis_paths: list[tuple[str, ...]]
    # Top-level payload properties this version knows, where others are ignored, not refused.
    known: frozenset[str] | None = None


def _route(channel: Channel, cls: type[Any], *, ignore_unknown: bool = False) -> _Route:
    """Precompute a channel's decoding so no per-frame work belongs to setup."""
    hook = CONVERTER.get_structure_hook(cls)
    known = frozenset(_camel(f.name) for f in attrs.fields(cls)) if ignore_unknown else None
    return _Route(channel, _PAYLOAD_VALIDATORS[channel], cls, hook, _millis_paths(cls), known)


_COMMAND_ROUTES: Final = {ch.value: _route(ch, cls) for ch, cls in m.COMMAND_CHANNELS.items()}
# A runtime reads gateway frames leniently: a newer gateway may add optional properties to a
# payload (extensions, as `nextOutputSeq` and `maxFrameBytes` were), and a runtime built before
# them must still attach. The gateway stays strict about what runtimes send.
_SERVER_ROUTES: Final = {
    ch.value: _route(ch, cls, ignore_unknown=True) for cls, ch in m.REPLY_CHANNELS.items()
}
_CLASS_OF: Final[dict[Channel, type[Any]]] = {
    **m.COMMAND_CHANNELS,
    **{ch: cls for cls, ch in m.REPLY_CHANNELS.items()},
}
# Each channel's class, wire name and unstructure hook, looked up once here instead of per frame
# (an enum's `.value` alone costs as much as formatting a timestamp).
_ENCODERS: Final[dict[Channel, tuple[type[Any], str, Callable[[Any], Any]]]] = {
    channel: (cls, channel.value, CONVERTER.get_unstructure_hook(cls))
    for channel, cls in _CLASS_OF.items()
}


# --- strict JSON -------------------------------------------------------------------------------


_DECODER: Final = strictjson.decoder()
_SCAN: Final = strictjson.scanner(_DECODER)
_STRING_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")
_DEPTH_STEP: Final = {"[": 1, "{": 1, "]": -1, "}": -1}
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _too_deep(text: str) -> bool:
    """Whether well-formed JSON `text` nests deeper than MAX_DEPTH."""
    brackets = _BRACKET.findall(_STRING_TOKEN.sub("", text))
    return max(accumulate(map(_DEPTH_STEP.__getitem__, brackets))) > MAX_DEPTH


# --- errors ------------------------------------------------------------------------------------


class _Problem(Exception):
    """Internal: the frame is refused; carries what the error frame will say."""

    def __init__(
        self,
        request_id: str | None,
        code: ErrorCode,
        message: str,
        path: str | None = None,
        *,
        readable: bool = True,
    ) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.payload = ErrorPayload.of(code, message, path)
        # False when the frame is not JSON at all: its "id" would be a guess, so it gets none.
        self.readable = readable


def _invalid(message: str, path: str | None = None, request_id: str | None = None) -> _Problem:
    """An `invalid_frame` problem."""
    return _Problem(request_id, ErrorCode.INVALID_FRAME, message, path)


def _unreadable(message: str) -> _Problem:
    """An `invalid_frame` problem for a frame that is not JSON text at all (answered, id null)."""
    return _Problem(None, ErrorCode.INVALID_FRAME, message, readable=False)


_MAX_POINTER: Final = 1024
_RULE_PHRASES: Final = {
    "type": "has the wrong JSON type",
    "required": "is a required property that is missing",
    "additionalProperties": "is not a property this message has",
    "pattern": "does not have the required form",
    "maxLength": "is too long",
    "minLength": "is too short",
    "maxItems": "has too many items",
    "maxProperties": "has too many properties",
    "minimum": "is too small",
    "maximum": "is too large",
    "enum": "is not one of the allowed values",
    "const": "is not the required value",
    "propertyNames": "has a key that is too long",
}


def _pointer(segments: list[str]) -> str:
    """RFC 6901 pointer of `segments`, cut back to an ancestor if it would be too long."""
    escaped = [s.replace("~", "~0").replace("/", "~1") for s in segments]
    while escaped and sum(len(s) + 1 for s in escaped) > _MAX_POINTER:
        escaped.pop()
    return "".join("/" + s for s in escaped)


def _locate(doc: Any, name: str) -> tuple[list[str], Any]:
    """Turn fastjsonschema's `data.a[0].b` into JSON-pointer segments and the node there.

    Keys are resolved against the document itself, since a key may contain "." or "[".
    """
    rest, node, segments = name[4:], doc, []  # drop the leading "data"
    while rest:
        if rest[0] == "[" and isinstance(node, list):
            end = rest.index("]")
            index = int(rest[1:end])
            segments.append(str(index))
            node, rest = node[index], rest[end + 1 :]
        elif rest[0] == "." and isinstance(node, dict):
            keys = [
                k
                for k in node
                if rest.startswith(k, 1) and (len(rest) == len(k) + 1 or rest[len(k) + 1] in ".[")
            ]
            if not keys:
                break
            key = max(keys, key=len)
            segments.append(key)
            node, rest = node[key], rest[len(key) + 1 :]
        else:
            break
    return segments, node


def _schema_problem(
    exc: JsonSchemaValueException, doc: Any, prefix: list[str], request_id: str | None
) -> _Problem:
    """Describe a schema violation by its rule and pointer only: never by the offending value."""
    segments, node = _locate(doc, exc.name or "data")
    rule = exc.rule or "schema"
    definition = exc.definition if isinstance(exc.definition, dict) else {}
    if rule == "required" and isinstance(node, dict):
        missing = [k for k in definition.get("required", ()) if k not in node]
        segments += missing[:1]
    elif rule == "additionalProperties" and isinstance(node, dict):
        known = definition.get("properties", {})
        segments += [k for k in node if k not in known][:1]
    phrase = _RULE_PHRASES.get(rule, "breaks the schema")
    message = f"the value at `path` {phrase} (schema rule '{rule}')"
    return _invalid(message, _pointer(prefix + segments), request_id)


def _timestamp_problem(route: _Route, payload: dict[str, Any], request_id: str) -> _Problem:
    """Point at the first timestamp naming a date that does not exist (e.g. 30 February)."""
    for template in route.millis_paths:
        for segments, value in _expand(payload, list(template), []):
            try:
                parse_timestamp(value)
            except (ValueError, TypeError):
                return _invalid(
                    "the timestamp at `path` names a date that does not exist",
                    _pointer(["payload", *segments]),
                    request_id,
                )
    return _invalid("the payload could not be read", "/payload", request_id)


def _expand(node: Any, template: list[str], done: list[str]) -> Iterator[tuple[list[str], Any]]:
    """Every concrete (pointer segments, value) a template path with "*" reaches in `node`."""
    if not template:
        yield done, node
        return
    head, rest = template[0], template[1:]
    if head == "*" and isinstance(node, list):
        for index, item in enumerate(node):
            yield from _expand(item, rest, [*done, str(index)])
    elif isinstance(node, dict) and head in node:
        yield from _expand(node[head], rest, [*done, head])


# --- decoding ----------------------------------------------------------------------------------


def _parse(text: str | bytes, max_bytes: int) -> dict[str, Any]:
    """Strictly parse one frame into its envelope object."""
    if isinstance(text, str):
        if len(text) > max_bytes:
            raise _Problem(None, ErrorCode.PAYLOAD_TOO_LARGE, "the frame is too large")
        if not text.isascii():
            try:
                size = len(text.encode("utf-8"))
            except UnicodeEncodeError:
                raise _invalid("the frame is not valid Unicode (lone surrogate)") from None
            if size > max_bytes:
                raise _Problem(None, ErrorCode.PAYLOAD_TOO_LARGE, "the frame is too large")
    elif isinstance(text, bytes | bytearray):
        if len(text) > max_bytes:
            raise _Problem(None, ErrorCode.PAYLOAD_TOO_LARGE, "the frame is too large")
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError:
            raise _unreadable("the frame is not valid UTF-8") from None
    else:
        raise _unreadable("the frame is neither text nor bytes")
    if (doc := strictjson.fast_object(text, MAX_DEPTH)) is not None:
        return doc
    try:
        try:
            doc, end = _SCAN(text, 0)  # the C scanner directly: a third cheaper than `decode`
        except StopIteration:
            doc, end = _DECODER.decode(text), len(text)  # slow path: says what is wrong
    except strictjson.Refused as exc:
        raise _invalid(str(exc)) from None
    except RecursionError:
        raise _invalid(f"the frame nests deeper than {MAX_DEPTH} levels") from None
    except ValueError:
        raise _unreadable("the frame is not JSON") from None
    if end != len(text) and text[end:].strip(" \t\n\r"):
        raise _unreadable("the frame has data after its JSON document")
    if type(doc) is not dict:
        raise _invalid("the frame is not a JSON object", "")
    if text.count("{") + text.count("[") > MAX_DEPTH and _too_deep(text):
        raise _invalid(f"the frame nests deeper than {MAX_DEPTH} levels", "")
    if "\\u" in text and _SURROGATE_ESCAPE.search(text):
        try:
            orjson.dumps(doc)
        except orjson.JSONEncodeError:
            raise _invalid("the frame has a lone UTF-16 surrogate escape") from None
    return doc


def _readable_id(doc: dict[str, Any]) -> str | None:
    """The frame's id if it is a valid one, so even a refusal can be matched to its request."""
    request_id = doc.get("id")
    try:
        _REQUEST_ID(request_id)
    except JsonSchemaValueException:
        return None
    return typing.cast(str, request_id)


def _check_envelope(doc: dict[str, Any]) -> None:
    """Raise the `_Problem` that explains why `doc` is not an Envelope, if it is not one."""
    try:
        _ENVELOPE(doc)
    except JsonSchemaValueException as exc:
        request_id = _readable_id(doc)
        if exc.rule == "enum" and exc.name == "data.channel":
            raise _Problem(
                request_id, ErrorCode.UNKNOWN_CHANNEL, "no such channel in protocol v1", "/channel"
            ) from None
        raise _schema_problem(exc, doc, [], request_id) from None


def _decode(
    text: str | bytes, max_bytes: int, routes: dict[str, _Route], envelope: Validator
) -> tuple[_Route, str | None, Any]:
    """Parse, validate the envelope and the payload, and structure it (raising `_Problem`).

    `envelope` may be narrower than the Envelope (CommandEnvelope is): a frame it refuses is
    explained by the Envelope's rules, or else by its channel going the other way.
    """
    doc = _parse(text, max_bytes)
    try:
        envelope(doc)
    except JsonSchemaValueException:
        _check_envelope(doc)
    request_id = doc["id"]
    route = routes.get(doc["channel"])
    if route is None:
        raise _Problem(
            request_id,
            ErrorCode.UNKNOWN_CHANNEL,
            "this channel does not go in this direction",
            "/channel",
        )
    payload = doc["payload"]
    known = route.known
    if known is not None and type(payload) is dict and not known.issuperset(payload):
        payload = {key: value for key, value in payload.items() if key in known}
    try:
        route.validate(payload)
    except JsonSchemaValueException as exc:
        raise _schema_problem(exc, payload, ["payload"], request_id) from None
    try:
        return route, request_id, route.structure(payload, route.cls)
    except ValueError:
        raise _timestamp_problem(route, payload, request_id) from None


_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')
_ID_VALUE = re.compile(r'\s*:\s*("(?:[^"\\]|\\.)*")')  # a key's string value, after the key
_SALVAGE_TOKENS: Final = 256


def _salvaged_id(text: str | bytes) -> str | None:
    """The top-level `id` of a frame refused before it could be read, if one can be found.

    A runtime can then fail that one request instead of waiting for an answer. Only strings and
    brackets are tokenised (by the regex engine, not Python) and only the first
    `_SALVAGE_TOKENS` tokens are looked at, so a hostile frame costs little; an ambiguous frame
    (two top-level ids) has none.
    """
    if isinstance(text, bytes | bytearray):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError:
            return None
    found: list[str] = []
    depth = 0
    for count, token in enumerate(_TOKEN.finditer(text)):
        if count >= _SALVAGE_TOKENS:
            break
        lexeme = token.group()
        if lexeme in "{[":
            depth += 1
        elif lexeme in "}]":
            depth -= 1
        elif depth == 1 and lexeme == '"id"':
            value = _ID_VALUE.match(text, token.end())
            if value is not None:
                found.append(value.group(1))
    if len(found) != 1:
        return None
    try:
        return _readable_id({"id": json.loads(found[0])})
    except ValueError:
        return None


def decode(text: str | bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> Decoded | DecodeError:
    """Read one runtime->gateway frame into a command, or say why it is refused; never raises."""
    try:
        route, request_id, command = _decode(text, max_bytes, _COMMAND_ROUTES, _COMMAND_ENVELOPE)
        return Decoded(route.channel, typing.cast(str, request_id), command)
    except _Problem as problem:
        if problem.request_id is None and problem.readable and isinstance(text, str | bytes):
            return DecodeError(_salvaged_id(text), problem.payload)
        return DecodeError(problem.request_id, problem.payload)
    except Exception:  # the promise is "never raises", whatever slipped through
        return DecodeError(
            None, ErrorPayload.of(ErrorCode.INVALID_FRAME, "the frame could not be decoded")
        )


def decode_server_frame(
    text: str | bytes, max_bytes: int = DEFAULT_MAX_BYTES
) -> tuple[Channel, str | None, Any]:
    """Read one gateway->runtime frame (reply, input delivery or error), for runtime clients.

    Raises FrameRejected if the gateway broke the protocol.
    """
    try:
        route, request_id, payload = _decode(text, max_bytes, _SERVER_ROUTES, _ENVELOPE)
    except _Problem as problem:
        raise FrameRejected(problem.request_id, problem.payload) from None
    except Exception:  # a client must not crash on a frame, whatever slipped through
        error = ErrorPayload.of(ErrorCode.INVALID_FRAME, "the frame could not be decoded")
        raise FrameRejected(None, error) from None
    return route.channel, request_id, payload


# --- encoding ----------------------------------------------------------------------------------


def encode(channel: Channel, request_id: str | None, payload: Any) -> str:
    """One frame of `payload` on `channel`; `request_id` is None only for an unreadable-id error."""
    cls, name, unstructure = _ENCODERS[channel]
    if type(payload) is not cls:
        raise TypeError(f"{type(payload).__name__} does not travel on {name}")
    if request_id is None and channel is not Channel.ERROR:
        raise ValueError("only runtime.session.error frames may have a null id")
    frame = {"channel": name, "id": request_id, "payload": unstructure(payload)}
    return orjson.dumps(frame).decode()


def encode_reply(request_id: str | None, payload: Any) -> str:
    """One gateway->runtime frame, on the channel the payload's class travels on."""
    return encode(m.REPLY_CHANNELS[type(payload)], request_id, payload)


def encode_error(problem: DecodeError) -> str:
    """The `runtime.session.error` frame answering a refused frame."""
    return encode(Channel.ERROR, problem.request_id, problem.error)
