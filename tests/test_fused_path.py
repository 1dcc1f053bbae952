"""The model's fused-kernel path (used on CUDA) agrees with its torch path; here run through the Triton interpreter."""

import torch

from streamgen import Generator
from streamgen import model as model_module


def test_fused_generation_matches_torch_path(tiny_model, prompt, monkeypatch):
    noise = torch.randn(1, 16, 5, 16, 16, generator=torch.Generator().manual_seed(0))
    gen = Generator(tiny_model)
    reference = gen.generate(prompt, noise=noise, steps=2)
    monkeypatch.setattr(model_module, "_fused", lambda x: not torch.is_grad_enabled())
    fused = gen.generate(prompt, noise=noise, steps=2)
    assert torch.allclose(fused, reference, atol=1e-4, rtol=1e-4), (fused - reference).abs().max()
