"""Injected faults: out of memory and NaN in one stream's chunk, a client vanishing mid-frame, a full disk under the
MP4 sink, and training killed with SIGKILL at random points. Each ends what it hits, cleanly, and nothing else."""

import asyncio
import errno
import gc
import io
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import time
from contextlib import redirect_stderr
from pathlib import Path

import numpy as np
import pytest
import torch
from websockets.asyncio.client import connect

from streamgen import cli, sinks
from streamgen.cache import live_caches
from streamgen.pipeline import Pipeline
from streamgen.protocol import Limits
from streamgen.server import StreamServer
from streamgen.session import NonFiniteError, Session

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(width=32, height=32, steps=1, realtime=False)
BIG = dict(width=64, height=64, steps=1, realtime=False)  # the stream the faults are injected into


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.load(None)


def baseline() -> int:
    gc.collect()
    return live_caches()


def inject(monkeypatch, pipe, fault):
    """Make the transformer call `fault(output)` for chunks of 64x64 videos (latent width 8) only."""
    model = pipe.transformer
    original = type(model).forward

    def forward(runs, *args, **kwargs):
        out = original(model, runs, *args, **kwargs)
        if runs[0].latents.shape[-1] == 8 and out.velocities[0] is not None:
            fault(out)
        return out

    monkeypatch.setattr(model, "forward", forward)


def oom(out):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")


def nan(out):
    out.velocities[0] = out.velocities[0] * float("nan")


async def messages(ws, until, timeout: float = 30) -> list[dict]:
    """Text messages up to and including the first for which `until(message)` holds."""
    seen = []
    deadline = time.monotonic() + timeout
    while True:
        data = await asyncio.wait_for(ws.recv(), max(0.01, deadline - time.monotonic()))
        if isinstance(data, str):
            seen.append(json.loads(data))
            if until(seen[-1]):
                return seen


@pytest.mark.parametrize("fault, mentions", [(oom, "out of memory"), (nan, "NaN or Inf")])
def test_a_failing_chunk_ends_its_stream_frees_its_cache_and_the_others_play_on(pipe, monkeypatch, fault, mentions):
    base = baseline()
    inject(monkeypatch, pipe, fault)

    async def scenario():
        async with StreamServer(pipe, port=0) as server:
            url = f"ws://127.0.0.1:{server.port}/"
            async with connect(url) as healthy, connect(url) as doomed:
                await healthy.send(json.dumps(dict(type="start", prompt="a red circle", **SMALL)))
                await messages(healthy, lambda m: m["type"] == "chunk" and m["index"] == 1)
                await doomed.send(json.dumps(dict(type="start", prompt="a blue square", **BIG)))
                seen = await messages(doomed, lambda m: m["type"] == "ended")
                ended = seen[-1]
                assert ended["reason"] == "error" and mentions in ended["message"], ended
                assert ended["chunks"] == 0  # its first chunk failed
                assert live_caches() == base + 1  # the failed stream's cache is gone, the healthy one's is not
                await messages(healthy, lambda m: m["type"] == "chunk" and m["index"] >= 3)  # plays on
                await doomed.send(json.dumps(dict(type="start", prompt="again", **SMALL)))  # the connection is fine
                await messages(doomed, lambda m: m["type"] == "chunk" and m["index"] == 1)
                for ws in (healthy, doomed):  # a quick close: nothing left queued behind the closing handshake
                    await ws.send(json.dumps(dict(type="stop")))
                    await messages(ws, lambda m: m["type"] == "ended")

    asyncio.run(asyncio.wait_for(scenario(), 60))
    assert live_caches() == base


def test_session_reports_non_finite_latents_and_closes(pipe, monkeypatch):
    base = baseline()
    inject(monkeypatch, pipe, nan)
    session = Session(pipe, "x", steps=1, width=64, height=64)
    with pytest.raises(NonFiniteError, match=r"chunk 0 .*NaN or Inf"):
        session.next_chunk()
    assert session.closed and session.next_chunk() is None and live_caches() == base


