"""Transformer configuration, read from a checkpoint's `transformer/config.json`.

Field names are the checkpoint's own. Keys this engine does not use (`_class_name`, `_diffusers_version`, ...) are
kept, so a config saved back is the config that was read.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Bounds far beyond any released model (Wan2.1 14B: 40 layers, 40 heads, dim 5120, ffn 13824). A damaged config.json
# (a float like 3.4e16 where a count belongs) must fail validation instead of building a model for hours.
Count = Annotated[int, Field(ge=1, le=256)]  # layers, heads, blocks, factors
Width = Annotated[int, Field(ge=1, le=1 << 18)]  # channels and feature sizes


class TransformerConfig(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    # Wan2.1 DiT
    num_layers: Count
    num_attention_heads: Count
    attention_head_dim: Width
    ffn_dim: Width
    in_channels: Width
    out_channels: Width
    text_dim: Width
    freq_dim: Width
    patch_size: tuple[Count, Count, Count]
    qk_norm: Literal["rms_norm_across_heads"] = "rms_norm_across_heads"
    cross_attn_norm: bool = True
    eps: float = 1e-6
    rope_max_seq_len: Width = 1024
    image_dim: None = None
    added_kv_proj_dim: None = None
    # FAR causal context and the AnyFlow two-time embedding
    compressed_patch_size: tuple[Count, Count, Count]
    full_chunk_limit: Count
    chunk_partition: Annotated[list[Count], Field(max_length=1 << 16)]
    gate_value: float
    deltatime_type: Literal["r", "t-r"]

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @model_validator(mode="after")
    def _consistent(self) -> TransformerConfig:
        if self.attention_head_dim % 2:
            raise ValueError(f"attention_head_dim must be even for rotary embeddings, got {self.attention_head_dim}")
        for p, c, axis in zip(self.patch_size, self.compressed_patch_size, "thw"):
            if c % p:
                raise ValueError(
                    f"compressed_patch_size {list(self.compressed_patch_size)} must be a multiple of patch_size "
                    f"{list(self.patch_size)} along {axis}"
                )
        if not self.chunk_partition:
            raise ValueError("chunk_partition must name at least one chunk")
        if not 0.0 <= self.gate_value <= 1.0:
            raise ValueError(f"gate_value must lie in [0, 1], got {self.gate_value}")
        return self

    def to_json_dict(self) -> dict:
        return self.model_dump(mode="json")


def preset(name: str) -> TransformerConfig:
    """Configs of the released students (for benchmarks and random-weight runs) and the tiny test model."""
    common = dict(
        in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, patch_size=(1, 2, 2),
        compressed_patch_size=(1, 4, 4), full_chunk_limit=3, chunk_partition=[1, 3, 3, 3, 3, 3, 3, 2],
        gate_value=0.25, deltatime_type="r", qk_norm="rms_norm_across_heads", cross_attn_norm=True, eps=1e-6,
        rope_max_seq_len=1024,
    )
    presets = {
        "1.3B": dict(num_layers=30, num_attention_heads=12, attention_head_dim=128, ffn_dim=8960),
        "14B": dict(num_layers=40, num_attention_heads=40, attention_head_dim=128, ffn_dim=13824),
        "tiny": dict(num_layers=2, num_attention_heads=2, attention_head_dim=32, ffn_dim=128, text_dim=32,
                     freq_dim=32, chunk_partition=[1, 2, 2, 2, 1]),
    }
    if name not in presets:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(presets)}")
    return TransformerConfig(**{**common, **presets[name]})
