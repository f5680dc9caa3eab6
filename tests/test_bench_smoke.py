"""The bench suite's own machinery, fast: results validation, rendering, the micro benchmarks.

No assertion here is about speed (speed targets live in bench/, never in timed tests); these
tests check that the suite measures and reports what it promises.
"""

from __future__ import annotations

import copy
import os
import ssl
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
import trio
import trustme
from jsonschema import ValidationError  # type: ignore[import-untyped,unused-ignore]
from trio_websocket import WebSocketRequest, open_websocket_url, serve_websocket

# bench/ is not part of the wheel: the suite runs from the checkout, and so do these tests.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import direct_echo, loadgen
from bench.codec_bench import HEARTBEAT, reference_validator
from bench.heap import OWNERS, owner, owning_frame
from bench.loadgen import Schedule, _leaves, due_time, dues_in_window, unanswered_waits
from bench.machine import describe
from bench.micro import attached_hub, codec_us, shell_us_per_heartbeat, statemachine_steps_per_s
from bench.report import (
    METRICS,
    render,
    render_markdown,
    table_rows,
    targets,
    validate_results,
    write_results,
)
from bench.suite import (
    ATTACH_TIMEOUT_S,
    QUICK,
    SMOKE,
    Results,
    burst_percentile,
    interpret,
    percentile,
    ratio_figures,
    run_plan,
)
from gateway import codec
from statemachine.effects import SendReply
from statemachine.messages import HeartbeatResponse


def synthetic(mode: str = "quick") -> dict[str, Any]:
    values = {name: float(index + 1) for index, name in enumerate(METRICS)}
    values["heartbeat_ratio"] = 0.9  # met
    values["attach_p99_ms"] = 750.0  # missed
    metrics = {name: {"value": value, "unit": METRICS[name]} for name, value in values.items()}
    metrics["create_run_http_per_s"] = {"value": 123.0, "unit": "runs/s"}  # informational
    return {
        "metrics": metrics,
        "machine": describe(1024),
        "mode": mode,
        "timestamp": "2026-01-01T00:00:00+00:00",
        "notes": ["a note the renderer must carry"],
        "details": {"hold": {"attached": 3}},
    }


def test_a_complete_document_validates() -> None:
    assert validate_results(synthetic()) == []


@pytest.mark.parametrize(
    ("damage", "complaint"),
    [
        (lambda d: d["metrics"].pop("session_kib"), "metric 'session_kib' is missing"),
        (lambda d: d["metrics"]["session_kib"].update(value="12"), "not a finite number"),
        (lambda d: d["metrics"]["session_kib"].update(value=float("nan")), "not a finite number"),
        (lambda d: d["metrics"]["session_kib"].update(value=True), "not a finite number"),
        (lambda d: d["metrics"]["session_kib"].pop("unit"), "is not {value, unit}"),
        (lambda d: d["machine"].pop("wsproto"), "machine.wsproto is missing"),
        (lambda d: d.update(mode="medium"), "`mode` is not one of"),
        (lambda d: d.pop("timestamp"), "`timestamp` is not a string"),
        (lambda d: d.update(metrics=[]), "`metrics` is not an object"),
    ],
)
def test_validation_names_what_is_wrong(damage: Any, complaint: str) -> None:
    doc = copy.deepcopy(synthetic())
    damage(doc)
    problems = validate_results(doc)
    assert any(complaint in problem for problem in problems), problems


def test_write_results_refuses_a_bad_document(tmp_path: Path) -> None:
    doc = synthetic()
    del doc["metrics"]["codec_us_per_frame"]
    with pytest.raises(ValueError, match="codec_us_per_frame"):
        write_results(doc, tmp_path / "latest.json")
    assert not (tmp_path / "latest.json").exists()


def test_written_results_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "results" / "latest.json"
    write_results(synthetic(), path)
    assert validate_results(orjson.loads(path.read_bytes())) == []


def test_table_has_every_metric_and_judges_targets() -> None:
    rows = {row[0].strip("`"): row for row in table_rows(synthetic())}
    assert set(METRICS) <= set(rows)
    assert rows["heartbeat_ratio"][3:] == (">= 0.85", "yes")
    assert rows["attach_p99_ms"][3:] == ("<= 500", "**no**")
    assert rows["create_run_http_per_s"][3:] == ("", "")  # informational: no target


def test_sessions_held_target_depends_on_the_mode() -> None:
    assert targets("quick")["sessions_held"].bound == 2_000
    assert targets("full")["sessions_held"].bound == 20_000
    assert targets("smoke")["sessions_held"].bound == SMOKE.hold_sessions


