"""The wire codec: round trips, every class of bad frame, timestamps, and `$ref` confinement."""

from __future__ import annotations

import contextlib
import json
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import fastjsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator  # type: ignore[import-untyped,unused-ignore]
from referencing import Registry, Resource

from gateway import codec
from gateway.codec import Decoded, DecodeError, FrameRejected, SpecError, decode
from gateway.specfiles import spec_root
from statemachine import messages as m
from statemachine.messages import Channel, ErrorCode, ErrorPayload, Millis

RUN = "run_abcdEFGH1234"
SUB = "run_subrun0001"
SES = "ses_abcdEFGH1234"
ATT = "att_abcdEFGH1234"
T0 = Millis(1_795_289_781_123)  # 2026-11-21T19:36:21.123Z
T0_TEXT = "2026-11-21T19:36:21.123Z"
SECRET = "hunter2-SECRET-VALUE"

# --- an independent judge of encoded frames: the reference validator on the spec files --------

_SCHEMAS = spec_root() / "v1" / "schemas"
_REGISTRY: Registry[Any] = Registry().with_resources(
    (doc["$id"], Resource.from_contents(doc))
    for doc in (json.loads(p.read_text(encoding="utf-8")) for p in _SCHEMAS.rglob("*.json"))
)


def reference_errors(frame: str) -> list[str]:
    """What Draft 2020-12 says about a frame: its envelope, then its channel's payload."""
    doc = json.loads(frame)
    base = codec.SPEC_BASE_URL + "schemas/"
    errors = [e.message for e in Draft202012Validator(
        {"$ref": base + codec.ENVELOPE_SCHEMA}, registry=_REGISTRY).iter_errors(doc)]
    payload_schema = {"$ref": base + codec.PAYLOAD_SCHEMAS[Channel(doc["channel"])]}
    validator = Draft202012Validator(payload_schema, registry=_REGISTRY)
    return errors + [e.message for e in validator.iter_errors(doc["payload"])]


def frame(channel: str, payload: Any, request_id: Any = "req-1", **extra: Any) -> str:
    return json.dumps({"channel": channel, "id": request_id, "payload": payload, **extra})


def refused(text: str | bytes, **kwargs: Any) -> DecodeError:
    result = decode(text, **kwargs)
    assert isinstance(result, DecodeError), result
    assert reference_errors(codec.encode_error(result)) == []
    return result


def heartbeat(**changes: Any) -> dict[str, Any]:
    return {"sessionId": SES, "runId": RUN, **changes}


def output(*events: dict[str, Any]) -> dict[str, Any]:
    return {"sessionId": SES, "runId": RUN, "events": list(events)}


def event(**changes: Any) -> dict[str, Any]:
    base = {"eventId": "e-1", "seq": 0, "type": "task.step", "data": {}, "timestamp": T0_TEXT}
    return {**base, **changes}


# --- round trips -------------------------------------------------------------------------------

OUT_EVENT = m.OutputEvent("e-1", 7, "task.step/done", {"ok": True, "n": [1, 2.5, None]}, T0)
IN_EVENT = m.InputEvent("in-1", 3, "user.message", {"text": "hi é"}, T0)

COMMANDS: list[Any] = [
    m.RuntimeAttachRequest(RUN, "rt-1", "v1"),
    m.RuntimeAttachRequest(RUN, "rt-1", "v1", ATT, True, 3,
                           (m.Capability.KV_READ, m.Capability.SECRETS_READ)),
    m.HeartbeatCommand(SES, RUN),
    m.HeartbeatCommand(SES, RUN, "rt-1", {"load": 0.5, "nested": {"a": [1]}}),
    m.RecoverConnectionsCommand(SES, RUN),
    m.RecoverConnectionsCommand(SES, RUN, (SUB,), 9),
    m.GetSecretsCommand(SES, RUN),
    m.GetSecretsCommand(SES, RUN, ()),
    m.GetSecretsCommand(SES, RUN, ("db", "api")),
    m.GetConfigCommand(SES, RUN),
    m.GetKVCommand(SES, RUN, ("a", "b")),
    m.SetKVCommand(SES, RUN, {"a": "1", "b": ""}),
    m.PublishOutputEventsRequest(SES, RUN, ()),
    m.PublishOutputEventsRequest(SES, RUN, (OUT_EVENT, OUT_EVENT)),
    m.AckInputCommand(SES, RUN, 12),
]
SERVER_PAYLOADS: list[Any] = [
    m.RuntimeAttachResponse(SES, RUN, 10_000, T0),
    m.RuntimeAttachResponse(SES, RUN, 1000, T0, "cfg-7"),
    m.HeartbeatResponse(True, T0),
    m.RecoverConnectionsResponse(False),
    m.GetSecretsResponse({"db": SECRET}),
    m.GetConfigResponse({"model": "x", "limits": {"tokens": 100}}),
    m.GetKVResponse({}),
    m.SetKVResponse(True),
    m.PublishOutputEventsResponse(True),
    m.AckInputResponse(True),
    m.TaskInputDelivery(SES, RUN, (IN_EVENT,)),
    ErrorPayload.of(ErrorCode.SEQ_GAP, "next seq is 4"),
    ErrorPayload.of(ErrorCode.INVALID_FRAME, "bad", "/payload/runId"),
]


