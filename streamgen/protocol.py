"""The streaming server's wire protocol, version 1: JSON control messages and binary media messages.

Text messages are JSON objects with a `type`; the client's are validated here (`parse_client_message`), strictly:
unknown fields are errors and values are not coerced (`"steps": "4"` or `true` is refused, not read as a number).
Binary messages go from server to client only: a fixed 24-byte big-endian header, then the payload:

| offset | size | field |
|---|---|---|
| 0 | 1 | protocol version (1) |
| 1 | 1 | payload kind: 1 JPEG frame, 2 MP4 init segment (`ftyp`+`moov`), 3 MP4 media segment (`moof`+`mdat`) |
| 2 | 2 | flags: bit 0 = last message of its chunk |
| 4 | 4 | stream id |
| 8 | 4 | chunk index |
| 12 | 4 | frame index (JPEG: the frame; MP4 segment: its first frame; init segment: 0) |
| 16 | 8 | timestamp: float64 Unix time (server clock, seconds) at which the chunk was ready |

The README's "Serving" section lists the messages; the pydantic models below are their definition.
"""

from __future__ import annotations

import json
import math
import struct
import time
from dataclasses import dataclass
from enum import IntEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, TypeAdapter, ValidationError

PROTOCOL_VERSION = 1
HEADER = struct.Struct("!BBHIIId")
FLAG_LAST_IN_CHUNK = 1


class PayloadKind(IntEnum):
    JPEG = 1
    MP4_INIT = 2
    MP4_SEGMENT = 3


@dataclass(frozen=True)
class FrameHeader:
    version: int
    kind: PayloadKind
    flags: int
    stream: int
    chunk: int
    frame: int
    timestamp: float

    def pack(self) -> bytes:
        return HEADER.pack(self.version, self.kind, self.flags, self.stream, self.chunk, self.frame, self.timestamp)


def pack_media(kind: PayloadKind, stream: int, chunk: int, frame: int, timestamp: float, payload: bytes,
               last: bool = False) -> bytes:
    flags = FLAG_LAST_IN_CHUNK if last else 0
    return FrameHeader(PROTOCOL_VERSION, kind, flags, stream, chunk, frame, timestamp).pack() + payload


def unpack_media(message: bytes) -> tuple[FrameHeader, bytes]:
    if len(message) < HEADER.size:
        raise ValueError(f"a media message has at least {HEADER.size} bytes, got {len(message)}")
    version, kind, flags, stream, chunk, frame, timestamp = HEADER.unpack_from(message)
    return FrameHeader(version, PayloadKind(kind), flags, stream, chunk, frame, timestamp), message[HEADER.size:]


# ---------------------------------------------------------------------------------------------------------------------
# Server limits


class Limits(BaseModel):
    """What one server accepts. A request beyond a limit gets an `error` with code "limit" naming it."""

    model_config = ConfigDict(extra="forbid")

    max_message_bytes: PositiveInt = 16 * 1024  # larger text messages: error "too_large" (connection kept)
    max_prompt_chars: PositiveInt = 2000
    max_width: PositiveInt = 1280
    max_height: PositiveInt = 1280
    max_frames: PositiveInt = 100_000  # finite streams; endless ones are bounded by `allow_endless`
    allow_endless: bool = True
    max_steps: PositiveInt = 16
    max_fps: float = Field(120.0, gt=0)
    max_streams: PositiveInt = 4  # concurrent streams on the server: beyond, error "busy"
    max_batch: PositiveInt = 4  # due streams whose chunks may share the model's forwards (1: one chunk at a time)
    max_streams_per_connection: PositiveInt = 2
    max_connections_per_address: PositiveInt = 8  # open websocket connections from one IP address: beyond, HTTP 429
    max_queued_chunks: PositiveInt = 4  # per stream; a slow client skips ahead (oldest chunks dropped)
    send_timeout_s: float = Field(30.0, gt=0)  # a client that takes no data for this long is disconnected
    send_buffer_bytes: PositiveInt = 64 * 1024  # per connection, socket and websocket buffers: a backlog beyond
    #   waits in the outbox, where a slow client skips ahead, not in buffers where it would only add latency
    rate_per_s: float = Field(20.0, gt=0)  # messages per second per connection, on average (token bucket) ...
    rate_burst: PositiveInt = 40  # ... with bursts up to this many; beyond: error "rate_limited" (connection kept)

    @property
    def transport_max_bytes(self) -> int:
        """Messages above this are refused by the websocket layer itself (close code 1009)."""
        return max(4 * self.max_message_bytes, 1 << 20)


# ---------------------------------------------------------------------------------------------------------------------
# Client -> server


class _ClientMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    v: Literal[1] | None = None  # protocol version the client speaks; optional
    id: str | int | None = Field(None, description="request id, echoed in the answer")


