"""streamgen: causal streaming video generation with AnyFlow flow-map students."""

from streamgen.config import TransformerConfig, preset
from streamgen.engine import Generator, LatentChunk
from streamgen.model import CausalWanTransformer, load_transformer, save_transformer
from streamgen.schedule import Schedule

__all__ = [
    "CausalWanTransformer",
    "Generator",
    "LatentChunk",
    "Schedule",
    "TransformerConfig",
    "load_transformer",
    "preset",
    "save_transformer",
]
