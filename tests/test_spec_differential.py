"""Differential test: our compiled validators and the reference implementation agree.

The codec validates frames with fastjsonschema (drafts 4-7, compiled to Python, refs inlined by
`codec.compile_def`). The schemas say draft 2020-12. For every definition in spec/v1/schemas we
run a corpus of instances - hand-made edge cases around every limit, instances generated from the
schema, mutations of them and arbitrary JSON - through both our validator and
`jsonschema.Draft202012Validator` (with a local `referencing.Registry`: no network), and demand the
same verdict on every one.

One known divergence is handled on purpose: JSON Schema patterns are ECMA-262 regexes, where `$`
(without the multiline flag) matches only at the very end. Python's `re` also lets `$` match just
before a final "\\n", and `jsonschema` uses `re.search` as is, so it would accept "run_abcdefgh\\n"
as a runId. fastjsonschema rewrites every unescaped `$` to `\\Z`, which is the ECMA meaning. The
reference validator below gets an ECMA-faithful `pattern` keyword doing the same rewrite, so the
comparison is against the standard, not against Python's quirk (see
`test_the_reference_pattern_keyword_is_needed`).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Iterator
from functools import cache
from typing import Any

import pytest
from fastjsonschema import JsonSchemaValueException
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema
from jsonschema import (  # type: ignore[import-untyped,unused-ignore]
    Draft202012Validator,
    ValidationError,
    validators,
)
from referencing import Registry, Resource

from gateway import codec
from gateway.specfiles import spec_root

SCHEMAS = spec_root() / "v1" / "schemas"
DOCUMENTS = {
    path.relative_to(SCHEMAS).as_posix(): json.loads(path.read_text(encoding="utf-8"))
    for path in sorted(SCHEMAS.rglob("*.json"))
}
REGISTRY: Registry[Any] = Registry().with_resources(
    (document["$id"], Resource.from_contents(document)) for document in DOCUMENTS.values()
)
ALL_DEFS = [f"{file}#/$defs/{name}" for file, doc in DOCUMENTS.items() for name in doc["$defs"]]

_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")


def ecma_pattern(validator: Any, pattern: str, instance: Any,
                 schema: dict[str, Any]) -> Iterator[ValidationError]:
    """`pattern` with ECMA-262's `$` (end of input only), as fastjsonschema compiles it."""
    if validator.is_type(instance, "string") and not re.search(
            _UNESCAPED_DOLLAR.sub(r"\\Z", pattern), instance):
        yield ValidationError(f"does not match {pattern!r}")


EcmaDraft202012Validator = validators.extend(Draft202012Validator, {"pattern": ecma_pattern})


@cache
def ours(ref: str) -> Callable[[Any], Any]:
    """The validator the codec uses for `ref` (its own object where the codec holds one)."""
    used = {ref_: codec._PAYLOAD_VALIDATORS[ch] for ch, ref_ in codec.PAYLOAD_SCHEMAS.items()}
    used[codec.ENVELOPE_SCHEMA] = codec._ENVELOPE
    used[codec.COMMAND_ENVELOPE_SCHEMA] = codec._COMMAND_ENVELOPE
    used["envelope.json#/$defs/RequestId"] = codec._REQUEST_ID
    return used.get(ref) or codec.compile_def(ref)


@cache
def reference(ref: str) -> Any:
    return EcmaDraft202012Validator({"$ref": codec.SPEC_BASE_URL + "schemas/" + ref},
                                    registry=REGISTRY)


def our_verdict(ref: str, instance: Any) -> bool:
    try:
        ours(ref)(instance)
    except JsonSchemaValueException:
        return False
    return True


def assert_same_verdict(ref: str, instance: Any) -> bool:
    expected: bool = reference(ref).is_valid(instance)
    assert our_verdict(ref, instance) == expected, (ref, instance, expected)
    return expected


@cache
def inlined(ref: str) -> dict[str, Any]:
    """The definition with its refs replaced by their targets (our schemas have no cycles)."""
    schema = codec._inline_refs({"$ref": codec.SPEC_BASE_URL + "schemas/" + ref}, "")
    assert isinstance(schema, dict)
    return schema


# --- a known-valid instance of every definition ------------------------------------------------

