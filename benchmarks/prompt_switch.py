"""What a prompt switch costs: the chunk right after `Session.prompt(...)` against a normal chunk, without and with
re-cache (re-encoding the cached context under the new prompt).

    python benchmarks/prompt_switch.py            # built-in default model, CPU, 64x64
    python benchmarks/prompt_switch.py --model DIR --device cuda --steps 4 --at 12

The switch happens after chunk `--at - 1`, so chunk `--at` is the switching chunk; by default that is past the trained
length, where an endless stream's context is full (the largest re-cache). Times are medians over `--reps` videos:
switch = text encoding + the model's text projection, cache = KV-cache refresh (with re-cache: the whole context),
denoise = the step budget, decode = the streaming VAE. "normal" is the same chunk index of a video without a switch.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from streamgen.pipeline import Pipeline
from streamgen.session import Session

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PARTS = ("switch", "cache", "denoise", "decode")


def run_video(pipe: Pipeline, args: argparse.Namespace, seed: int, switch: str | None) -> list[dict[str, float]]:
    """Seconds per part of chunks at-2 .. at+1 of one endless video, switching before chunk `at` if asked."""
    times = []
    with Session(pipe, "a red circle moving right on a gray background", steps=args.steps, seed=seed,
                 height=args.size, width=args.size) as session:
        for chunk in session:
            if chunk.index >= args.at - 2:
                times.append(dict(zip(PARTS, (chunk.switch_s, chunk.cache_s, chunk.denoise_s, chunk.decode_s)),
                                  frames=len(chunk.frames)))
            if chunk.index == args.at - 1 and switch is not None:
                new = f"a green square moving left on a black background {seed} {switch}"  # unseen: no cached text
                session.prompt(new, recache=switch == "recache")
            if chunk.index == args.at + 1:
                return times
    raise AssertionError("the video ended early")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="pipeline folder; default: the built-in default model")
    parser.add_argument("--device")
    parser.add_argument("--dtype", choices=list(DTYPES))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64, help="height and width in pixels")
    parser.add_argument("--at", type=int, default=12, help="index of the switching chunk")
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    pipe = Pipeline.load(args.model, DTYPES.get(args.dtype), args.device)
    run_video(pipe, args, 0, "recache")  # warm-up: allocator, VAE, text cache paths

    rows: dict[str, list[dict[str, float]]] = {"normal": [], "switch": [], "switch + recache": []}
    for rep in range(args.reps):
        for name, mode in (("normal", None), ("switch", "plain"), ("switch + recache", "recache")):
            rows[name].append(run_video(pipe, args, rep + 1, mode)[2])  # chunk `at`
    print(f"{pipe.transformer.device} {str(pipe.transformer.dtype).removeprefix('torch.')}, {args.size}x{args.size}, "
          f"steps {args.steps}, chunk {args.at} ({rows['normal'][0]['frames']} frames), median of {args.reps} videos")
    print(f"{'chunk':<18}" + "".join(f"{p + ' ms':>12}" for p in PARTS) + f"{'latents ms':>12}{'total ms':>12}")
    medians = {}
    for name, samples in rows.items():
        parts = {p: statistics.median(s[p] for s in samples) * 1000 for p in PARTS}
        latents = statistics.median((s["switch"] + s["cache"] + s["denoise"]) * 1000 for s in samples)
        total = statistics.median(sum(s[p] for p in PARTS) * 1000 for s in samples)
        medians[name] = latents
        print(f"{name:<18}" + "".join(f"{parts[p]:>12.2f}" for p in PARTS) + f"{latents:>12.2f}{total:>12.2f}")
    for name in ("switch", "switch + recache"):
        print(f"{name}: +{medians[name] - medians['normal']:.2f} ms of latent work on the switching chunk "
              f"({medians[name] / medians['normal']:.2f}x a normal chunk's)")
    frames = rows["normal"][0]["frames"]
    total = statistics.median(sum(s[p] for p in PARTS) for s in rows["normal"])
    print(f"steady state: {frames / total:.1f} frames/s generated and decoded (one stream, no encoding)")


if __name__ == "__main__":
    main()
