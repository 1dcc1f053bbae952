"""streamgen: causal streaming video generation with AnyFlow flow-map students."""

from __future__ import annotations

import os

import torch

from streamgen.config import TransformerConfig, preset
from streamgen.engine import Generator, LatentChunk
from streamgen.model import CausalWanTransformer, load_transformer, save_transformer
from streamgen.pipeline import FrameChunk, Pipeline
from streamgen.schedule import Schedule


def load(path: str | os.PathLike | None = None, dtype: torch.dtype | None = None,
         device: str | torch.device | None = None) -> Pipeline:
    """A pipeline from a model folder (diffusers layout), or the built-in default model when `path` is None."""
    return Pipeline.load(path, dtype, device)


__all__ = [
    "CausalWanTransformer",
    "FrameChunk",
    "Generator",
    "LatentChunk",
    "Pipeline",
    "Schedule",
    "TransformerConfig",
    "load",
    "load_transformer",
    "preset",
    "save_transformer",
]
