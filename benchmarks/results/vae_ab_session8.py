"""Shared by the one-off VAE and stream measurements of sessions 8-10 (`vae_triton_conv_ab_session8.py`,
`vae_profile_ab_session8.py`, `conv3d_launch_overhead_session8.py`, `decode_pass_frames_ab_session8.py`, the
`*_session9.py` scripts, the stream A/Bs of session 10 and the decoder A/Bs of sessions 12-13): timing one streaming
decode (wall, host, or its GPU kernel time) or variants of it alternating, each variant's frames, timing one whole
stream or variants of it alternating, and a copy of a VAE in an earlier session's code (its modules put next to the
scripts for the run, as `vae_triton_conv_ab_session8.py` describes)."""

import time

import torch
from torch.profiler import ProfilerActivity, profile


def decode_seconds(vae, latents: torch.Tensor, sizes: list[int]) -> tuple[float, float]:
    """One streaming decode of `latents` in chunks of `sizes` latent frames: wall seconds (synchronized) and the host's
    seconds inside `decode` (launching the work)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    host = 0.0
    decoder = vae.stream_decoder()
    for chunk in latents.split(sizes, dim=2):
        t = time.perf_counter()
        frames = decoder.decode(chunk)
        host += time.perf_counter() - t
        del frames
    torch.cuda.synchronize()
    return time.perf_counter() - start, host


def kernel_seconds(vae, latents: torch.Tensor, sizes: list[int]) -> float:
    """The GPU kernel time of one streaming decode (torch.profiler: the sum of every op's device time), seconds."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        decode_seconds(vae, latents, sizes)
    return sum(e.self_device_time_total for e in prof.key_averages()) / 1e6


def variant_frames(vae, latents: torch.Tensor, sizes: list[int], variants, use) -> dict[str, torch.Tensor]:
    """Each variant's streaming decode of `latents` in chunks of `sizes` (float32 frames) by name, to compare them."""
    frames = {}
    for variant in variants:
        name = use(variant)
        decoder = vae.stream_decoder()
        frames[name] = torch.cat([decoder.decode(c) for c in latents.split(sizes, dim=2)], dim=2).float()
    return frames


def alternate_decodes(vae, latents: torch.Tensor, sizes: list[int], variants, use, reps: int = 3) -> None:
    """`reps` rounds of one streaming decode per variant, alternating (`use(variant)` switches to it and returns its
    name): prints each decode's wall, host and GPU kernel seconds."""
    for rep in range(reps):
        for variant in variants:
            name = use(variant)
            wall, host = decode_seconds(vae, latents, sizes)
            kernel = kernel_seconds(vae, latents, sizes)
            print(f"decode rep {rep} {name}: wall {wall:.3f} s, host {host:.3f} s, kernel time {kernel:.3f} s",
                  flush=True)


def stream_seconds(pipe, prompt: torch.Tensor, steps: int) -> tuple[float, float]:
    """One whole 1.3B stream end to end (480x832, 81 frames, seed 0) with `pipe` as it is set: wall seconds and the
    peak GiB allocated on the GPU during it."""
    device = pipe.vae.device
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    for _ in pipe.stream(prompt, height=480, width=832, num_frames=81, steps=steps, seed=0):
        pass
    return time.perf_counter() - t, torch.cuda.max_memory_allocated(device) / 2**30


def alternate_streams(pipe, prompt: torch.Tensor, variants, use, budgets=(4, 1), reps: int = 3) -> None:
    """Per step budget: one warm-up stream per variant (graphs captured, both paths warm), then `reps` rounds of one
    stream per variant, alternating (`use(variant)` switches and returns its name): prints end to end seconds and the
    peak GiB."""
    for steps in budgets:
        for variant in variants:
            use(variant)
            stream_seconds(pipe, prompt, steps)
        for rep in range(reps):
            for variant in variants:
                name = use(variant)
                e2e, peak = stream_seconds(pipe, prompt, steps)
                print(f"{steps} steps rep {rep} {name}: end to end {e2e:.3f} s, peak {peak:.2f} GiB", flush=True)


def code_copy(vae, old_vae):
    """The same VAE (config and weights, bf16, channels-last, on vae's device) as `old_vae` (an earlier session's
    `streamgen/vae.py`, imported as a module) builds it."""
    old = old_vae.WanVAE(vae.config).eval().to(device=vae.device, dtype=torch.bfloat16)
    old.load_state_dict(vae.state_dict())
    return old.to_channels_last()


def session7_copy(vae):
    """`code_copy` in session 7's code."""
    from abtmp_session8 import old_vae

    return code_copy(vae, old_vae)