class _StreamMessage(_ClientMessage):
    stream: int | None = Field(None, description="stream id; may be left out when the connection has one stream")


class Start(_ClientMessage):
    type: Literal["start"]
    prompt: str = Field(min_length=1)
    steps: PositiveInt = 4  # with `fps`: the largest budget the deadline controller may pick
    seed: int | None = Field(None, ge=0, lt=2**63)
    width: PositiveInt | None = None  # pixels; default: the model's
    height: PositiveInt | None = None
    frames: PositiveInt | None = None  # video frames (1 + 4k); null: endless
    format: Literal["jpeg", "fmp4"] = "jpeg"  # one binary message per JPEG frame, or per fragmented-MP4 segment
    quality: int = Field(85, ge=1, le=100)  # JPEG quality
    fps: float | None = Field(None, gt=0)  # deadline mode: pick the step budget per chunk to keep up with this
    realtime: bool = True  # pace generation at the video's frame rate (at most about a chunk ahead of playback);
    #                        false: as fast as the model goes (the client's queue still bounds what is kept)


class SetPrompt(_StreamMessage):
    type: Literal["prompt"]
    prompt: str = Field(min_length=1)
    recache: bool = False  # re-encode the cached context under the new prompt


class SetSteps(_StreamMessage):
    type: Literal["steps"]
    steps: PositiveInt


class SetDeadline(_StreamMessage):
    type: Literal["deadline"]
    fps: float | None = Field(gt=0)  # null: back to the fixed budget


class Pause(_StreamMessage):
    type: Literal["pause"]


class Resume(_StreamMessage):
    type: Literal["resume"]


class Stop(_StreamMessage):
    type: Literal["stop"]


class Ping(_ClientMessage):
    type: Literal["ping"]
    t: float | None = None  # echoed in the pong (e.g. the client's clock, for a round-trip time)


ClientMessage = Annotated[
    Start | SetPrompt | SetSteps | SetDeadline | Pause | Resume | Stop | Ping, Field(discriminator="type")
]
_client_adapter: TypeAdapter = TypeAdapter(ClientMessage)
CLIENT_TYPES = ("start", "prompt", "steps", "deadline", "pause", "resume", "stop", "ping")


class ProtocolError(Exception):
    """A message the server refuses: answered with an `error` message; the connection stays open."""

    def __init__(self, code: str, message: str, request_id: str | int | None = None):
        super().__init__(message)
        self.code, self.message, self.request_id = code, message, request_id

    def to_message(self) -> Error:
        return Error(type="error", code=self.code, message=self.message, id=self.request_id)


