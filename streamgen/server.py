"""`streamgen serve`: live videos over websockets, steered by their viewers while they play, all on one model.

One process, one port: a plain GET / answers with the browser page (`static/index.html`), a websocket upgrade speaks
the protocol of `streamgen.protocol`. Each room has one job, and requests flow one way:

- a connection handler (event loop) parses the client's control messages, answers them, and sends media;
- the `Scheduler` (one worker thread, the only one running the model) decides which streams make the next chunks:
  up to `Limits.max_batch` of the streams that are due, in round-robin order, so every client gets its turn however
  many chunks another asks for; their chunks share the model's forwards where they match (same video size, context
  and budget: `Generator.next_chunks`), each stream keeping its own KV cache;
- an `Outbox` per stream sits between the two: at most `Limits.max_queued_chunks` chunks; when a client reads slower
  than its stream is made the oldest chunk is dropped (the client skips ahead), so memory never grows with a slow
  client. A client that takes no data at all for `Limits.send_timeout_s` is disconnected.

Access: the server listens on 127.0.0.1 unless told otherwise, and any other address needs an access token, which
websocket clients give as `?token=` in the URL (checked in constant time before the handshake). Browsers' websocket
connections are checked by their Origin (same host:port as the page by default), and without a token the Host header
must name this machine, so a web page elsewhere can reach the server neither directly nor by DNS rebinding. No client
message names a file: prompts are text, and nothing a client sends becomes a path.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import http
import ipaddress
import logging
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from urllib.parse import parse_qs, urlsplit

import torch
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from streamgen.pipeline import Pipeline
from streamgen.protocol import (
    Ack,
    ChunkInfo,
    ClientMessage,
    Ended,
    Hello,
    Limits,
    Media,
    PayloadKind,
    Ping,
    Pong,
    ProtocolError,
    Start,
    Started,
    Stop,
    TokenBucket,
    pack_media,
    parse_client_message,
)
from streamgen.session import Session, SessionChunk, next_chunks
from streamgen.sinks import FragmentedMp4Sink, ImageEncoder

log = logging.getLogger("streamgen.server")


@dataclass
class ReadyChunk:
    """A chunk made and encoded by the worker, waiting in an outbox."""

    chunk: SessionChunk
    payloads: list[tuple[PayloadKind, int, bytes]]  # kind, first frame, bytes
    encode_s: float
    timestamp: float  # Unix time at which it was ready


class Outbox:
    """What one stream has made and its client has not taken yet; lives on the event loop.

    `header` (the MP4 init segment) is never dropped; chunks are, oldest first, beyond `size`.
    """

    def __init__(self, size: int):
        self.size = size
        self.header: list[str | bytes] = []
        self.chunks: deque[ReadyChunk] = deque()
        self.end: Ended | None = None
        self.dropped_frames = 0
        self.most_queued = 0  # high-water mark, for tests and logs
        self._wake = asyncio.Event()

    def put(self, chunk: ReadyChunk) -> None:
        if len(self.chunks) >= self.size:
            self.dropped_frames += len(self.chunks.popleft().chunk.frames)
        self.chunks.append(chunk)
        self.most_queued = max(self.most_queued, len(self.chunks))
        self._wake.set()

    def put_header(self, messages: list[str | bytes]) -> None:
        self.header += messages
        self._wake.set()

    def finish(self, end: Ended, drop_queued: bool = False) -> None:
        """The stream ended; `drop_queued` (a stop): the client gets no more chunks, just `end`."""
        if drop_queued:
            self.chunks.clear()
        if self.end is None:
            self.end = end
        self._wake.set()

    async def get(self) -> list[str | bytes] | ReadyChunk | Ended:
        while True:
            if self.header:
                header, self.header = self.header, []
                return header
            if self.chunks:
                return self.chunks.popleft()
            if self.end is not None:
                return self.end
            self._wake.clear()
            await self._wake.wait()


class StreamJob:
    """One stream: its session and encoder (used by the worker thread), its outbox and flags (event loop)."""

    def __init__(self, stream_id: int, session: Session, request: Start, limits: Limits,
                 loop: asyncio.AbstractEventLoop):
        self.id, self.session, self.request, self.loop = stream_id, session, request, loop
        self.outbox = Outbox(limits.max_queued_chunks)
        self.paused = False
        self.due = 0.0  # monotonic time from which the next chunk may be made (realtime pacing)
        self.chunks = self.frames = 0  # made so far
        self._lock = threading.Lock()  # the worker's chunk vs. close()
        self._closed = False
        self._pieces: list[bytes] = []
        if request.format == "jpeg":
            self._jpeg: ImageEncoder | None = ImageEncoder("jpeg", request.quality)
            self._mp4: FragmentedMp4Sink | None = None
        else:
            self._jpeg, self._mp4 = None, FragmentedMp4Sink(self._pieces.append, session.fps)

    def hand_over(self, chunk: SessionChunk | None) -> None:
        """Worker thread, holding `_lock`: encode and hand over a chunk the session made."""
        if chunk is None:
            return
        controller = self.session.deadline_controller
        t0 = time.perf_counter()
        header, payloads = self._encode(chunk)
        encode_s = time.perf_counter() - t0
        if controller is not None:
            controller.add_overhead(len(chunk.frames), encode_s)
        self.chunks, self.frames = self.chunks + 1, self.frames + len(chunk.frames)
        if self.request.realtime:  # stay about one chunk ahead of playback, never bank time while behind
            play = len(chunk.frames) / self.session.fps
            self.due = max(self.due, time.monotonic() - play) + play
        self._deliver(header, ReadyChunk(chunk, payloads, encode_s, time.time()))

    def _encode(self, chunk: SessionChunk) -> tuple[list[str | bytes], list[tuple[PayloadKind, int, bytes]]]:
        if self._jpeg is not None:
            return [], [(PayloadKind.JPEG, chunk.first_frame + i, self._jpeg.encode(f))
                        for i, f in enumerate(chunk.frames)]
        self._mp4.write(chunk.frames)
        if self.session.done:
            self._mp4.close()  # flushes what the encoder still holds into the last fragment
        pieces, self._pieces[:] = list(self._pieces), []
        header = []
        if chunk.index == 0:  # the init segment came first, with the first fragment
            init, pieces = pieces[0], pieces[1:]
            header = [Media(stream=self.id, mime=self._mp4.mime_type).to_json(),
                      pack_media(PayloadKind.MP4_INIT, self.id, 0, 0, time.time(), init, last=True)]
        return header, [(PayloadKind.MP4_SEGMENT, chunk.first_frame, piece) for piece in pieces]

    def _deliver(self, header: list[str | bytes], ready: ReadyChunk) -> None:
        def put() -> None:
            if header:
                self.outbox.put_header(header)
            self.outbox.put(ready)

        with contextlib.suppress(RuntimeError):  # the event loop is gone: the server is shutting down
            self.loop.call_soon_threadsafe(put)

    def ended(self, reason: str, message: str | None = None) -> Ended:
        return Ended(stream=self.id, reason=reason, chunks=self.chunks, frames=self.frames,
                     dropped_frames=self.outbox.dropped_frames, message=message)

    def finish(self, reason: str, message: str | None = None) -> None:
        """Worker thread: tell the client the stream ended, after the chunks already queued for it."""
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(lambda: self.outbox.finish(self.ended(reason, message)))

    def close(self) -> None:
        """Free the stream's KV cache and encoder now (any thread; waits for a chunk in progress)."""
        with self._lock:
            self._closed = True
            self.session.close()
            if self._mp4 is not None:
                self._mp4.abort()


