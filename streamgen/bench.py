"""Latency of the full stream per step budget, at real model sizes with random weights.

Per budget: time to first decoded frame, per-chunk latency (and how it grows along the video), sustained fps with
and without decoding, peak GPU memory. Random weights cost the same FLOPs as trained ones, so timings carry over.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from streamgen.config import TransformerConfig, preset
from streamgen.engine import chunk_sizes, now
from streamgen.model import CausalWanTransformer
from streamgen.pipeline import Pipeline, PipelineSettings
from streamgen.vae import WanVAE
from streamgen.vae import preset as vae_preset


@dataclass
class BudgetResult:
    steps: int
    first_frame_s: float  # request to first decoded frame
    chunk_s: list[float]  # per generated chunk: cache refresh + denoise
    decode_s: list[float]
    total_s: float  # whole video, decode included
    latents_s: float  # whole video without decoding (separate run)
    frames: int
    peak_gib: float  # whole stream with decode
    peak_latents_gib: float  # transformer and cache alone

    @property
    def fps(self) -> float:
        return self.frames / self.total_s

    @property
    def fps_latents(self) -> float:
        return self.frames / self.latents_s


def random_pipeline(size: str | TransformerConfig, device: torch.device, dtype: torch.dtype,
                    seed: int = 0) -> Pipeline:
    """A pipeline of a transformer preset (or config) and the real Wan2.1 VAE, random weights, built on the device."""
    config = preset(size) if isinstance(size, str) else size
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: a 14B model never exists in fp32
    try:
        with torch.device(device):
            transformer = CausalWanTransformer(config).eval()
            vae = WanVAE(vae_preset("wan2.1")).eval()
    finally:
        torch.set_default_dtype(default)
    transformer.to_dtype(dtype)
    return Pipeline(transformer, vae, None, PipelineSettings())


def vae_decode_case(device: torch.device) -> tuple[WanVAE, torch.Tensor, list[int]]:
    """The 1.3B stream's decode at 480x832, 81 frames, for VAE benchmarks: the released VAE with random weights in
    bf16, random latents (21 latent frames) and the stream's chunk sizes, seeded so every benchmark decodes the same."""
    torch.manual_seed(0)
    vae = WanVAE(vae_preset("wan2.1")).eval().to(device=device, dtype=torch.bfloat16)
    latents = torch.randn(1, 16, 21, 60, 104, device=device)
    return vae, latents, chunk_sizes(preset("1.3B").chunk_partition, 21)


def run_budget(pipe: Pipeline, steps: int, prompt: torch.Tensor, height: int, width: int, frames: int) -> BudgetResult:
    device = pipe.transformer.device
    torch.cuda.reset_peak_memory_stats(device) if device.type == "cuda" else None
    start = now(device)
    first, chunk_s, decode_s, count = None, [], [], 0
    for chunk in pipe.stream(prompt, height=height, width=width, num_frames=frames, steps=steps, seed=0):
        first = first if first is not None else now(device) - start
        chunk_s.append(chunk.latents.context_s + chunk.latents.denoise_s)
        decode_s.append(chunk.decode_s)
        count += chunk.frames.shape[1]
    total = now(device) - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    latent_frames, h, w = pipe.latent_size(height, width, frames)
    torch.cuda.reset_peak_memory_stats(device) if device.type == "cuda" else None
    start = now(device)
    for _ in pipe.generator.stream(prompt.to(device), height=h, width=w, num_frames=latent_frames, steps=steps,
                                   seed=0):
        pass
    latents = now(device) - start
    peak_latents = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return BudgetResult(steps, first, chunk_s, decode_s, total, latents, count, peak, peak_latents)


