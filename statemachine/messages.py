"""The protocol's payloads as frozen attrs classes: what the codec produces and the core consumes.

Field names are the seed schema's, in snake_case; the codec's one converter maps them to camelCase.
Timestamps are integer milliseconds since the Unix epoch (`Millis`); the codec renders them as
RFC 3339 UTC strings on the wire, so the core never formats or parses time.
"""

from __future__ import annotations

import enum
import hashlib
from typing import Any, Final, NewType

from attrs import frozen

Millis = NewType("Millis", int)
"""Milliseconds since the Unix epoch, UTC. On the wire: an RFC 3339 `...Z` timestamp."""


class Name(enum.Enum):
    """An enum whose members hash by identity.

    Members are singletons that compare by identity, so identity can hash them too. Enum's own
    __hash__ is Python code, run by every dict and table lookup on a frame's hot path.
    """

    __hash__ = object.__hash__


class Capability(Name):
    """What a runtime may ask to do (the seed's RuntimeCapability)."""

    SECRETS_READ = "secrets.read"
    KV_READ = "kv.read"
    KV_WRITE = "kv.write"
    CHECKPOINT_SAVE = "checkpoint.save"
    CHECKPOINT_LOAD = "checkpoint.load"
    SUBTASKS_RUN = "subtasks.run"
    STREAM_RESUME = "stream.resume"


class Channel(Name):
    """Every channel of the AsyncAPI document, seed and extension (`x-agent-gateway`) alike."""

    ATTACH = "runtime.session.attach.command"
    ATTACH_REPLY = "runtime.session.attach.reply"
    HEARTBEAT = "runtime.session.heartbeat.command"
    HEARTBEAT_REPLY = "runtime.session.heartbeat.reply"
    RECOVER = "runtime.session.recover.command"
    RECOVER_REPLY = "runtime.session.recover.reply"
    SECRETS_GET = "runtime.session.secrets.get.command"
    SECRETS_GET_REPLY = "runtime.session.secrets.get.reply"
    CONFIG_GET = "runtime.session.config.get.command"
    CONFIG_GET_REPLY = "runtime.session.config.get.reply"
    KV_GET = "runtime.session.kv.get.command"
    KV_GET_REPLY = "runtime.session.kv.get.reply"
    KV_SET = "runtime.session.kv.set.command"
    KV_SET_REPLY = "runtime.session.kv.set.reply"
    OUTPUT = "runtime.task.output.event"
    OUTPUT_REPLY = "runtime.task.output.reply"
    INPUT = "service.task.input.event"
    # Extensions (x-agent-gateway): input acknowledgement and the error frame.
    INPUT_ACK = "runtime.task.input.ack.command"
    INPUT_ACK_REPLY = "runtime.task.input.ack.reply"
    ERROR = "runtime.session.error"


class ErrorCode(Name):
    """Codes of the `runtime.session.error` frame; spec/v1/errors.md says when each is sent."""

    INVALID_FRAME = "invalid_frame"
    UNKNOWN_CHANNEL = "unknown_channel"
    NOT_ATTACHED = "not_attached"
    SESSION_MISMATCH = "session_mismatch"
    CAPABILITY_DENIED = "capability_denied"
    LEASE_EXPIRED = "lease_expired"
    STALE_EPOCH = "stale_epoch"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    RATE_LIMITED = "rate_limited"
    INTERNAL = "internal"
    # Extensions (x-agent-gateway).
    FORBIDDEN_RUN = "forbidden_run"
    UNSUPPORTED_VERSION = "unsupported_version"
    SEQ_GAP = "seq_gap"
    SEQ_CONFLICT = "seq_conflict"


# Whether a runtime may send the same request again (after backing off, or after re-attaching).
RETRYABLE: dict[ErrorCode, bool] = {
    ErrorCode.INVALID_FRAME: False,
    ErrorCode.UNKNOWN_CHANNEL: False,
    ErrorCode.NOT_ATTACHED: True,
    ErrorCode.SESSION_MISMATCH: False,
    ErrorCode.CAPABILITY_DENIED: False,
    ErrorCode.LEASE_EXPIRED: True,
    ErrorCode.STALE_EPOCH: False,
    ErrorCode.PAYLOAD_TOO_LARGE: False,
    ErrorCode.RATE_LIMITED: True,
    ErrorCode.INTERNAL: True,
    ErrorCode.FORBIDDEN_RUN: False,
    ErrorCode.UNSUPPORTED_VERSION: False,
    ErrorCode.SEQ_GAP: False,
    ErrorCode.SEQ_CONFLICT: False,
}