def test_a_client_vanishing_mid_frame_frees_everything(pipe):
    base = baseline()

    async def scenario():
        async with StreamServer(pipe, port=0, limits=Limits(send_buffer_bytes=8192, max_queued_chunks=2)) as server:
            for _ in range(2):
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.connect(("127.0.0.1", server.port))
                ws = await connect(f"ws://127.0.0.1:{server.port}/", sock=sock, max_queue=1)
                await ws.send(json.dumps(dict(type="start", prompt="a", **BIG)))
                await wait_until(lambda: server.jobs)
                box = next(iter(server.jobs.values())).outbox
                await wait_until(lambda box=box: box.dropped_frames > 0, 30)  # its sender is stuck inside a frame
                assert live_caches() == base + 1
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                ws.transport.abort()  # with SO_LINGER 0: a TCP reset, mid-message
                await wait_until(lambda: live_caches() == base and not server.jobs and not server.scheduler.streams)
            async with connect(f"ws://127.0.0.1:{server.port}/") as other:  # the server still serves
                await other.send(json.dumps(dict(type="start", prompt="b", **SMALL)))
                await messages(other, lambda m: m["type"] == "chunk" and m["index"] == 1)
                await other.send(json.dumps(dict(type="stop")))
                await messages(other, lambda m: m["type"] == "ended")

    asyncio.run(asyncio.wait_for(scenario(), 60))


async def wait_until(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


# ---------------------------------------------------------------------------------------------------------------------
# a full disk


class FullDisk:
    """A container whose writes fail with ENOSPC once `budget` packets were muxed."""

    def __init__(self, container, path: str, budget: int):
        self._container, self._path, self._budget = container, path, budget

    def mux(self, packets):
        self._budget -= len(packets) if isinstance(packets, list) else 1
        if self._budget < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._path)
        return self._container.mux(packets)

    def __getattr__(self, name):
        return getattr(self._container, name)


def full_disk_after(monkeypatch, packets: int) -> None:
    real_open = sinks.av.open

    def open_(path, *args, **kwargs):
        container = real_open(path, *args, **kwargs)
        return FullDisk(container, str(path), packets) if "w" in args[:1] else container

    monkeypatch.setattr(sinks.av, "open", open_)


def test_disk_full_leaves_no_file_and_the_cli_says_so(tmp_path, monkeypatch):
    full_disk_after(monkeypatch, 0)  # x264 holds short videos back until the end: the failure comes at close
    out = tmp_path / "video.mp4"
    err = io.StringIO()
    with redirect_stderr(err):
        code = cli.main(["generate", "--prompt", "x", "--steps", "1", "--frames", "9", "--width", "32", "--height",
                         "32", "-o", str(out)])
    assert code == 2, err.getvalue()
    assert "No space left on device" in err.getvalue() and "Traceback" not in err.getvalue()
    assert list(tmp_path.iterdir()) == []  # neither the video nor its temporary file


def test_a_real_write_failure_mid_video_leaves_no_file(tmp_path):
    """The kernel refuses writes past a file size limit (RLIMIT_FSIZE, EFBIG): the same path as a full disk."""
    out = tmp_path / "video.mp4"
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (3000, 3000)); from streamgen.cli import main; "
            f"sys.exit(main(['generate', '--prompt', 'x', '--steps', '1', '--frames', '9', '-o', {str(out)!r}]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("streamgen: error:") and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


def test_mp4_sink_removes_its_temporary_file_when_the_disk_fills_mid_video(tmp_path, monkeypatch):
    full_disk_after(monkeypatch, 3)
    sink = sinks.Mp4Sink(tmp_path / "v.mp4", 8)
    rng = np.random.default_rng(0)
    written = 0
    with pytest.raises(OSError) as e:  # no `with sink`: the sink cleans up after itself
        for _ in range(40):
            sink.write(rng.integers(0, 255, (4, 32, 32, 3), np.uint8))
            written += 1
    assert e.value.errno == errno.ENOSPC and 0 < written < 40  # mid-video, in write()
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------------
# training killed at random points

KILLS = int(os.environ.get("STREAMGEN_KILLS", "5"))  # the 20: STREAMGEN_KILLS=20 pytest -k killed
STEPS = 3 * KILLS + 3  # each run is killed after one or two finished steps (and a bit): kills land in training


