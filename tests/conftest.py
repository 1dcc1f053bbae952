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


@pytest.fixture
def cudnn_stand_in(monkeypatch) -> list[int]:
    """The `cudnn` attention backend with cuDNN stood in for by float64 torch (this machine has none): the key counts
    cuDNN is given, in call order."""
    from streamgen import attention as attn

    prefixes: list[int] = []

    def cudnn_with_lse(q, k, v):
        prefixes.append(k.shape[1])
        s = (q.double().transpose(1, 2) @ k.double().permute(0, 2, 3, 1)) / q.shape[-1] ** 0.5
        out = torch.softmax(s, -1) @ v.double().transpose(1, 2)
        return out.transpose(1, 2).to(q.dtype), torch.logsumexp(s, -1).float()

    monkeypatch.setattr(attn, "_cudnn_with_lse", cudnn_with_lse)
    monkeypatch.setattr(attn, "select_backend", lambda device_type, dtype: "cudnn")
    return prefixes
