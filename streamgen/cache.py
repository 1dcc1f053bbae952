"""The KV cache: preallocated per-layer buffers holding the context the next chunk attends to, and its refresh.

The context of chunk k (FAR): chunks older than the last `full_chunk_limit - 1` as compressed tokens, the last ones
at full resolution. Each entry's keys and values depend only on the entries before it (the refresh mask is
chunk-causal), so after a chunk is final the cache keeps the longest unchanged prefix of entries and recomputes only
the rest: the chunk that just turned compressed and the full window after it. The result is exactly what re-encoding
the whole prefix gives, at a cost that does not grow with the video.

Keys are stored rotated at their positions, so reading the context costs nothing extra at every step; positions
can still be re-indexed exactly later by rotating by the offset, since rotations compose.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from streamgen.model import CausalWanTransformer, Past, Run


@dataclass(frozen=True)
class Entry:
    """One chunk's tokens in the cache."""

    chunk: int
    first_frame: int
    frames: int
    compressed: bool


def context_layout(chunk_sizes: Sequence[int], num_final: int, full_chunk_limit: int) -> list[Entry]:
    """The entries chunk `num_final` attends to, given that chunks 0..num_final-1 are final."""
    starts = [sum(chunk_sizes[:i]) for i in range(num_final)]
    first_full = max(0, num_final - (full_chunk_limit - 1))
    return [Entry(i, starts[i], chunk_sizes[i], i < first_full) for i in range(num_final)]


def entry_grid(model: CausalWanTransformer, e: Entry, height: int, width: int) -> tuple[int, int, int]:
    return model.token_grid(torch.empty(1, 1, e.frames, height, width, device="meta"), e.compressed)


def entry_tokens(model: CausalWanTransformer, e: Entry, height: int, width: int) -> int:
    return math.prod(entry_grid(model, e, height, width))


class KVCache:
    def __init__(self, model: CausalWanTransformer, batch: int, height: int, width: int, capacity_tokens: int):
        """Buffers of `capacity_tokens` tokens per layer for a `height` x `width` latent video.

        Capacity covers the context plus the tokens of the chunk attending to it: a forward pass writes its own
        keys and values right after the context (see `Past`).
        """
        cfg = model.config
        self.model = model
        self.height, self.width = height, width
        shape = (cfg.num_layers, batch, capacity_tokens, cfg.num_attention_heads, cfg.attention_head_dim)
        self.keys = torch.zeros(shape, dtype=model.dtype, device=model.device)
        self.values = torch.zeros(shape, dtype=model.dtype, device=model.device)
        self.entries: list[Entry] = []
        self.length = 0

    @classmethod
    def for_layouts(cls, model: CausalWanTransformer, batch: int, height: int, width: int,
                    layouts: Iterable[list[Entry]], chunk_tokens: int) -> KVCache:
        """A cache just large enough for the largest of `layouts` plus a chunk of `chunk_tokens` attending to it."""
        need = max((sum(entry_tokens(model, e, height, width) for e in layout) for layout in layouts), default=0)
        return cls(model, batch, height, width, need + chunk_tokens)

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def tokens(self, entry: Entry) -> int:
        return entry_tokens(self.model, entry, self.height, self.width)

    def clear(self) -> None:
        self.entries, self.length = [], 0

    def past(self) -> Past:
        return Past(self.keys, self.values, self.length)

    @torch.no_grad()
    def refresh(self, layout: list[Entry], latents_of: Callable[[int], Tensor], text: list) -> int:
        """Make the cache hold `layout`, recomputing only the entries after the longest unchanged prefix.

        latents_of(chunk) gives a chunk's final latents (B, C, f, H, W). Returns the number of entries recomputed.
        """
        keep = 0
        while keep < min(len(layout), len(self.entries)) and layout[keep] == self.entries[keep]:
            keep += 1
        self.entries = self.entries[:keep]
        self.length = sum(self.tokens(e) for e in self.entries)
        todo = layout[keep:]
        if not todo:
            return 0
        batch = self.keys.shape[1]
        zero = torch.zeros(batch, device=self.model.device)
        runs = [Run(latents_of(e.chunk), zero, zero, e.first_frame, e.compressed) for e in todo]
        chunks = torch.tensor([e.chunk for e in todo])
        visible = chunks[None, :] <= chunks[:, None]  # chunk-causal among the recomputed entries
        self.model(runs, text, visible=visible, past=self.past(), want_velocity=False)  # writes K/V in place
        self.entries = list(layout)
        self.length += sum(self.tokens(e) for e in todo)
        return len(todo)