def test_every_command_and_reply_class_is_covered() -> None:
    assert {type(c) for c in COMMANDS} == set(m.COMMAND_CHANNELS.values())
    assert {type(p) for p in SERVER_PAYLOADS} == set(m.REPLY_CHANNELS)


@pytest.mark.parametrize("command", COMMANDS, ids=repr)
def test_commands_round_trip(command: Any) -> None:
    channel = next(ch for ch, cls in m.COMMAND_CHANNELS.items() if cls is type(command))
    text = codec.encode(channel, "req-9", command)
    assert reference_errors(text) == []
    assert decode(text) == Decoded(channel, "req-9", command)
    assert decode(text.encode("utf-8")) == Decoded(channel, "req-9", command)


@pytest.mark.parametrize("payload", SERVER_PAYLOADS, ids=repr)
def test_gateway_frames_round_trip_and_validate(payload: Any) -> None:
    text = codec.encode_reply("req-9", payload)
    assert reference_errors(text) == []
    assert codec.decode_server_frame(text) == (m.REPLY_CHANNELS[type(payload)], "req-9", payload)


def test_error_frames_may_have_a_null_id() -> None:
    text = codec.encode_reply(None, ErrorPayload.of(ErrorCode.INVALID_FRAME, "not JSON"))
    assert reference_errors(text) == []
    channel, request_id, payload = codec.decode_server_frame(text)
    assert (channel, request_id, payload.code) == (Channel.ERROR, None, ErrorCode.INVALID_FRAME)


def test_encoding_leaves_out_absent_optional_fields() -> None:
    payload = json.loads(codec.encode_reply("r", m.RuntimeAttachResponse(SES, RUN, 1000, T0)))
    assert payload["payload"] == {"sessionId": SES, "runId": RUN, "heartbeatIntervalMs": 1000,
                                  "leaseExpiresAt": T0_TEXT}
    attach = json.loads(codec.encode(Channel.ATTACH, "r", m.RuntimeAttachRequest(RUN, "i", "v1")))
    assert attach["payload"] == {"runId": RUN, "runtimeInstanceId": "i", "protocolVersion": "v1"}


def test_encode_refuses_a_payload_on_the_wrong_channel_or_a_null_id() -> None:
    with pytest.raises(TypeError):
        codec.encode(Channel.HEARTBEAT_REPLY, "r", m.SetKVResponse(True))
    with pytest.raises(ValueError, match="null id"):
        codec.encode(Channel.HEARTBEAT_REPLY, None, m.HeartbeatResponse(True, T0))


def test_free_form_maps_are_passed_through_not_copied() -> None:
    payload = heartbeat(metadata={"a": {"b": [1]}})
    command = codec.CONVERTER.structure(payload, m.HeartbeatCommand)
    assert command.metadata is payload["metadata"]


def test_decoded_fields_are_the_message_types() -> None:
    result = decode(frame("runtime.session.attach.command", {
        "runId": RUN, "runtimeInstanceId": "i", "protocolVersion": "v1",
        "capabilities": ["kv.read"], "connectionEpoch": 2.0}))
    assert isinstance(result, Decoded)
    assert isinstance(result.command, m.RuntimeAttachRequest)
    assert result.command.capabilities == (m.Capability.KV_READ,)
    assert type(result.command.connection_epoch) is int


def test_whitespace_around_the_frame_is_fine() -> None:
    assert isinstance(decode(" \n" + frame("runtime.session.heartbeat.command", heartbeat())
                             + "\r\n\t"), Decoded)


def test_decode_server_frame_refuses_commands_and_bad_replies() -> None:
    with pytest.raises(FrameRejected) as caught:
        codec.decode_server_frame(
            codec.encode(Channel.HEARTBEAT, "r", m.HeartbeatCommand(SES, RUN)))
    assert caught.value.error.code is ErrorCode.UNKNOWN_CHANNEL
    with pytest.raises(FrameRejected) as caught:
        codec.decode_server_frame(frame("runtime.session.heartbeat.reply", {"accepted": True}))
    assert (caught.value.error.path, caught.value.request_id) == ("/payload/nextHeartbeatDueAt",
                                                                  "req-1")
    with pytest.raises(FrameRejected):
        codec.decode_server_frame(b"\xff")


