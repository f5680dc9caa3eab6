"""The protocol files in spec/v1: the seeds are intact, refs resolve, and code agrees with them."""

from __future__ import annotations

import hashlib
import json
import re
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urldefrag, urljoin

import attrs
import pytest
import yaml

from gateway import codec, server
from gateway.specfiles import spec_root
from statemachine import messages as m

V1 = spec_root() / "v1"
ASYNCAPI = V1 / "api" / "runtime-session.asyncapi.yaml"
SCHEMAS = V1 / "schemas"
ERRORS_MD = V1 / "errors.md"
EXT = "x-agent-gateway"

# sha256 of the canonical JSON (sorted keys, no spaces) of each seed document as published
# (/work/shared/seeds at the time of writing): the seeds must stay recognisable.
SEED_ASYNCAPI_SHA256 = "7135acd3d99eebc2906b6b44ebda520321b41e9980304f870b7f9c85b53df23f"
SEED_SCHEMA_SHA256 = "e1da94698a6281b2477dc18efc057541dea6641c39089f617cf050a7372edebc"


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def load_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def schema_files() -> list[Path]:
    return sorted(SCHEMAS.rglob("*.json"))


def canonical_sha256(document: Any) -> str:
    text = json.dumps(document, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def strip_additions(node: Any) -> Any:
    """Undo agent-gateway's marked additions: x-agent-gateway keys, the keys they list under
    `added`, and whole objects marked `extension: true`."""
    if isinstance(node, list):
        return [strip_additions(item) for item in node]
    if not isinstance(node, dict):
        return node
    mark = node.get(EXT)
    added = set(mark.get("added", [])) if isinstance(mark, dict) else set()
    return {
        key: strip_additions(value)
        for key, value in node.items()
        if key != EXT
        and key not in added
        and not (isinstance(value, dict) and isinstance(value.get(EXT), dict)
                 and value[EXT].get("extension"))
    }


def walk(node: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from walk(value, (*path, str(key)))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from walk(value, (*path, str(index)))


CONDITIONS = frozenset({"if", "then", "else", "not"})


def subschemas(node: Any, skip: frozenset[str] = frozenset()) -> Iterator[dict[str, Any]]:
    """Every dict in schema position (not inside enum/const/default/x- values, nor `skip`)."""
    if isinstance(node, dict):
        yield node
        for key, value in node.items():
            if key in ("enum", "const", "default", "examples") or key.startswith("x-"):
                continue
            if key in skip:
                continue
            if key in ("properties", "$defs"):
                for sub in value.values():
                    yield from subschemas(sub, skip)
            else:
                yield from subschemas(value, skip)
    elif isinstance(node, list):
        for item in node:
            yield from subschemas(item, skip)


def resolve_pointer(document: Any, fragment: str) -> Any:
    target = document
    for token in fragment.split("/")[1:]:
        token = token.replace("~1", "/").replace("~0", "~")
        assert isinstance(target, dict) and token in target, f"no {token!r} in #{fragment}"
        target = target[token]
    return target


def uri_to_path(uri: str) -> Path:
    assert uri.startswith(codec.SPEC_BASE_URL), uri
    return V1 / uri[len(codec.SPEC_BASE_URL):]


# --- the seeds ---------------------------------------------------------------------------------


def test_restored_seeds_parse_and_are_the_seeds_plus_marked_additions() -> None:
    asyncapi = load_yaml(ASYNCAPI)
    assert asyncapi["asyncapi"] == "2.6.0"
    assert "runtime 视角描述" in asyncapi["info"]["description"]
    assert canonical_sha256(strip_additions(asyncapi)) == SEED_ASYNCAPI_SHA256
    schema = load_json(SCHEMAS / "commands" / "runtime-session.json")
    assert canonical_sha256(strip_additions(schema)) == SEED_SCHEMA_SHA256


def test_stripping_really_removes_something() -> None:
    # Guards the two hashes above against a strip function that would pass anything through.
    asyncapi = load_yaml(ASYNCAPI)
    stripped = strip_additions(asyncapi)
    assert len(asyncapi["channels"]) == 20 and len(stripped["channels"]) == 17
    assert canonical_sha256(asyncapi) != SEED_ASYNCAPI_SHA256


def test_every_file_parses_and_declares_its_own_id() -> None:
    for path in schema_files():
        document = load_json(path)
        assert document["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert uri_to_path(document["$id"]) == path


# --- references --------------------------------------------------------------------------------


def test_every_ref_in_spec_resolves_to_a_local_file() -> None:
    documents: list[tuple[str, Any]] = [
        (ASYNCAPI.as_uri(), load_yaml(ASYNCAPI)),
        *((load_json(p)["$id"], load_json(p)) for p in schema_files()),
    ]
    count = 0
    for base, document in documents:
        for _, node in walk(document):
            if not (isinstance(node, dict) and isinstance(node.get("$ref"), str)):
                continue
            target_uri, fragment = urldefrag(urljoin(base, node["$ref"]))
            if target_uri == base:
                target_path = Path(ASYNCAPI) if base.startswith("file:") else uri_to_path(base)
            elif target_uri.startswith("file:"):
                target_path = Path(target_uri[len("file://"):])
            else:
                target_path = uri_to_path(target_uri)
            assert target_path.resolve().is_relative_to(V1.resolve()), node["$ref"]
            target_doc = load_yaml(target_path) if target_path.suffix == ".yaml" else load_json(
                target_path)
            resolve_pointer(target_doc, fragment)
            count += 1
    assert count > 60


def test_no_keyword_sits_beside_a_ref() -> None:
    # fastjsonschema (drafts 4-7) ignores siblings of $ref; 2020-12 applies them: a divergence.
    for path in schema_files():
        for sub in subschemas(load_json(path)):
            if "$ref" in sub:
                assert set(sub) == {"$ref"}, (path, sub)


# --- what the validators can and cannot enforce ------------------------------------------------

FORBIDDEN_KEYWORDS = {
    "format",  # fastjsonschema would assert its own idea of it; we use explicit patterns
    # 2019-09/2020-12 only: fastjsonschema (drafts 4-7) silently ignores them.
    "prefixItems", "unevaluatedProperties", "unevaluatedItems", "dependentRequired",
    "dependentSchemas", "$dynamicRef", "$dynamicAnchor", "$anchor", "$recursiveRef",
    "minContains", "maxContains",
}


def test_schemas_use_only_keywords_both_validators_agree_on() -> None:
    for path in schema_files():
        for sub in subschemas(load_json(path)):
            assert not FORBIDDEN_KEYWORDS & set(sub), (path, sub)
            pattern = sub.get("pattern")
            if pattern is not None:
                # \d, \w, \s match non-ASCII characters in Python but not in ECMA-262.
                assert not re.search(r"\\[dDwWsSbB]", pattern), (path, pattern)


def test_every_string_array_and_open_map_is_bounded() -> None:
    # Conditions (if/then/else/not) only narrow what `properties` already bounds.
    for path in schema_files():
        for sub in subschemas(load_json(path), CONDITIONS):
            types = sub.get("type")
            types = types if isinstance(types, list) else [types]
            if "string" in types:
                assert "maxLength" in sub or "enum" in sub or "const" in sub, (path, sub)
            if "array" in types:
                assert "maxItems" in sub, (path, sub)
            if "object" in types and "properties" not in sub:
                assert "maxProperties" in sub, (path, sub)
            if "object" in types and "properties" in sub:
                assert sub.get("additionalProperties") is False, (path, sub)


# --- the documents agree with statemachine/messages.py -----------------------------------------


def test_asyncapi_channels_are_exactly_the_channel_enum() -> None:
    channels = load_yaml(ASYNCAPI)["channels"]
    assert set(channels) == {c.value for c in m.Channel}


def test_asyncapi_directions_and_payloads_match_the_codec() -> None:
    asyncapi = load_yaml(ASYNCAPI)
    for name, item in asyncapi["channels"].items():
        channel = m.Channel(name)
        operation = "publish" if channel in m.COMMAND_CHANNELS else "subscribe"
        assert set(item) - {"description", EXT} == {operation}, name
        message_name = item[operation]["message"]["$ref"].rsplit("/", 1)[1]
        message = asyncapi["components"]["messages"][message_name]
        assert message["payload"]["$ref"] == "../schemas/" + codec.PAYLOAD_SCHEMAS[channel]
        cls = m.COMMAND_CHANNELS.get(channel) or next(
            c for c, ch in m.REPLY_CHANNELS.items() if ch is channel)
        assert message_name == {"ErrorPayload": "ErrorFrame"}.get(cls.__name__, cls.__name__)


def schema_def(ref: str) -> dict[str, Any]:
    file, fragment = ref.split("#")
    definition = resolve_pointer(load_json(SCHEMAS / file), fragment)
    assert isinstance(definition, dict)
    return definition


def message_classes() -> list[tuple[type[Any], dict[str, Any]]]:
    pairs = [(cls, schema_def(codec.PAYLOAD_SCHEMAS[ch])) for ch, cls in m.COMMAND_CHANNELS.items()]
    pairs += [(cls, schema_def(codec.PAYLOAD_SCHEMAS[ch])) for cls, ch in m.REPLY_CHANNELS.items()]
    pairs.append((m.OutputEvent, schema_def("events/output-event.json#/$defs/OutputEvent")))
    pairs.append((m.InputEvent, schema_def("events/input-event.json#/$defs/InputEvent")))
    return pairs


@pytest.mark.parametrize(("cls", "definition"), message_classes(),
                         ids=lambda x: getattr(x, "__name__", ""))
def test_schema_properties_are_the_class_fields(cls: type[Any], definition: dict[str, Any]) -> None:
    fields = attrs.fields(cls)
    camel = {codec._camel(f.name): f for f in fields}
    assert set(definition["properties"]) == set(camel)
    assert set(definition["required"]) == {
        name for name, f in camel.items() if f.default is attrs.NOTHING
    }
    hints = typing.get_type_hints(cls)
    for name, f in camel.items():
        optional = f.default is not attrs.NOTHING
        # An optional field defaulting to None must be omitted, not sent as null.
        if optional and f.default is None:
            assert type(None) in typing.get_args(hints[f.name]), name


def test_envelope_enums_are_the_code_enums() -> None:
    envelope = load_json(SCHEMAS / "envelope.json")["$defs"]
    assert envelope["ChannelName"]["enum"] == [c.value for c in m.Channel]
    assert envelope["CommandChannelName"]["enum"] == [c.value for c in m.COMMAND_CHANNELS]
    assert envelope["ErrorCode"]["enum"] == [c.value for c in m.ErrorCode]
    capabilities = load_json(SCHEMAS / "commands" / "runtime-session.json")["$defs"]
    assert capabilities["RuntimeCapability"]["enum"] == [c.value for c in m.Capability]


def test_asyncapi_close_codes_are_the_close_code_enum() -> None:
    close_codes = load_yaml(ASYNCAPI)[EXT]["closeCodes"]
    assert [entry["code"] for entry in close_codes] == [int(c) for c in m.CloseCode]


# --- errors.md ---------------------------------------------------------------------------------


def table_rows(markdown: str, heading: str) -> list[list[str]]:
    section = markdown.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return [[cell.strip() for cell in row.strip("|").split(" | ")] for row in rows]


def test_errors_md_documents_every_error_code_with_its_retry_rule() -> None:
    rows = table_rows(ERRORS_MD.read_text(encoding="utf-8"), "Error codes")
    documented = {row[0].strip("`"): row for row in rows}
    assert set(documented) == {c.value for c in m.ErrorCode}
    extensions = {m.ErrorCode.FORBIDDEN_RUN, m.ErrorCode.UNSUPPORTED_VERSION,
                  m.ErrorCode.SEQ_GAP, m.ErrorCode.SEQ_CONFLICT}
    for code in m.ErrorCode:
        _, extension, retryable, when, action = documented[code.value]
        assert retryable == ("yes" if m.RETRYABLE[code] else "no"), code
        assert extension == ("extension" if code in extensions else "no"), code
        assert len(when) > 40 and action, code


def test_errors_md_documents_every_close_code() -> None:
    rows = table_rows(ERRORS_MD.read_text(encoding="utf-8"), "Close codes")
    documented = {int(row[0].strip("`")): row for row in rows}
    assert set(documented) == {int(c) for c in m.CloseCode}
    for code in m.CloseCode:
        assert documented[code][2] == ("extension" if code >= 4000 else "no")


def test_errors_md_documents_every_handshake_refusal() -> None:
    """Each (status, slug) the runtime endpoint refuses with, read from its source."""
    source = (Path(server.__file__)).read_text(encoding="utf-8")
    refused = set(re.findall(r'_reject\(\s*request,\s*(\d{3}),\s*"([a-z-]+)"', source))
    rows = table_rows(ERRORS_MD.read_text(encoding="utf-8"), "The handshake")
    assert refused and {(row[0].strip("`"), row[1].strip("`")) for row in rows} == refused


def test_errors_md_states_the_limits_the_codec_enforces() -> None:
    text = ERRORS_MD.read_text(encoding="utf-8")
    assert f"at most {codec.MAX_DEPTH} levels" in text
    assert "1 MiB by default" in text and codec.DEFAULT_MAX_BYTES == 1 << 20
    assert "Binary frames get `invalid_frame`" in text
