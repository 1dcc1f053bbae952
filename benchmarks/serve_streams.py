"""Throughput of `streamgen serve` with N concurrent clients: frames per second per stream and in all.

    python benchmarks/serve_streams.py --streams 1 2 4 --max-batch 1 4   # built-in default model, CPU, JPEG, 64x64

Each client starts an endless stream with `realtime: false` (as fast as the model goes) and reads everything; the
server runs in this process on a free port. Frames are counted from the chunk messages over `--seconds` after a
warm-up of two chunks per stream. `--max-batch 1` makes one chunk at a time; larger lets due streams share forwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from websockets.asyncio.client import connect

from streamgen.pipeline import Pipeline
from streamgen.protocol import Limits
from streamgen.server import StreamServer


async def client(port: int, steps: int, seconds: float, started: asyncio.Barrier) -> tuple[int, int, float]:
    """Frames received in the measured window, frames the server dropped for this client, and the share of its chunks
    whose denoising was shared with other streams."""
    async with connect(f"ws://127.0.0.1:{port}/") as ws:
        await ws.send(json.dumps({"type": "start", "prompt": "a red circle moving right on a gray background",
                                  "steps": steps, "realtime": False}))
        frames, dropped, end, chunks, shared = 0, 0, None, 0, 0
        while end is None or time.monotonic() < end:
            message = await ws.recv()
            if isinstance(message, bytes):
                continue
            info = json.loads(message)
            if info["type"] == "chunk":
                if end is None and info["index"] == 2:
                    await started.wait()
                    end = time.monotonic() + seconds
                elif end is not None:
                    frames, dropped = frames + info["frames"], info["dropped_frames"]
                    chunks, shared = chunks + 1, shared + (info["batch"] > 1)
        return frames, dropped, shared / max(chunks, 1)


async def measure(pipe: Pipeline, streams: int, steps: int, seconds: float, max_batch: int) -> None:
    async with StreamServer(pipe, port=0, limits=Limits(max_streams=streams, max_batch=max_batch)) as server:
        barrier = asyncio.Barrier(streams)
        results = await asyncio.gather(*(client(server.port, steps, seconds, barrier) for _ in range(streams)))
    per_stream = [f / seconds for f, _, _ in results]
    print(f"{streams} streams, max_batch {max_batch}: {sum(per_stream):6.1f} frames/s in all, per stream "
          + ", ".join(f"{x:.1f}" for x in per_stream) + f"; dropped {sum(d for _, d, _ in results)}; "
          + f"chunks in shared forwards {100 * sum(s for _, _, s in results) / streams:.0f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--max-batch", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    pipe = Pipeline.load(None)
    print(f"{pipe.transformer.device}, built-in default model, {pipe.settings.width}x{pipe.settings.height}, "
          f"steps {args.steps}, JPEG")
    for n in args.streams:
        for max_batch in args.max_batch:
            asyncio.run(measure(pipe, n, args.steps, args.seconds, max_batch))


if __name__ == "__main__":
    main()