def test_runtimes_ignore_payload_properties_a_newer_gateway_adds() -> None:
    """A runtime built before an extension (as `maxFrameBytes` was added to the attach reply)
    must still attach to a gateway that sends it; the gateway stays strict with runtimes."""
    reply = json.loads(codec.encode_reply("r", m.RuntimeAttachResponse(SES, RUN, 1000, T0)))
    reply["payload"]["someFutureExtension"] = {"any": ["thing"]}
    channel, _, payload = codec.decode_server_frame(json.dumps(reply))
    assert channel is Channel.ATTACH_REPLY
    assert payload == m.RuntimeAttachResponse(SES, RUN, 1000, T0)
    beat = json.loads(frame("runtime.session.heartbeat.command", heartbeat()))
    beat["payload"]["someFutureExtension"] = 1
    assert refused(json.dumps(beat)).error.code is ErrorCode.INVALID_FRAME
    # What a gateway must send is still checked: an unknown property does not hide a missing one.
    with pytest.raises(FrameRejected):
        codec.decode_server_frame(frame("runtime.session.heartbeat.reply",
                                        {"accepted": True, "someFutureExtension": 1}))


# --- timestamps --------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "millis"), [
    ("1970-01-01T00:00:00Z", 0),
    ("1970-01-01T00:00:00.5Z", 500),
    ("1970-01-01T00:00:00.12Z", 120),
    ("1970-01-01T00:00:00.123Z", 123),
    ("1970-01-01T00:00:00.123999999Z", 123),  # truncated to whole milliseconds
    ("2026-11-21T19:36:21.123Z", T0),
    ("2024-02-29T23:59:59.999Z", 1_709_251_199_999),
    ("1969-12-31T23:59:59.999Z", -1),
    ("0001-01-01T00:00:00Z", -62_135_596_800_000),
    ("9999-12-31T23:59:59.999Z", 253_402_300_799_999),
])
def test_timestamps_parse_with_and_without_fractions(text: str, millis: int) -> None:
    assert codec.parse_timestamp(text) == millis


@pytest.mark.parametrize("digits", range(1, 10))
def test_every_fraction_length_is_truncated_to_milliseconds(digits: int) -> None:
    fraction = "987654321"[:digits]
    expected = int(fraction.ljust(3, "0")[:3])
    assert codec.parse_timestamp(f"1970-01-01T00:00:01.{fraction}Z") == 1000 + expected


@pytest.mark.parametrize("text", [
    "2026-13-01T00:00:00Z", "2026-00-10T00:00:00Z", "2026-02-30T00:00:00Z",
    "2025-02-29T00:00:00Z", "2026-04-31T00:00:00Z", "0000-01-01T00:00:00Z",
    "2026-11-21T24:00:00Z", "2026-11-21T19:60:00Z", "2026-11-21T19:36:60Z",
    "2026-11-21T19:36:21+00:00", "2026-11-21T19:36:21.123+01:00", "2026-11-21T19:36:21z",
    "2026-11-21t19:36:21Z", "2026-11-21 19:36:21Z", "2026-11-21T19:36:21.Z",
    "2026-11-21T19:36:21.1234567890Z", "2026-11-21T19:36:21",
    "\uff12\uff10\uff12\uff16-11-21T19:36:21Z",  # full-width digits
    "2026-11-21T19:36:21Z\n", "",
])
def test_invalid_timestamps_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        codec.parse_timestamp(text)
    result = refused(frame("runtime.task.output.event", output(event(timestamp=text))))
    assert result.error.code is ErrorCode.INVALID_FRAME
    assert result.error.path == "/payload/events/0/timestamp"
    assert result.request_id == "req-1"


@given(st.integers(min_value=-62_135_596_800_000, max_value=253_402_300_799_999))
def test_formatting_and_parsing_timestamps_are_inverse(millis: int) -> None:
    text = codec.format_millis(Millis(millis))
    assert codec.parse_timestamp(text) == millis
    instant = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=millis)
    assert text == (f"{instant.year:04d}-{instant.month:02d}-{instant.day:02d}T"
                    f"{instant:%H:%M:%S}.{instant.microsecond // 1000:03d}Z")


def test_a_bad_date_deep_in_a_batch_is_pointed_at() -> None:
    batch = output(event(seq=0), event(seq=1), event(seq=2, timestamp="2026-02-30T00:00:00Z"))
    assert refused(frame("runtime.task.output.event", batch)).error.path == (
        "/payload/events/2/timestamp")


# --- bad frames --------------------------------------------------------------------------------

INVALID = ErrorCode.INVALID_FRAME


@pytest.mark.parametrize("text", [
    "", " ", "{", "}", "nope", "{}x", "{} {}", '{"a":1,}', "{'a': 1}", '{"a":01}', '{"a":"\x01"}',
])
def test_text_that_is_not_json(text: str) -> None:
    result = refused(text)
    assert (result.request_id, result.error.code, result.error.path) == (None, INVALID, None)


