"""Where a chunk's time goes: CUDA kernel time of one denoising step and one incremental cache refresh, by op;
or, with --vae, of the streaming VAE decode of a whole 81-frame video (the default CUDA path: fused norm kernels,
channels-last), with cuDNN's autotuner off and on; or, with --memory, what is allocated at the peak of a whole
480x832 stream (latents only, then with decode), grouped by the line of streamgen that allocated it.

    python -m benchmarks.profile_step --size 1.3B --chunk 5   # profile chunk 5 (its context is at its largest)
    python -m benchmarks.profile_step --vae
    python -m benchmarks.profile_step --memory --steps 4
    python -m benchmarks.profile_step --compile               # the engine's step vs torch.compile(max-autotune)
"""

import argparse
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile

from streamgen.bench import random_pipeline, vae_decode_case
from streamgen.cache import KVCache, context_layout
from streamgen.engine import chunk_sizes
from streamgen.model import Run


@dataclass
class ChunkCase:
    """A video's chunks for timing one chunk's work: each chunk's final latents (random), a prompt's per-layer text
    keys and values, every chunk's context layout, and a KV cache large enough for them."""

    sizes: list[int]
    finals: dict[int, torch.Tensor]
    text: list
    layouts: list
    cache: KVCache

    def refresh(self, chunk: int) -> None:
        """The cache's incremental refresh before `chunk` (the chunk that turned compressed and the full window after
        it, re-encoded), repeatable: the cache is set back to the context of chunk - 1 first, whose unchanged prefix
        its buffers hold once it has been refreshed to that context."""
        self.cache.entries = list(self.layouts[chunk - 1])
        self.cache.refresh(self.layouts[chunk], self.finals.__getitem__, self.text)

    def denoise_run(self, chunk: int) -> Run:
        """Chunk `chunk`'s latents as one denoising step's input (t = 500 -> r = 250)."""
        t = torch.full((1,), 500.0, device=self.finals[chunk].device)
        return Run(self.finals[chunk], t, t * 0.5, sum(self.sizes[:chunk]))


def chunk_case(model, device: torch.device, height: int = 60, width: int = 104) -> ChunkCase:
    """The chunks of an 81-frame video at `height` x `width` latents (480x832 by default) for `model`'s config."""
    cfg = model.config
    sizes = chunk_sizes(cfg.chunk_partition, sum(cfg.chunk_partition))
    finals = {i: torch.randn(1, cfg.in_channels, n, height, width, device=device) for i, n in enumerate(sizes)}
    text = model.encode_text(torch.randn(1, 512, cfg.text_dim, device=device, dtype=model.dtype))
    layouts = [context_layout(sizes, k, cfg.full_chunk_limit) for k in range(len(sizes))]
    return ChunkCase(sizes, finals, text, layouts, KVCache.for_layouts(model, 1, height, width, layouts))


def timed(fn, name: str, rows: int) -> None:
    fn()  # warm-up
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    print(f"== {name}: {start.elapsed_time(end):.1f} ms")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60))


def profile_vae(device: torch.device, rows: int) -> None:
    vae, latents, sizes = vae_decode_case(device)
    vae.to_channels_last()

    def decode():
        vae.decode(latents, sizes)

    for autotune in (False, True):
        torch.backends.cudnn.benchmark = autotune
        decode()  # the autotuner's search, when on
        timed(decode, f"streaming decode, 81 frames, cudnn.benchmark={autotune}", rows)


def compare_compile(model, step: Callable[[], object], compiled_step: Callable[[], object], iters: int = 20) -> None:
    """One denoising step as the engine runs it (Triton kernels, its default attention backend, replayed from a CUDA
    graph) against
    torch.compile(mode="max-autotune") of the plain torch path (inductor fuses and autotunes, and replays CUDA graphs
    of its own), and the plain torch path eager: ms per step, and each velocity's rel L2 from the engine's."""
    from benchmarks.gpu import rel_l2
    from streamgen import model as model_module

    def ms(fn) -> float:
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / iters

    engine = ms(step)
    reference = step().velocities[0].clone()
    model_module.set_fused_kernels(False)
    model.cuda_graphs.enabled = False
    try:
        eager = ms(step)
        plain = step().velocities[0].clone()
        t = time.perf_counter()
        out = compiled_step().velocities[0].clone()
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - t
        compiled = ms(compiled_step)
    finally:
        model_module.set_fused_kernels(True)
        model.cuda_graphs.enabled = True
    print(f"== denoising step: engine (Triton kernels, default attention, CUDA graph) {engine:.2f} ms; torch.compile "
          f"max-autotune {compiled:.2f} ms (compiled in {compile_s:.0f} s); plain torch eager {eager:.2f} ms. Velocity "
          f"rel L2 vs the engine's: compiled {rel_l2(out, reference):.1e}, plain torch {rel_l2(plain, reference):.1e}",
          flush=True)


