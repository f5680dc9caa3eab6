"""Secret values never leak: not in logs, error frames, problem bodies, metrics or session views.

One realistic session (our own client reads secrets, echoes one into its outputs, stores one in
KV) plus everything hostile that could make the gateway repeat a value: frames carrying secrets
in every field that can be refused, commands without the capability, control API requests that
are refused with a secret in their body, and a revocation. Every log record of every logger (at
DEBUG) is kept, and each secret is searched for as it is and in its escaped forms.

Outputs: a secret a runtime echoes into an output event's data is stored as `***` (on by
default), or as it is with `mask_secrets=False`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import reliability_ledger
import trio
from e2e_support import Harness, gateway_for_test
from raw_wire import Closed, RawWire, raw_wire

from gateway.client import ClientError, connect

API_KEY = "sk-live-4f9a8b7c6d5e3a2b1c0d"
PASSWORD = 'p@ss"w\\ord/ünï€-7731'  # needs escaping in JSON, in repr and in URLs
DB_URL = "postgres://app:Zx9-Qw8-Er7@db.internal:5432/prod"
WEBHOOK = "whsec_" + "A1b2C3d4" * 4  # also a valid eventId and event type (see the masking test)
SECRETS = {"API_KEY": API_KEY, "PASSWORD": PASSWORD, "DB_URL": DB_URL, "WEBHOOK": WEBHOOK}

HEARTBEAT = "runtime.session.heartbeat.command"
SECRETS_GET = "runtime.session.secrets.get.command"
KV_SET = "runtime.session.kv.set.command"
OUTPUT = "runtime.task.output.event"


def forms(secret: str) -> set[str]:
    """The ways a value shows up in text: raw, JSON- and repr-escaped, URL-encoded."""
    return {
        secret,
        json.dumps(secret)[1:-1],
        json.dumps(secret, ensure_ascii=False)[1:-1],
        repr(secret)[1:-1],
        quote(secret, safe=""),
    }


NEEDLES = {needle: name for name, value in SECRETS.items() for needle in forms(value)}


def leaks(text: str) -> list[str]:
    """The names of the secrets found in `text`."""
    return sorted({name for needle, name in NEEDLES.items() if needle in text})


class Evidence:
    """Every text a secret could leak into, by where it came from."""

    def __init__(self) -> None:
        self.texts: dict[str, list[str]] = {
            "secrets: logs": [],
            "secrets: errors": [],
            "secrets: metrics": [],
            "secrets: session view": [],
        }

    def add(self, where: str, text: str) -> None:
        self.texts[where].append(text)

    def check(self) -> list[str]:
        """Record each place in the ledger; return every leak found."""
        found = []
        for where, texts in self.texts.items():
            leaked = [(text, leaks(text)) for text in texts if leaks(text)]
            reliability_ledger.record(where, len(texts), len(leaked))
            found += [f"{where}: {names} in {text[:300]!r}" for text, names in leaked]
        return found


# The test's own HTTP client (the platform's side) logs the URLs the test asks for; the gateway
# uses neither library, so their records say nothing about what the gateway leaks.
PLATFORM_SIDE = ("httpx", "httpcore")


class _Keep(logging.Handler):
    """Keeps everything about each record: message, arguments, exception and stack."""

    def __init__(self, evidence: Evidence) -> None:
        super().__init__(logging.DEBUG)
        self.evidence = evidence
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.partition(".")[0] in PLATFORM_SIDE:
            return
        self.count += 1
        parts = [record.name, record.levelname]
        try:
            parts.append(record.getMessage())
        except Exception:  # a broken format string must not hide its arguments
            parts.append(repr(record.msg))
        parts.append(repr(record.args))
        if record.exc_info:
            parts.append(logging.Formatter().formatException(record.exc_info))
        if record.exc_text:
            parts.append(record.exc_text)
        if record.stack_info:
            parts.append(record.stack_info)
        parts.append(repr({k: v for k, v in vars(record).items() if k not in ("msg", "args")}))
        self.evidence.add("secrets: logs", "\n".join(parts))


@contextmanager
def every_log_record(evidence: Evidence) -> Iterator[_Keep]:
    """All loggers at DEBUG into one handler, including those that do not propagate."""
    handler = _Keep(evidence)
    loggers = [logging.getLogger(), *(
        logger for logger in logging.root.manager.loggerDict.values()
        if isinstance(logger, logging.Logger))]
    levels = {logger: logger.level for logger in loggers}
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
    logging.getLogger().addHandler(handler)
    loose = [logger for logger in loggers if not logger.propagate]
    for logger in loose:
        logger.addHandler(handler)
    disabled = logging.root.manager.disable
    logging.disable(logging.NOTSET)
    try:
        yield handler
    finally:
        logging.disable(disabled)
        for logger in loose:
            logger.removeHandler(handler)
        logging.getLogger().removeHandler(handler)
        for logger, level in levels.items():
            logger.setLevel(level)


async def _frames_until(wire: RawWire, request_id: str, evidence: Evidence) -> dict[str, Any]:
    """The answer to `request_id`; every error frame on the way is evidence."""
    while True:
        frame = await wire.recv()
        if frame["channel"] == "runtime.session.error":
            evidence.add("secrets: errors", json.dumps(frame, ensure_ascii=False))
        if frame["id"] == request_id:
            return frame


async def _hostile_frames(h: Harness, wire: RawWire, run_id: str, session_id: str,
                          evidence: Evidence) -> int:
    """Frames that carry secrets where the gateway must refuse them; returns how many."""
    ids = {"sessionId": session_id, "runId": run_id}
    big = "x" * 70_000
    cases: list[Any] = [
        {"channel": HEARTBEAT, "id": "s1", "payload": {"sessionId": API_KEY, "runId": run_id}},
        {"channel": HEARTBEAT, "id": "s2", "payload": {**ids, "runtimeInstanceId": PASSWORD}},
        {"channel": HEARTBEAT, "id": "s3", "payload": {**ids, "runtimeInstanceId": WEBHOOK}},
        {"channel": API_KEY, "id": "s4", "payload": {}},
        {"channel": HEARTBEAT, "id": "s5", "payload": {"sessionId": session_id, "runId": DB_URL}},
        {"channel": SECRETS_GET, "id": "s6", "payload": {**ids, "names": [PASSWORD * 20]}},
        {"channel": KV_SET, "id": "s7", "payload": {**ids, "kv": {"k": API_KEY + big}}},
        {"channel": OUTPUT, "id": "s8", "payload": {**ids, "events": [{
            "eventId": WEBHOOK, "seq": 0, "type": "log", "data": {"t": API_KEY},
            "timestamp": PASSWORD}]}},
        {"channel": OUTPUT, "id": "s9", "payload": {**ids, "events": [{
            "eventId": "e", "seq": -1, "type": API_KEY + "/" + PASSWORD, "data": {},
            "timestamp": "2026-11-21T12:00:00Z"}]}},
        {"channel": OUTPUT, "id": "s10", "payload": {**ids, "events": [{
            "eventId": "e", "seq": 5, "type": "log", "data": {"t": API_KEY},
            "timestamp": "2026-11-21T12:00:00Z"}]}},  # a gap: refused after parsing
        {"channel": "runtime.session.attach.command", "id": "s11", "payload": {
            "runId": run_id, "runtimeInstanceId": "rt", "protocolVersion": API_KEY}},
        {"channel": "runtime.session.attach.command", "id": "s12", "payload": {
            "runId": run_id, "runtimeInstanceId": "rt", "protocolVersion": "v1",
            "attemptId": DB_URL}},
        {"channel": HEARTBEAT, "id": "s13", "payload": {**ids, "metadata": {"m": API_KEY},
                                                       "extra": DB_URL}},
    ]
    for case in cases:
        await wire.send_json(case)
        await _frames_until(wire, case["id"], evidence)
    head = f'{{"channel": "{HEARTBEAT}", "id": "r", "payload": '
    raw = [
        head + f'{{"x": "{API_KEY}", "x": 1}}}}',  # duplicate key
        head + f'{{"x": {API_KEY}}}}}',  # not JSON
        head + f'{{"x": "{API_KEY}"}}}} trailing {DB_URL}',  # data after the document
        head + f'{{"x": 1e400, "k": "{API_KEY}"}}}}',  # a number out of range
        DB_URL,
        head + f'{{"x": "{API_KEY}{"x" * 300_000}"}}}}',  # over the frame limit
        head + f'{{"x": "{API_KEY}", "y": ' + "[" * 40 + "]" * 40 + "}}",  # too deep
    ]
    for text in raw:
        await wire.send_text(text)
        frame = await wire.recv()
        evidence.add("secrets: errors", json.dumps(frame, ensure_ascii=False))
    await wire.send_frame(0x2, API_KEY.encode())  # binary
    evidence.add("secrets: errors", json.dumps(await wire.recv(), ensure_ascii=False))
    return len(cases) + len(raw) + 1


async def _control_refusals(h: Harness, run_id: str, evidence: Evidence) -> None:
    """Control API requests refused with a secret in their body or path: problem bodies."""
    requests: list[tuple[str, str, Any]] = [
        ("POST", "/v1/runs", {"capabilities": ["nope"], "secrets": SECRETS, "config": {}}),
        ("POST", "/v1/runs", {"capabilities": [], "secrets": {"K": 5}, "config": {},
                              "extra": API_KEY}),
        ("POST", "/v1/runs", {"capabilities": [], "secrets": {"LONG": PASSWORD * 5000},
                              "config": {}}),
        ("POST", "/v1/runs", {"capabilities": [], "secrets": SECRETS, "config": {},
                              "runId": API_KEY}),
        ("POST", "/v1/runs", {"capabilities": [], "secrets": SECRETS, "config": {},
                              "configVersion": PASSWORD * 100}),
        ("POST", f"/v1/runs/{run_id}/inputs", {"events": [{"type": API_KEY + " x",
                                                           "data": {"k": DB_URL}}]}),
        ("POST", f"/v1/runs/{run_id}/inputs", {"events": [{"type": "t", "data": DB_URL}]}),
        ("GET", f"/v1/runs/{API_KEY}/session", None),
        ("GET", f"/v1/runs/{run_id}/outputs?after={quote(PASSWORD)}", None),
        ("DELETE", f"/v1/runs/run_{WEBHOOK[6:]}", None),
    ]
    for method, path, body in requests:
        response = await h.http.request(method, path, json=body)
        assert 400 <= response.status_code < 500, (path, response.text)
        evidence.add("secrets: errors", response.text)
    raw_bodies = [
        f'{{"capabilities": [], "secrets": {{"K": "{API_KEY}", "K": "{DB_URL}"}}, "config": {{}}}}',
        f'{{"capabilities": [], "secrets": {{"K": "{API_KEY}"}}, "config": {{}}',
        f'{{"capabilities": [], "secrets": {{"K": "{API_KEY}"}}, "config": NaN}}',
        API_KEY,
    ]
    for text in raw_bodies:
        response = await h.http.post("/v1/runs", content=text.encode(),
                                     headers={"content-type": "application/json"})
        assert response.status_code == 400, response.text
        evidence.add("secrets: errors", response.text)
    response = await h.http.post("/v1/runs", content=json.dumps(SECRETS).encode(),
                                 headers={"content-type": "text/plain"})
    evidence.add("secrets: errors", response.text)


async def test_secret_values_never_appear_in_logs_errors_metrics_or_session_views(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    evidence = Evidence()
    with every_log_record(evidence) as kept:
        async with gateway_for_test(tmp_path) as h:
            run_id, token = await h.create_run(secrets=SECRETS, config={"model": "m"})
            bare_run, bare_token = await h.create_run(secrets=SECRETS, capabilities=[])
            context = h.ca.client_context()

            # A well-behaved runtime on our client: reads, echoes, stores.
            async with connect(h.running.runtime_url, token=token, run_id=run_id,
                               capabilities=["secrets.read", "kv.read", "kv.write"],
                               ssl_context=context) as session:
                got = await session.get_secrets()
                assert got == SECRETS
                assert await session.get_secrets(["API_KEY", "NOPE"]) == {"API_KEY": API_KEY}
                await session.publish([("log.line", {"text": f"calling with {API_KEY}"}),
                                       ("log.line", {"env": dict(got)})])
                await session.kv_set({"cached-key": API_KEY, "db": DB_URL})
                assert await session.kv_get(["cached-key"]) == {"cached-key": API_KEY}
                view = await h.http.get(f"/v1/runs/{run_id}/session")
                evidence.add("secrets: session view", view.text)
                epoch = session.connection_epoch

            # The same through our client, without the capability: the error it raises.
            async with connect(h.running.runtime_url, token=bare_token, run_id=bare_run,
                               ssl_context=context) as bare:
                with pytest.raises(ClientError) as denied:
                    await bare.get_secrets()
                evidence.add("secrets: errors", f"{denied.value!s} {denied.value!r}")

            # A hostile runtime on a raw connection, frames that carry secrets.
            async with raw_wire(h.running.runtime_url, context, token) as wire:
                await wire.send_json({"channel": "runtime.session.attach.command", "id": "a",
                                      "payload": {"runId": run_id, "runtimeInstanceId": "rt-2",
                                                  "protocolVersion": "v1", "reconnect": True,
                                                  "connectionEpoch": epoch + 1}})
                attached = await _frames_until(wire, "a", evidence)
                session_id = attached["payload"]["sessionId"]
                await wire.send_json({"channel": SECRETS_GET, "id": "denied", "payload": {
                    "sessionId": session_id, "runId": run_id}})
                denied_frame = await _frames_until(wire, "denied", evidence)
                assert denied_frame["payload"]["code"] == "capability_denied"
                hostile = await _hostile_frames(h, wire, run_id, session_id, evidence)
                # Revoked while attached: the close frame's reason is evidence too.
                assert (await h.http.delete(f"/v1/runs/{run_id}")).status_code == 204
                with pytest.raises(Closed) as closed:
                    await wire.recv(timeout=10)
                assert closed.value.code == 4002
                evidence.add("secrets: errors", f"{closed.value.code} {closed.value.reason}")

            await _control_refusals(h, bare_run, evidence)
            for run in (run_id, bare_run):
                response = await h.http.get(f"/v1/runs/{run}/session")
                evidence.add("secrets: session view", response.text)
            metrics = (await h.http.get("/metrics")).text
            evidence.add("secrets: metrics", metrics)
            await trio.sleep(0)
    printed = capsys.readouterr()
    evidence.add("secrets: logs", printed.out + printed.err)
    # The search would find nothing in an empty haystack: prove the haystack is full.
    assert kept.count > 50
    assert hostile > 15 and len(evidence.texts["secrets: errors"]) > hostile
    assert "agent_gateway_errors_total" in metrics
    found = evidence.check()
    assert not found, "\n".join(found)


@pytest.mark.parametrize("mask", [True, False])
async def test_secrets_echoed_into_outputs_are_masked_unless_turned_off(
    tmp_path: Path, mask: bool
) -> None:
    """Masked by default (`***`), as CI systems mask job logs; `mask_secrets=False` stores the
    outputs as published. Values under 4 characters are never masked (masking.py says why)."""
    overrides = {} if mask else {"mask_secrets": False}
    short = "abc"
    async with gateway_for_test(tmp_path, **overrides) as h:
        run_id, token = await h.create_run(secrets={**SECRETS, "SHORT": short,
                                                    "INNER": API_KEY[3:12]})
        data = {
            "text": f"key={API_KEY} and again {API_KEY}; pw {PASSWORD}",
            "nested": {"list": [DB_URL, {"deep": [f"<{WEBHOOK}>"]}], API_KEY: "as a key"},
            "short": short,
            "number": 42,
        }
        async with connect(h.running.runtime_url, token=token, run_id=run_id,
                           ssl_context=h.ca.client_context()) as session:
            await session.publish([("log.line", data)])
        stored = (await h.http.get(f"/v1/runs/{run_id}/outputs")).json()["events"]
    assert len(stored) == 1
    got = stored[0]["data"]
    if mask:
        expected = {
            "text": "key=*** and again ***; pw ***",
            "nested": {"list": ["***", {"deep": ["<***>"]}], "***": "as a key"},
            "short": short,
            "number": 42,
        }
    else:
        expected = data
    lost = int(got != expected)
    if mask:
        lost += len(leaks(json.dumps(stored, ensure_ascii=False)))
        reliability_ledger.record("secrets: output masking", 1 + len(SECRETS), lost)
    assert got == expected


async def test_secrets_in_an_event_id_or_type_are_not_stored_as_they_are(tmp_path: Path) -> None:
    """A runtime that echoes a secret into an output event's `eventId` or `type` leaks it to
    whoever reads the outputs just as much as one that echoes it into `data`."""
    async with gateway_for_test(tmp_path) as h:
        run_id, token = await h.create_run(secrets={"WEBHOOK": WEBHOOK})
        async with raw_wire(h.running.runtime_url, h.ca.client_context(), token) as wire:
            attached = await wire.call({"channel": "runtime.session.attach.command", "id": "a",
                                        "payload": {"runId": run_id, "runtimeInstanceId": "rt",
                                                    "protocolVersion": "v1"}})
            answer = await wire.call({"channel": OUTPUT, "id": "o", "payload": {
                "sessionId": attached["payload"]["sessionId"], "runId": run_id, "events": [
                    {"eventId": WEBHOOK, "seq": 0, "type": f"log/{WEBHOOK}", "data": {},
                     "timestamp": "2026-11-21T12:00:00Z"}]}})
        stored = (await h.http.get(f"/v1/runs/{run_id}/outputs")).json()
    leaked = leaks(json.dumps(stored))
    reliability_ledger.record("secrets: output masking", 1, int(bool(leaked)))
    # Either refused, or stored without the value; never stored as it is.
    assert answer["channel"] == "runtime.session.error" or not leaked, stored


async def test_a_run_familys_secrets_are_masked_in_each_of_its_logs(tmp_path: Path) -> None:
    """A main run's token reads the secrets of its main run and every sub-run, and publishes
    into all their logs: each log masks all of them in `type` and `data`. EventIds are masked
    only with the secrets fixed for the run's life (its own, its main run's), so a re-publish
    after a sub-run appeared still matches what was stored (not a seq_conflict)."""
    async with gateway_for_test(tmp_path) as h:
        main_id, token = await h.create_run(secrets={"API_KEY": API_KEY})
        async with raw_wire(h.running.runtime_url, h.ca.client_context(), token) as wire:
            sessions: dict[str, str] = {}

            async def publish(run_id: str, seq: int, event_id: str, text: str) -> Any:
                if run_id not in sessions:
                    attached = await wire.call({
                        "channel": "runtime.session.attach.command", "id": f"a-{run_id}",
                        "payload": {"runId": run_id, "runtimeInstanceId": "rt",
                                    "protocolVersion": "v1"}})
                    sessions[run_id] = attached["payload"]["sessionId"]
                answer = await wire.call({"channel": OUTPUT, "id": f"o-{run_id}-{seq}",
                                          "payload": {
                    "sessionId": sessions[run_id], "runId": run_id, "events": [
                        {"eventId": event_id, "seq": seq, "type": "log", "data": {"text": text},
                         "timestamp": "2026-11-21T12:00:00Z"}]}})
                return answer["payload"]

            assert await publish(main_id, 0, f"evt-{WEBHOOK}", "first") == {"accepted": True}
            sub_id, _ = await h.create_run(mainRunId=main_id, secrets={"WEBHOOK": WEBHOOK})
            # The same event again (its reply was lost): WEBHOOK is now a secret of the family.
            assert await publish(main_id, 0, f"evt-{WEBHOOK}", "first") == {"accepted": True}
            assert await publish(main_id, 1, "e1", f"hook={WEBHOOK}") == {"accepted": True}
            assert await publish(sub_id, 0, "e0", f"key={API_KEY}") == {"accepted": True}
        stored = {run: (await h.http.get(f"/v1/runs/{run}/outputs")).json()["events"]
                  for run in (sub_id, main_id)}
    assert [e["data"] for e in stored[main_id]] == [{"text": "first"}, {"text": "hook=***"}]
    assert stored[sub_id][0]["data"] == {"text": "key=***"}
    leaked = leaks(json.dumps([stored[sub_id], stored[main_id][1]]))
    reliability_ledger.record("secrets: output masking", 2, len(leaked))
    assert not leaked


async def test_a_secret_echoed_as_a_number_is_masked(tmp_path: Path) -> None:
    """A runtime that parsed a numeric secret (a PIN, an account number) and published it as a
    JSON number showed it to whoever reads the outputs as plainly as one echoed as a string:
    masking looked only at strings. A number whose JSON text shows a secret is stored as `***`
    (a number cannot be masked in part); other numbers, and booleans, stay as they are."""
    pin, account = "31415926", "27182818284"
    async with gateway_for_test(tmp_path) as h:
        run_id, token = await h.create_run(secrets={"PIN": pin, "ACCOUNT": account})
        data = {"pin": int(pin), "balance": float(account + ".5"), "list": [int(pin), 7],
                "ok": True, "count": 42}
        async with connect(h.running.runtime_url, token=token, run_id=run_id,
                           ssl_context=h.ca.client_context()) as session:
            await session.publish([("log.line", data)])
        stored = (await h.http.get(f"/v1/runs/{run_id}/outputs")).json()["events"]
    text = json.dumps(stored)
    leaked = [name for name, value in (("PIN", pin), ("ACCOUNT", account)) if value in text]
    reliability_ledger.record("secrets: output masking", 2, len(leaked))
    assert stored[0]["data"] == {"pin": "***", "balance": "***", "list": ["***", 7], "ok": True,
                                 "count": 42}
    assert not leaked