@pytest.mark.parametrize(("text", "request_id"), [
    ('{"id": "n1", "payload": {"x": NaN}}', "n1"),  # JSON refused by policy: still named
    ('{"id": "d1", "payload": {"x": ' + "[" * 5000 + "]" * 5000 + "}}", "d1"),
    ('{"id": "a", "id": "b", "payload": {}}', None),  # two ids: which request? none
    ('{"payload": {"id": "inner"}, "x": NaN}', None),  # only the top level counts
    ('{"id": 5, "payload": {"x": NaN}}', None),  # not a valid id
    # Not JSON at all: unreadable, whatever it seems to say.
    ('{"channel":"runtime.session.heartbeat.command","id":"r","payload":{}', None),
])
def test_an_unreadable_frame_still_names_its_request_when_it_can(
    text: str, request_id: str | None
) -> None:
    result = refused(text)
    assert (result.request_id, result.error.code) == (request_id, INVALID)


@pytest.mark.parametrize("data", [b"\xff", b'{"a":"\xc3"}', b"\xef\xbb\xbf{}", b"\xed\xa0\x80",
                                  "{}".encode("utf-16")])
def test_bytes_that_are_not_utf8_json(data: bytes) -> None:
    assert refused(data).error.code is INVALID


@pytest.mark.parametrize("text", ["[]", "[1]", "1", '"s"', "null", "true", "1.5"])
def test_json_that_is_not_an_object(text: str) -> None:
    result = refused(text)
    assert (result.error.code, result.error.path) == (INVALID, "")


@pytest.mark.parametrize("text", [
    "[" * 10_000 + "]" * 10_000,
    '{"a":' * 10_000 + "1" + "}" * 10_000,
    frame("runtime.session.heartbeat.command", heartbeat(metadata={"a": [[[[[[]]]]]] * 0}))[:-1]
    + "[" * 5000,
])
def test_absurd_nesting_is_refused_without_recursing(text: str) -> None:
    assert refused(text).error.code is INVALID


def nested(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = {"k": value}
    return value


def test_nesting_is_allowed_up_to_the_documented_depth() -> None:
    # The envelope is level 1 and the payload level 2, so metadata may be MAX_DEPTH - 2 deep.
    deepest = frame("runtime.session.heartbeat.command", heartbeat(
        metadata=nested(codec.MAX_DEPTH - 2)))
    assert isinstance(decode(deepest), Decoded)
    too_deep = frame("runtime.session.heartbeat.command", heartbeat(
        metadata=nested(codec.MAX_DEPTH - 1)))
    result = refused(too_deep)
    assert result.error.code is INVALID and "deeper than 32" in result.error.message
    brackets_in_strings = frame("runtime.session.heartbeat.command", heartbeat(
        metadata={"s": "[{" * 100, "t": '\\"[[' * 50}))
    assert isinstance(decode(brackets_in_strings), Decoded)


@pytest.mark.parametrize("text", [
    '{"channel":"a","channel":"b","id":"r","payload":{}}',
    frame("runtime.session.heartbeat.command", heartbeat()).replace(
        '"runId"', '"runId": "run_otherRun00001", "runId"'),
    frame("runtime.session.heartbeat.command", heartbeat(metadata=nested(5))).replace(
        '{"k": 1}', '{"k": 1, "k": 2}'),
    '{"x":[{"a":1},{"b":1,"b":1}]}',
])
def test_duplicate_keys_at_any_depth(text: str) -> None:
    result = refused(text)
    assert result.error.code is INVALID and "duplicate" in result.error.message


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400", "-1e400",
                                    "1" + "0" * 5000, "9223372036854775808",
                                    "-9223372036854775809", "1" * 30])
def test_numbers_outside_what_every_parser_agrees_on(number: str) -> None:
    text = frame("runtime.session.heartbeat.command", heartbeat(metadata={"n": 0})).replace(
        '"n": 0', f'"n": {number}')
    assert refused(text).error.code is INVALID


@pytest.mark.parametrize("number", ["9223372036854775807", "-9223372036854775808", "1e308",
                                    "-0", "0.0", "1E+2"])
def test_numbers_at_the_limits_are_fine(number: str) -> None:
    text = frame("runtime.session.heartbeat.command", heartbeat(metadata={"n": 0})).replace(
        '"n": 0', f'"n": {number}')
    assert isinstance(decode(text), Decoded)


def test_seq_beyond_2_pow_53_is_refused_with_its_path() -> None:
    result = refused(frame("runtime.task.output.event", output(event(seq=2**53))))
    assert (result.error.path, result.request_id) == ("/payload/events/0/seq", "req-1")


