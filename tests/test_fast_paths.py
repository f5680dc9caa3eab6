"""The hot paths that skip work must decide exactly as the slow paths they skip.

- `strictjson.fast_object` (orjson plus a census) must return what the strict parser returns, or
  defer to it; it must never accept what the strict parser refuses.
- `masking.mask_events` skips the per-event walk when one search of the batch's JSON finds no
  secret; it must never skip a batch that holds one, however the secret is escaped. What it
  masks must keep every key and value the runtime sent, even where masking makes keys equal.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway import strictjson
from gateway.masking import (
    MASK,
    MASK_IN_IDS,
    MIN_SECRET_LENGTH,
    WHOLE_MASK,
    WHOLE_MASK_IN_IDS,
    _spare_markers,
    mask_events,
)
from statemachine.messages import Millis, OutputEvent

DEPTH = 32
STRICT = strictjson.decoder()
STRICT_BY_VALUE = strictjson.decoder(integers_by_value=True)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 70), max_value=1 << 70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=25,
)


def _strict(decoder: json.JSONDecoder, text: str) -> tuple[str, Any]:
    """('ok', document) or ('refused', None), as the strict parser sees `text`."""
    try:
        return "ok", decoder.decode(text)
    except ValueError:
        return "refused", None


def _check(text: str) -> None:
    fast = strictjson.fast_object(text, DEPTH)
    if fast is None:
        return  # deferred: the strict parser decides, so nothing can differ
    for decoder in (STRICT, STRICT_BY_VALUE):
        verdict, doc = _strict(decoder, text)
        if decoder is STRICT_BY_VALUE and verdict == "refused":
            continue  # the control API refuses more (integral floats); it checks that itself
        assert verdict == "ok", text
        assert doc == fast and json.dumps(doc, sort_keys=True) == json.dumps(fast, sort_keys=True)


@given(st.dictionaries(st.text(max_size=6), json_values, max_size=5))
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_fast_object_agrees_with_the_strict_parser_on_generated_objects(
    doc: dict[str, Any],
) -> None:
    _check(json.dumps(doc))
    _check(json.dumps(doc, ensure_ascii=False))


@pytest.mark.parametrize(
    "text",
    [
        '{"a": 1, "a": 2}',
        '{"a": {"b": 1, "b": 1}}',
        '{"a": 1, "b": "x", "a": "y"}',
        '{"n": 9223372036854775808}',
        '{"n": -9223372036854775809}',
        '{"n": 18446744073709551615}',
        '{"n": 18446744073709551616}',
        '{"n": 123456789012345678901234567890}',
        '{"n": -123456789012345678901234567890}',
        '{"n": 1e19}',
        '{"n": 1e400}',
        '{"n": NaN}',
        '{"n": Infinity}',
        '{"s": "\\ud800"}',
        '{"s": "a\\"b"}',
        "[1, 2]",
        '"text"',
        '{"a": 1} trailing',
        '{"deep": ' + "[" * 40 + "]" * 40 + "}",
    ],
)
def test_fast_object_defers_everything_the_strict_parser_might_refuse(text: str) -> None:
    strict, _ = _strict(STRICT, text)
    fast = strictjson.fast_object(text, DEPTH)
    if strict == "refused" or "\\" in text or not text.startswith("{") or "[" * 40 in text:
        assert fast is None, text
    _check(text)


secret_values = st.text(min_size=MIN_SECRET_LENGTH, max_size=10).filter(lambda s: s.strip())
places = st.sampled_from(["data-value", "data-key", "nested", "event-id", "type"])


def _event(seq: int, secret: str, place: str, filler: str) -> OutputEvent:
    data: dict[str, Any] = {"text": filler, "step": seq}
    event_id, event_type = f"evt-{seq}", "log.line"
    if place == "data-value":
        data["text"] = f"{filler}{secret}{filler}"
    elif place == "data-key":
        data[f"k{secret}"] = 1
    elif place == "nested":
        data["list"] = [{"deep": [secret]}]
    elif place == "event-id":
        event_id = f"evt-{secret}-{seq}"
    else:
        event_type = f"t.{secret}"
    return OutputEvent(event_id, seq, event_type, data, Millis(0))


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return []


@given(secret_values, places, st.integers(min_value=0, max_value=8), st.text(max_size=8))
@example("mask", "event-id", 0, "")  # the id's marker, "masked", spells the secret itself
@example("masked", "event-id", 0, "")  # ... or is the secret: the replaced string is unchanged
@example("ked-", "event-id", 0, "")  # "evt-masked-0": the secret reappears at the marker's seam
@example("****", "data-value", 0, "*")  # "******" masks to "*****": "***" and its neighbours
@settings(max_examples=300)
def test_a_secret_anywhere_in_a_batch_is_masked_however_it_is_escaped(
    secret: str, place: str, where: int, filler: str
) -> None:
    events = [OutputEvent(f"evt-{i}", i, "log.line", {"text": filler}, Millis(0)) for i in range(9)]
    events[where] = _event(where, secret, place, filler)
    masked = mask_events(events, [secret])
    for event in masked:
        for text in _strings([event.event_id, event.type, event.data]):
            assert secret not in text, (place, text)
    touched = masked[where]
    assert MASK in orjson.dumps(touched.data).decode() or any(
        marker in touched.event_id + touched.type for marker in (MASK_IN_IDS, WHOLE_MASK_IN_IDS)
    )


def test_a_batch_without_secrets_is_returned_as_it_came() -> None:
    events = [OutputEvent(f"evt-{i}", i, "log.line", {"text": "hi"}, Millis(0)) for i in range(5)]
    assert mask_events(events, ["s3cr3t-value"]) is events


def test_the_whole_string_markers_are_too_short_to_hold_a_masked_secret() -> None:
    # The fallback's guarantee rests on this: no secret long enough to be masked fits in them.
    assert len(WHOLE_MASK) < MIN_SECRET_LENGTH and len(WHOLE_MASK_IN_IDS) < MIN_SECRET_LENGTH


key_parts = st.sampled_from(["", "k=", "***", "**1", "**2", "*", "x"])


@given(
    st.lists(secret_values, min_size=1, max_size=3),
    st.lists(st.tuples(key_parts, st.integers(min_value=-1, max_value=2), key_parts), max_size=8),
)
@example(["AAAA", "BBBB"], [("k=", 0, ""), ("k=", 1, "")])  # both keys mask to "k=***"
@example(["AAAA"], [("", 0, ""), ("***", -1, "")])  # a masked key lands on one sent as "***"
@example(["AAAA"], [("***", -1, ""), ("", 0, ""), ("**1", -1, ""), ("x", 0, "")])
@settings(max_examples=300)
def test_keys_that_masking_makes_equal_all_survive_without_a_secret(
    secrets: list[str], parts: list[tuple[str, int, str]]
) -> None:
    # Each key is prefix + (one of the secrets, or nothing for -1) + suffix; value = its position.
    keys = list(dict.fromkeys(
        f"{before}{secrets[which % len(secrets)] if which >= 0 else ''}{after}"
        for before, which, after in parts
    ))
    data = {key: position for position, key in enumerate(keys)}
    event = OutputEvent("evt-1", 1, "log.line", {"nested": [data]}, Millis(0))
    masked = mask_events([event], secrets)[0].data["nested"][0]
    assert sorted(masked.values()) == list(range(len(keys)))  # no key lost to another
    for key, position in masked.items():
        assert not any(s in key for s in secrets if len(s) >= MIN_SECRET_LENGTH), key
        if not any(s in keys[position] for s in secrets if len(s) >= MIN_SECRET_LENGTH):
            assert key == keys[position]  # a key without a secret keeps its name
    again = mask_events([event], secrets)[0].data["nested"][0]
    assert list(again.items()) == list(masked.items())  # a re-publish masks to the same object


def test_spare_markers_are_distinct_and_too_short_to_hold_a_secret() -> None:
    first = list(itertools.islice(_spare_markers(), 4000))  # past two places of the numbering
    assert first[:3] == ["**1", "**2", "**3"]
    assert len(set(first)) == len(first) and WHOLE_MASK not in first
    assert all(len(marker) < MIN_SECRET_LENGTH for marker in first)