class CloseCode(enum.IntEnum):
    """WebSocket close codes the gateway uses (documented in spec/v1/errors.md)."""

    NORMAL = 1000
    MESSAGE_TOO_BIG = 1009  # a frame over the transport's hard limit
    INTERNAL_ERROR = 1011  # the gateway failed; reconnect
    SERVICE_RESTART = 1012  # the gateway is draining; reconnect (with reconnect: true)
    SUPERSEDED = 4001  # a connection with a higher connectionEpoch took the session
    REVOKED = 4002  # the platform deleted the run or revoked its token
    SLOW_CONSUMER = 4003  # the outbound queue filled: the runtime is not reading


# --- runtime -> gateway: commands --------------------------------------------------------------


@frozen
class RuntimeAttachRequest:
    """Attach (or, with reconnect, re-attach) a runtime to its run."""

    run_id: str
    runtime_instance_id: str
    protocol_version: str
    attempt_id: str | None = None
    reconnect: bool = False
    connection_epoch: int | None = None
    capabilities: tuple[Capability, ...] = ()
    # Extension: ask for the reply's extension fields (a runtime built on the seed alone would
    # refuse them: the seed's reply allows no other properties).
    reply_extensions: bool = False


@frozen
class HeartbeatCommand:
    """Renew the session's lease."""

    session_id: str
    run_id: str
    runtime_instance_id: str | None = None
    metadata: dict[str, Any] | None = None


@frozen
class RecoverConnectionsCommand:
    """Re-bind a main run's session and its sub-runs' sessions to a new connection."""

    session_id: str
    main_run_id: str
    sub_run_ids: tuple[str, ...] = ()
    connection_epoch: int | None = None


@frozen
class GetSecretsCommand:
    """Read the run's secrets: the named ones, or all granted when `names` is absent."""

    session_id: str
    run_id: str
    names: tuple[str, ...] | None = None


@frozen
class GetConfigCommand:
    """Read the run's configuration."""

    session_id: str
    run_id: str


@frozen
class GetKVCommand:
    """Read keys from the run's KV namespace."""

    session_id: str
    run_id: str
    keys: tuple[str, ...]


@frozen
class SetKVCommand:
    """Write keys to the run's KV namespace (durably, before the reply)."""

    session_id: str
    run_id: str
    kv: dict[str, str]


@frozen
class OutputEvent:
    """One event a runtime publishes; `seq` orders and de-duplicates it within its run."""

    event_id: str
    seq: int
    type: str
    data: dict[str, Any]
    timestamp: Millis


@frozen
class PublishOutputEventsRequest:
    """A batch of output events, stored durably and in `seq` order before the reply."""

    session_id: str
    run_id: str
    events: tuple[OutputEvent, ...]


@frozen
class AckInputCommand:
    """Extension: acknowledge every input event of the run with `seq` up to and including `seq`."""

    session_id: str
    run_id: str
    seq: int


Command = (
    RuntimeAttachRequest
    | HeartbeatCommand
    | RecoverConnectionsCommand
    | GetSecretsCommand
    | GetConfigCommand
    | GetKVCommand
    | SetKVCommand
    | PublishOutputEventsRequest
    | AckInputCommand
)

# --- gateway -> runtime -------------------------------------------------------------------------


@frozen
class RuntimeAttachResponse:
    """The session granted: its id, how often to heartbeat, and when the lease ends."""

    session_id: str
    run_id: str
    heartbeat_interval_ms: int
    lease_expires_at: Millis
    config_version: str | None = None
    next_output_seq: int | None = None  # extension: where a (restarted) runtime's outputs go on
    max_frame_bytes: int | None = None  # extension: the largest frame the gateway accepts


@frozen
class HeartbeatResponse:
    """The lease was renewed; heartbeat again by `next_heartbeat_due_at`."""

    accepted: bool
    next_heartbeat_due_at: Millis


@frozen
class RecoverConnectionsResponse:
    """Whether every named session was recovered onto this connection."""

    accepted: bool


@frozen
class GetSecretsResponse:
    """The secrets asked for (unknown names are left out)."""

    secrets: dict[str, str]


@frozen
class GetConfigResponse:
    """The run's configuration."""

    config: dict[str, Any]


@frozen
class GetKVResponse:
    """The keys found (missing keys are left out)."""

    kv: dict[str, str]


@frozen
class SetKVResponse:
    """The write is durable."""

    accepted: bool