def test_frames_over_the_size_limit() -> None:
    big = frame("runtime.session.heartbeat.command", heartbeat(metadata={"s": "x" * (2 << 20)}))
    result = refused(big)
    # The refusal carries the frame's id, so the runtime can fail that one request.
    assert (result.error.code, result.request_id) == (ErrorCode.PAYLOAD_TOO_LARGE, "req-1")
    assert refused(big.encode()).error.code is ErrorCode.PAYLOAD_TOO_LARGE
    small = frame("runtime.session.heartbeat.command", heartbeat())
    assert refused(small, max_bytes=len(small) - 1).error.code is ErrorCode.PAYLOAD_TOO_LARGE
    assert isinstance(decode(small, max_bytes=len(small)), Decoded)
    # The limit is in UTF-8 bytes, not characters.
    wide = frame("runtime.session.heartbeat.command", heartbeat(metadata={"s": "é" * 100}),
                 ).replace("\\u00e9", "é")
    assert refused(wide, max_bytes=len(wide) + 50).error.code is ErrorCode.PAYLOAD_TOO_LARGE
    assert isinstance(decode(wide, max_bytes=len(wide.encode())), Decoded)


def test_strings_over_their_schema_limit_are_refused_without_echoing_them() -> None:
    long_value = SECRET * 4000
    result = refused(frame("runtime.session.kv.set.command",
                           {"sessionId": SES, "runId": RUN, "kv": {"k": long_value}}))
    assert (result.error.code, result.error.path) == (INVALID, "/payload/kv/k")
    assert SECRET not in result.error.message


def test_lone_surrogates_are_refused_but_pairs_are_fine() -> None:
    template = frame("runtime.session.heartbeat.command", heartbeat(metadata={"s": "X"}))
    assert refused(template.replace('"X"', '"\\ud800"')).error.code is INVALID
    assert refused(template.replace('"X"', '"a\\udfffb"')).error.code is INVALID
    assert refused(template.replace('"X"', '"\ud800"')).error.code is INVALID
    assert isinstance(decode(template.replace('"X"', '"\\ud83d\\ude00"')), Decoded)
    assert isinstance(decode(template.replace('"X"', '"\\\\ud800"')), Decoded)


@pytest.mark.parametrize("channel", ["runtime.session.nope", "",
                                     "RUNTIME.SESSION.HEARTBEAT.COMMAND",
                                     "runtime.session.heartbeat.command ", "x" * 1000])
def test_unknown_channels(channel: str) -> None:
    result = refused(frame(channel, heartbeat()))
    assert (result.error.code, result.error.path, result.request_id) == (
        ErrorCode.UNKNOWN_CHANNEL, "/channel", "req-1")
    assert channel.strip() == "" or channel not in result.error.message


@pytest.mark.parametrize("channel", [c for c in Channel if c not in m.COMMAND_CHANNELS])
def test_gateway_to_runtime_channels_sent_by_a_runtime(channel: Channel) -> None:
    request_id = None if channel is Channel.ERROR else "req-1"
    result = refused(frame(channel.value, {"accepted": True}, request_id))
    assert (result.error.code, result.error.path, result.request_id) == (
        ErrorCode.UNKNOWN_CHANNEL, "/channel", request_id)


def _valid(validator: Callable[[Any], Any], doc: Any) -> bool:
    try:
        validator(doc)
    except fastjsonschema.JsonSchemaValueException:
        return False
    return True


_CHANNELS = st.sampled_from([c.value for c in Channel] + ["runtime.session.nope", ""])
_IDS = st.one_of(st.sampled_from(["req-1", "", "x" * 65, "req 1"]), st.none(), st.integers())
_PAYLOADS = st.one_of(st.dictionaries(st.text(max_size=3), st.none(), max_size=70), st.none())
_ENVELOPE_LIKE = st.one_of(
    st.fixed_dictionaries(
        {"channel": _CHANNELS, "id": _IDS, "payload": _PAYLOADS}, optional={"extra": st.none()}
    ),
    st.dictionaries(st.sampled_from(["channel", "id", "payload"]), _CHANNELS | _IDS | _PAYLOADS),
)


@given(_ENVELOPE_LIKE)
@settings(max_examples=500)
def test_the_command_envelope_is_the_envelope_on_a_command_channel(doc: dict[str, Any]) -> None:
    # `decode` checks runtime frames against CommandEnvelope and explains refusals by Envelope's
    # rules; that is only sound if the two agree on every frame on a command channel.
    commands = {c.value for c in m.COMMAND_CHANNELS}
    expected = _valid(codec._ENVELOPE, doc) and doc.get("channel") in commands
    assert _valid(codec._COMMAND_ENVELOPE, doc) == expected


@pytest.mark.parametrize("channel", [1, None, [], {}, True])
def test_channel_of_the_wrong_type(channel: Any) -> None:
    result = refused(frame("x", heartbeat()).replace('"x"', json.dumps(channel)))
    assert (result.error.code, result.error.path, result.request_id) == (INVALID, "/channel",
                                                                          "req-1")


@pytest.mark.parametrize("request_id", ["", "x" * 65, 1, 1.5, None, [], {}, True, "req\n",
                                        "req 1", "réq", "req\t", "\u200b"])