PATTERN_SAMPLES = {
    "^run_[A-Za-z0-9]{8,64}$": "run_abcdEFGH1234",
    "^att_[A-Za-z0-9]{8,64}$": "att_abcdEFGH1234",
    "^ses_[A-Za-z0-9]{8,64}$": "ses_abcdEFGH1234",
    "^[A-Za-z0-9._:-]{1,128}$": "rt-1.a:b_c",
    "^[A-Za-z0-9_.:/-]{1,128}$": "task.step/started",
    "^[!-~]{1,64}$": "req-1",
    (
        "^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
        "T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\\.[0-9]{1,9})?Z$"
    ): "2026-11-21T19:36:21.123Z",
}


def example(schema: dict[str, Any], full: bool = True) -> Any:
    """A valid instance: every property (full) or only the required ones."""
    kind = schema.get("type")
    kind = kind[0] if isinstance(kind, list) else kind
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][0]
    if kind == "object":
        properties = schema.get("properties")
        if properties is None:
            return {"k": "v"}
        names = properties if full else schema.get("required", [])
        return {name: example(properties[name], full) for name in names}
    if kind == "array":
        return [example(schema["items"], full)]
    if kind == "string":
        return PATTERN_SAMPLES[schema["pattern"]] if "pattern" in schema else "text"
    if kind == "integer":
        return max(schema.get("minimum", 0), 0)
    if kind == "boolean":
        return True
    raise AssertionError(f"no example for {schema}")


@pytest.mark.parametrize("ref", ALL_DEFS)
def test_examples_are_valid_for_both(ref: str) -> None:
    assert assert_same_verdict(ref, example(inlined(ref)))
    assert assert_same_verdict(ref, example(inlined(ref), full=False))


def test_every_pattern_has_a_sample() -> None:
    patterns = {
        sub["pattern"] for doc in DOCUMENTS.values() for sub in _dicts(doc) if "pattern" in sub
    }
    assert patterns == set(PATTERN_SAMPLES)


