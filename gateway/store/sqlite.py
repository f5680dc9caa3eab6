"""The embedded store: one SQLite file in WAL mode, with group-committed writes.

Every write is a function of the writer connection, queued on a trio channel. One writer task
takes everything queued, runs it all in ONE transaction (each op inside its own SAVEPOINT, so one
op's failure or fence leaves the others intact) in one worker-thread call, commits, and only then
wakes each caller with its own answer. One fsync thus covers many small writes, which is what lets
concurrent runtimes publish tens of thousands of events per second durably. Reads use a small pool
of separate connections (WAL lets them read committed data while the writer writes), each with a
reader task that runs every read waiting for it in one worker-thread call: a trip to a worker
thread costs ~80 us of CPU, several times a point read's own cost, and a reconnect storm (every
runtime authenticating and attaching at once) is exactly when reads wait in numbers.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, TypeVar, cast

import orjson
import trio

from gateway.store.base import InputConflict, NewInput, RunExists, StoreError, UnknownRun
from statemachine.inputs import AppendOutcome, EpochClaimed, OutputsAppended, Written
from statemachine.messages import Capability, InputEvent, Millis, OutputEvent
from statemachine.records import RunGrant, SessionRecord, SessionState

T = TypeVar("T")
Op = Callable[[sqlite3.Connection], Any]

SCHEMA_VERSION = 2
MAX_GROUP = 512  # ops per transaction: bounds one commit's latency and the worker call's memory
READ_GROUP = 32  # reads per worker call: bounds how long a long read delays the others
QUEUE_DEPTH = 4096  # queued writes (and, apart, reads) before callers wait (backpressure)
READERS = 4
BUSY_TIMEOUT_MS = 10_000
_KEY_CHUNK = 500  # stays under SQLite's bound-parameter limit

SCHEMA = """
CREATE TABLE runs (
    run_id TEXT PRIMARY KEY NOT NULL,
    main_run_id TEXT REFERENCES runs(run_id),
    capabilities TEXT NOT NULL,
    secrets TEXT NOT NULL,
    config TEXT NOT NULL,
    config_version TEXT NOT NULL,
    token_hash BLOB NOT NULL UNIQUE,
    revoked_at INTEGER
);
CREATE INDEX runs_by_main ON runs(main_run_id) WHERE main_run_id IS NOT NULL;
CREATE TABLE sessions (
    run_id TEXT PRIMARY KEY NOT NULL REFERENCES runs(run_id),
    session_id TEXT NOT NULL,
    state TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    attempt_id TEXT,
    runtime_instance_id TEXT,
    capabilities TEXT NOT NULL,
    lease_expires_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE kv (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (run_id, key)
) WITHOUT ROWID;
-- outputs and inputs carry no foreign key: appends require a session (which references the run)
-- and posts check the run, so a per-row key check would only slow the hottest inserts.
CREATE TABLE outputs (
    run_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    event_id TEXT NOT NULL,
    type TEXT NOT NULL,
    data TEXT NOT NULL,
    timestamp INTEGER NOT NULL,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;
CREATE TABLE inputs (
    run_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    event_id TEXT NOT NULL,
    type TEXT NOT NULL,
    data TEXT NOT NULL,
    timestamp INTEGER NOT NULL,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;
CREATE INDEX inputs_by_event ON inputs(run_id, event_id);
CREATE TABLE input_acks (
    run_id TEXT PRIMARY KEY NOT NULL REFERENCES runs(run_id),
    acked_seq INTEGER NOT NULL
) WITHOUT ROWID;
"""

# From each older schema version to the next, in the writer's first transaction.
MIGRATIONS: dict[int, str] = {
    # 1 -> 2: inputs are found by event id, so a retried post queues nothing twice.
    1: "CREATE INDEX inputs_by_event ON inputs(run_id, event_id)",
}

# --- SQL ------------------------------------------------------------------------------------------

SQL_RUN_EXISTS = "SELECT 1 FROM runs WHERE run_id = ?"
SQL_MAIN_RUN_OK = (
    "SELECT 1 FROM runs WHERE run_id = ? AND main_run_id IS NULL AND revoked_at IS NULL"
)
SQL_LIVE_RUN = "SELECT 1 FROM runs WHERE run_id = ? AND revoked_at IS NULL"
SQL_INSERT_RUN = (
    "INSERT INTO runs (run_id, main_run_id, capabilities, secrets, config, config_version,"
    " token_hash) VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_RUN_COLUMNS = "run_id, main_run_id, capabilities, secrets, config, config_version"
SQL_GET_RUN = f"SELECT {_RUN_COLUMNS} FROM runs WHERE run_id = ? AND revoked_at IS NULL"
SQL_LIST_RUNS = (
    f"SELECT {_RUN_COLUMNS} FROM runs WHERE revoked_at IS NULL"
    " ORDER BY main_run_id IS NOT NULL, rowid"
)
SQL_RUN_FOR_TOKEN = "SELECT run_id FROM runs WHERE token_hash = ? AND revoked_at IS NULL"
SQL_REVOKE = (
    "UPDATE runs SET revoked_at = ? WHERE (run_id = ? OR main_run_id = ?) AND revoked_at IS NULL"
)
SQL_REPLACE_TOKEN = "UPDATE runs SET token_hash = ? WHERE run_id = ? AND revoked_at IS NULL"
SQL_SUB_RUNS = "SELECT run_id FROM runs WHERE main_run_id = ? AND revoked_at IS NULL ORDER BY rowid"

_SESSION_SELECT = (
    "SELECT s.run_id, s.session_id, s.state, s.epoch, s.attempt_id, s.runtime_instance_id,"
    " s.capabilities, s.lease_expires_at, coalesce(a.acked_seq, -1)"
    " FROM sessions s JOIN runs r ON r.run_id = s.run_id"
    " LEFT JOIN input_acks a ON a.run_id = s.run_id WHERE r.revoked_at IS NULL"
)
SQL_LIST_SESSIONS = _SESSION_SELECT + " ORDER BY s.run_id"
SQL_GET_SESSION = _SESSION_SELECT + " AND s.run_id = ?"
SQL_SESSION_EPOCH = "SELECT epoch FROM sessions WHERE run_id = ?"
# A fenced write's epoch: none once the run is revoked, so a write already on its way when the
# revoke committed (the core decided it before hearing of the revoke) stores nothing.
SQL_WRITER_EPOCH = (
    "SELECT s.epoch FROM sessions s JOIN runs r ON r.run_id = s.run_id"
    " WHERE s.run_id = ? AND r.revoked_at IS NULL"
)
# The WHERE keeps a late save from a superseded session from overwriting a newer epoch.
SQL_UPSERT_SESSION = (
    "INSERT INTO sessions (run_id, session_id, state, epoch, attempt_id, runtime_instance_id,"
    " capabilities, lease_expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (run_id) DO UPDATE SET session_id = excluded.session_id,"
    " state = excluded.state, epoch = excluded.epoch, attempt_id = excluded.attempt_id,"
    " runtime_instance_id = excluded.runtime_instance_id,"
    " capabilities = excluded.capabilities, lease_expires_at = excluded.lease_expires_at"
    " WHERE excluded.epoch >= sessions.epoch"
)

SQL_LAST_OUTPUT = "SELECT seq FROM outputs WHERE run_id = ? ORDER BY seq DESC LIMIT 1"
SQL_OUTPUT_IDS = "SELECT seq, event_id FROM outputs WHERE run_id = ? AND seq BETWEEN ? AND ?"
SQL_INSERT_OUTPUT = (
    "INSERT INTO outputs (run_id, seq, event_id, type, data, timestamp) VALUES (?, ?, ?, ?, ?, ?)"
)
SQL_READ_OUTPUTS = (
    "SELECT event_id, seq, type, data, timestamp FROM outputs"
    " WHERE run_id = ? AND seq > ? ORDER BY seq LIMIT ?"
)
SQL_COUNT_OUTPUTS_RUN = "SELECT count(*) FROM outputs WHERE run_id = ?"
SQL_COUNT_OUTPUTS = "SELECT count(*) FROM outputs"

SQL_UPSERT_KV = (
    "INSERT INTO kv (run_id, key, value) VALUES (?, ?, ?)"
    " ON CONFLICT (run_id, key) DO UPDATE SET value = excluded.value"
)

SQL_LAST_INPUT = "SELECT seq FROM inputs WHERE run_id = ? ORDER BY seq DESC LIMIT 1"
# Named, not left to the planner: without statistics SQLite picks the primary key's run_id prefix
# and scans the run's whole queue for every posted event (measured: minutes for 64 000 inputs).
SQL_INPUT_BY_EVENT = (
    "SELECT seq, type, data FROM inputs INDEXED BY inputs_by_event"
    " WHERE run_id = ? AND event_id = ? LIMIT 1"
)
SQL_INSERT_INPUT = (
    "INSERT INTO inputs (run_id, seq, event_id, type, data, timestamp) VALUES (?, ?, ?, ?, ?, ?)"
)
SQL_READ_INPUTS = (
    "SELECT event_id, seq, type, data, timestamp FROM inputs"
    " WHERE run_id = ? AND seq > ? ORDER BY seq LIMIT ?"
)
SQL_ACKED = "SELECT acked_seq FROM input_acks WHERE run_id = ?"
SQL_ACK = (
    "INSERT INTO input_acks (run_id, acked_seq) VALUES (?, ?)"
    " ON CONFLICT (run_id) DO UPDATE SET acked_seq = max(acked_seq, excluded.acked_seq)"
)
SQL_POSITIONS = (
    "SELECT coalesce((SELECT acked_seq FROM input_acks WHERE run_id = :run), -1),"
    " coalesce((SELECT seq FROM inputs WHERE run_id = :run ORDER BY seq DESC LIMIT 1), -1)"
)

_SYNC_MODES = {"full": "FULL", "normal": "NORMAL"}


# --- encoding -----------------------------------------------------------------------------------


def _dumps(value: Any) -> str:
    """JSON text for a column; a value JSON cannot hold is the caller's error (StoreError)."""
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError as error:
        raise StoreError(f"not JSON-serializable: {type(error).__name__}") from None


def _capabilities(text: str) -> frozenset[Capability]:
    """Decode a capabilities column (a JSON list of their wire values)."""
    return frozenset(Capability(value) for value in orjson.loads(text))


def _grant(row: Any) -> RunGrant:
    """A `runs` row as the grant the core reads."""
    run_id, main_run_id, capabilities, secrets, config, config_version = row
    return RunGrant(
        run_id=run_id,
        capabilities=_capabilities(capabilities),
        secrets=orjson.loads(secrets),
        config=orjson.loads(config),
        config_version=config_version,
        main_run_id=main_run_id,
    )


def _session(row: Any) -> SessionRecord:
    """A `sessions` row (joined with its acked input seq) as the record the core restores."""
    return SessionRecord(
        run_id=row[0],
        session_id=row[1],
        state=SessionState(row[2]),
        epoch=row[3],
        attempt_id=row[4],
        runtime_instance_id=row[5],
        capabilities=_capabilities(row[6]),
        lease_expires_at=Millis(row[7]),
        input_acked_seq=row[8],
    )


def _session_params(record: SessionRecord) -> tuple[Any, ...]:
    """The bound parameters of `SQL_UPSERT_SESSION` for a record."""
    return (
        record.run_id,
        record.session_id,
        record.state.value,
        record.epoch,
        record.attempt_id,
        record.runtime_instance_id,
        _dumps(sorted(c.value for c in record.capabilities)),
        record.lease_expires_at,
    )


# --- operations (each a function of a connection, run in a worker thread) -----------------------


def _scalar(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...], default: Any) -> Any:
    """The first column of the first row, or `default` when there is none."""
    row = conn.execute(sql, params).fetchone()
    return default if row is None else row[0]


def _op_create_run(grant: RunGrant, token_hash: bytes, conn: sqlite3.Connection) -> None:
    """Insert a run after checking its id is free and its main run can parent it."""
    if conn.execute(SQL_RUN_EXISTS, (grant.run_id,)).fetchone() is not None:
        raise RunExists(f"run {grant.run_id!r} already exists")
    main = grant.main_run_id
    if main is not None and conn.execute(SQL_MAIN_RUN_OK, (main,)).fetchone() is None:
        raise UnknownRun(f"main run {grant.main_run_id!r} is unknown, revoked or a sub-run")
    try:
        conn.execute(
            SQL_INSERT_RUN,
            (
                grant.run_id,
                grant.main_run_id,
                _dumps(sorted(c.value for c in grant.capabilities)),
                _dumps(grant.secrets),
                _dumps(grant.config),
                grant.config_version,
                token_hash,
            ),
        )
    except sqlite3.IntegrityError:
        raise StoreError("the token is already in use by another run") from None


def _op_revoke(run_id: str, now: int, conn: sqlite3.Connection) -> bool:
    """Revoke a live run and its sub-runs; False when there was no live run to revoke."""
    if conn.execute(SQL_LIVE_RUN, (run_id,)).fetchone() is None:
        return False
    conn.execute(SQL_REVOKE, (now, run_id, run_id))
    return True


def _op_claim(records: Sequence[SessionRecord], conn: sqlite3.Connection) -> EpochClaimed:
    """Check every claim before writing any, so a refused claim leaves all runs untouched."""
    ok = True
    for record in records:
        if conn.execute(SQL_RUN_EXISTS, (record.run_id,)).fetchone() is None:
            raise UnknownRun(f"run {record.run_id!r} is unknown")
        stored = _scalar(conn, SQL_SESSION_EPOCH, (record.run_id,), None)
        if stored is not None and stored > record.epoch:
            ok = False
    if ok:
        conn.executemany(SQL_UPSERT_SESSION, [_session_params(r) for r in records])
    acked: dict[str, int] = {}
    last: dict[str, int] = {}
    outputs: dict[str, int] = {}
    for record in records:
        row = conn.execute(SQL_POSITIONS, {"run": record.run_id}).fetchone()
        acked[record.run_id], last[record.run_id] = row
        outputs[record.run_id] = _scalar(conn, SQL_LAST_OUTPUT, (record.run_id,), -1)
    return EpochClaimed(ok=ok, input_acked_seq=acked, input_last_seq=last, output_last_seq=outputs)


def _op_save_session(record: SessionRecord, conn: sqlite3.Connection) -> None:
    """Upsert a session row unless a higher epoch is stored (the SQL's WHERE decides)."""
    conn.execute(SQL_UPSERT_SESSION, _session_params(record))


def _fenced(conn: sqlite3.Connection, run_id: str, epoch: int) -> bool:
    """Whether a write at `epoch` is refused: the run's session is at another one, or none."""
    return bool(_scalar(conn, SQL_WRITER_EPOCH, (run_id,), None) != epoch)


def _revoked(conn: sqlite3.Connection, run_id: str) -> bool:
    """Whether a fenced write was refused because its run is revoked (asked only once refused)."""
    return conn.execute(SQL_LIVE_RUN, (run_id,)).fetchone() is None


def _op_append(
    run_id: str, epoch: int, events: Sequence[OutputEvent], conn: sqlite3.Connection
) -> OutputsAppended:
    """Append the new part of a batch, or nothing if it is fenced, leaves a gap or conflicts."""
    last: int = _scalar(conn, SQL_LAST_OUTPUT, (run_id,), -1)
    if _fenced(conn, run_id, epoch):
        outcome = AppendOutcome.REVOKED if _revoked(conn, run_id) else AppendOutcome.FENCED
        return OutputsAppended(outcome, last + 1)
    gap = OutputsAppended(AppendOutcome.SEQ_GAP, last + 1)
    rows: list[tuple[str, int, str, str, str, int]] = []
    republished: dict[int, str] = {}
    previous = -1
    for event in events:
        if event.seq <= previous:  # also refuses negative seqs
            return gap
        previous = event.seq
        if event.seq <= last:
            republished[event.seq] = event.event_id
            continue  # stored already: a re-publish, skipped so it stays exactly-once
        if event.seq != last + 1 + len(rows):
            return gap
        rows.append(
            (run_id, event.seq, event.event_id, event.type, _dumps(event.data), event.timestamp)
        )
    if republished and _conflicting(conn, run_id, republished):
        # Another event under a stored seq is not a re-publish: acknowledging it would lose it.
        return OutputsAppended(AppendOutcome.SEQ_CONFLICT, last + 1)
    if rows:
        conn.executemany(SQL_INSERT_OUTPUT, rows)
    return OutputsAppended(AppendOutcome.STORED, last + 1 + len(rows))


def _conflicting(conn: sqlite3.Connection, run_id: str, republished: dict[int, str]) -> bool:
    """Whether any re-published seq is stored under a different eventId."""
    stored = conn.execute(SQL_OUTPUT_IDS, (run_id, min(republished), max(republished)))
    return any(republished.get(seq, event_id) != event_id for seq, event_id in stored)


def _op_kv_set(run_id: str, epoch: int, kv: Mapping[str, str], conn: sqlite3.Connection) -> Written:
    """Upsert the keys unless the writer's epoch is stale."""
    if _fenced(conn, run_id, epoch):
        return Written(fenced=True, revoked=_revoked(conn, run_id))
    conn.executemany(SQL_UPSERT_KV, [(run_id, key, value) for key, value in kv.items()])
    return Written(fenced=False)


def _op_post_inputs(run_id: str, events: Sequence[NewInput], conn: sqlite3.Connection) -> list[int]:
    """Queue inputs for a live run, numbering them after the run's last seq.

    An event whose id the run has queued already (the platform retrying a post whose answer it
    lost) keeps its seq and is not queued again; the same id with another type or data is an
    `InputConflict`, and then nothing of the post is queued.
    """
    if conn.execute(SQL_LIVE_RUN, (run_id,)).fetchone() is None:
        raise UnknownRun(f"run {run_id!r} is unknown or revoked")
    following: int = _scalar(conn, SQL_LAST_INPUT, (run_id,), -1) + 1
    seqs, rows = [], []
    for index, event in enumerate(events):
        stored = conn.execute(SQL_INPUT_BY_EVENT, (run_id, event.event_id)).fetchone()
        if stored is not None:
            seq, kind, data = stored
            if kind != event.type or not _same_json(orjson.loads(data), event.data):
                raise InputConflict(index)
            seqs.append(int(seq))
            continue
        seqs.append(following)
        rows.append((run_id, following, event.event_id, event.type, _dumps(event.data),
                     event.timestamp))
        following += 1
    conn.executemany(SQL_INSERT_INPUT, rows)
    return seqs


def _same_json(stored: Any, posted: Any) -> bool:
    """Equal as JSON: key order aside, but `true` is not `1` and `1.0` is not `1` (as in Python)."""
    return orjson.dumps(stored, option=orjson.OPT_SORT_KEYS) == orjson.dumps(
        posted, option=orjson.OPT_SORT_KEYS
    )


def _op_ack(run_id: str, epoch: int, seq: int, conn: sqlite3.Connection) -> Written:
    """Raise the run's acked input seq (never lower it) unless the writer's epoch is stale."""
    if _fenced(conn, run_id, epoch):
        return Written(fenced=True, revoked=_revoked(conn, run_id))
    conn.execute(SQL_ACK, (run_id, seq))
    return Written(fenced=False)


def _read_events(
    conn: sqlite3.Connection, sql: str, run_id: str, after_seq: int, limit: int
) -> list[tuple[str, int, str, Any, Millis]]:
    """Decoded event rows, in the field order of OutputEvent and InputEvent."""
    rows = conn.execute(sql, (run_id, after_seq, max(limit, 0))).fetchall()
    return [(e, s, t, orjson.loads(d), Millis(ts)) for e, s, t, d, ts in rows]


def _kv_get(run_id: str, keys: Sequence[str], conn: sqlite3.Connection) -> dict[str, str]:
    """Read keys in chunks that stay under SQLite's parameter limit."""
    wanted = list(dict.fromkeys(keys))
    found: dict[str, str] = {}
    for start in range(0, len(wanted), _KEY_CHUNK):
        chunk = wanted[start : start + _KEY_CHUNK]
        marks = ",".join("?" * len(chunk))
        sql = f"SELECT key, value FROM kv WHERE run_id = ? AND key IN ({marks})"
        found.update(conn.execute(sql, (run_id, *chunk)).fetchall())
    return found


# --- the group-committing writer ---------------------------------------------------------------


class _Request:
    """One queued write: the op, then (once its group committed) its answer or its error."""

    __slots__ = ("answered", "done", "error", "op", "result")

    def __init__(self, op: Op) -> None:
        self.op = op
        self.answered = False
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = trio.Event()


def _as_store_error(error: BaseException) -> BaseException:
    """What a caller sees: SQLite's errors become StoreError; contract errors pass as they are."""
    if isinstance(error, sqlite3.Error):
        failure = StoreError(f"sqlite: {type(error).__name__}: {error}")
        failure.__cause__ = error
        return failure
    return error


def _run_group(conn: sqlite3.Connection, group: Sequence[_Request]) -> None:
    """Run a group of writes in one transaction; answers are given only once COMMIT returned."""
    outcomes: list[tuple[Any, BaseException | None]] = []
    try:
        conn.execute("BEGIN IMMEDIATE")
        for request in group:
            conn.execute("SAVEPOINT op")
            try:
                outcomes.append((request.op(conn), None))
            # Any failure (even a bug) undoes this op alone and goes to its caller...
            except Exception as error:
                if not conn.in_transaction:
                    # ... unless SQLite rolled the whole transaction back itself, as it does on
                    # SQLITE_FULL and I/O errors: then no write of the group happened.
                    failure = StoreError(f"transaction rolled back: {_as_store_error(error)}")
                    outcomes = [(None, failure)] * len(group)
                    break
                conn.execute("ROLLBACK TO op")
                outcomes.append((None, _as_store_error(error)))
            conn.execute("RELEASE op")
        else:  # every op ran inside the transaction (after a `break` there is none to commit)
            conn.execute("COMMIT")
    except sqlite3.Error as error:
        if conn.in_transaction:
            # The connection may be out of its transaction or broken; the failure is reported below.
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        failure = StoreError(f"commit failed: {type(error).__name__}: {error}")
        outcomes = [(None, failure)] * len(group)
    for request, (result, err) in zip(group, outcomes, strict=True):
        request.result, request.error, request.answered = result, err, True


def _run_reads(conn: sqlite3.Connection, group: Sequence[_Request]) -> None:
    """Run reads one after another, each answering (or failing) its own caller."""
    for request in group:
        try:
            request.result = request.op(conn)
        # Any failure (even a bug) goes to the read's caller, not to the reads behind it.
        except Exception as error:
            request.error = _as_store_error(error)
        request.answered = True


def _connect(path: str, synchronous: str, *, readonly: bool) -> sqlite3.Connection:
    """Open a connection in autocommit mode (transactions are explicit) with our pragmas."""
    conn = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, cached_statements=64
    )
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute(f"PRAGMA synchronous = {_SYNC_MODES[synchronous]}")
    if readonly:
        conn.execute("PRAGMA query_only = ON")
    return conn


def _open_writer(path: str, synchronous: str) -> sqlite3.Connection:
    """Open the writer connection, switching to WAL and creating or checking the schema."""
    conn = _connect(path, synchronous, readonly=False)
    try:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(f"could not switch {path!r} to WAL (journal mode {mode})")
        conn.execute("BEGIN IMMEDIATE")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        elif version in MIGRATIONS:
            for step in range(version, SCHEMA_VERSION):
                conn.execute(MIGRATIONS[step])
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        elif version != SCHEMA_VERSION:
            raise StoreError(f"database schema version {version} is not {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.close()
        raise
    return conn


class SQLiteStore:
    """The `Store` on one SQLite file; build it with `open_sqlite_store`, which runs its writer."""

    def __init__(self, writer: sqlite3.Connection, readers: Sequence[sqlite3.Connection]) -> None:
        self._writer = writer
        self._readers = list(readers)
        self._requests, self._queue = trio.open_memory_channel[_Request](QUEUE_DEPTH)
        self._reads, self._read_queue = trio.open_memory_channel[_Request](QUEUE_DEPTH)
        self._writer_done = trio.Event()
        self._readers_running = len(self._readers)
        self._readers_done = trio.Event()
        self._closed = False

    # --- plumbing -------------------------------------------------------------------------------

    async def run_writer(self) -> None:
        """Commit queued writes in groups until the store closes; then fail whatever is left."""
        try:
            commit = partial(_run_group, self._writer)
            await _serve_in_groups(self._queue, MAX_GROUP, commit, "write")
        finally:
            # Answer what is still queued before closing: closing drops buffered requests.
            _fail_queued(self._queue, "the store closed before this write ran")
            self._queue.close()
            self._writer_done.set()

    async def run_reader(self, conn: sqlite3.Connection) -> None:
        """Answer queued reads on `conn`, all that are waiting in one worker call, until closed."""
        try:
            await _serve_in_groups(self._read_queue, READ_GROUP, partial(_run_reads, conn), "read")
        finally:
            self._readers_running -= 1
            if self._readers_running == 0:
                _fail_queued(self._read_queue, "the store closed before this read ran")
                self._read_queue.close()
                self._readers_done.set()

    async def _write(self, op: Op) -> Any:
        """Queue a write and wait until its group committed; its answer or error is ours."""
        return await _submit(self._requests, op)

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Queue a read and wait for a reader connection to run it; its answer or error is ours."""
        return cast(T, await _submit(self._reads, fn))

    async def aclose(self) -> None:
        """Let queued writes commit, stop the writer, and close every connection."""
        if self._closed:
            await self._writer_done.wait()
            return
        self._closed = True
        await self._requests.aclose()
        await self._reads.aclose()  # reads already queued are still answered
        await self._writer_done.wait()
        with trio.CancelScope(shield=True):
            await self._readers_done.wait()  # no read holds a connection any more
            await trio.to_thread.run_sync(_close_all, [self._writer, *self._readers])

    # --- runs -----------------------------------------------------------------------------------

    async def create_run(self, grant: RunGrant, token_hash: bytes) -> None:
        """See `Store.create_run`."""
        await self._write(partial(_op_create_run, grant, token_hash))

    async def get_run(self, run_id: str) -> RunGrant | None:
        """See `Store.get_run`."""

        def read(conn: sqlite3.Connection) -> RunGrant | None:
            row = conn.execute(SQL_GET_RUN, (run_id,)).fetchone()
            return None if row is None else _grant(row)

        return await self._read(read)

    async def run_for_token(self, token_hash: bytes) -> str | None:
        """See `Store.run_for_token`."""
        found = await self._read(
            partial(_scalar, sql=SQL_RUN_FOR_TOKEN, params=(token_hash,), default=None)
        )
        return cast("str | None", found)

    async def revoke_run(self, run_id: str) -> bool:
        """See `Store.revoke_run`."""
        return cast(bool, await self._write(partial(_op_revoke, run_id, int(time.time() * 1000))))

    async def replace_token(self, run_id: str, token_hash: bytes) -> bool:
        """See `Store.replace_token`."""

        def replace(conn: sqlite3.Connection) -> bool:
            return conn.execute(SQL_REPLACE_TOKEN, (token_hash, run_id)).rowcount == 1

        return cast(bool, await self._write(replace))

    async def list_runs(self) -> list[RunGrant]:
        """See `Store.list_runs`."""
        return await self._read(
            lambda conn: [_grant(row) for row in conn.execute(SQL_LIST_RUNS).fetchall()]
        )

    async def sub_runs(self, main_run_id: str) -> list[str]:
        """See `Store.sub_runs`."""
        return await self._read(
            lambda conn: [r[0] for r in conn.execute(SQL_SUB_RUNS, (main_run_id,)).fetchall()]
        )

    # --- sessions -------------------------------------------------------------------------------

    async def list_sessions(self) -> list[SessionRecord]:
        """See `Store.list_sessions`."""
        return await self._read(
            lambda conn: [_session(row) for row in conn.execute(SQL_LIST_SESSIONS).fetchall()]
        )

    async def get_session(self, run_id: str) -> SessionRecord | None:
        """See `Store.get_session`."""

        def read(conn: sqlite3.Connection) -> SessionRecord | None:
            row = conn.execute(SQL_GET_SESSION, (run_id,)).fetchone()
            return None if row is None else _session(row)

        return await self._read(read)

    async def claim_epoch(self, records: Sequence[SessionRecord]) -> EpochClaimed:
        """See `Store.claim_epoch`."""
        return cast(EpochClaimed, await self._write(partial(_op_claim, tuple(records))))

    async def save_session(self, record: SessionRecord) -> None:
        """See `Store.save_session`."""
        await self._write(partial(_op_save_session, record))

    # --- outputs --------------------------------------------------------------------------------

    async def append_outputs(
        self, run_id: str, epoch: int, events: Sequence[OutputEvent]
    ) -> OutputsAppended:
        """See `Store.append_outputs`."""
        return cast(
            OutputsAppended, await self._write(partial(_op_append, run_id, epoch, tuple(events)))
        )

    async def read_outputs(self, run_id: str, after_seq: int, limit: int) -> list[OutputEvent]:
        """See `Store.read_outputs`."""

        def read(conn: sqlite3.Connection) -> list[OutputEvent]:
            rows = _read_events(conn, SQL_READ_OUTPUTS, run_id, after_seq, limit)
            return [OutputEvent(*row) for row in rows]

        return await self._read(read)

    async def last_output_seq(self, run_id: str) -> int:
        """See `Store.last_output_seq`."""
        return cast(
            int,
            await self._read(partial(_scalar, sql=SQL_LAST_OUTPUT, params=(run_id,), default=-1)),
        )

    async def count_outputs(self, run_id: str | None = None) -> int:
        """See `Store.count_outputs`."""
        if run_id is None:
            op = partial(_scalar, sql=SQL_COUNT_OUTPUTS, params=(), default=0)
        else:
            op = partial(_scalar, sql=SQL_COUNT_OUTPUTS_RUN, params=(run_id,), default=0)
        return cast(int, await self._read(op))

    # --- kv -------------------------------------------------------------------------------------

    async def kv_get(self, run_id: str, keys: Sequence[str]) -> dict[str, str]:
        """See `Store.kv_get`."""
        return await self._read(partial(_kv_get, run_id, tuple(keys)))

    async def kv_set(self, run_id: str, epoch: int, kv: Mapping[str, str]) -> Written:
        """See `Store.kv_set`."""
        return cast(Written, await self._write(partial(_op_kv_set, run_id, epoch, dict(kv))))

    # --- inputs ---------------------------------------------------------------------------------

    async def post_inputs(self, run_id: str, events: Sequence[NewInput]) -> list[int]:
        """See `Store.post_inputs`."""
        return cast("list[int]", await self._write(partial(_op_post_inputs, run_id, tuple(events))))

    async def read_inputs(self, run_id: str, after_seq: int, limit: int) -> tuple[InputEvent, ...]:
        """See `Store.read_inputs`."""

        def read(conn: sqlite3.Connection) -> tuple[InputEvent, ...]:
            rows = _read_events(conn, SQL_READ_INPUTS, run_id, after_seq, limit)
            return tuple(InputEvent(*row) for row in rows)

        return await self._read(read)

    async def ack_inputs(self, run_id: str, epoch: int, seq: int) -> Written:
        """See `Store.ack_inputs`."""
        return cast(Written, await self._write(partial(_op_ack, run_id, epoch, seq)))

    async def input_positions(self, run_id: str) -> tuple[int, int]:
        """See `Store.input_positions`."""

        def read(conn: sqlite3.Connection) -> tuple[int, int]:
            acked, last = conn.execute(SQL_POSITIONS, {"run": run_id}).fetchone()
            return int(acked), int(last)

        return await self._read(read)


async def _serve_in_groups(
    queue: trio.MemoryReceiveChannel[_Request],
    limit: int,
    run: Callable[[Sequence[_Request]], None],
    what: str,
) -> None:
    """Run what is queued, up to `limit` requests per worker-thread call, waking each caller.

    Returns once the queue is closed and empty.
    """
    while True:
        try:
            group = [await queue.receive()]
        except (trio.EndOfChannel, trio.ClosedResourceError):
            return
        while len(group) < limit:
            try:
                group.append(queue.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
        try:
            await trio.to_thread.run_sync(run, group)
        finally:
            for request in group:
                if not request.answered:  # the worker call never ran
                    request.error = StoreError(f"the store stopped before this {what}")
                request.done.set()


async def _submit(requests: trio.MemorySendChannel[_Request], op: Op) -> Any:
    """Queue `op` for its worker task and wait for the answer; its error, if any, is raised."""
    request = _Request(op)
    try:
        await requests.send(request)
    except (trio.ClosedResourceError, trio.BrokenResourceError):
        raise StoreError("the store is closed") from None
    await request.done.wait()
    if request.error is not None:
        raise request.error
    return request.result


def _fail_queued(queue: trio.MemoryReceiveChannel[_Request], why: str) -> None:
    """Answer every still-queued request with StoreError, so no caller waits forever."""
    while True:
        try:
            request = queue.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            return
        request.error = StoreError(why)
        request.done.set()


def _close_all(conns: Sequence[sqlite3.Connection]) -> None:
    """Close connections (the last one out checkpoints the WAL into the main file)."""
    for conn in conns:
        conn.close()


@asynccontextmanager
async def open_sqlite_store(
    path: str | os.PathLike[str], *, synchronous: str = "full", readers: int = READERS
) -> AsyncIterator[SQLiteStore]:
    """Open (creating if needed) the store at `path`; its writer task lives only inside the block.

    `synchronous` is "full" (every commit is fsynced: survives power loss) or "normal" (survives a
    process crash; a power loss may lose the last commits).
    """
    if synchronous not in _SYNC_MODES:
        raise ValueError(f"synchronous must be one of {sorted(_SYNC_MODES)}, not {synchronous!r}")
    where = os.fspath(path)
    writer = await trio.to_thread.run_sync(_open_writer, where, synchronous)
    conns: list[sqlite3.Connection] = []
    try:
        for _ in range(max(1, readers)):
            conns.append(
                await trio.to_thread.run_sync(partial(_connect, where, synchronous, readonly=True))
            )
    except BaseException:
        _close_all([writer, *conns])
        raise
    store = SQLiteStore(writer, conns)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.run_writer)
        for conn in conns:
            nursery.start_soon(store.run_reader, conn)
        try:
            yield store
        finally:
            with trio.CancelScope(shield=True):
                await store.aclose()
