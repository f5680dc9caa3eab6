"""The reliability ledger: what each fault and hostile-input test tried and what it lost.

Tests call `record(...)` as they go; `tests/conftest.py` renders the totals into
`docs/reliability.md` once a run has covered every class, so the published table always comes
from one real test run and never from a hand-edited file.
"""

from __future__ import annotations

from dataclasses import dataclass

# Class name -> one line saying what the class exercises. The order is the table's order.
CLASSES: dict[str, str] = {
    "crash": "gateway process SIGKILLed at random kill points while runtimes publish, "
    "set KV and receive inputs; restarted on the same data directory",
    "network drop": "loopback proxy cuts connections mid-frame",
    "network stall": "loopback proxy stalls connections half-open (no FIN) past the lease",
    "network delay": "loopback proxy delays every chunk in both directions",
    "split brain": "two runtime instances attach the same run with different epochs, "
    "in every order and interleaving",
    "store full": "the database cannot grow (SQLITE_FULL, as on a full disk), set and lifted "
    "again and again while runtimes attach, publish, set KV and acknowledge inputs",
    "slow consumer": "a runtime that never reads its frames",
    "command flood": "commands sent faster than the per-connection rate limit",
    "connection overload": "more connections than the configured maximum",
    "drain": "SIGTERM while sessions are busy",
    "hostile frame: invalid UTF-8": "text and binary frames whose bytes are not UTF-8",
    "hostile frame: non-JSON": "text frames that are not JSON",
    "hostile frame: non-object": "JSON values that are not an object (arrays, strings, numbers, "
    "null)",
    "hostile frame: deep nesting": "JSON nested deeper than 32 levels, up to 100k levels",
    "hostile frame: huge strings/arrays": "frames within, above and far above the maximum frame "
    "size",
    "hostile frame: out-of-range numbers": "1e400, integers beyond 64 bits, NaN, negative seq "
    "and epochs",
    "hostile frame: duplicate keys": "objects with a repeated key at any depth",
    "hostile frame: binary": "binary WebSocket frames, including valid JSON sent as binary",
    "hostile frame: unknown channel": "channels no version of the protocol defines",
    "hostile frame: reply channel": "gateway-to-runtime channels (replies, input events, errors) "
    "sent by a runtime",
    "hostile frame: command before attach": "every command sent before the connection attached",
    "hostile frame: other run/session ids": "commands naming another run, session or runtime "
    "instance",
    "hostile handshake": "no token, malformed or revoked tokens, another run's token, oversized "
    "headers, plain HTTP and wrong paths",
    "control API fuzz": "schemathesis against the control API's OpenAPI file: no 5xx, every "
    "response as specified",
    "secrets: logs": "secret values searched in every log record of a session",
    "secrets: errors": "secret values searched in every error frame and problem body",
    "secrets: metrics": "secret values searched in the /metrics text",
    "secrets: session view": "secret values searched in the control API's session view",
    "secrets: output masking": "secret values echoed into output events are stored masked",
}


@dataclass
class Tally:
    """Running totals of one class across every test that recorded it."""

    tried: int = 0
    lost: int = 0
    details: list[str] | None = None


_tallies: dict[str, Tally] = {}


def record(fault_class: str, tried: int, lost: int, detail: str = "") -> None:
    """Add one test's counts to a class (unknown names fail loudly: typos must not vanish)."""
    if fault_class not in CLASSES:
        raise KeyError(f"{fault_class!r} is not a reliability class; add it to CLASSES")
    if tried < 0 or lost < 0 or lost > tried:
        raise ValueError(f"{fault_class}: tried={tried} lost={lost} is not a valid count")
    tally = _tallies.setdefault(fault_class, Tally())
    tally.tried += tried
    tally.lost += lost
    if detail:
        tally.details = [*(tally.details or []), detail]


def recorded() -> dict[str, Tally]:
    """The totals so far (a copy, so callers cannot change the ledger behind its back)."""
    return {name: Tally(t.tried, t.lost, list(t.details or [])) for name, t in _tallies.items()}


def missing() -> list[str]:
    """Classes no test has recorded in this run, in table order."""
    return [name for name in CLASSES if name not in _tallies]


def reset() -> None:
    """Forget everything (for the ledger's own tests)."""
    _tallies.clear()


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render() -> str:
    """The markdown table: one row per class, with counts or "not run" where nothing recorded."""
    lines = [
        "| Class | What is tried | Cases tried | Lost |",
        "|-------|---------------|------------:|-----:|",
    ]
    for name, description in CLASSES.items():
        tally = _tallies.get(name)
        tried = "not run" if tally is None else str(tally.tried)
        lost = "not run" if tally is None else str(tally.lost)
        lines.append(f"| {_cell(name)} | {_cell(description)} | {tried} | {lost} |")
    return "\n".join(lines) + "\n"