def _dicts(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _dicts(value)
    elif isinstance(node, list):
        for item in node:
            yield from _dicts(item)


# --- hand-made edge cases around every limit ---------------------------------------------------

STRING_LENGTHS = [1, 7, 8, 11, 12, 32, 33, 64, 65, 68, 69, 128, 129, 256, 257, 1024, 1025,
                  65536, 65537]
ARRAY_LENGTHS = [0, 2, 32, 33, 256, 257, 1000, 1001]
MAP_SIZES = [0, 64, 65, 256, 257, 1024, 1025]
NUMBERS: list[Any] = [-1, 0, 1, 999, 1000, 1.0, 1.5, 2**53 - 1, 2**53, 2**63, -(2**63) - 1,
                      True, False]
ODD_VALUES: list[Any] = [None, True, 0, -1, 1.5, "", " ", "a\n", "\n", "é", [], {}, [None],
                         {"k": None}, "2026-11-21T19:36:21+00:00", "2026-11-21T19:36:21z",
                         "2026-13-01T00:00:00Z", "2026-11-21T19:36:21.1234567890Z",
                         "runtime.session.error", "kv.read", "ses_abcdEFGH1234\n"]


def paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    yield prefix, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from paths(value, (*prefix, index))


def replaced(document: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    copied = copy.deepcopy(document)
    parent = copied
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = value
    return copied


def removed(document: Any, path: tuple[Any, ...]) -> Any:
    copied = copy.deepcopy(document)
    parent = copied
    for step in path[:-1]:
        parent = parent[step]
    del parent[path[-1]]
    return copied


def edge_cases(valid: Any) -> Iterator[Any]:
    """Variations of a valid instance that sit on both sides of every limit and rule."""
    for path, node in list(paths(valid)):
        for odd in ODD_VALUES:
            yield replaced(valid, path, odd)
        if isinstance(node, str):
            for length in STRING_LENGTHS:
                yield replaced(valid, path, (node + "a" * length)[:length])
            yield replaced(valid, path, node + "\n")
            yield replaced(valid, path, " " + node)
            yield replaced(valid, path, node.upper())
        elif isinstance(node, bool):
            yield replaced(valid, path, not node)
        elif isinstance(node, int | float):
            for number in NUMBERS:
                yield replaced(valid, path, number)
        elif isinstance(node, list):
            for length in ARRAY_LENGTHS:
                yield replaced(valid, path, (node * length)[:length] if node else [None] * length)
        elif isinstance(node, dict):
            for key in node:
                yield removed(valid, (*path, key))
            yield replaced(valid, path, {**node, "extra": 1})
            for size in MAP_SIZES:
                yield replaced(valid, path, {f"k{i}": "v" for i in range(size)})
            yield replaced(valid, path, {"k" * 256: "v"})
            yield replaced(valid, path, {"k" * 257: "v"})
            yield replaced(valid, path, {"k": "v" * 65537})
        if path:
            yield removed(valid, path) if isinstance(path[-1], str) else replaced(valid, path, None)


@pytest.mark.parametrize("ref", ALL_DEFS)
def test_edge_cases_get_the_same_verdict(ref: str) -> None:
    verdicts = [
        assert_same_verdict(ref, case)
        for valid in (example(inlined(ref)), example(inlined(ref), full=False))
        for case in edge_cases(valid)
    ]
    assert False in verdicts  # the corpus does reach the rules


@pytest.mark.parametrize("value", ["run_abcdefgh\n", "run_abcdefgh\n\n", "\nrun_abcdefgh"])
def test_the_reference_pattern_keyword_is_needed(value: str) -> None:
    ref = "common/identity.json#/$defs/runId"
    plain = Draft202012Validator({"$ref": codec.SPEC_BASE_URL + "schemas/" + ref},
                                 registry=REGISTRY)
    assert not our_verdict(ref, value)
    assert not reference(ref).is_valid(value)
    # Python's `$` matches before one final newline: only the first value fools it.
    assert plain.is_valid(value) == (value == "run_abcdefgh\n")


# --- generated corpora -------------------------------------------------------------------------

JSON_LEAVES = (
    st.none() | st.booleans() | st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=12,
)


def _without_extensions(schema: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in schema.items() if not k.startswith("x-")}


def instances(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Instances generated from a schema.

    hypothesis-jsonschema draws the leaves (patterned strings, bounded integers, enum arrays);
    objects and arrays of objects are built here, because its object generator relies on a
    Hypothesis internal (`many.more`) that current Hypothesis no longer has.
    """
    if schema.get("type") == "object":
        properties = schema.get("properties")
        if properties is not None:
            required = schema.get("required", [])
            return st.fixed_dictionaries(
                {k: instances(properties[k]) for k in required},
                optional={k: instances(v) for k, v in properties.items() if k not in required},
            )
        extra = schema.get("additionalProperties", True)
        values = instances(extra) if isinstance(extra, dict) else JSON_VALUES
        return st.dictionaries(st.text(max_size=12), values, max_size=4)
    if schema.get("type") == "array" and schema["items"].get("type") == "object":
        return st.lists(instances(schema["items"]), max_size=3)
    return from_schema(_without_extensions(schema))


@st.composite
def mutants(draw: st.DrawFn, schema: dict[str, Any]) -> Any:
    """A generated instance with one random change somewhere inside it."""
    value = draw(instances(schema))
    path, node = draw(st.sampled_from(list(paths(value))))
    change = draw(st.sampled_from(["replace", "remove", "extra", "newline", "grow"]))
    if change == "remove" and path and isinstance(path[-1], str):
        return removed(value, path)
    if change == "extra" and isinstance(node, dict):
        return replaced(value, path, {**node, draw(st.text(max_size=8)): draw(JSON_VALUES)})
    if change == "newline" and isinstance(node, str):
        return replaced(value, path, node + "\n")
    if change == "grow" and isinstance(node, str | list):
        return replaced(value, path, node * draw(st.integers(min_value=2, max_value=80)))
    return replaced(value, path, draw(JSON_VALUES))


FAST = settings(max_examples=15, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("ref", ALL_DEFS)
@FAST
@given(data=st.data())
def test_generated_instances_get_the_same_verdict(ref: str, data: st.DataObject) -> None:
    assert_same_verdict(ref, data.draw(instances(inlined(ref))))


@pytest.mark.parametrize("ref", ALL_DEFS)
@FAST
@given(data=st.data())
def test_mutated_instances_get_the_same_verdict(ref: str, data: st.DataObject) -> None:
    assert_same_verdict(ref, data.draw(mutants(inlined(ref))))


@pytest.mark.parametrize("ref", ALL_DEFS)
@FAST
@given(value=JSON_VALUES)
def test_arbitrary_json_gets_the_same_verdict(ref: str, value: Any) -> None:
    assert_same_verdict(ref, value)
