"""Access to the server (loopback by default, token elsewhere, Origin and Host checks), the per-client rate limit,
no path from a message to the filesystem, and checkpoints that never unpickle."""

import asyncio
import io
import json
import pickle
import socket
import sys
from contextlib import redirect_stderr

import pytest
import torch
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from streamgen import cli
from streamgen.checkpoint import CheckpointError
from streamgen.model import load_transformer
from streamgen.pipeline import Pipeline
from streamgen.protocol import Limits, TokenBucket
from streamgen.server import StreamServer, is_loopback

TOKEN = "s3cret-token-0123456789"


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.load(None)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_loopback_by_default_and_elsewhere_only_with_a_token(pipe, monkeypatch):
    assert StreamServer(pipe).host == "127.0.0.1"
    assert cli.build_parser().parse_args(["serve"]).host == "127.0.0.1"
    assert is_loopback("localhost") and is_loopback("127.0.0.2") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2") and not is_loopback("example.com")
    for host in ("0.0.0.0", "::", "192.168.1.2", "example.com"):
        with pytest.raises(ValueError, match="give an access token"):
            StreamServer(pipe, host=host)
    with pytest.raises(ValueError, match="at least 16"):
        StreamServer(pipe, host="0.0.0.0", token="short")
    monkeypatch.delenv("STREAMGEN_TOKEN", raising=False)
    err = io.StringIO()
    with redirect_stderr(err):
        assert cli.main(["serve", "--host", "0.0.0.0", "--port", "0"]) == 2
    assert err.getvalue().count("\n") == 1 and "--token or STREAMGEN_TOKEN" in err.getvalue()
    monkeypatch.setenv("STREAMGEN_TOKEN", TOKEN)
    assert cli.build_parser().parse_args(["serve"]).token == TOKEN


def test_token_is_required_and_checked(pipe):
    async def scenario():
        async with StreamServer(pipe, host="0.0.0.0", port=0, token=TOKEN) as server:
            base = f"ws://127.0.0.1:{server.port}/"
            for url in (base, base + "?token=wrong", base + "?token=" + TOKEN[:-1], base + "?token=" + TOKEN + "x",
                        base + "?token=%C3%A9%00"):
                with pytest.raises(InvalidStatus) as refused:
                    await connect(url)
                assert refused.value.response.status_code == 401
                assert b"access token" in refused.value.response.body
            async with connect(base + "?token=" + TOKEN) as ws:
                assert json.loads(await ws.recv())["type"] == "hello"

    run(scenario())


def test_connections_per_address_are_capped(pipe):
    async def scenario():
        async with StreamServer(pipe, port=0, limits=Limits(max_connections_per_address=2)) as server:
            url = f"ws://127.0.0.1:{server.port}/"
            first, second = await connect(url), await connect(url)
            for ws in (first, second):
                assert json.loads(await ws.recv())["type"] == "hello"
            with pytest.raises(InvalidStatus) as refused:
                await connect(url)
            assert refused.value.response.status_code == 429
            assert b"max_connections_per_address" in refused.value.response.body
            await first.close()
            for _ in range(100):  # the server counts the connection closed once its handler finished
                if server.connections["127.0.0.1"] < 2:
                    break
                await asyncio.sleep(0.02)
            async with connect(url) as third:
                assert json.loads(await third.recv())["type"] == "hello"
            await second.close()

    run(scenario())


def test_origin_and_host_checks(pipe):
    async def scenario():
        async with StreamServer(pipe, port=0) as server:
            here = f"127.0.0.1:{server.port}"
            async with connect(f"ws://{here}/", origin=f"http://{here}") as ws:  # the page from this server
                await ws.recv()
            async with connect(f"ws://{here}/") as ws:  # no Origin: not a browser
                await ws.recv()
            for origin in ("http://evil.example", f"http://evil.example:{server.port}", "null",
                           f"http://localhost:{server.port + 1}"):
                with pytest.raises(InvalidStatus) as refused:
                    await connect(f"ws://{here}/", origin=origin)
                assert refused.value.response.status_code == 403
            # DNS rebinding: a page at evil.example:port whose name now resolves to 127.0.0.1
            status = await asyncio.to_thread(raw_upgrade, server.port, f"evil.example:{server.port}",
                                             f"http://evil.example:{server.port}")
            assert status == 403
            assert await asyncio.to_thread(raw_upgrade, server.port, f"localhost:{server.port}", None) == 101
        async with StreamServer(pipe, port=0, allowed_origins=["https://app.example"]) as server:
            async with connect(f"ws://127.0.0.1:{server.port}/", origin="https://app.example") as ws:
                await ws.recv()
            with pytest.raises(InvalidStatus):
                await connect(f"ws://127.0.0.1:{server.port}/", origin=f"http://127.0.0.1:{server.port}")

    run(scenario())