def test_only_a_smoke_page_says_its_figures_mean_nothing() -> None:
    assert "figures mean nothing" in render_markdown(synthetic("smoke"), None)
    assert "figures mean nothing" not in render_markdown(synthetic("full"), None)


def test_render_writes_the_page_and_the_chart(tmp_path: Path) -> None:
    doc = synthetic("full")
    render(doc, tmp_path / "benchmarks.md", tmp_path / "benchmarks.png")
    page = (tmp_path / "benchmarks.md").read_text(encoding="utf-8")
    assert "| metric | value | unit | target | met? |" in page
    assert "![benchmark figures](benchmarks.png)" in page
    assert "a note the renderer must carry" in page
    assert "Mode **full**" in page
    for name in METRICS:
        assert f"`{name}`" in page
    assert (tmp_path / "benchmarks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_markdown_without_a_chart_has_no_image() -> None:
    assert "![" not in render_markdown(synthetic(), None)


def test_interpret_puts_each_figure_next_to_its_transport_twin() -> None:
    results = Results()
    for name, value in [("echo_cpu_us_per_round_trip", 100.0), ("gateway_cpu_us_per_heartbeat",
                        125.0), ("session_kib", 43.0), ("echo_conn_kib", 39.0),
                        ("direct_echo_conn_kib", 30.5)]:
        results.put(name, value, "unit")
    results.details["outputs"] = {"stored": 1_000_000, "gateway_cpu_s": 18.0, "elapsed_s": 20.0}
    results.details["ratio"] = {"pair_ratios": [0.9, 0.7, 0.85, 0.8, 0.95, 0.75, 0.88, 0.82]}
    interpret(results, cores=2, load=3.0)
    text = "\n".join(results.notes)
    assert "load average 3.0 on 2 cores" in text
    assert "the gateway's own work is 25 us per heartbeat (the ratio of the two is 0.80)" in text
    assert "18.0 us of CPU per durable event, 0.90 cores busy" in text
    assert "its own share is 4.0 KiB" in text
    assert "each the rate over all 8 of its rounds" in text
    assert "the ratio of one pair of rounds ranged from 0.70 to 0.95" in text
    assert "(middle half 0.80-0.88)" in text
    assert "holds 30.5 KiB per idle connection, 8.5 KiB less than trio-websocket's" in text


async def test_the_direct_echo_server_speaks_websocket(tmp_path: Path) -> None:
    # It stands for a transport in the memory figures, so it must be a working one: upgrade,
    # text and binary messages (several frames' worth), ping, and a clean close handshake.
    ca = trustme.CA()
    ca.issue_cert("localhost").configure_cert(server := ssl.create_default_context(
        ssl.Purpose.CLIENT_AUTH))
    client = ssl.create_default_context()
    ca.configure_trust(client)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(direct_echo.serve, server)
        async with open_websocket_url(f"wss://localhost:{port}/echo", client) as ws:
            messages: list[str | bytes] = ["hi", "x" * 100_000, b"\x00\xff" * 30_000]
            for message in messages:
                await ws.send_message(message)
                assert await ws.get_message() == message
            await ws.ping(b"p")
        assert ws.closed is not None and ws.closed.code == 1000  # the server answered the close
        nursery.cancel_scope.cancel()


async def _never_answers(request: WebSocketRequest) -> None:
    await request.accept()
    await trio.sleep_forever()


@pytest.mark.parametrize(
    "scenario",
    [
        {"scenario": "ratio", "server_pids": {"echo": os.getpid(), "gateway": os.getpid()},
         "rounds": 1, "round_s": 0.1, "warmup_s": 0.1, "cap": 10},
        {"scenario": "outputs", "batch": 1, "batches": 1, "duration_s": 0.1, "text_bytes": 1},
        {"scenario": "inputs", "control_url": "http://127.0.0.1:9", "admin_token": "t",
         "posts": 1, "events_per_post": 1, "text_bytes": 1},
    ],
    ids=lambda spec: spec["scenario"],
)
async def test_a_scenario_ends_by_itself_when_the_server_never_answers(
    tmp_path: Path, scenario: dict[str, Any]
) -> None:
    # Every load generator is bounded by its own timeout_s, connecting and attaching included:
    # a server that accepts the WebSocket and then says nothing must not hold it.
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server)
    async with trio.open_nursery() as nursery:
        listener = await nursery.start(serve_websocket, _never_answers, "127.0.0.1", 0, server)
        url = f"wss://localhost:{listener.port}/runtime"
        spec = {**scenario, "ca": str(tmp_path / "ca.pem"), "url": url, "gateway_url": url,
                "echo_url": url, "runs": [["run_bench0001", "agt_token"]], "timeout_s": 0.5}
        with trio.move_on_after(10) as guard, pytest.raises(BaseException) as raised:
            await loadgen.SCENARIOS[spec["scenario"]](spec)
        assert not guard.cancel_called, "the scenario did not end by itself"
        assert any(leaf.startswith("TooSlowError") for leaf in _leaves(raised.value))
        nursery.cancel_scope.cancel()


