"""A runtime built on the seed documents alone can validate every reply strictly.

The seed's reply schemas allow no properties beyond their own, so the gateway sends its extension
properties only to runtimes that ask for them (`replyExtensions` on attach).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from e2e_support import Wire, gateway_for_test
from jsonschema import Draft202012Validator  # type: ignore[import-untyped,unused-ignore]
from referencing import Registry, Resource
from test_spec_files import SCHEMAS, load_json, strip_additions

# The seed's name for each reply channel's payload.
SEED_REPLIES = {
    "runtime.session.attach.reply": "RuntimeAttachResponse",
    "runtime.session.heartbeat.reply": "HeartbeatResponse",
    "runtime.session.recover.reply": "RecoverConnectionsResponse",
    "runtime.session.secrets.get.reply": "GetSecretsResponse",
    "runtime.session.config.get.reply": "GetConfigResponse",
    "runtime.session.kv.get.reply": "GetKVResponse",
    "runtime.session.kv.set.reply": "SetKVResponse",
    "runtime.task.output.reply": "PublishOutputEventsResponse",
}


def seed_validator(definition: str) -> Draft202012Validator:
    """The seed's definition: the spec file without its marked additions (test_spec_files checks
    that this is the seed), with our files for the references the seed left out."""
    documents = [load_json(path) for path in sorted(SCHEMAS.rglob("*.json"))]
    seed = strip_additions(load_json(SCHEMAS / "commands" / "runtime-session.json"))
    documents = [seed if d["$id"] == seed["$id"] else d for d in documents]
    registry: Registry[Any] = Registry().with_resources(
        (d["$id"], Resource.from_contents(d)) for d in documents
    )
    return Draft202012Validator({"$ref": f"{seed['$id']}#/$defs/{definition}"}, registry=registry)


async def replies_to_every_command(wire: Wire, run_id: str, **attach: Any) -> list[Any]:
    """One reply on each of the seed's reply channels."""
    capabilities = ["secrets.read", "kv.read", "kv.write"]
    reply = await wire.call("runtime.session.attach.command", {
        "runId": run_id, "runtimeInstanceId": "rt-1", "protocolVersion": "v1",
        "capabilities": capabilities, **attach})
    ids = {"sessionId": reply["payload"]["sessionId"], "runId": run_id}
    return [
        reply,
        await wire.call("runtime.session.heartbeat.command", ids),
        await wire.call("runtime.session.secrets.get.command", ids),
        await wire.call("runtime.session.config.get.command", ids),
        await wire.call("runtime.session.kv.set.command", {**ids, "kv": {"a": "b"}}),
        await wire.call("runtime.session.kv.get.command", {**ids, "keys": ["a"]}),
        await wire.call("runtime.task.output.event", {**ids, "events": []}),
        await wire.call("runtime.session.recover.command", {
            "sessionId": ids["sessionId"], "mainRunId": run_id, "connectionEpoch": 5}),
    ]


async def test_every_reply_validates_against_the_seeds_reply_schema(tmp_path: Path) -> None:
    async with gateway_for_test(tmp_path) as h:
        run_id, token = await h.create_run(secrets={"KEY": "value"}, config={"a": 1})
        async with h.wire(token) as wire:
            frames = await replies_to_every_command(wire, run_id)
    assert sorted(frame["channel"] for frame in frames) == sorted(SEED_REPLIES)
    refused = {
        frame["channel"]: [error.message for error in
                           seed_validator(SEED_REPLIES[frame["channel"]]).iter_errors(
                               frame["payload"])]
        for frame in frames
    }
    assert refused == {channel: [] for channel in SEED_REPLIES}


async def test_a_runtime_that_asks_gets_the_attach_replys_extensions(tmp_path: Path) -> None:
    async with gateway_for_test(tmp_path, max_frame_bytes=8192) as h:
        run_id, token = await h.create_run()
        async with h.wire(token) as wire:
            reply = (await replies_to_every_command(wire, run_id, replyExtensions=True))[0]
    assert reply["payload"]["nextOutputSeq"] == 0
    assert reply["payload"]["maxFrameBytes"] == 8192
