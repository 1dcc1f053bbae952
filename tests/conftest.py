import os

import torch

if not torch.cuda.is_available():  # Triton kernels run on the CPU through its interpreter (set before triton loads)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from hypothesis import settings

from streamgen import CausalWanTransformer, preset

# Property tests draw the same examples on every machine (as hypothesis does by itself when CI is set), so a
# failure seen in CI is a failure seen here.
settings.register_profile("deterministic", derandomize=True, database=None)
settings.load_profile("deterministic")


@pytest.fixture
def tiny_model() -> CausalWanTransformer:
    """The issue's tiny config: 2 layers, dim 64; random weights with non-trivial biases and norm gains."""
    torch.manual_seed(0)
    model = CausalWanTransformer(preset("tiny")).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture
def prompt() -> torch.Tensor:
    torch.manual_seed(1)
    embeds = torch.randn(1, 8, 32)
    embeds[:, 5:] = 0  # zero padding past the prompt, as the text encoder delivers it
    return embeds