def raw_upgrade(port: int, host: str, origin: str | None) -> int:
    """The HTTP status of a websocket upgrade with these Host and Origin headers."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        headers = ["GET / HTTP/1.1", f"Host: {host}", "Upgrade: websocket", "Connection: Upgrade",
                   "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13"]
        if origin:
            headers.append(f"Origin: {origin}")
        s.sendall(("\r\n".join(headers) + "\r\n\r\n").encode())
        return int(s.recv(1024).split()[1])


def test_the_page_sends_the_token(pipe):
    page = StreamServer(pipe).page
    assert 'params.get("token")' in page and '"?token=" + encodeURIComponent(token)' in page


def test_rate_limit_answers_rate_limited_and_keeps_the_connection(pipe):
    clock = [0.0]
    bucket = TokenBucket(2.0, 3, clock=lambda: clock[0])
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    clock[0] += 0.5  # one token back
    assert bucket.take() and not bucket.take()
    clock[0] += 100
    assert sum(bucket.take() for _ in range(10)) == 3  # never more than the burst saved

    async def scenario():
        async with StreamServer(pipe, port=0, limits=Limits(rate_per_s=2, rate_burst=5)) as server:
            async with connect(f"ws://127.0.0.1:{server.port}/") as ws:
                await ws.recv()
                for i in range(20):
                    await ws.send(json.dumps({"type": "ping", "t": i}))
                answers = [json.loads(await ws.recv()) for _ in range(20)]
                pongs = [a for a in answers if a["type"] == "pong"]
                limited = [a for a in answers if a["type"] == "error"]
                assert 5 <= len(pongs) <= 6 and len(pongs) + len(limited) == 20
                assert all(a["code"] == "rate_limited" and "messages a second" in a["message"] for a in limited)
                await asyncio.sleep(1.0)
                await ws.send(json.dumps({"type": "ping", "t": 99}))
                assert json.loads(await ws.recv())["type"] == "pong"  # still connected, tokens back

    run(scenario())


def test_limits_are_configurable_from_the_command_line(capsys):
    assert cli.main(["serve", "--limit", "rate_burst=0"]) == 2
    assert "rate_burst" in capsys.readouterr().err
    assert cli.main(["serve", "--limit", "rate_per_s=-1"]) == 2
    assert "rate_per_s" in capsys.readouterr().err


def test_no_message_reaches_the_filesystem(pipe, tmp_path):
    """A stream whose prompt and id are paths opens no file: checked by an audit hook on every open()."""
    target = tmp_path / "secret.txt"
    target.write_text("do not read")
    opened = []

    def hook(event, args):
        if event == "open" and args and isinstance(args[0], str | bytes) and str(tmp_path) in str(args[0]):
            opened.append(args[0])

    sys.addaudithook(hook)  # cannot be removed; it only records paths under this test's folder

    async def scenario():
        async with StreamServer(pipe, port=0) as server:
            async with connect(f"ws://127.0.0.1:{server.port}/") as ws:
                await ws.recv()
                for message in ({"type": "start", "id": str(target), "prompt": str(target), "frames": 5,
                                 "width": 32, "height": 32, "realtime": False, "steps": 1},
                                {"type": "start", "prompt": "x", "output": str(tmp_path / "out.mp4")},
                                {"type": "start", "prompt": "x", "model": str(tmp_path)}):
                    await ws.send(json.dumps(message))
                while (m := json.loads(await recv_text(ws)))["type"] != "ended":
                    pass
                assert m["reason"] == "finished"

    run(scenario())
    assert opened == [] and sorted(p.name for p in tmp_path.iterdir()) == ["secret.txt"]


async def recv_text(ws) -> str:
    while isinstance(data := await ws.recv(), bytes):
        pass
    return data


class Exploit:
    """Unpickling it would create a file: code from the checkpoint running."""

    path = ""

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "model.pth", "last.ckpt"])
def test_pickle_checkpoints_are_refused_with_an_explanation(pipe, tmp_path, monkeypatch, name):
    folder = tmp_path / "transformer"
    pipe.save_pretrained(tmp_path)
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    exploit = Exploit()
    exploit.path = str(tmp_path / "pickle-ran")
    (folder / name).write_bytes(pickle.dumps(exploit))

    def never(*args, **kwargs):
        raise AssertionError("a checkpoint was unpickled")

    monkeypatch.setattr(torch, "load", never)
    monkeypatch.setattr(pickle, "load", never)
    monkeypatch.setattr(pickle, "loads", never)
    with pytest.raises(CheckpointError) as e:
        load_transformer(tmp_path, torch.float32)
    assert name in str(e.value) and "safetensors only" in str(e.value) and "arbitrary code" in str(e.value)
    err = io.StringIO()
    with redirect_stderr(err):
        assert cli.main(["generate", "--prompt", "x", "--model", str(tmp_path), "-o", str(tmp_path / "v.mp4")]) == 2
    assert "streamgen: error:" in err.getvalue() and name in err.getvalue() and "Traceback" not in err.getvalue()
    assert not (tmp_path / "v.mp4").exists() and not (tmp_path / "pickle-ran").exists()
