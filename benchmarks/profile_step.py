"""Where a chunk's time goes: CUDA kernel time of one denoising step and one incremental cache refresh, by op;
or, with --vae, of the streaming VAE decode of a whole 81-frame video (the default CUDA path: fused norm kernels,
channels-last), with cuDNN's autotuner off and on.

    python benchmarks/profile_step.py --size 1.3B --chunk 5   # profile chunk 5 (its context is at its largest)
    python benchmarks/profile_step.py --vae
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from streamgen.bench import random_pipeline
from streamgen.cache import KVCache, context_layout
from streamgen.config import preset
from streamgen.engine import chunk_sizes
from streamgen.model import Run
from streamgen.vae import WanVAE
from streamgen.vae import preset as vae_preset


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
    torch.manual_seed(0)
    vae = WanVAE(vae_preset("wan2.1")).eval().to(device=device, dtype=torch.bfloat16)
    vae.to_channels_last()
    latents = torch.randn(1, 16, 21, 60, 104, device=device)
    sizes = chunk_sizes(preset("1.3B").chunk_partition, 21)

    def decode():
        vae.decode(latents, sizes)

    for autotune in (False, True):
        torch.backends.cudnn.benchmark = autotune
        decode()  # the autotuner's search, when on
        timed(decode, f"streaming decode, 81 frames, cudnn.benchmark={autotune}", rows)


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="1.3B")
    p.add_argument("--chunk", type=int, default=5)
    p.add_argument("--rows", type=int, default=20)
    p.add_argument("--vae", action="store_true", help="profile the VAE decode instead")
    args = p.parse_args()
    device = torch.device("cuda")
    if args.vae:
        return profile_vae(device, args.rows)
    model = random_pipeline(args.size, device, torch.bfloat16).transformer
    cfg = model.config
    sizes = chunk_sizes(cfg.chunk_partition, sum(cfg.chunk_partition))
    finals = {i: torch.randn(1, 16, n, 60, 104, device=device) for i, n in enumerate(sizes)}
    text = model.encode_text(torch.randn(1, 512, cfg.text_dim, device=device, dtype=torch.bfloat16))
    layouts = [context_layout(sizes, k, cfg.full_chunk_limit) for k in range(len(sizes))]
    cache = KVCache.for_layouts(model, 1, 60, 104, layouts, chunk_tokens=3 * 1560)

    def refresh():
        cache.refresh(layouts[args.chunk - 1], finals.__getitem__, text)
        cache.refresh(layouts[args.chunk], finals.__getitem__, text)  # the incremental step being measured

    timed(refresh, f"refresh before chunk {args.chunk} (incl. the previous one's)", args.rows)
    t = torch.full((1,), 500.0, device=device)
    run = Run(finals[args.chunk], t, t * 0.5, sum(sizes[: args.chunk]))
    timed(lambda: model([run], text, past=cache.past()), f"denoising step, past {cache.length} tokens", args.rows)


if __name__ == "__main__":
    main()
