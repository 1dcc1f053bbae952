"""The one dispatch point for attention. Tensors stay in the engine's (batch, tokens, heads, head_dim) layout.

Masks here say which keys a query may see. Every mask the sampler needs is a per-query prefix of the keys (a chunk
sees its whole context; the cache refresh is chunk-causal, and runs are ordered by chunk), so `Mask` keeps such a
mask as blocks of queries with the key prefix they see: each block is one unmasked attention call over a view,
which the fastest kernels serve. Other masks (training's teacher forcing) stay dense.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Mask:
    prefix_blocks: list[tuple[int, int, int]] | None  # (query start, query end, keys seen) when every row is a prefix
    dense: Tensor | None  # (Lq, Lk) bool, True where the query may attend the key, otherwise

    @staticmethod
    def from_runs(visible: Tensor, q_lens: list[int], k_lens: list[int]) -> Mask:
        """A run-level visibility matrix (Rq, Rk) over runs of the given token counts."""
        rows = visible.cpu()
        k_ends = torch.tensor(k_lens).cumsum(0).tolist()
        blocks, start = [], 0
        for i, n in enumerate(q_lens):
            seen = int(rows[i].long().sum())
            if not bool(rows[i, :seen].all()):
                break
            blocks.append((start, start + n, k_ends[seen - 1] if seen else 0))
            start += n
        else:
            return Mask(blocks, None)
        dev = visible.device
        dense = visible.repeat_interleave(torch.tensor(q_lens, device=dev), 0)
        return Mask(None, dense.repeat_interleave(torch.tensor(k_lens, device=dev), 1))


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Mask | None = None) -> Tensor:
    """softmax(q k^T / sqrt(d)) v over (B, L, H, d) tensors; `mask=None` means every query sees every key."""
    if mask is None:
        return _sdpa(q, k, v)
    if mask.prefix_blocks is None:
        return _sdpa(q, k, v, mask.dense)
    return torch.cat([_sdpa(q[:, a:b], k[:, :end], v[:, :end]) for a, b, end in mask.prefix_blocks], dim=1)