@frozen
class PublishOutputEventsResponse:
    """The batch is durable (duplicates by `seq` were stored once)."""

    accepted: bool


@frozen
class AckInputResponse:
    """Extension: the acknowledgement is durable."""

    accepted: bool


@frozen
class InputEvent:
    """One event the platform sends a run; `seq` orders it and lets the runtime de-duplicate."""

    event_id: str
    seq: int
    type: str
    data: dict[str, Any]
    timestamp: Millis


@frozen
class TaskInputDelivery:
    """A batch of input events, in `seq` order, for one run's session."""

    session_id: str
    run_id: str
    events: tuple[InputEvent, ...]


MAX_FRAME_ID: Final = 64
"""The envelope's RequestId bound (`^[!-~]{1,64}$`), which ids the gateway picks must keep too."""


def delivery_id(run_id: str, first_seq: int) -> str:
    """The envelope id of an input delivery: `in-<runId>-<first seq>`, readable where it fits.

    A runId may be 68 characters, more than an id holds; such a run is named by a digest of its
    id instead, which still tells apart the runs (a main run and its sub-runs) on one connection.
    """
    readable = f"in-{run_id}-{first_seq}"
    if len(readable) <= MAX_FRAME_ID:
        return readable
    digest = hashlib.blake2b(run_id.encode("ascii"), digest_size=8).hexdigest()
    return f"in-{digest}-{first_seq}"


@frozen
class ErrorPayload:
    """Extension: the payload of `runtime.session.error`, the one answer to a refused command."""

    code: ErrorCode
    message: str
    retryable: bool
    path: str | None = None

    @classmethod
    def of(cls, code: ErrorCode, message: str, path: str | None = None) -> ErrorPayload:
        """Build an error whose `retryable` flag is the documented one for its code."""
        return cls(code, message, RETRYABLE[code], path)


Reply = (
    RuntimeAttachResponse
    | HeartbeatResponse
    | RecoverConnectionsResponse
    | GetSecretsResponse
    | GetConfigResponse
    | GetKVResponse
    | SetKVResponse
    | PublishOutputEventsResponse
    | AckInputResponse
)

# The request/reply pairs of the protocol: which payload class travels on which channel.
COMMAND_CHANNELS: dict[Channel, type[Any]] = {
    Channel.ATTACH: RuntimeAttachRequest,
    Channel.HEARTBEAT: HeartbeatCommand,
    Channel.RECOVER: RecoverConnectionsCommand,
    Channel.SECRETS_GET: GetSecretsCommand,
    Channel.CONFIG_GET: GetConfigCommand,
    Channel.KV_GET: GetKVCommand,
    Channel.KV_SET: SetKVCommand,
    Channel.OUTPUT: PublishOutputEventsRequest,
    Channel.INPUT_ACK: AckInputCommand,
}
REPLY_CHANNELS: dict[type[Any], Channel] = {
    RuntimeAttachResponse: Channel.ATTACH_REPLY,
    HeartbeatResponse: Channel.HEARTBEAT_REPLY,
    RecoverConnectionsResponse: Channel.RECOVER_REPLY,
    GetSecretsResponse: Channel.SECRETS_GET_REPLY,
    GetConfigResponse: Channel.CONFIG_GET_REPLY,
    GetKVResponse: Channel.KV_GET_REPLY,
    SetKVResponse: Channel.KV_SET_REPLY,
    PublishOutputEventsResponse: Channel.OUTPUT_REPLY,
    AckInputResponse: Channel.INPUT_ACK_REPLY,
    TaskInputDelivery: Channel.INPUT,
    ErrorPayload: Channel.ERROR,
}
# A command's reply channel, for clients matching answers to requests.
REPLY_OF: dict[Channel, Channel] = {
    Channel.ATTACH: Channel.ATTACH_REPLY,
    Channel.HEARTBEAT: Channel.HEARTBEAT_REPLY,
    Channel.RECOVER: Channel.RECOVER_REPLY,
    Channel.SECRETS_GET: Channel.SECRETS_GET_REPLY,
    Channel.CONFIG_GET: Channel.CONFIG_GET_REPLY,
    Channel.KV_GET: Channel.KV_GET_REPLY,
    Channel.KV_SET: Channel.KV_SET_REPLY,
    Channel.OUTPUT: Channel.OUTPUT_REPLY,
    Channel.INPUT_ACK: Channel.INPUT_ACK_REPLY,
}

PROTOCOL_VERSIONS = frozenset({"v1", "1", "1.0"})
"""`protocolVersion` values this gateway speaks; anything else gets `unsupported_version`."""