def test_bad_request_ids(request_id: Any) -> None:
    result = refused(frame("runtime.session.heartbeat.command", heartbeat(), request_id))
    assert (result.error.code, result.error.path, result.request_id) == (INVALID, "/id", None)


def test_the_longest_and_oddest_ids_are_fine() -> None:
    for request_id in ("x" * 64, "!", "~", "a/b#c?d=e&f:g"):
        result = decode(frame("runtime.session.heartbeat.command", heartbeat(), request_id))
        assert isinstance(result, Decoded) and result.request_id == request_id


@pytest.mark.parametrize(("document", "path"), [
    ({"id": "r", "payload": {}}, "/channel"),
    ({"channel": "runtime.session.heartbeat.command", "payload": {}}, "/id"),
    ({"channel": "runtime.session.heartbeat.command", "id": "r"}, "/payload"),
    ({"channel": "runtime.session.heartbeat.command", "id": "r", "payload": [], }, "/payload"),
    ({"channel": "runtime.session.heartbeat.command", "id": "r", "payload": {}, "x": 1}, "/x"),
])
def test_envelope_violations(document: dict[str, Any], path: str) -> None:
    result = refused(json.dumps(document))
    assert (result.error.code, result.error.path) == (INVALID, path)


@pytest.mark.parametrize(("channel", "payload", "path"), [
    ("runtime.session.heartbeat.command", {"sessionId": SES}, "/payload/runId"),
    ("runtime.session.heartbeat.command", {"runId": RUN}, "/payload/sessionId"),
    ("runtime.session.heartbeat.command", heartbeat(extra=1), "/payload/extra"),
    ("runtime.session.heartbeat.command", heartbeat(runId=RUN + "\n"), "/payload/runId"),
    ("runtime.session.heartbeat.command", heartbeat(sessionId=SES + "\n"), "/payload/sessionId"),
    ("runtime.session.heartbeat.command", heartbeat(runId="run_short"), "/payload/runId"),
    ("runtime.session.heartbeat.command", heartbeat(runId=1), "/payload/runId"),
    ("runtime.session.heartbeat.command", heartbeat(metadata=[]), "/payload/metadata"),
    ("runtime.session.heartbeat.command",
     heartbeat(metadata={f"k{i}": 1 for i in range(65)}), "/payload/metadata"),
    ("runtime.session.attach.command", {"runId": RUN, "runtimeInstanceId": "i"},
     "/payload/protocolVersion"),
    ("runtime.session.attach.command", {"runId": RUN, "runtimeInstanceId": "i",
                                        "protocolVersion": "v" * 33}, "/payload/protocolVersion"),
    ("runtime.session.attach.command", {"runId": RUN, "runtimeInstanceId": "i",
                                        "protocolVersion": "v1", "capabilities": ["root"]},
     "/payload/capabilities/0"),
    ("runtime.session.attach.command", {"runId": RUN, "runtimeInstanceId": "i",
                                        "protocolVersion": "v1", "reconnect": "yes"},
     "/payload/reconnect"),
    ("runtime.session.attach.command", {"runId": RUN, "runtimeInstanceId": "i",
                                        "protocolVersion": "v1", "connectionEpoch": -1},
     "/payload/connectionEpoch"),
    ("runtime.session.attach.command", {"runId": RUN, "runtimeInstanceId": "i",
                                        "protocolVersion": "v1", "connectionEpoch": True},
     "/payload/connectionEpoch"),
    ("runtime.session.attach.command", {"runId": RUN, "runtimeInstanceId": "i",
                                        "protocolVersion": "v1", "attemptId": None},
     "/payload/attemptId"),
    ("runtime.session.recover.command", {"sessionId": SES, "mainRunId": RUN,
                                         "subRunIds": [SUB] * 257}, "/payload/subRunIds"),
    ("runtime.session.recover.command", {"sessionId": SES, "mainRunId": RUN,
                                         "subRunIds": [SUB, "nope"]}, "/payload/subRunIds/1"),
    ("runtime.session.secrets.get.command", heartbeat(names=["x" * 257]), "/payload/names/0"),
    ("runtime.session.kv.get.command", heartbeat(), "/payload/keys"),
    ("runtime.session.kv.get.command", heartbeat(keys=[1]), "/payload/keys/0"),
    ("runtime.session.kv.set.command", heartbeat(kv={"a": 1}), "/payload/kv/a"),
    ("runtime.session.kv.set.command", heartbeat(kv={"a.b[0]": 1}), "/payload/kv/a.b[0]"),
    ("runtime.session.kv.set.command", heartbeat(kv={"a/b~c": None}), "/payload/kv/a~1b~0c"),
    ("runtime.session.kv.set.command", heartbeat(kv={"k" * 257: "v"}), "/payload/kv"),
    ("runtime.task.output.event", output(event(data=None)), "/payload/events/0/data"),
    ("runtime.task.output.event", output(event(), event(seq=1.5)), "/payload/events/1/seq"),
    ("runtime.task.output.event", output(event(type="has space")), "/payload/events/0/type"),
    ("runtime.task.output.event", output(event(eventId="")), "/payload/events/0/eventId"),
    ("runtime.task.output.event", output(event(extra=1)), "/payload/events/0/extra"),
    ("runtime.task.output.event", output(*[event()] * 1001), "/payload/events"),
    ("runtime.task.output.event",
     output(event(data={f"k{i}": i for i in range(257)})), "/payload/events/0/data"),
    ("runtime.task.input.ack.command", heartbeat(seq=-1), "/payload/seq"),
    ("runtime.task.input.ack.command", heartbeat(), "/payload/seq"),
])
def test_payload_violations_point_at_the_first_one(channel: str, payload: Any, path: str) -> None:
    result = refused(frame(channel, payload))
    assert (result.error.code, result.error.path, result.request_id) == (INVALID, path, "req-1")
    assert not result.error.retryable


