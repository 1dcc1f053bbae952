"""Triton kernels for the streamgen engine, each next to its plain-torch reference (``*_reference``).

On a machine without a GPU, set ``TRITON_INTERPRET=1`` before triton is first imported to run them on the CPU.
"""

from .attention import attention_reference, chunk_attention, extend_attention, key_splits
from .modulate import gated_residual, gated_residual_reference, layernorm_modulate, layernorm_modulate_reference
from .qk_norm_rope import rms_norm_rope, rms_norm_rope_reference, rope, rope_reference

__all__ = [
    "attention_reference",
    "chunk_attention",
    "extend_attention",
    "gated_residual",
    "gated_residual_reference",
    "key_splits",
    "layernorm_modulate",
    "layernorm_modulate_reference",
    "rms_norm_rope",
    "rms_norm_rope_reference",
    "rope",
    "rope_reference",
]
