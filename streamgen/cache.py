"""The KV cache: preallocated per-layer buffers holding the context the next chunk attends to, and its refresh.

The context of chunk k (FAR): chunks older than the last `full_chunk_limit - 1` as compressed tokens, the last ones
at full resolution. Each entry's keys and values depend only on the entries before it (the refresh mask is
chunk-causal), so after a chunk is final the cache keeps the longest unchanged prefix of entries and recomputes only
the rest: the chunk that just turned compressed and the full window after it. The result is exactly what re-encoding
the whole prefix gives, at a cost that does not grow with the video.

Keys are stored rotated at their positions, so reading the context costs nothing extra at every step; positions
can still be re-indexed exactly later by rotating by the offset, since rotations compose.

Endless streams (`window_layout`, `KVCache.reindex`): the context is bounded to the first chunk (the anchor) plus the
newest compressed chunks that fit in the trained position range, laid out at contiguous positions after the anchor.
When an old compressed entry leaves, the entries after it move down. Two policies:

- keep (default, constant cost): the moved entries' keys are rotated by their position offset and their keys and
  values are otherwise kept, computed under the context they had, which still held the entry that left
  (StreamingLLM-style). This is an APPROXIMATION of the FAR scheme on the new layout: exact only where an entry's
  whole context moved with it by the same offset (rotary attention depends on position differences only).
- recompute (exact): the cache is cut before the first entry that left or moved, and the refresh re-encodes the rest
  at the new positions. The cache then equals a from-scratch FAR encode of the new layout, at the price of
  re-encoding the (bounded) context after every eviction.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

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


def window_layout(
    chunk_size: Callable[[int], int], num_final: int, full_chunk_limit: int, max_frames: int, window: int | None,
    floor: int = 1,
) -> tuple[list[Entry], int]:
    """The bounded context of chunk `num_final` in an endless stream, and the new eviction floor.

    Entries: the anchor (chunk 0, compressed once it leaves the full window), the newest compressed chunks that fit,
    then the last `full_chunk_limit - 1` chunks at full resolution, at contiguous positions from 0, so that they and
    the chunk about to be generated span at most `max_frames` positions (the trained range). `window` caps the
    number of compressed chunks besides the anchor (None: as many as fit). `floor` is the oldest chunk that may
    still appear (earlier ones were evicted and never come back); pass the returned floor to the next call.
    Until something has to leave, this is `context_layout` exactly.
    """
    first_full = max(0, num_final - (full_chunk_limit - 1))
    full = list(range(first_full, num_final))
    anchor = [0] if first_full > 0 else []
    budget = max_frames - chunk_size(num_final) - sum(chunk_size(c) for c in anchor + full)
    if budget < 0:
        raise ValueError(
            f"max_frames={max_frames} positions cannot hold the anchor, the full window and chunk {num_final} "
            f"({max_frames - budget} frames)"
        )
    kept: list[int] = []
    used, limit = 0, math.inf if window is None else window
    for c in range(first_full - 1, max(1, floor) - 1, -1):
        if used + chunk_size(c) > budget or len(kept) >= limit:
            break
        kept.append(c)
        used += chunk_size(c)
    kept.reverse()
    layout, position = [], 0
    for c in anchor + kept + full:
        layout.append(Entry(c, position, chunk_size(c), c < first_full))
        position += chunk_size(c)
    return layout, (kept[0] if kept else max(first_full, 1))


def rotate_time(keys: Tensor, delta: int, model: CausalWanTransformer) -> None:
    """Move rotated keys (..., H, d) by `delta` frame positions, in place: only the time part of the head dim turns.

    Rotary phases multiply, so keys rotated at position p and then by delta are keys rotated at p + delta (also for
    compressed tokens, whose time phase is a renormalised mean over the frames they cover).
    """
    n = model.rope.dims[0]
    angles = delta * model.rope.freqs[0]  # float64, one per time pair
    cos, sin = angles.cos().float().to(keys.device), angles.sin().float().to(keys.device)
    part = keys[..., :n].float().unflatten(-1, (-1, 2))
    x0, x1 = part[..., 0], part[..., 1]
    keys[..., :n] = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).to(keys.dtype)


_live: weakref.WeakSet[KVCache] = weakref.WeakSet()


def live_caches() -> int:
    """KV caches holding their buffers now (not released, not garbage-collected): a leak check for servers."""
    return len(_live)


def entry_grid(model: CausalWanTransformer, e: Entry, height: int, width: int) -> tuple[int, int, int]:
    return model.token_grid(torch.empty(1, 1, e.frames, height, width, device="meta"), e.compressed)


def entry_tokens(model: CausalWanTransformer, e: Entry, height: int, width: int) -> int:
    return math.prod(entry_grid(model, e, height, width))


class BufferPool:
    """KV buffers handed back by finished streams, lent again to the next stream of the same shape.

    CUDA graphs read the cache in place, at the address they were captured with: a stream that gets the buffers of
    an earlier one of the same video size replays that stream's graphs instead of capturing new ones. At most
    `max_idle` idle buffers are kept per shape; `clear()` gives them all back to the allocator. Thread-safe.
    """

    def __init__(self, max_idle: int = 2):
        self.max_idle = max_idle
        self._idle: dict[tuple, list[Tensor]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _key(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> tuple:
        return tuple(shape), dtype, torch.device(device)

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """A buffer of that shape: an idle one (stale contents) or a new zeroed one."""
        with self._lock:
            idle = self._idle.get(self._key(shape, dtype, device))
            if idle:
                return idle.pop(0)  # first given, first taken: keys get the old keys buffer, values the values
        return torch.zeros(shape, dtype=dtype, device=device)

    def give(self, buffer: Tensor) -> None:
        with self._lock:
            idle = self._idle.setdefault(self._key(buffer.shape, buffer.dtype, buffer.device), [])
            if len(idle) < self.max_idle:
                idle.append(buffer)

    def idle(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._idle.values())

    def clear(self) -> None:
        with self._lock:
            self._idle.clear()


class KVCache:
    def __init__(self, model: CausalWanTransformer, batch: int, height: int, width: int, capacity_tokens: int,
                 pool: BufferPool | None = None):
        """Buffers of `capacity_tokens` tokens per layer for a `height` x `width` latent video.

        Capacity covers the context only: a denoising chunk's own keys and values stay out of the buffers (see
        `Past`). With a `pool` the buffers come from it and go back to it on `release`.
        """
        cfg = model.config
        self.model = model
        self.height, self.width = height, width
        self.pool = pool or BufferPool(max_idle=0)
        shape = (cfg.num_layers, batch, capacity_tokens, cfg.num_attention_heads, cfg.attention_head_dim)
        self.keys = self.pool.take(shape, model.dtype, model.device)
        self.values = self.pool.take(shape, model.dtype, model.device)
        self.entries: list[Entry] = []
        self.length = 0
        _live.add(self)

    @classmethod
    def for_layouts(cls, model: CausalWanTransformer, batch: int, height: int, width: int,
                    layouts: Iterable[list[Entry]], pool: BufferPool | None = None) -> KVCache:
        """A cache just large enough for the largest of these context layouts."""
        need = max((sum(entry_tokens(model, e, height, width) for e in layout) for layout in layouts), default=0)
        return cls(model, batch, height, width, need, pool)

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def tokens(self, entry: Entry) -> int:
        return entry_tokens(self.model, entry, self.height, self.width)

    def clear(self) -> None:
        self.entries, self.length = [], 0

    def release(self) -> None:
        """Give the buffers back now (a stream that ended or whose client left); the cache holds nothing after."""
        if self.keys.numel():
            self.pool.give(self.keys)
            self.pool.give(self.values)
        self.keys = self.values = torch.empty(0, dtype=self.keys.dtype, device=self.keys.device)
        self.clear()
        _live.discard(self)

    @torch.no_grad()
    def reindex(self, layout: list[Entry], recompute: bool = False) -> tuple[int, int]:
        """Before a refresh to `layout`: drop entries of chunks it no longer holds, move the others to its positions.

        keep (recompute=False): kept entries are compacted towards the front of the buffers and their keys rotated
        by their position offset; their values and keys are otherwise those computed under their old context (see
        the module docstring: an approximation once an earlier entry left). recompute=True: the cache is cut before
        the first entry that left or moved, so the refresh re-encodes the rest exactly. Entries whose kind changed
        (full -> compressed) are left for the refresh to find. Returns (entries dropped, entries moved).
        """
        target = {e.chunk: e for e in layout}
        kept: list[Entry] = []
        read = write = dropped = moved = 0
        for i, e in enumerate(self.entries):
            n = self.tokens(e)
            new = target.get(e.chunk)
            if recompute and (new is None or new.first_frame != e.first_frame):
                dropped = sum(1 for later in self.entries[i:] if later.chunk not in target)
                break
            if new is None:
                dropped += 1
            else:
                if read != write:  # overlapping move towards the front: copy through a temporary, layer by layer
                    for buf in (self.keys, self.values):
                        for layer in buf:
                            layer[:, write:write + n] = layer[:, read:read + n].clone()
                if new.first_frame != e.first_frame:
                    rotate_time(self.keys[:, :, write:write + n], new.first_frame - e.first_frame, self.model)
                    moved += 1
                    e = replace(e, first_frame=new.first_frame)
                kept.append(e)
                write += n
            read += n
        self.entries, self.length = kept, write
        return dropped, moved

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
        past = Past(self.keys, self.values, self.length, store=True)
        self.model(runs, text, visible=visible, past=past, want_velocity=False)  # writes K/V in place
        self.entries = list(layout)
        self.length += sum(self.tokens(e) for e in todo)
        return len(todo)