def test_a_very_long_unknown_key_gives_a_pointer_that_fits_the_error_frame() -> None:
    result = refused(frame("runtime.session.heartbeat.command", heartbeat(**{"k" * 5000: 1})))
    assert result.error.path == "/payload"


def test_error_messages_never_echo_values() -> None:
    cases = [
        heartbeat(runId=SECRET),
        heartbeat(metadata=SECRET),
        heartbeat(runtimeInstanceId=SECRET + " "),
        {"sessionId": SES, "runId": RUN, "kv": {"k": [SECRET]}},
    ]
    for payload in cases:
        for channel in ("runtime.session.heartbeat.command", "runtime.session.kv.set.command"):
            result = refused(frame(channel, payload))
            assert SECRET not in result.error.message
            assert SECRET not in (result.error.path or "")


def test_the_binary_frame_answer() -> None:
    assert codec.BINARY_FRAME.request_id is None
    assert codec.BINARY_FRAME.error.code is INVALID
    assert reference_errors(codec.encode_error(codec.BINARY_FRAME)) == []


def test_non_text_input_is_refused_not_raised() -> None:
    assert isinstance(decode(12345), DecodeError)  # type: ignore[arg-type]
    assert isinstance(decode(None), DecodeError)  # type: ignore[arg-type]
    assert isinstance(decode(bytearray(b"{}")), DecodeError)  # type: ignore[arg-type]


# --- nothing escapes ---------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=25,
)
# JSON every parser agrees on, as the protocol allows it: 64-bit integers, finite doubles.
PROTOCOL_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=10,
)
VALID_FRAMES = [codec.encode(ch, "r", c) for c in COMMANDS
                for ch, cls in m.COMMAND_CHANNELS.items() if cls is type(c)]


def pointer_parent_exists(document: Any, pointer: str) -> bool:
    node = document
    tokens = [t.replace("~1", "/").replace("~0", "~") for t in pointer.split("/")[1:]]
    for token in tokens[:-1]:
        if isinstance(node, list):
            node = node[int(token)]
        elif isinstance(node, dict) and token in node:
            node = node[token]
        else:
            return False
    return True


def check_outcome(text: str | bytes) -> None:
    result = decode(text)
    assert isinstance(result, Decoded | DecodeError)
    if isinstance(result, DecodeError):
        assert reference_errors(codec.encode_error(result)) == []
        if result.error.path:
            document = json.loads(text)
            assert pointer_parent_exists(document, result.error.path), result.error.path
    else:
        assert reference_errors(text if isinstance(text, str) else text.decode()) == []
    with contextlib.suppress(FrameRejected):
        codec.decode_server_frame(text)


HYPOTHESIS = settings(max_examples=150, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))


@HYPOTHESIS
@given(st.text() | st.binary())
def test_arbitrary_text_and_bytes_never_raise(text: str | bytes) -> None:
    check_outcome(text)


@HYPOTHESIS
@given(JSON_VALUES)
def test_arbitrary_json_never_raises(value: Any) -> None:
    check_outcome(json.dumps(value))


@HYPOTHESIS
@given(st.sampled_from(Channel), st.one_of(st.none(), st.text(max_size=70)), JSON_VALUES)
def test_arbitrary_envelopes_never_raise(channel: Channel, request_id: str | None,
                                         payload: Any) -> None:
    check_outcome(frame(channel.value, payload, request_id))


@st.composite
def mutated_frames(draw: st.DrawFn) -> str:
    document = json.loads(draw(st.sampled_from(VALID_FRAMES)))
    nodes: list[tuple[Any, Any]] = []

    def collect(node: Any) -> None:
        if isinstance(node, dict):
            nodes.extend((node, key) for key in node)
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            nodes.extend((node, index) for index in range(len(node)))
            for value in node:
                collect(value)

    collect(document)
    parent, key = draw(st.sampled_from(nodes))
    action = draw(st.sampled_from(["replace", "delete", "newline"]))
    if action == "delete" and isinstance(parent, dict):
        del parent[key]
    elif action == "newline" and isinstance(parent[key], str):
        parent[key] += "\n"
    else:
        parent[key] = draw(JSON_VALUES)
    return json.dumps(document)


