"""The one dispatch point for attention. Tensors stay in the engine's (batch, tokens, heads, head_dim) layout.

Masks in this engine are about which tokens a query may see. Every mask the sampler needs is a per-query prefix of
the keys (a chunk sees its whole context; the cache refresh is chunk-causal), so `Mask` carries that prefix length
when it exists: a kernel can then skip key tiles instead of reading a dense mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Mask:
    dense: Tensor  # (Lq, Lk) bool, True where the query may attend the key
    kv_limit: Tensor | None  # (Lq,) int32 when each row is a prefix: query i sees keys [0, kv_limit[i])

    @staticmethod
    def from_runs(visible: Tensor, q_lens: list[int], k_lens: list[int]) -> Mask:
        """Expand a run-level visibility matrix (Rq, Rk) to tokens."""
        dev = visible.device
        dense = visible.repeat_interleave(torch.tensor(q_lens, device=dev), 0)
        dense = dense.repeat_interleave(torch.tensor(k_lens, device=dev), 1)
        kv_limit = None
        rows = visible.cpu()
        last = rows.long().cumsum(1).argmax(1)  # index of the last visible run in each row
        is_prefix = all(bool(rows[i, : last[i] + 1].all()) and not bool(rows[i, last[i] + 1:].any())
                        for i in range(rows.shape[0]))
        if is_prefix:
            ends = torch.tensor(k_lens).cumsum(0)
            per_run = ends[last].to(torch.int32)
            kv_limit = per_run.repeat_interleave(torch.tensor(q_lens)).to(dev)
        return Mask(dense, kv_limit)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Mask | None = None) -> Tensor:
    """softmax(q k^T / sqrt(d)) v over (B, L, H, d) tensors; `mask=None` means every query sees every key."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=None if mask is None else mask.dense
    )
    return out.transpose(1, 2)