def stack(*innermost_first: str) -> tracemalloc.Traceback:
    return tracemalloc.Traceback(tuple((name, 1) for name in innermost_first))


def test_heap_charges_an_allocation_to_the_library_that_asked_for_it() -> None:
    where = {name: prefix for prefix, name in OWNERS}
    trio_core, ws, shell = where["trio core"], where["trio-websocket"], where["gateway"]
    event_init = "<attrs generated methods trio._sync.Event>"
    # trio's own frames are skipped while a library that called into trio is on the stack ...
    assert owner(stack(event_init, trio_core + "_core/_run.py", ws + "_impl.py",
                       shell + "service.py")) == "trio-websocket"
    assert owner(stack(where["gateway (core)"] + "hub.py", shell + "service.py")) == (
        "gateway (core)")
    assert owner(stack(trio_core + "_ssl.py", trio_core + "_core/_run.py")) == "trio TLS stream"
    # ... and count when nothing else is.
    assert owner(stack(trio_core + "_core/_run.py", "<frozen runpy>")) == "trio core"
    assert owner(stack("<frozen runpy>")) == "other"
    # A checkout that happens to sit in a directory named like a package is still judged by
    # where each package really lives.
    assert owner(stack("/home/me/gateway/bench/loadgen.py")) == "other"


def test_heap_names_the_line_of_the_library_that_asked() -> None:
    where = {name: prefix for prefix, name in OWNERS}
    trace = tracemalloc.Traceback((
        ("<attrs generated methods trio._sync.Event>", 2),
        (where["trio core"] + "_core/_run.py", 10),
        (where["gateway"] + "links.py", 42),
        (where["gateway"] + "service.py", 7),
    ))
    name, frame = owning_frame(trace)
    assert frame is not None
    assert (name, frame.filename, frame.lineno) == ("gateway", where["gateway"] + "links.py", 42)
    assert owning_frame(stack("<frozen runpy>")) == ("other", None)


def _round(target: str, trips: int, elapsed: float, server_cpu: float) -> dict[str, Any]:
    return {"target": target, "round_trips": trips, "bad": 0, "elapsed_s": elapsed,
            "server_cpu_s": server_cpu, "client_cpu_s": elapsed / 2}


def test_heartbeat_ratio_is_the_quotient_of_the_two_reported_rates() -> None:
    # The issue defines heartbeat_ratio as heartbeat_rt_per_s / echo_rt_per_s. Rounds in ABBA
    # order, the host slowing down through the phase: the pooled rates see the same slowdown.
    rounds = [
        _round("echo", 10_000, 1.0, 0.9), _round("gateway", 8_000, 1.0, 0.9),
        _round("gateway", 7_000, 1.0, 0.9), _round("echo", 9_000, 1.0, 0.9),
        _round("echo", 4_000, 1.0, 0.9), _round("gateway", 3_800, 1.0, 0.9),
    ]
    figures = ratio_figures(rounds)
    assert figures.echo_rate == pytest.approx(23_000 / 3)
    assert figures.heartbeat_rate == pytest.approx(18_800 / 3)
    # Pairs are the back-to-back rounds: (10 000, 8 000), (9 000, 7 000), (4 000, 3 800).
    assert figures.details["pair_ratios"] == [0.8, round(7 / 9, 3), 0.95]
    assert figures.gateway_cpu_us == pytest.approx(2.7 / 18_800 * 1e6)
    assert figures.echo_cpu_us == pytest.approx(2.7 / 23_000 * 1e6)
    assert figures.details["echo"]["server_cores"] == pytest.approx(0.9)


def test_a_bad_reply_fails_the_ratio_phase() -> None:
    rounds = [_round("echo", 10, 1.0, 0.1), {**_round("gateway", 9, 1.0, 0.1), "bad": 1}]
    with pytest.raises(RuntimeError, match="1 bad replies in a gateway round"):
        ratio_figures(rounds)


def test_percentile_is_nearest_rank() -> None:
    samples = [float(x) for x in range(1, 1001)]
    assert percentile(samples, 0.99) == 990.0
    assert percentile(samples, 0.5) == 500.0
    assert percentile([7.0], 0.99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 0.99)


