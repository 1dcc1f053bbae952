"""One-off (session 12), run once per code version in alternating processes (the old code from a git worktree):
the generator's small-op changes (the cross-attention's output GEMM accumulating into x with its bias added by the
next two kernels; the cache refresh's attention blocks written into one output instead of concatenated; the
per-layer modulation add without a separate upcast). Prints a cache refresh of chunk 5 and a denoising step of
chunk 5 replayed from their CUDA graphs, and the 1.3B stream latents only and end to end at 4 and 1 steps; saves
the 4-step final latents for comparing the versions. `generator_small_ops_ab_session12.txt` is the new code with all
three changes; the first was then reverted, and `generator_attention_out_ab_session12.txt` (--graphs-only) is the
code with the other two, as committed.

    python benchmarks/results/generator_small_ops_ab_session12.py LABEL     # on the GPU machine, from a checkout
    python benchmarks/results/generator_small_ops_ab_session12.py LABEL --graphs-only    # no streams
    python benchmarks/results/generator_small_ops_ab_session12.py --compare A B
"""

import os
import sys
import time

import torch


def graph_ms(fn, reps: int = 10) -> float:
    fn()
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def stream(pipe, prompt, steps, decode: bool) -> float:
    frames, h, w = pipe.latent_size(480, 832, 81)
    torch.cuda.synchronize()
    t = time.perf_counter()
    if decode:
        for _ in pipe.stream(prompt, height=480, width=832, num_frames=81, steps=steps, seed=0):
            pass
    else:
        for _ in pipe.generator.stream(prompt, height=h, width=w, num_frames=frames, steps=steps, seed=0):
            pass
        torch.cuda.synchronize()
    return time.perf_counter() - t


@torch.no_grad()
def run(label: str, streams: bool = True) -> None:
    sys.path.insert(0, os.getcwd())
    from benchmarks.profile_step import chunk_case
    from streamgen.bench import random_pipeline

    device = torch.device("cuda")
    pipe = random_pipeline("1.3B", device, torch.bfloat16)
    model = pipe.transformer
    case = chunk_case(model, device)
    cache, layouts, finals, text = case.cache, case.layouts, case.finals, case.text
    cache.refresh(layouts[4], finals.__getitem__, text)

    def refresh():  # ChunkCase.refresh(5), written out: the script also runs the older checkouts, which lack it
        cache.entries = list(layouts[4])
        cache.refresh(layouts[5], finals.__getitem__, text)

    refresh_ms = [graph_ms(refresh) for _ in range(3)]
    run5 = case.denoise_run(5)
    step_ms = [graph_ms(lambda: model([run5], text, past=cache.past())) for _ in range(3)]
    cache.release()
    print(f"{label}: refresh of chunk 5 " + " / ".join(f"{m:.2f}" for m in refresh_ms) + " ms; denoising step "
          + " / ".join(f"{m:.2f}" for m in step_ms) + " ms", flush=True)
    seeded = torch.Generator(device).manual_seed(1)
    prompt = torch.randn(1, 512, 4096, device=device, dtype=torch.bfloat16, generator=seeded)
    frames, h, w = pipe.latent_size(480, 832, 81)
    latents = pipe.generator.generate(prompt, height=h, width=w, num_frames=frames, steps=4, seed=0)
    torch.save(latents.cpu(), os.path.join(os.environ.get("OUT", "."), f"latents_{label}.pt"))
    for steps in (4, 1) if streams else ():
        stream(pipe, prompt, steps, True)  # graphs captured
        lat = [stream(pipe, prompt, steps, False) for _ in range(3)]
        e2e = [stream(pipe, prompt, steps, True) for _ in range(3)]
        print(f"{label}: {steps} steps latents " + " / ".join(f"{s:.3f}" for s in lat) + " s, end to end "
              + " / ".join(f"{s:.3f}" for s in e2e) + " s", flush=True)


def compare(a: str, b: str) -> None:
    out = os.environ.get("OUT", ".")
    x, y = (torch.load(os.path.join(out, f"latents_{n}.pt")).double() for n in (a, b))
    print(f"final latents (4 steps) {a} vs {b}: rel L2 {((x - y).norm() / y.norm()).item():.2e}")


if __name__ == "__main__":
    if sys.argv[1] == "--compare":
        compare(sys.argv[2], sys.argv[3])
    else:
        run(sys.argv[1], streams="--graphs-only" not in sys.argv)