@pytest.fixture(scope="module")
def stage1_setup(tmp_path_factory):
    from distill.data import write_latent_shards
    from distill.synthetic import SyntheticVideos
    from streamgen import CausalWanTransformer, preset
    from streamgen.model import save_transformer
    from streamgen.text import WordHashEncoder
    from streamgen.vae import WanVAE
    from streamgen.vae import preset as vae_preset

    root = tmp_path_factory.mktemp("killed")
    torch.manual_seed(0)
    vae = WanVAE(vae_preset("tiny")).eval()
    vae.save_pretrained(root / "vae" / "vae")
    write_latent_shards(root / "data", SyntheticVideos(4, seed=3, frames=13, height=32, width=32), vae,
                        WordHashEncoder(32, 16), shard_size=2)
    save_transformer(CausalWanTransformer(preset("tiny").model_copy(update={"gate_value": 0.0})), root / "teacher")
    return root


def train_command(root: Path, name: str) -> list[str]:
    config = {"task": "stage1", "output_dir": str(root / name), "steps": STEPS, "batch_size": 2, "seed": 5,
              "data": str(root / "data"), "vae": str(root / "vae"), "init_from": str(root / "teacher"),
              "log_every": 1, "save_every": 1, "optim": {"lr": 1e-3, "warmup_steps": 2},
              "stage1": {"bidirectional_prob": 0.5}}
    path = root / f"{name}.json"
    path.write_text(json.dumps(config))
    return [sys.executable, "-m", "distill.train", str(path)]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def check_checkpoints(run: Path) -> int:
    """The step `latest` names, after checking that checkpoint is whole (state and exported weights load)."""
    from streamgen.model import load_transformer

    latest = run / "checkpoints" / "latest"
    if not latest.exists():
        return 0
    folder = run / "checkpoints" / latest.read_text()
    state = torch.load(folder / "state.pt", weights_only=True)
    load_transformer(folder / "model", torch.float32)
    assert folder.name == f"step-{state['step']:07d}"
    return state["step"]


def kill_at_random_points(root: Path, name: str, kills: int, rng: random.Random) -> list[int]:
    """Run training `kills` times, each killed (SIGKILL) after a random number of steps plus a random delay."""
    steps = []
    for _ in range(kills):
        process = subprocess.Popen(train_command(root, name), env=ENV, cwd=ROOT, stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL, text=True)
        for _ in range(rng.randint(1, 2)):  # progress lines (finished steps) before the kill ...
            if not process.stdout.readline():
                break
        time.sleep(rng.uniform(0, 0.15))  # ... then somewhere inside a step, a save or the export
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stdout.close()
        steps.append(check_checkpoints(root / name))
    return steps


def flat(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from flat(v, f"{prefix}{k}.")
    elif isinstance(tree, list | tuple):
        for i, v in enumerate(tree):
            yield from flat(v, f"{prefix}{i}.")
    else:
        yield prefix, tree


def test_training_killed_at_random_points_resumes_to_identical_parameters(stage1_setup):
    root = stage1_setup
    whole = subprocess.Popen(train_command(root, "whole"), env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)  # meanwhile, on the other core
    steps = kill_at_random_points(root, "killed", KILLS, random.Random(int(os.environ.get("STREAMGEN_KILL_SEED", 0))))
    finish = subprocess.run(train_command(root, "killed"), env=ENV, cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert finish.returncode == 0, finish.stderr[-3000:]
    assert whole.wait(300) == 0, whole.stderr.read()[-3000:]
    whole.stderr.close()
    print(f"steps checkpointed after each of {KILLS} kills: {steps}")
    assert steps == sorted(steps) and 0 < steps[0] and steps[-1] <= STEPS  # never lost a checkpoint it had

    a = torch.load(root / "whole" / "checkpoints" / f"step-{STEPS:07d}" / "state.pt", weights_only=True)
    b = torch.load(root / "killed" / "checkpoints" / f"step-{STEPS:07d}" / "state.pt", weights_only=True)
    fa, fb = dict(flat({k: a[k] for k in ("model", "ema", "optimizer")})), dict(
        flat({k: b[k] for k in ("model", "ema", "optimizer")}))
    assert fa.keys() == fb.keys() and len(fa) > 100
    for k in fa:
        assert torch.equal(fa[k], fb[k]) if isinstance(fa[k], torch.Tensor) else fa[k] == fb[k], k
    assert (root / "killed" / "checkpoints" / "latest").read_text() == f"step-{STEPS:07d}"
    from streamgen.model import load_transformer

    exported = [load_transformer(root / run / "model", torch.float32).state_dict() for run in ("whole", "killed")]
    assert all(torch.equal(exported[0][k], exported[1][k]) for k in exported[0])
