"""One-off (session 15): two places where the host waited for the generator's CUDA stream once per chunk, each
leaving the GPU without queued work until the host caught up, against the code before:

- `engine.upload`: each chunk's noise copied from pinned memory without waiting, where torch's copy from pageable
  memory waited for the stream (the cache refresh just queued);
- `Pipeline.decode_chunk`: the chunk's NaN/Inf check read on the decode stream, where it was read on the
  generator's and so waited for the next chunk's queued work.

Variants, alternating in one process: "before" (both as they were), "pinned" (the upload only), "both". Printed: the
1.3B stream end to end (480x832, 81 frames) at 1 and 4 steps, latents-only streams at 1 step, and the GPU's idle
time during one end-to-end 1-step stream per variant (the union of both streams' kernels against the span from the
first kernel to the last) with the host's synchronizing calls.

    cd benchmarks/results && PYTHONPATH=CHECKOUT python host_waits_ab_session15.py     # on the GPU machine
"""

import time
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile
from vae_ab_session8 import alternate_streams

import streamgen.engine as engine
from streamgen.bench import random_pipeline
from streamgen.pipeline import NonFiniteError, Pipeline
from streamgen.vae import to_uint8_frames

VARIANTS = ("before", "pinned", "both")
PINNED, OWN_STREAM_CHECK = engine.upload, Pipeline.decode_chunk


def pageable(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x.to(device, torch.float32)


def check_on_generator_stream(self, decoder, chunk):
    self._decode_stream.wait_event(chunk.ready)
    with torch.cuda.stream(self._decode_stream):
        chunk.latents.record_stream(self._decode_stream)
        finite = torch.isfinite(chunk.latents).all()
        frames = to_uint8_frames(decoder.decode(chunk.latents))
    if not bool(finite):
        raise NonFiniteError(f"chunk {chunk.index}: the latents hold NaN or Inf")
    return frames


def use(variant: str) -> str:
    engine.upload = pageable if variant == "before" else PINNED
    Pipeline.decode_chunk = OWN_STREAM_CHECK if variant == "both" else check_on_generator_stream
    return variant


def idle(pipe, prompt, steps: int) -> str:
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in pipe.stream(prompt, height=480, width=832, num_frames=81, steps=steps, seed=0):
            pass
        torch.cuda.synchronize()
    kernels = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                     if e.device_type == torch.autograd.DeviceType.CUDA)
    busy, gaps, end = 0.0, [], kernels[0][0]
    for s, e in kernels:
        if s > end:
            gaps.append(s - end)
        busy += max(0.0, e - max(s, end))
        end = max(end, e)
    span = end - kernels[0][0]
    syncs = Counter(e.name for e in prof.events() if e.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize"))
    return (f"GPU span {span / 1e3:.1f} ms, busy {busy / 1e3:.1f} ms ({100 * busy / span:.1f}%), idle "
            f"{sum(gaps) / 1e3:.1f} ms in {len(gaps)} gaps (largest {max(gaps) / 1e3:.3f} ms), syncs {dict(syncs)}")


def main() -> None:
    device = torch.device("cuda")
    pipe = random_pipeline("1.3B", device, torch.bfloat16)
    prompt = torch.randn(1, 512, 4096, device=device, dtype=torch.bfloat16)
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    with torch.no_grad():
        frames = []
        for variant in ("before", *VARIANTS):  # "before" twice: how far two runs of the same code differ
            use(variant)
            frames.append((variant, pipe.generate(prompt, steps=4, seed=0).astype(int)))
        for variant, f in frames[1:]:
            base = frames[0][1]
            print(f"frames of {variant} against before's first: max |diff| {abs(f - base).max()}, values "
                  f"differing {(f != base).mean():.2e}", flush=True)
        f, h, w = pipe.latent_size(480, 832, 81)
        latents = [pipe.generator.generate(prompt, height=h, width=w, num_frames=f, steps=4, seed=0) for _ in "ab"]
        print("latents of two runs equal:", torch.equal(*latents), flush=True)
        sizes = [c.latents.shape[2] for c in pipe.generator.stream(prompt, height=h, width=w, num_frames=f, steps=1,
                                                                      seed=0)]
        decoded = []
        for _ in "ab":
            decoder = pipe.vae.stream_decoder()
            decoded.append(torch.cat([decoder.decode(c) for c in latents[0].split(sizes, dim=2)], dim=2))
        print("streaming decodes of the same latents equal:", torch.equal(*decoded), flush=True)
        alternate_streams(pipe, prompt, VARIANTS, use, budgets=(1, 4), reps=4)
        for rep in range(3):
            for variant in VARIANTS[:2]:
                use(variant)
                torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in pipe.generator.stream(prompt, height=h, width=w, num_frames=f, steps=1, seed=0):
                    pass
                torch.cuda.synchronize()
                print(f"latents only, 1 step rep {rep} {variant}: {time.perf_counter() - t:.3f} s", flush=True)
        for variant in VARIANTS:
            use(variant)
            print(f"1 step end to end, {variant}: {idle(pipe, prompt, 1)}", flush=True)


if __name__ == "__main__":
    main()