class TokenBucket:
    """Per-connection message rate: `rate` tokens a second, at most `burst` saved; each message takes one."""

    def __init__(self, rate: float, burst: int, clock=time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens, self.last = float(burst), clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {_short(text, 20)} is out of range")
    return value


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _short(value: object, limit: int = 60) -> str:
    return _clip(repr(value), limit)


def parse_client_message(data: str | bytes, limits: Limits) -> ClientMessage:
    """A validated client message, or ProtocolError with code too_large / binary / bad_json / bad_message /
    unknown_type / unsupported_version / invalid / limit. Never any other exception, whatever `data` holds."""
    if isinstance(data, bytes | bytearray):
        raise ProtocolError("binary", "binary messages are not accepted from clients; send JSON text")
    try:
        size = len(data.encode())
    except UnicodeEncodeError:  # lone surrogates (websockets only hands over valid UTF-8, direct callers may not)
        raise ProtocolError("bad_json", "not valid JSON: the text is not valid Unicode") from None
    if size > limits.max_message_bytes:
        raise ProtocolError("too_large", f"message of {size} bytes exceeds the limit of {limits.max_message_bytes}")
    try:
        raw = json.loads(data, parse_float=_finite, parse_constant=_no_constant)
        json.dumps(raw, ensure_ascii=False).encode()  # escaped lone surrogates ("\\ud800") are not text either
    except RecursionError:
        raise ProtocolError("bad_json", "not valid JSON: nested too deeply") from None
    except UnicodeEncodeError:
        raise ProtocolError("bad_json", "not valid JSON: a string holds a lone surrogate escape (\\ud800-\\udfff), "
                            "which is not text") from None
    except ValueError as e:  # JSONDecodeError, NaN/Infinity, 1e999, an integer of thousands of digits
        reason = "a number has too many digits" if "digits" in str(e) else _clip(str(e), 200)
        raise ProtocolError("bad_json", f"not valid JSON: {reason}") from None
    if not isinstance(raw, dict):
        raise ProtocolError("bad_message", f"a message is a JSON object with a 'type', got {type(raw).__name__}")
    request_id = raw.get("id") if isinstance(raw.get("id"), str | int) and not isinstance(raw.get("id"), bool) else None
    if "type" not in raw:
        raise ProtocolError("bad_message", "the message has no 'type'", request_id)
    if raw["type"] not in CLIENT_TYPES:
        raise ProtocolError("unknown_type", f"unknown message type {_short(raw['type'])}; known: "
                            f"{', '.join(CLIENT_TYPES)}", request_id)
    if "v" in raw and not (type(raw["v"]) is int and raw["v"] == PROTOCOL_VERSION):
        raise ProtocolError("unsupported_version", f"protocol version {_short(raw['v'])} is not supported; this "
                            f"server speaks {PROTOCOL_VERSION}", request_id)
    try:
        message = _client_adapter.validate_python(raw, strict=True)
    except ValidationError as e:
        problems = "; ".join(f"{_clip('.'.join(str(p) for p in err['loc'][1:])) or 'message'}: {err['msg']}"
                             for err in e.errors()[:10])
        raise ProtocolError("invalid", f"bad {raw['type']!r} message: {problems}", request_id) from None
    check_limits(message, limits)
    return message


def check_limits(message: ClientMessage, limits: Limits) -> None:
    def refuse(what: str) -> None:
        raise ProtocolError("limit", what, message.id)

    prompt = getattr(message, "prompt", None)
    if prompt is not None and len(prompt) > limits.max_prompt_chars:
        refuse(f"prompt of {len(prompt)} characters exceeds the limit of {limits.max_prompt_chars}")
    steps = getattr(message, "steps", None)
    if steps is not None and steps > limits.max_steps:
        refuse(f"steps={steps} exceeds the limit of {limits.max_steps}")
    fps = getattr(message, "fps", None)
    if fps is not None and fps > limits.max_fps:
        refuse(f"fps={fps} exceeds the limit of {limits.max_fps}")
    if isinstance(message, Start):
        if message.width is not None and message.width > limits.max_width:
            refuse(f"width={message.width} exceeds the limit of {limits.max_width}")
        if message.height is not None and message.height > limits.max_height:
            refuse(f"height={message.height} exceeds the limit of {limits.max_height}")
        if message.frames is None and not limits.allow_endless:
            refuse("endless streams are not allowed on this server: give 'frames'")
        if message.frames is not None and message.frames > limits.max_frames:
            refuse(f"frames={message.frames} exceeds the limit of {limits.max_frames}")


# ---------------------------------------------------------------------------------------------------------------------
# Server -> client


class _ServerMessage(BaseModel):
    def to_json(self) -> str:
        return self.model_dump_json()


class Hello(_ServerMessage):
    type: Literal["hello"] = "hello"
    protocol: int = PROTOCOL_VERSION
    server: str
    model: dict  # default width, height, frames (null: endless), fps, and a description
    limits: Limits


class Started(_ServerMessage):
    type: Literal["started"] = "started"
    id: str | int | None = None
    stream: int
    width: int
    height: int
    frames: int | None  # null: endless
    fps: float  # the video's frame rate (playback), not the generation speed
    format: Literal["jpeg", "fmp4"]
    steps: int
    deadline_fps: float | None
    realtime: bool


class Media(_ServerMessage):
    """Sent before a stream's MP4 init segment: what `MediaSource.addSourceBuffer` needs."""

    type: Literal["media"] = "media"
    stream: int
    mime: str


class ChunkInfo(_ServerMessage):
    """Sent before a chunk's binary messages."""

    type: Literal["chunk"] = "chunk"
    stream: int
    index: int
    first_frame: int
    frames: int
    steps: int  # the budget used (in deadline mode: the one the controller picked)
    deadline: bool
    prompt_version: int  # 0 for the start prompt; each accepted `prompt` message adds one
    position: int  # rotary position of its first latent frame
    timings_ms: dict[str, float]  # switch, cache, denoise, decode, encode
    batch: int = 1  # chunks of streams denoised in the same forwards as this one (denoise time is theirs together)
    dropped_frames: int  # frames of this stream skipped so far because the client was behind
    timestamp: float  # Unix time at which the chunk was ready


class Ack(_ServerMessage):
    type: Literal["ack"] = "ack"
    id: str | int | None = None
    of: str  # the message type acknowledged
    stream: int
    prompt_version: int | None = None  # for "prompt": the version chunks made under it carry


class Ended(_ServerMessage):
    type: Literal["ended"] = "ended"
    stream: int
    reason: Literal["finished", "stopped", "error"]
    chunks: int
    frames: int
    dropped_frames: int
    message: str | None = None


class Error(_ServerMessage):
    type: Literal["error"] = "error"
    code: str
    message: str
    id: str | int | None = None


class Pong(_ServerMessage):
    type: Literal["pong"] = "pong"
    t: float | None = None
    server_time: float