def live_at_peak(trace: list[dict], start: int) -> tuple[int, list[dict]]:
    """Replay an allocator trace (torch.cuda.memory._snapshot()["device_traces"][0]): the peak of live bytes from
    event `start` on, and the blocks live then (including those allocated before `start`)."""
    live: dict[int, dict] = {}
    total = peak = 0
    at_peak: list[dict] = []
    for i, event in enumerate(trace):
        if event["action"] == "alloc":
            live[event["addr"]] = event
            total += event["size"]
            if i >= start and total > peak:
                peak, at_peak = total, list(live.values())
        elif event["action"] == "free_requested" and event["addr"] in live:
            total -= live.pop(event["addr"])["size"]
    return peak, at_peak


def call_site(event: dict) -> str:
    """The innermost frame in streamgen/ or kernels/ of an allocation (else its innermost Python frame)."""
    frames = [f for f in event.get("frames", []) if f["filename"].endswith(".py")]
    ours = [f for f in frames if "/streamgen/" in f["filename"] or "/kernels/" in f["filename"]]
    f = (ours or frames or [{"filename": "?", "line": 0, "name": "?"}])[0]
    return f"{'/'.join(f['filename'].rsplit('/', 2)[-2:])}:{f['line']} {f['name']}"


def profile_memory(size: str, steps: int, rows: int, decode_pass_frames: int | None) -> None:
    """Live memory at the peak of a 480x832, 81-frame stream, latents only and then with decode, after a warm-up
    stream, by the call site that allocated each block (weights and cache buffers included)."""
    device = torch.device("cuda")
    torch.cuda.memory._record_memory_history(max_entries=2_000_000)
    pipe = random_pipeline(size, device, torch.bfloat16)
    if decode_pass_frames is not None:
        pipe.vae.decode_pass_frames = decode_pass_frames
    prompt = torch.randn(1, 512, pipe.transformer.config.text_dim, device=device, dtype=torch.bfloat16)
    frames, h, w = pipe.latent_size(480, 832, 81)
    for _ in pipe.stream(prompt, height=480, width=832, num_frames=81, steps=steps, seed=0):
        pass  # warm-up: graphs, plans, autotuning
    runs = {"latents only": lambda: pipe.generator.stream(prompt, height=h, width=w, num_frames=frames, steps=steps,
                                                          seed=0),
            "with decode": lambda: pipe.stream(prompt, height=480, width=832, num_frames=81, steps=steps, seed=0)}
    for name, run in runs.items():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        start = len(torch.cuda.memory._snapshot()["device_traces"][0])
        for _ in run():
            pass
        torch.cuda.synchronize()
        trace = torch.cuda.memory._snapshot()["device_traces"][0]
        peak, blocks = live_at_peak(trace, start)
        by_site = Counter()
        for b in blocks:
            by_site[call_site(b)] += b["size"]
        print(f"== {name}, {steps} steps: max_memory_allocated {torch.cuda.max_memory_allocated(device) / 2**30:.2f} "
              f"GiB, trace peak {peak / 2**30:.2f} GiB ({len(trace)} events), live then by call site:")
        for site, n in by_site.most_common(rows):
            print(f"  {n / 2**30:7.3f} GiB  {site}")
    torch.cuda.memory._record_memory_history(enabled=None)


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="1.3B")
    p.add_argument("--chunk", type=int, default=5)
    p.add_argument("--rows", type=int, default=20)
    p.add_argument("--vae", action="store_true", help="profile the VAE decode instead")
    p.add_argument("--memory", action="store_true", help="what is live at a whole stream's memory peak instead")
    p.add_argument("--steps", type=int, default=4, help="step budget of the --memory stream")
    p.add_argument("--decode-pass-frames", type=int,
                   help="the --memory stream's VAE decode_pass_frames (default: the VAE's, 2)")
    p.add_argument("--compile", action="store_true",
                   help="time chunk --chunk's denoising step against torch.compile(mode='max-autotune') instead")
    args = p.parse_args()
    device = torch.device("cuda")
    if args.vae:
        return profile_vae(device, args.rows)
    if args.memory:
        return profile_memory(args.size, args.steps, args.rows, args.decode_pass_frames)
    model = random_pipeline(args.size, device, torch.bfloat16).transformer
    case = chunk_case(model, device)
    cache, layouts, text = case.cache, case.layouts, case.text

    def refresh():
        cache.refresh(layouts[args.chunk - 1], case.finals.__getitem__, text)
        cache.refresh(layouts[args.chunk], case.finals.__getitem__, text)  # the incremental step being measured

    run = case.denoise_run(args.chunk)
    if args.compile:
        refresh()
        forward = torch.compile(model._forward, mode="max-autotune")
        return compare_compile(model, lambda: model([run], text, past=cache.past()),
                               lambda: forward([run], text, None, cache.past(), True, False))
    timed(refresh, f"refresh before chunk {args.chunk} (incl. the previous one's)", args.rows)
    timed(lambda: model([run], text, past=cache.past()), f"denoising step, past {cache.length} tokens", args.rows)


if __name__ == "__main__":
    main()