def make_chunks(jobs: list[StreamJob], share: float) -> list[Exception | None]:
    """Worker thread: the next chunk of each job, made together (`streamgen.session.next_chunks`), encoded and
    handed over; per job the error that ended its chunk, if any. Closed jobs are skipped."""
    with contextlib.ExitStack() as held:
        for job in sorted(jobs, key=lambda j: j.id):  # one lock order
            held.enter_context(job._lock)
        live = [job for job in jobs if not job._closed]
        for job in live:
            if job.session.deadline_controller is not None:
                job.session.deadline_controller.share = share
        made = dict(zip(map(id, live), next_chunks([job.session for job in live])))
        errors: list[Exception | None] = []
        for job in jobs:
            chunk = made.get(id(job))
            if isinstance(chunk, Exception):
                errors.append(chunk)
                continue
            try:
                job.hand_over(chunk)
                errors.append(None)
            except Exception as e:
                errors.append(e)
        return errors


class Scheduler:
    """The worker thread that owns the model: streams in turn, at most `max_streams`; up to `max_batch` due streams
    make their next chunks together (sharing the model's forwards where their chunks match)."""

    def __init__(self, max_streams: int, max_batch: int = 1):
        self.max_streams, self.max_batch = max_streams, max_batch
        self._jobs: deque[StreamJob] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="streamgen-scheduler", daemon=True)
        self._thread.start()

    @property
    def streams(self) -> int:
        with self._cond:
            return len(self._jobs)

    def add(self, job: StreamJob) -> bool:
        """Schedule `job`; False when the server already runs `max_streams` streams."""
        with self._cond:
            if len(self._jobs) >= self.max_streams:
                return False
            self._jobs.append(job)
            self._cond.notify()
            return True

    def remove(self, job: StreamJob) -> None:
        with self._cond:
            if job in self._jobs:
                self._jobs.remove(job)

    def pause(self, job: StreamJob, paused: bool) -> None:
        with self._cond:
            job.paused = paused
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()

    def _pick(self) -> tuple[list[StreamJob], float | None]:
        """Up to `max_batch` due streams, the first ones in round-robin order (moved to the back), else how long
        until one is due."""
        now, wait, due = time.monotonic(), None, []
        for job in self._jobs:
            if job.paused:
                continue
            if job.due <= now:
                due.append(job)
                if len(due) == self.max_batch:
                    break
            else:
                wait = job.due - now if wait is None else min(wait, job.due - now)
        for job in due:
            self._jobs.remove(job)
            self._jobs.append(job)
        return due, None if due else wait

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._stopping:
                    jobs, wait = self._pick()
                    if jobs:
                        break
                    self._cond.wait(wait)
                if self._stopping:
                    return
                share = len(jobs) / sum(not j.paused for j in self._jobs)
            try:
                errors = make_chunks(jobs, share)
            except Exception as e:  # not one stream's failure: all of this turn's streams end, the server stays up
                errors = [e] * len(jobs)
            for job, error in zip(jobs, errors):
                if error is not None:  # one stream's failure ends that stream, not the server: its cache freed now
                    log.error("stream %d failed", job.id, exc_info=error)
                    self.remove(job)
                    job.close()
                    job.finish("error", failure_message(error, job.chunks))
                elif job.session.done and not job.session.closed:  # complete (a closed one was stopped by its client)
                    self.remove(job)
                    job.finish("finished")


