"""The model's fused-kernel path (used on CUDA) agrees with its torch path; here run through the Triton interpreter."""

import pytest
import torch

from streamgen import Generator
from streamgen import attention as attn
from streamgen import model as model_module


def test_fused_generation_matches_torch_path(tiny_model, prompt, monkeypatch):
    noise = torch.randn(1, 16, 5, 16, 16, generator=torch.Generator().manual_seed(0))
    gen = Generator(tiny_model)
    reference = gen.generate(prompt, noise=noise, steps=2)
    monkeypatch.setattr(model_module, "_fused", lambda x: not torch.is_grad_enabled())
    fused = gen.generate(prompt, noise=noise, steps=2)
    assert torch.allclose(fused, reference, atol=1e-4, rtol=1e-4), (fused - reference).abs().max()


def test_cudnn_backend_generation_matches_sdpa(tiny_model, prompt, cudnn_stand_in):
    """The default on Hopper: a denoising chunk attends over the cached context and its own tokens held apart (the
    cache has no room for them), cuDNN over each one's keys up to a multiple of 128 (stood in for by float64 torch:
    this machine has no cuDNN), the rest merged by kernels.extend_attention (Triton's interpreter). Same video as
    plain SDPA over the joined keys."""
    noise = torch.randn(1, 16, 8, 16, 16, generator=torch.Generator().manual_seed(1))
    gen = Generator(tiny_model)
    with pytest.MonkeyPatch.context() as plain:  # the reference: plain SDPA
        plain.setattr(attn, "select_backend", lambda device_type, dtype: "sdpa")
        reference = gen.generate(prompt, noise=noise, steps=2)
    ours = gen.generate(prompt, noise=noise, steps=2)
    # chunks of 2 frames are 128 tokens (16x16 latents, 2x2 patches); contexts of 304 tokens give cuDNN 256
    assert 128 in cudnn_stand_in and 256 in cudnn_stand_in
    assert torch.allclose(ours, reference, atol=1e-4, rtol=1e-4), (ours - reference).abs().max()