@HYPOTHESIS
@given(mutated_frames())
def test_mutated_frames_never_raise_and_point_inside_the_frame(text: str) -> None:
    check_outcome(text)


@settings(max_examples=60, deadline=None, database=None)
@given(st.lists(st.builds(
    m.OutputEvent,
    st.from_regex(r"[A-Za-z0-9._:-]{1,20}", fullmatch=True),
    st.integers(min_value=0, max_value=2**53 - 1),
    st.from_regex(r"[A-Za-z0-9_.:/-]{1,20}", fullmatch=True),
    st.dictionaries(st.text(max_size=8), PROTOCOL_JSON, max_size=4),
    st.integers(min_value=0, max_value=253_402_300_799_999).map(Millis),
), max_size=5))
def test_output_batches_round_trip(events: list[m.OutputEvent]) -> None:
    command = m.PublishOutputEventsRequest(SES, RUN, tuple(events))
    text = codec.encode(Channel.OUTPUT, "r", command)
    assert reference_errors(text) == []
    assert decode(text) == Decoded(Channel.OUTPUT, "r", command)


# --- $ref confinement --------------------------------------------------------------------------

OUTSIDE_REFS = [
    "https://example.com/schema.json",
    "http://agent-service.spec/v1/schemas/envelope.json",
    "https://agent-service.spec/v2/schemas/envelope.json",
    "https://agent-service.spec:443/v1/schemas/envelope.json",
    "https://user@agent-service.spec/v1/schemas/envelope.json",
    "https://agent-service.spec/v1/schemas/envelope.json?x=1",
    "https://agent-service.spec/v1/../../../../etc/passwd",
    "https://agent-service.spec/v1/schemas/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "https://agent-service.spec/v1/schemas/..%2f..%2fetc%2fpasswd",
    "https://agent-service.spec/v1/errors.md",
    "https://agent-service.spec/v1/api/runtime-session.asyncapi.yaml",
    "https://agent-service.spec/v1/schemas/missing.json",
    "https://agent-service.spec/v1/schemas//envelope.json",
    "file:///etc/passwd",
    "file:///work/main/spec/v1/schemas/envelope.json",
    "ftp://agent-service.spec/v1/schemas/envelope.json",
    "data:application/json,{}",
    "//agent-service.spec/v1/schemas/envelope.json",
    "envelope.json",
    "../../etc/passwd",
]


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    opened: list[str] = []

    def refuse(url: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(str(url))
        raise AssertionError(f"urlopen({url!r})")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    return opened


@pytest.mark.parametrize("ref", OUTSIDE_REFS)
def test_schemas_referring_outside_spec_do_not_compile(ref: str, no_network: list[str]) -> None:
    with pytest.raises(SpecError):
        codec.compile_schema({"$ref": ref})
    with pytest.raises(SpecError):
        codec.compile_schema({"properties": {"a": {"$ref": ref}}},
                             base_uri=codec.SPEC_BASE_URL + "schemas/envelope.json")
    assert no_network == []


@pytest.mark.parametrize("ref", OUTSIDE_REFS)
def test_the_handlers_alone_keep_fastjsonschema_off_the_network(ref: str,
                                                                no_network: list[str]) -> None:
    # Without our inlining: fastjsonschema's own resolver must still never reach urllib.
    compile_raw: Callable[..., Any] = fastjsonschema.compile
    with pytest.raises(SpecError):
        compile_raw({"$ref": ref}, handlers=codec._LocalOnly())
    assert no_network == []


def test_local_refs_compile_through_both_paths(no_network: list[str]) -> None:
    ref = codec.SPEC_BASE_URL + "schemas/common/identity.json#/$defs/runId"
    raw = fastjsonschema.compile({"$ref": ref}, handlers=codec._LocalOnly())
    ours = codec.compile_schema({"$ref": ref})
    for value, ok in ((RUN, True), (RUN + "\n", False), ("run_x", False)):
        for validator in (raw, ours):
            if ok:
                validator(value)
            else:
                with pytest.raises(fastjsonschema.JsonSchemaValueException):
                    validator(value)
    assert no_network == []


def test_keywords_beside_a_ref_are_refused() -> None:
    with pytest.raises(SpecError, match="beside"):
        codec.compile_schema({"$ref": codec.SPEC_BASE_URL + "schemas/common/identity.json",
                              "maxLength": 3})


def test_refs_to_missing_definitions_are_refused() -> None:
    with pytest.raises(SpecError):
        codec.compile_def("envelope.json#/$defs/Nope")
    with pytest.raises(SpecError):
        codec.compile_def("envelope.json#anchor")