def test_failed_attaches_rank_as_not_attached_in_time() -> None:
    # 1 000 runtimes: 995 attached in 1..995 ms, 5 failed. The p99 is the 990th of all 1 000,
    # not the 986th of the 995 that made it.
    attached = [float(x) for x in range(1, 996)]
    assert burst_percentile(attached, 5, 0.99) == 990.0
    assert burst_percentile(attached, 0, 0.99) == 986.0
    # More than 1 % failed: the p99 runtime never attached within the burst's time.
    assert burst_percentile(attached[:980], 20, 0.99) == ATTACH_TIMEOUT_S * 1000
    assert burst_percentile(attached[:980], 20, 0.5) == 500.0


def test_dues_in_window_are_the_heartbeats_due_in_it() -> None:
    assert dues_in_window(3.0, 10.0, 20.0, 50.0) == [23.0, 33.0, 43.0]
    assert dues_in_window(0.0, 10.0, 10.0, 30.0) == [10.0, 20.0]  # [start, end)
    assert dues_in_window(100.0, 10.0, 20.0, 50.0) == []
    # Edges that are themselves due times are placed as the session's loop places them.
    start, end = due_time(0.3, 0.7, 5), due_time(0.3, 0.7, 9)
    assert dues_in_window(0.3, 0.7, start, end) == [due_time(0.3, 0.7, n) for n in range(5, 9)]


def test_heartbeats_unanswered_when_the_window_closes_are_counted() -> None:
    # Window [100, 130), a heartbeat every 10 s, results read at 140.
    all_answered, one_answered, none_answered = Schedule(101.0), Schedule(105.0), Schedule(99.0)
    all_answered.timed, one_answered.timed = 3, 1
    waits = unanswered_waits([all_answered, one_answered, none_answered], 10.0, 100.0, 130.0,
                             140.0)
    assert sorted(waits) == [11.0, 15.0, 21.0, 25.0, 31.0]


def test_the_attached_hub_grants_heartbeats() -> None:
    hub, heartbeats = attached_hub(3)
    effects = hub.handle(heartbeats[1])
    assert len(effects) == 1
    assert isinstance(effects[0], SendReply)
    assert isinstance(effects[0].payload, HeartbeatResponse)


def test_statemachine_micro_benchmark_runs() -> None:
    assert statemachine_steps_per_s(2_000, sessions=50, repeats=1) > 0


def test_codec_micro_benchmark_runs() -> None:
    ours, theirs = codec_us(50, 1)
    assert ours > 0 and theirs > 0


def _heartbeat_variant(**changes: Any) -> dict[str, Any]:
    frame: dict[str, Any] = orjson.loads(HEARTBEAT)
    for key, value in changes.items():
        if key == "payload":
            frame["payload"] = {**frame["payload"], **value}
        else:
            frame[key] = value
    return frame


@pytest.mark.parametrize(
    "frame",
    [
        _heartbeat_variant(),
        # The wider Envelope admits a gateway channel; the codec refuses it from a runtime.
        _heartbeat_variant(channel="runtime.session.heartbeat.reply"),
        _heartbeat_variant(id="has space"),
        _heartbeat_variant(payload={"sessionId": 7}),
        _heartbeat_variant(payload={"extra": True}),
        _heartbeat_variant(extra=True),
    ],
)
def test_jsonschema_reference_validates_what_the_codec_validates(frame: dict[str, Any]) -> None:
    # jsonschema_us_per_frame is "the same validation" as codec_us_per_frame: the two must agree
    # on every frame, including the ones only the codec's narrower envelope refuses.
    validate = reference_validator()
    try:
        validate(frame)
        reference_accepts = True
    except ValidationError:
        reference_accepts = False
    codec_accepts = isinstance(codec.decode(orjson.dumps(frame).decode()), codec.Decoded)
    assert reference_accepts == codec_accepts


async def test_shell_micro_benchmark_runs_the_whole_frame_path() -> None:
    assert await shell_us_per_heartbeat(20, 1) > 0


async def test_the_micro_phase_runs_inside_the_suites_trio_run() -> None:
    # `python -m bench` runs every phase inside one trio run; a micro benchmark that started its
    # own (as one once did) breaks `nox -s bench` while calling it alone still works.
    plan = attrs.evolve(QUICK, statemachine_steps=2_000, codec_loops=20, codec_repeats=1)
    results = await run_plan(plan, 1024, ["micro"])
    assert set(results.metrics) == {
        "statemachine_steps_per_s", "codec_us_per_frame", "jsonschema_us_per_frame",
        "shell_us_per_heartbeat", "store_read_cpu_us", "store_read_cpu_us_x100",
    }
    assert all(metric["value"] > 0 for metric in results.metrics.values())
