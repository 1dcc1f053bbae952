"""Transformer configuration, read from a checkpoint's `transformer/config.json`.

Field names are the checkpoint's own. Keys this engine does not use (`_class_name`, `_diffusers_version`, ...) are
kept, so a config saved back is the config that was read.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, PositiveInt, model_validator


class TransformerConfig(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    # Wan2.1 DiT
    num_layers: PositiveInt
    num_attention_heads: PositiveInt
    attention_head_dim: PositiveInt
    ffn_dim: PositiveInt
    in_channels: PositiveInt
    out_channels: PositiveInt
    text_dim: PositiveInt
    freq_dim: PositiveInt
    patch_size: tuple[PositiveInt, PositiveInt, PositiveInt]
    qk_norm: Literal["rms_norm_across_heads"] = "rms_norm_across_heads"
    cross_attn_norm: bool = True
    eps: float = 1e-6
    rope_max_seq_len: PositiveInt = 1024
    image_dim: None = None
    added_kv_proj_dim: None = None
    # FAR causal context and the AnyFlow two-time embedding
    compressed_patch_size: tuple[PositiveInt, PositiveInt, PositiveInt]
    full_chunk_limit: PositiveInt
    chunk_partition: list[PositiveInt]
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