def markdown(results: list[BudgetResult], title: str) -> str:
    lines = [f"### {title}", "",
             "| steps | first frame (s) | chunk min / median / max (s) | last / second chunk | latents only (s) | "
             "with decode (s) | fps (latents) | fps (end to end) | peak GiB (latents only) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        c = r.chunk_s
        growth = c[-1] / c[1] if len(c) > 2 else float("nan")
        lines.append(f"| {r.steps} | {r.first_frame_s:.3f} | {min(c):.3f} / {statistics.median(c):.3f} / {max(c):.3f} "
                     f"| {growth:.2f} | {r.latents_s:.2f} | {r.total_s:.2f} | {r.fps_latents:.1f} | {r.fps:.1f} "
                     f"| {r.peak_gib:.1f} ({r.peak_latents_gib:.1f}) |")
    return "\n".join(lines)


def plot(results: list[BudgetResult], title: str, path: Path) -> bool:
    """fps (end to end and latents only) and time to first frame against the step budget; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    steps = [r.steps for r in results]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(steps, [r.fps for r in results], "o-", label="end to end (with decode)")
    left.plot(steps, [r.fps_latents for r in results], "s--", label="latents only")
    left.set(xscale="log", xlabel="step budget", ylabel="frames per second", xticks=steps, xticklabels=steps)
    left.legend()
    right.plot(steps, [r.first_frame_s * 1000 for r in results], "o-")
    right.set(xscale="log", xlabel="step budget", ylabel="time to first decoded frame (ms)", xticks=steps,
              xticklabels=steps)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> list[BudgetResult]:
    import argparse

    p = argparse.ArgumentParser(description="stream latency per step budget (random weights)")
    p.add_argument("--size", default="1.3B", help="transformer preset: 1.3B, 14B, tiny")
    p.add_argument("--config", type=Path, help="a transformer config.json instead of a preset "
                   "(benchmarks/configs/ holds the released students')")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=1, help="untimed streams before timing")
    p.add_argument("--decode-pass-frames", type=int, metavar="N",
                   help="decode at most N video frames per VAE pass (default: 2, the VAE's)")
    p.add_argument("--out", type=Path, help="folder for latency_SIZE.json / .md / .png (png needs matplotlib)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    if args.config is not None:
        args.size = args.config.stem
        config = TransformerConfig(**json.loads(args.config.read_text()))
    else:
        config = preset(args.size)
    if args.decode_pass_frames is not None and args.decode_pass_frames < 1:
        p.error(f"--decode-pass-frames must be >= 1, got {args.decode_pass_frames}")
    pipe = random_pipeline(config, device, dtype)
    if args.decode_pass_frames is not None:
        pipe.vae.decode_pass_frames = args.decode_pass_frames
    print(f"built {args.size} + Wan2.1 VAE on {device} in {time.perf_counter() - t0:.1f}s", flush=True)
    prompt = torch.randn(1, 512, pipe.transformer.config.text_dim, device=device, dtype=dtype)
    for _ in range(args.warmup):
        run_budget(pipe, min(args.steps), prompt, args.height, args.width, args.frames)
    results = []
    for steps in args.steps:
        results.append(run_budget(pipe, steps, prompt, args.height, args.width, args.frames))
        r = results[-1]
        print(f"steps {steps}: first frame {r.first_frame_s:.3f}s, {r.fps:.1f} fps end to end, "
              f"{r.fps_latents:.1f} fps latents, chunks {[round(c, 3) for c in r.chunk_s]}, "
              f"decode {[round(d, 3) for d in r.decode_s]}", flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    title = (f"{args.size}, {args.height}x{args.width}, {args.frames} frames, {str(dtype)[6:]}, {name}, "
             f"torch {torch.__version__}")
    table = markdown(results, title)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"latency_{args.size}.json").write_text(json.dumps(
            {"title": title, "results": [asdict(r) | {"fps": r.fps, "fps_latents": r.fps_latents} for r in results]},
            indent=2))
        (args.out / f"latency_{args.size}.md").write_text(table + "\n")
        plot(results, title, args.out / f"latency_{args.size}.png")
    print(table)
    return results


if __name__ == "__main__":
    main()
