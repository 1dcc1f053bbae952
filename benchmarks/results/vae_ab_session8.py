"""Shared by this session's VAE measurements (`vae_triton_conv_ab_session8.py`, `vae_profile_ab_session8.py`,
`conv3d_launch_overhead_session8.py`): timing one streaming decode, and a copy of a VAE in session 7's code (its
modules put in `abtmp_session8/` for the run, as `vae_triton_conv_ab_session8.py` describes)."""

import time

import torch


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


def session7_copy(vae):
    """The same VAE (config and weights, bf16, channels-last, on vae's device) in session 7's code."""
    from abtmp_session8 import old_vae

    old = old_vae.WanVAE(vae.config).eval().to(device=vae.device, dtype=torch.bfloat16)
    old.load_state_dict(vae.state_dict())
    return old.to_channels_last()