def failure_message(e: Exception, chunk: int) -> str:
    """What a client is told when making chunk `chunk` of its stream failed."""
    if isinstance(e, torch.OutOfMemoryError):
        return (f"out of memory making chunk {chunk}; the stream was ended and its memory freed (try a smaller size "
                "or fewer steps)")
    return f"making chunk {chunk} failed: {type(e).__name__}: {e}"


MIN_TOKEN_CHARS = 16


def client_address(connection: ServerConnection) -> str:
    """The peer's IP address ("" where the transport has none), the key of the per-address connection count."""
    return connection.remote_address[0] if connection.remote_address else ""


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or name) is this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class StreamServer:
    """The server: `async with StreamServer(pipeline, port=0) as server:` serves until the block ends.

    `port=0` takes a free port (see `port`). The pipeline is used by the scheduler's worker thread only.
    `token`: clients must connect with `?token=<token>`; required when `host` is not a loopback address.
    `allowed_origins`: Origins (`https://app.example:443`, or `*`) whose pages may connect; default: a page from
    this server only (Origin host:port == Host). Clients that send no Origin (not browsers) are not checked by it.
    """

    def __init__(self, pipeline: Pipeline, host: str = "127.0.0.1", port: int = 8765, limits: Limits | None = None,
                 description: str = "", token: str | None = None, allowed_origins: Sequence[str] | None = None):
        self.check_access(host, token)
        self.token = token.encode() if token else None
        self.allowed_origins = None if allowed_origins is None else {o.rstrip("/").lower() for o in allowed_origins}
        self.pipeline, self.host, self.requested_port = pipeline, host, port
        self.limits = limits or Limits()
        s = pipeline.settings
        self.hello = Hello(server="streamgen", limits=self.limits, model=dict(
            width=s.width, height=s.height, frames=s.num_frames, fps=s.fps, description=description)).to_json()
        self.page = (resources.files("streamgen") / "static" / "index.html").read_text(encoding="utf-8")
        self.scheduler: Scheduler | None = None
        self.connections: Counter[str] = Counter()  # open websocket connections per client IP address
        self.jobs: dict[int, StreamJob] = {}  # live streams by id, for tests and logs
        self._next_id = 1
        self._server: Server | None = None

    @staticmethod
    def check_access(host: str, token: str | None) -> None:
        """ValueError unless `host` is loopback or a good enough `token` is given."""
        if token is not None and (len(token) < MIN_TOKEN_CHARS or not token.isascii() or not token.isprintable()):
            raise ValueError(f"the access token must be at least {MIN_TOKEN_CHARS} printable ASCII characters, e.g. "
                             "from python -c 'import secrets; print(secrets.token_urlsafe())'")
        if not token and not is_loopback(host):
            raise ValueError(f"serving on {host} makes the server reachable from other machines: give an access "
                             "token (--token or STREAMGEN_TOKEN), or serve on 127.0.0.1")

    @property
    def port(self) -> int:
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> StreamServer:
        self.scheduler = Scheduler(self.limits.max_streams, self.limits.max_batch)
        self._server = await serve(self._handle, self.host, self.requested_port, process_request=self._http,
                                   max_size=self.limits.transport_max_bytes, compression=None,
                                   write_limit=self.limits.send_buffer_bytes // 2)
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self.scheduler is not None:
            await asyncio.to_thread(self.scheduler.stop)
        for job in list(self.jobs.values()):
            await asyncio.to_thread(job.close)

    async def __aenter__(self) -> StreamServer:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def serve_forever(self) -> None:
        async with self:
            await self._server.serve_forever()

    def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        """Plain HTTP on the websocket port: the page at /, 404 elsewhere; upgrades go on to the handshake if the
        access checks pass."""
        if request.headers.get("Upgrade", "").lower() == "websocket":
            refusal = self._refusal(request) or self._crowded(connection)
            if refusal is None:
                return None
            status, reason = refusal
            log.warning("refused a connection: %s", reason)
            return connection.respond(status, reason + "\n")
        if request.path.split("?")[0] not in ("/", "/index.html"):
            return connection.respond(http.HTTPStatus.NOT_FOUND, "not found: the page is at /\n")
        response = connection.respond(http.HTTPStatus.OK, self.page)
        del response.headers["Content-Type"]
        response.headers["Content-Type"] = "text/html; charset=utf-8"
        return response

    def _refusal(self, request: Request) -> tuple[http.HTTPStatus, str] | None:
        """Why a websocket upgrade is refused (status, reason), or None to accept it."""
        host = request.headers.get("Host", "")
        origin = request.headers.get("Origin")
        if origin is not None:
            origin = origin.rstrip("/").lower()
            if self.allowed_origins is None:
                allowed = urlsplit(origin).netloc == host.lower()
            else:
                allowed = "*" in self.allowed_origins or origin in self.allowed_origins
            if not allowed:
                return http.HTTPStatus.FORBIDDEN, f"origin {origin[:100]} is not allowed to connect"
        if self.token is None:
            name = urlsplit("//" + host).hostname or ""
            if not (is_loopback(name) or name == self.host.lower()):
                return http.HTTPStatus.FORBIDDEN, f"host {host[:100]} is not this server's (loopback only)"
            return None
        given = parse_qs(urlsplit(request.path).query).get("token", [""])[-1]
        if not hmac.compare_digest(given.encode(), self.token):
            return http.HTTPStatus.UNAUTHORIZED, "a valid access token is required: connect with ?token=..."
        return None

    def _crowded(self, connection: ServerConnection) -> tuple[http.HTTPStatus, str] | None:
        address = client_address(connection)
        if self.connections[address] >= self.limits.max_connections_per_address:
            return (http.HTTPStatus.TOO_MANY_REQUESTS, f"{address} already has "
                    f"{self.limits.max_connections_per_address} connections open (max_connections_per_address)")
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        sock = ws.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.limits.send_buffer_bytes // 2)
        address = client_address(ws)
        self.connections[address] += 1
        connection = _Connection(self, ws)
        try:
            await connection.run()
        finally:
            await connection.release()
            self.connections[address] -= 1
            if not self.connections[address]:
                del self.connections[address]


class _Connection:
    """One client: its streams, the control loop and a sender task per stream."""

    def __init__(self, server: StreamServer, ws: ServerConnection):
        self.server, self.ws, self.limits = server, ws, server.limits
        self.streams: dict[int, StreamJob] = {}
        self.senders: dict[int, asyncio.Task] = {}

    async def run(self) -> None:
        await self.ws.send(self.server.hello)
        bucket = TokenBucket(self.limits.rate_per_s, self.limits.rate_burst)
        try:
            async for data in self.ws:
                request_id = None
                try:
                    if not bucket.take():
                        raise ProtocolError("rate_limited", f"more than {self.limits.rate_per_s:g} messages a second "
                                            f"(bursts of {self.limits.rate_burst}); this one was ignored")
                    message = parse_client_message(data, self.limits)
                    request_id = message.id
                    answer = await self.dispatch(message)
                    if answer is None:
                        continue
                except ProtocolError as e:
                    answer = e.to_message().to_json()
                except Exception as e:  # a bug answering one message must not cost the client its streams
                    log.exception("message failed")
                    answer = ProtocolError("internal", f"{type(e).__name__}: {e}", request_id).to_message().to_json()
                await self.ws.send(answer)
        except ConnectionClosed:
            pass

    async def dispatch(self, message: ClientMessage) -> str | None:
        """The answer to `message` (None: already sent), or ProtocolError."""
        if isinstance(message, Ping):
            return Pong(t=message.t, server_time=time.time()).to_json()
        if isinstance(message, Start):
            return await self.start(message)
        job = self.stream(message.stream, message.id)
        acked = dict(id=message.id, of=message.type, stream=job.id)
        if message.type == "prompt":
            acked["prompt_version"] = job.session.prompt(message.prompt, recache=message.recache)
        elif message.type == "steps":
            job.session.steps(message.steps)
        elif message.type == "deadline":
            job.session.deadline(message.fps)
        elif message.type in ("pause", "resume"):
            self.server.scheduler.pause(job, message.type == "pause")
        elif isinstance(message, Stop):
            await self.end(job, "stopped")
        return Ack(**acked).to_json()

    async def start(self, message: Start) -> None:
        if len(self.streams) >= self.limits.max_streams_per_connection:
            raise ProtocolError("limit", f"this connection already has {len(self.streams)} streams, the most "
                                f"one connection may have", message.id)
        try:
            session = Session(self.server.pipeline, message.prompt, steps=message.steps, seed=message.seed,
                              height=message.height, width=message.width, frames=message.frames,
                              deadline_fps=message.fps)
        except ValueError as e:
            raise ProtocolError("invalid", f"bad 'start' message: {e}", message.id) from None
        server = self.server
        job = StreamJob(server._next_id, session, message, self.limits, asyncio.get_running_loop())
        if not server.scheduler.add(job):
            raise ProtocolError("busy", f"the server is busy: it runs its maximum of {self.limits.max_streams} "
                                "streams; try again later", message.id)
        server._next_id += 1
        server.jobs[job.id] = self.streams[job.id] = job
        started = Started(id=message.id, stream=job.id, width=session.width, height=session.height,
                          frames=session.num_frames, fps=session.fps, format=message.format, steps=message.steps,
                          deadline_fps=message.fps, realtime=message.realtime).to_json()
        await self.ws.send(started)  # before any media of the stream
        self.senders[job.id] = asyncio.create_task(self.send_media(job))

    def stream(self, stream_id: int | None, request_id: str | int | None) -> StreamJob:
        if stream_id is None:
            if len(self.streams) != 1:
                raise ProtocolError("no_stream", f"this connection has {len(self.streams)} streams: name one with "
                                    "'stream'", request_id)
            return next(iter(self.streams.values()))
        if stream_id not in self.streams:
            raise ProtocolError("no_stream", f"no stream {stream_id} on this connection", request_id)
        return self.streams[stream_id]

    async def end(self, job: StreamJob, reason: str) -> None:
        """Stop generating for `job` and free its cache now; its sender sends `ended` and quits."""
        self.server.scheduler.remove(job)
        await asyncio.to_thread(job.close)
        job.outbox.finish(job.ended(reason), drop_queued=True)

    async def send_media(self, job: StreamJob) -> None:
        try:
            while True:
                item = await job.outbox.get()
                if isinstance(item, Ended):
                    await self.send(item.to_json())
                    return
                for message in item if isinstance(item, list) else self.chunk_messages(job, item):
                    await self.send(message)
        except asyncio.TimeoutError:
            await self.ws.close(1008, f"client too slow: took no data for {self.limits.send_timeout_s} s")
        except ConnectionClosed:
            pass
        finally:
            self.streams.pop(job.id, None)
            self.server.jobs.pop(job.id, None)

    def chunk_messages(self, job: StreamJob, ready: ReadyChunk) -> list[str | bytes]:
        c = ready.chunk
        info = ChunkInfo(stream=job.id, index=c.index, first_frame=c.first_frame, frames=len(c.frames),
                         steps=c.steps, deadline=c.by_deadline, prompt_version=c.prompt_version, position=c.position,
                         timings_ms={k: round(v * 1000, 3) for k, v in dict(
                             switch=c.switch_s, cache=c.cache_s, denoise=c.denoise_s, decode=c.decode_s,
                             encode=ready.encode_s).items()},
                         batch=c.batch, dropped_frames=job.outbox.dropped_frames, timestamp=ready.timestamp)
        last = len(ready.payloads) - 1
        return [info.to_json()] + [pack_media(kind, job.id, c.index, frame, ready.timestamp, payload, last=i == last)
                                   for i, (kind, frame, payload) in enumerate(ready.payloads)]

    async def send(self, message: str | bytes) -> None:
        """Send, or give up on a client that takes nothing for `send_timeout_s`."""
        await asyncio.wait_for(self.ws.send(message), self.limits.send_timeout_s)

    async def release(self) -> None:
        """The client left: free every stream of it at once."""
        for job in list(self.streams.values()):
            self.server.scheduler.remove(job)
            await asyncio.to_thread(job.close)
            self.server.jobs.pop(job.id, None)
        for task in self.senders.values():
            task.cancel()
        self.streams.clear()
