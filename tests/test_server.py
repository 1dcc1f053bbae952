"""The streaming server, driven by real websockets clients against a server started in the test (tiny model, CPU)."""

import asyncio
import gc
import io
import json
import socket
import time
import urllib.error
import urllib.request
from contextlib import asynccontextmanager

import av
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from streamgen import server as server_module
from streamgen.cache import live_caches
from streamgen.cli import main as cli_main
from streamgen.pipeline import Pipeline
from streamgen.protocol import Limits, PayloadKind, unpack_media
from streamgen.server import Outbox, ReadyChunk, Scheduler, StreamServer

SMALL = dict(width=32, height=32)  # the smallest size the tiny model takes: fast chunks


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.load(None)


def run(coro, timeout: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@asynccontextmanager
async def served(pipe, **limits):
    async with StreamServer(pipe, port=0, limits=Limits(**limits)) as server:
        yield server


class Client:
    """Control messages as dicts; binary messages kept per chunk, under the chunk info that announced them."""

    def __init__(self, ws):
        self.ws = ws
        self.chunks: list[dict] = []  # chunk infos, each with its "media": [(header, payload)]
        self.other_media: list = []  # binary messages outside chunks (the MP4 init segment)

    async def send(self, **message) -> None:
        await self.ws.send(json.dumps(message))

    async def expect(self, type: str, timeout: float = 20, **fields) -> dict:
        """The next text message of `type` whose fields have these values; other messages are recorded, not lost."""
        deadline = time.monotonic() + timeout
        while True:
            data = await asyncio.wait_for(self.ws.recv(), max(0.01, deadline - time.monotonic()))
            if isinstance(data, bytes):
                media = unpack_media(data)
                if media[0].kind == PayloadKind.MP4_INIT:
                    self.other_media.append(media)
                else:
                    self.chunks[-1]["media"].append(media)
                continue
            message = json.loads(data)
            if message["type"] == "chunk":
                self.chunks.append(message | {"media": []})
            if message["type"] == type and all(message.get(k) == v for k, v in fields.items()):
                return message


def fresh_baseline() -> int:
    gc.collect()
    return live_caches()


async def wait_until(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_start_frames_prompt_steps_deadline_pause_stop(pipe):
    base = fresh_baseline()

    async def scenario():
        async with served(pipe) as server, connect(f"ws://127.0.0.1:{server.port}/") as ws:
            c = Client(ws)
            hello = await c.expect("hello")
            assert hello["protocol"] == 1 and hello["limits"]["max_streams"] == 4
            await c.send(type="start", id="s1", prompt="a red circle", steps=2, seed=0, realtime=False, **SMALL)
            started = await c.expect("started")
            assert (started["id"], started["width"], started["frames"], started["steps"]) == ("s1", 32, None, 2)
            stream = started["stream"]
            first = await c.expect("chunk", index=1)
            await c.expect("chunk", index=2)  # chunk 1's frames came before it
            assert live_caches() == base + 1
            zero = c.chunks[0]
            assert (zero["index"], zero["frames"], zero["steps"], zero["prompt_version"]) == (0, 1, 2, 0)
            for info in c.chunks[:2]:
                assert len(info["media"]) == info["frames"]  # one JPEG per frame
                for i, (header, jpeg) in enumerate(info["media"]):
                    assert (header.stream, header.chunk) == (stream, info["index"])
                    assert header.frame == info["first_frame"] + i
                    assert header.kind == PayloadKind.JPEG and jpeg[:2] == b"\xff\xd8" and jpeg[-2:] == b"\xff\xd9"
                    assert header.flags == (i == info["frames"] - 1)  # the last frame of its chunk is flagged
            assert first["first_frame"] == 1 and set(first["timings_ms"]) == {"switch", "cache", "denoise", "decode",
                                                                              "encode"}

            await c.send(type="prompt", id=7, prompt="a blue square")
            ack = await c.expect("ack", of="prompt")
            assert (ack["id"], ack["stream"], ack["prompt_version"]) == (7, stream, 1)
            switched = await c.expect("chunk", prompt_version=1)
            assert all(info["prompt_version"] == 0 for info in c.chunks[:-1])  # applies from one chunk on, for good
            assert switched["index"] > first["index"]

            await c.send(type="prompt", prompt="a green field", recache=True)
            assert (await c.expect("ack", of="prompt"))["prompt_version"] == 2
            assert (await c.expect("chunk", prompt_version=2))["timings_ms"]["switch"] >= 0

            await c.send(type="steps", steps=1)
            await c.expect("ack", of="steps")
            await c.expect("chunk", steps=1)

            await c.send(type="steps", steps=3)
            await c.send(type="deadline", fps=100)
            await c.expect("ack", of="deadline")
            chosen = await c.expect("chunk", deadline=True)
            assert 1 <= chosen["steps"] <= 3  # the controller picks within the step budget
            await c.send(type="deadline", fps=None)
            await c.expect("ack", of="deadline")
            await c.expect("chunk", deadline=False)

            await c.send(type="ping", t=12.5)
            assert (await c.expect("pong"))["t"] == 12.5

            await c.send(type="pause")
            await c.expect("ack", of="pause")
            job = server.jobs[stream]
            await asyncio.sleep(0.1)  # a chunk in progress when the pause came may still finish: wait for it
            await asyncio.to_thread(lambda: (job._lock.acquire(), job._lock.release()))
            made = job.chunks
            await asyncio.sleep(0.4)
            assert job.chunks == made  # paused: nothing is generated
            await c.send(type="resume")
            await c.expect("ack", of="resume")
            await wait_until(lambda: job.chunks > made)

            await c.send(type="stop", id="bye")
            assert (await c.expect("ack", of="stop"))["id"] == "bye"
            ended = await c.expect("ended")
            assert ended["reason"] == "stopped" and ended["stream"] == stream and ended["chunks"] >= 6
            assert live_caches() == base  # the cache is freed by the stop itself
            await wait_until(lambda: not server.jobs)
            await c.send(type="prompt", prompt="too late")
            assert (await c.expect("error"))["code"] == "no_stream"

    run(scenario())
    assert live_caches() == base


def test_finite_fragmented_mp4_stream_is_a_playable_video(pipe):
    async def scenario():
        async with served(pipe) as server, connect(f"ws://127.0.0.1:{server.port}/") as ws:
            c = Client(ws)
            await c.send(type="start", prompt="a red circle", frames=9, format="fmp4", realtime=False, **SMALL)
            media = await c.expect("media")
            assert media["mime"].startswith('video/mp4; codecs="avc1.')
            ended = await c.expect("ended")
            assert (ended["reason"], ended["chunks"], ended["frames"], ended["dropped_frames"]) == ("finished", 2, 9, 0)
            return c

    c = run(scenario())
    (init_header, init), = c.other_media
    assert init_header.kind == PayloadKind.MP4_INIT and init[4:8] == b"ftyp"
    segments = [m for info in c.chunks for m in info["media"]]
    assert all(h.kind == PayloadKind.MP4_SEGMENT and p[4:8] == b"moof" for h, p in segments)
    assert [h.frame for h, _ in segments] == [info["first_frame"] for info in c.chunks] == [0, 1]
    with av.open(io.BytesIO(init + b"".join(p for _, p in segments))) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 9 and frames[0].shape == (32, 32, 3)


@pytest.mark.parametrize("message, code, mentions", [
    ("{not json", "bad_json", "not valid JSON"),
    ('["start"]', "bad_message", "JSON object"),
    ('{"prompt": "x"}', "bad_message", "no 'type'"),
    ('{"type": "dance"}', "unknown_type", "'dance'"),
    ('{"type": "ping", "v": 2}', "unsupported_version", "version 2"),
    ('{"type": "start", "prompt": "x", "steps": 0}', "invalid", "steps"),
    ('{"type": "start", "prompt": "x", "steps": "4"}', "invalid", "steps"),
    ('{"type": "start", "prompt": "x", "colour": "red"}', "invalid", "colour"),
    ('{"type": "start", "prompt": "x", "width": 33}', "invalid", "multiples of 32"),
    ('{"type": "start", "prompt": "x", "frames": 10}', "invalid", "1 + 4k"),
    ('{"type": "start", "prompt": "x", "steps": 99}', "limit", "steps=99"),
    ('{"type": "start", "prompt": "x", "fps": 1000}', "limit", "fps=1000"),
    ('{"type": "start", "prompt": "x", "format": "gif"}', "invalid", "format"),
    ('{"type": "steps", "steps": 2}', "no_stream", "0 streams"),
    ('{"type": "ping", "pad": "' + "x" * 20_000 + '"}', "too_large", "exceeds the limit of 16384"),
    (b"\x00\x01", "binary", "binary"),
])
def test_bad_messages_get_an_error_and_the_connection_stays_usable(pipe, message, code, mentions):
    async def scenario():
        async with served(pipe) as server, connect(f"ws://127.0.0.1:{server.port}/") as ws:
            c = Client(ws)
            await c.expect("hello")
            await ws.send(message)
            error = await c.expect("error")
            assert error["code"] == code and mentions in error["message"], error
            await c.send(type="ping", t=1)
            await c.expect("pong")

    run(scenario())


def test_errors_echo_the_request_id_and_a_stream_still_starts_after_them(pipe):
    async def scenario():
        async with served(pipe) as server, connect(f"ws://127.0.0.1:{server.port}/") as ws:
            c = Client(ws)
            await c.send(type="start", id="a", prompt="x", steps=0)
            assert (await c.expect("error"))["id"] == "a"
            await c.send(type="start", id="b", prompt="x", frames=5, realtime=False, **SMALL)
            assert (await c.expect("started"))["id"] == "b"
            assert (await c.expect("ended"))["reason"] == "finished"

    run(scenario())


def test_a_message_beyond_the_transport_limit_closes_with_1009(pipe):
    async def scenario():
        async with served(pipe, max_message_bytes=1000) as server, connect(
                f"ws://127.0.0.1:{server.port}/", max_size=None) as ws:
            await ws.recv()
            await ws.send("x" * (server.limits.transport_max_bytes + 1))
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
            assert closed.value.rcvd.code == 1009

    run(scenario())


def test_abrupt_disconnect_frees_the_cache_at_once(pipe):
    base = fresh_baseline()

    async def scenario():
        async with served(pipe) as server:
            for _ in range(2):  # twice: a freed stream also frees its place
                ws = await connect(f"ws://127.0.0.1:{server.port}/")
                c = Client(ws)
                await c.send(type="start", prompt="a red circle", realtime=False, **SMALL)
                await c.expect("chunk", index=1)
                assert live_caches() == base + 1 and len(server.jobs) == 1
                ws.transport.abort()  # no closing handshake: the TCP connection just drops
                await wait_until(lambda: live_caches() == base)
                await wait_until(lambda: not server.jobs and server.scheduler.streams == 0)

    run(scenario())


def test_max_streams_busy_then_free_again(pipe):
    async def scenario():
        async with served(pipe, max_streams=2, max_streams_per_connection=1) as server:
            clients = [Client(await connect(f"ws://127.0.0.1:{server.port}/")) for _ in range(3)]
            for c in clients[:2]:
                await c.send(type="start", prompt="a", **SMALL)  # realtime: paced at 8 fps
                await c.expect("started")
            await clients[2].send(type="start", id=3, prompt="a", **SMALL)
            busy = await clients[2].expect("error")
            assert busy["code"] == "busy" and "maximum of 2 streams" in busy["message"] and busy["id"] == 3
            await clients[0].send(type="start", prompt="b", **SMALL)
            assert (await clients[0].expect("error"))["code"] == "limit"  # one stream per connection here
            await clients[2].send(type="ping")
            await clients[2].expect("pong")  # still connected after "busy"

            a = [await clients[0].expect("chunk", index=k) for k in range(3)]
            assert a[2]["timestamp"] - a[0]["timestamp"] >= 0.9  # realtime: chunk 1 (8 frames) plays 1 s at 8 fps
            await clients[0].send(type="stop")
            await clients[0].expect("ended")
            await clients[2].send(type="start", prompt="a", realtime=False, **SMALL)
            await clients[2].expect("chunk", index=1)  # the freed place is taken
            for c in clients:
                await c.ws.close()

    run(scenario())


def test_slow_client_skips_ahead_with_a_bounded_queue(pipe):
    async def scenario():
        async with served(pipe, max_queued_chunks=2, send_buffer_bytes=8192) as server:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", server.port))
            ws = await connect(f"ws://127.0.0.1:{server.port}/", sock=sock, max_queue=1)
            c = Client(ws)
            await c.send(type="start", prompt="a", steps=1, realtime=False, **SMALL)
            await wait_until(lambda: server.jobs, 5)
            job = next(iter(server.jobs.values()))
            await wait_until(lambda: job.outbox.dropped_frames >= 16, 30)  # the client reads nothing meanwhile
            assert job.outbox.most_queued == 2  # never more than the limit waiting
            while not (late := await c.expect("chunk", timeout=30))["dropped_frames"]:
                pass
            indices = [info["index"] for info in c.chunks]
            assert indices == sorted(indices) and len(indices) < late["index"] + 1  # skipped ahead, in order
            assert all(len(info["media"]) == info["frames"] for info in c.chunks[:-1])  # whole chunks only
            ws.transport.abort()  # a close handshake would wait behind the data the client no longer reads

    run(scenario())


def test_http_page_on_the_same_port(pipe):
    async def scenario():
        async with served(pipe) as server:
            base = f"http://127.0.0.1:{server.port}"
            page = await asyncio.to_thread(lambda: urllib.request.urlopen(base + "/").read().decode())
            assert 'id="frame-count"' in page and "new WebSocket" in page
            with pytest.raises(urllib.error.HTTPError) as missing:
                await asyncio.to_thread(urllib.request.urlopen, base + "/nothing-here")
            assert missing.value.code == 404
            missing.value.close()

    run(scenario())


class FakeJob:
    def __init__(self, id):
        self.id, self.paused, self.due = id, False, 0.0
        self.done = self.closed = False
        self.shares = []

    @property
    def session(self):
        return self


@pytest.fixture
def turns(monkeypatch) -> list[list[int]]:
    """The ids of the jobs the scheduler hands to `make_chunks`, turn by turn (the model is not run)."""
    made = []

    def make_chunks(jobs, share):
        made.append([job.id for job in jobs])
        for job in jobs:
            job.shares.append(share)
        time.sleep(0.002)
        return [None] * len(jobs)

    monkeypatch.setattr(server_module, "make_chunks", make_chunks)
    return made


def test_scheduler_is_round_robin_and_skips_paused_and_not_yet_due_streams(turns):
    scheduler = Scheduler(max_streams=3)
    jobs = [FakeJob(i) for i in range(4)]
    jobs[2].due = time.monotonic() + 60  # paced: not due for a minute
    for job in jobs[:3]:
        assert scheduler.add(job)
    assert not scheduler.add(jobs[3])  # max_streams
    time.sleep(0.2)
    both = [i for turn in turns for i in turn]
    scheduler.pause(jobs[1], True)
    time.sleep(0.05)
    cut = len(turns)
    time.sleep(0.1)
    scheduler.stop()
    assert all(len(turn) == 1 for turn in turns)  # max_batch 1: one stream per turn
    assert 2 not in both and abs(both.count(0) - both.count(1)) <= 1  # fair while both ran
    assert {i for turn in turns[cut:] for i in turn} == {0}  # paused: skipped
    assert jobs[0].shares[0] == 1 / 3 and jobs[0].shares[-1] == 1 / 2  # a deadline's share: of the unpaused streams


def test_scheduler_hands_due_streams_over_together_up_to_max_batch(turns):
    scheduler = Scheduler(max_streams=5, max_batch=2)
    jobs = [FakeJob(i) for i in range(4)]
    jobs[3].due = time.monotonic() + 60
    for job in jobs:
        assert scheduler.add(job)
    time.sleep(0.2)
    scheduler.stop()
    assert turns[:3] == [[0, 1], [2, 0], [1, 2]]  # two at a time, round-robin, the one not due left out
    assert all(len(turn) == 2 for turn in turns) and 3 not in {i for turn in turns for i in turn}
    assert jobs[0].shares[0] == 2 / 4  # two of the four unpaused streams' turns


def test_outbox_drops_oldest_chunks_but_never_the_header():
    async def scenario():
        box = Outbox(2)
        chunks = [ReadyChunk(type("C", (), {"frames": [0] * 4})(), [], 0.0, 0.0) for _ in range(4)]
        box.put_header(["init"])
        for chunk in chunks:
            box.put(chunk)
        assert box.dropped_frames == 8 and box.most_queued == 2
        assert await box.get() == ["init"]
        assert await box.get() is chunks[2] and await box.get() is chunks[3]

    run(scenario())


def test_cli_serve_refuses_bad_limits(capsys):
    assert cli_main(["serve", "--limit", "max_streamz=2"]) == 2
    assert "max_streamz" in capsys.readouterr().err


def test_streams_of_one_size_share_forwards_and_say_so(pipe):
    """Two endless streams of one size: once their contexts match (at once, or when both passed their window) their
    chunks are made in the same forwards, and each chunk info says with how many."""
    async def scenario(max_batch, chunks):
        async with served(pipe, max_batch=max_batch) as server, connect(f"ws://127.0.0.1:{server.port}/") as ws:
            c = Client(ws)
            await c.expect("hello")
            for i in range(2):
                await c.send(type="start", id=i, prompt="a red circle", steps=1, seed=i, realtime=False, **SMALL)
            shared = set()
            while len(c.chunks) < chunks and shared != {1, 2}:
                info = await c.expect("chunk")
                if info["batch"] == 2:
                    shared.add(info["stream"])
            return shared, c.chunks

    shared, _ = run(scenario(2, 60))
    assert shared == {1, 2}  # each stream was made in a batch of two (a stream that ran ahead waits for the window)
    shared, chunks = run(scenario(1, 24))
    assert not shared and len(chunks) == 24 and all(info["batch"] == 1 for info in chunks)
