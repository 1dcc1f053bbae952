"""Loopback load test: N concurrent websocket viewers against `streamgen serve` (default model) for a bounded time.

    python benchmarks/load_test.py --clients 8 --seconds 120 [--out benchmarks/results/load_test.json]

The server runs as a subprocess on 127.0.0.1 (so its memory is its own); each client starts one realtime stream and
reads everything. Reported: frames delivered, frame latency (receive time minus the server timestamp in the binary
header: chunk ready -> frame received, same clock), frames dropped (the server's skip-ahead counts and gaps in frame
indices), and the server's resident memory after warm-up and at the end (growth over the run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from websockets.asyncio.client import connect

from streamgen.protocol import unpack_media

ROOT = Path(__file__).resolve().parents[1]


def rss_mb(pid: int) -> float:
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss / 2**20
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("cannot read the server's memory")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Viewer:
    def __init__(self, index: int):
        self.index = index
        self.frames = 0
        self.latencies: list[float] = []
        self.dropped = 0  # the server's count of skipped frames
        self.gaps = 0  # frames missing between consecutive received ones
        self.errors: list[str] = []
        self.last_frame = -1

    async def run(self, url: str, start: dict, until: float) -> None:
        async with connect(url, max_size=None) as ws:
            await ws.send(json.dumps({**start, "prompt": f"a shape number {self.index}"}))
            while (left := until - time.monotonic()) > 0:
                try:
                    data = await asyncio.wait_for(ws.recv(), left)
                except asyncio.TimeoutError:
                    break
                now = time.time()
                if isinstance(data, bytes):
                    header, _ = unpack_media(data)
                    self.frames += 1
                    self.latencies.append(now - header.timestamp)
                    self.gaps += max(0, header.frame - self.last_frame - 1)
                    self.last_frame = header.frame
                else:
                    message = json.loads(data)
                    if message["type"] == "chunk":
                        self.dropped = message["dropped_frames"]
                    elif message["type"] in ("error", "ended"):
                        self.errors.append(json.dumps(message))
            await ws.send(json.dumps({"type": "stop"}))


async def load(url: str, args, server_pid: int) -> dict:
    start = dict(type="start", steps=args.steps, width=args.size, height=args.size, realtime=not args.fast)
    t0 = time.monotonic()
    until = t0 + args.seconds
    viewers = [Viewer(i) for i in range(args.clients)]
    tasks = [asyncio.create_task(v.run(url, start, until)) for v in viewers]
    memory = []
    while time.monotonic() < until:
        memory.append((round(time.monotonic() - t0, 1), round(rss_mb(server_pid), 1)))
        await asyncio.sleep(1.0)
    await asyncio.gather(*tasks)
    await asyncio.sleep(1.0)  # the server frees the streams
    after = rss_mb(server_pid)
    latencies = sorted(x for v in viewers for x in v.latencies)
    warm = [m for t, m in memory if t >= args.warmup] or [memory[-1][1]]
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99
    return {
        "clients": args.clients, "seconds": args.seconds, "size": args.size, "steps": args.steps,
        "realtime": not args.fast,
        "frames_delivered": sum(v.frames for v in viewers),
        "frames_per_client": [v.frames for v in viewers],
        "fps_per_client": round(sum(v.frames for v in viewers) / args.clients / args.seconds, 2),
        "latency_ms": {"p50": round(q[49] * 1000, 1), "p99": round(q[98] * 1000, 1),
                       "max": round(latencies[-1] * 1000, 1) if latencies else None},
        "dropped_frames": {"server_skipped": sum(v.dropped for v in viewers),
                           "index_gaps": sum(v.gaps for v in viewers)},
        "errors": [e for v in viewers for e in v.errors],
        "server_rss_mb": {"after_warmup": warm[0], "end_of_run": warm[-1], "max": max(warm),
                          "growth_after_warmup": round(warm[-1] - warm[0], 1), "after_clients_left": round(after, 1),
                          "samples": memory},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--size", type=int, default=32, help="width and height in pixels (default 32)")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--fast", action="store_true", help="streams not paced at the video's frame rate")
    parser.add_argument("--warmup", type=float, default=20, help="seconds before the memory baseline (default 20)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "load_test.json")
    args = parser.parse_args(argv)
    if not (1 <= args.clients <= 64 and 1 <= args.seconds <= 3600):
        parser.error("--clients in [1, 64], --seconds in [1, 3600]")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "streamgen.cli", "serve", "--port", str(port), "--device", "cpu",
         "--limit", f"max_streams={args.clients}", "--limit", "max_streams_per_connection=1"],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE, text=True)
    try:
        line = server.stderr.readline()  # "serving on ..." once it listens
        if "serving on" not in line:
            raise SystemExit(f"the server did not start: {line}{server.stderr.read()}")
        report = asyncio.run(load(f"ws://127.0.0.1:{port}/", args, server.pid))
    finally:
        server.terminate()
        server.wait(30)
    report["command"] = "python benchmarks/load_test.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    summary = {k: v for k, v in report.items() if k not in ("frames_per_client",)}
    summary["server_rss_mb"] = {k: v for k, v in report["server_rss_mb"].items() if k != "samples"}
    print(json.dumps(summary, indent=2))
    return report


if __name__ == "__main__":
    main()
