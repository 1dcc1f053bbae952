"""The one dispatch point for attention. Tensors stay in the engine's (batch, tokens, heads, head_dim) layout.

Masks here say which keys a query may see. Every mask the sampler needs is a per-query prefix of the keys (a chunk
sees its whole context; the cache refresh is chunk-causal, and runs are ordered by chunk), so `Mask` keeps such a
mask as blocks of queries with the key prefix they see: each block is one unmasked attention call over a view,
which the fastest kernels serve. Other masks (training's teacher forcing) stay dense.

Backends, for 16-bit CUDA tensors: flash-attn when it is installed, else `STREAMGEN_ATTENTION` (`triton`: the
kernel in `kernels/attention.py`; `sdpa`: torch's scaled_dot_product_attention; `cudnn`: SDPA's cuDNN kernel over the
keys up to a multiple of 128, the rest folded in by `kernels.extend_attention`), else the measured default below.
Everything else (CPU, fp32, dense masks) runs on SDPA.

A denoising chunk attends over a cached context and its own tokens, which `attention` takes apart (`context`): the
KV cache then holds the context only.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger("streamgen")

BACKENDS = ("flash", "triton", "cudnn", "sdpa")


@functools.cache  # asked on every CUDA forward
def cuda_default() -> str:
    """`cudnn` on Hopper GPUs (measured fastest on the H100: benchmarks/RESULTS.md) where torch's cuDNN attention op
    answers a small call, else `sdpa`."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        return "sdpa"
    try:  # a private op: absent, renamed or refused (no cuDNN) means SDPA
        x = torch.zeros(1, 128, 1, 64, device="cuda", dtype=torch.bfloat16)
        _cudnn_with_lse(x, x, x)
    except (AttributeError, RuntimeError, TypeError, ValueError):
        return "sdpa"
    return "cudnn"


@functools.cache  # every CUDA forward asks (to key its graph): a failing import would search sys.path each time
def _flash_attn_func():
    try:
        return importlib.import_module("flash_attn").flash_attn_func
    except (ImportError, AttributeError):
        return None


def select_backend(device_type: str, dtype: torch.dtype) -> str:
    """The backend attention uses for tensors of this device type and dtype."""
    if device_type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return "sdpa"
    choice = os.environ.get("STREAMGEN_ATTENTION")
    if choice is not None and choice not in BACKENDS:
        raise ValueError(f"STREAMGEN_ATTENTION must be one of {', '.join(BACKENDS)}, got {choice!r}")
    if choice == "flash" or (choice is None and _flash_attn_func() is not None):
        if _flash_attn_func() is None:
            raise ImportError("STREAMGEN_ATTENTION=flash, but flash_attn is not importable: "
                              "pip install 'streamgen[flash]'")
        return "flash"
    return choice or cuda_default()


@dataclass(frozen=True)
class Mask:
    prefix_blocks: list[tuple[int, int, int]] | None  # (query start, query end, keys seen) when every row is a prefix
    dense: Tensor | None  # (Lq, Lk) bool, True where the query may attend the key, otherwise

    @staticmethod
    def from_runs(visible: Tensor, q_lens: list[int], k_lens: list[int], device=None) -> Mask:
        """A run-level visibility matrix (Rq, Rk) over runs of the given token counts.

        Prefix masks never touch the device (so they can be built inside a CUDA-graph capture); a dense mask is
        built on `device` (default: visible's).
        """
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
        dev = device or visible.device
        dense = visible.to(dev).repeat_interleave(torch.tensor(q_lens, device=dev), 0)
        return Mask(None, dense.repeat_interleave(torch.tensor(k_lens, device=dev), 1))


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def _cudnn_with_lse(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """cuDNN attention (B, L, H, d) and its natural-log sum of exp scores (B, H, Lq), through torch's (private) op."""
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, True)[:2]
    return out.transpose(1, 2), lse.squeeze(-1) if lse.dim() == 4 else lse


def _cudnn(q: Tensor, *sources: tuple[Tensor, Tensor], out: Tensor | None = None) -> Tensor:
    """Attention over the keys of one or two (k, v) sources (a cached context and a chunk's own tokens, held apart),
    written into `out` if given.

    cuDNN runs 8-9% faster over a key count that is a multiple of 128 (H100, 4680 queries: 0.90 ms over 17,536
    keys, 0.98 over 17,550), and the engine's contexts (390- and 1560-token frames) rarely are: cuDNN takes each
    source's longest such prefix, and one small kernel merges those results and folds in the last keys of each.
    Where one program per 128 queries and head leaves the GPU's last wave short (a denoising chunk of one stream:
    444 programs, 3.4 waves of 132 SMs), cuDNN takes the prefix as two halves in one batch of two, q repeated by
    stride 0 (H100: 589 -> 551 us over 12,032 keys, 237 -> 217 over 4,608;
    benchmarks/results/cudnn_batched_split_session7.txt)."""
    lengths = [k.shape[1] for k, _ in sources]
    if max(lengths) < 128 or (len(sources) == 1 and lengths[0] % 128 == 0):  # nothing to fold in: plain SDPA
        return _into(out, _sdpa(q, *_joined(sources)))
    from kernels import extend_attention, key_splits

    b, lq, h = q.shape[:3]
    partials, tails = [], []
    try:
        for (k, v), n in zip(sources, lengths):
            n -= n % 128
            if b == 1 and key_splits(h * -(-lq // 128), n, q.device) == 2:
                half = n // 256 * 128  # each half a multiple of 128; an odd 128 joins the tail
                n = 2 * half
                halves, lse = _cudnn_with_lse(q.expand(2, -1, -1, -1), k[0, :n].unflatten(0, (2, half)),
                                              v[0, :n].unflatten(0, (2, half)))
                partials.append((halves.unsqueeze(1), lse.unsqueeze(1)))
            elif n:
                partials.append(_cudnn_with_lse(q, k[:, :n], v[:, :n]))
            tails.append((k[:, n:], v[:, n:]))
    except RuntimeError as e:  # a shape cuDNN refuses (SDPA would have checked first): SDPA, said once
        if "cudnn refused" not in _announced:
            _announced.add("cudnn refused")
            log.warning("cuDNN attention refused q %s k %s (%s); using SDPA", tuple(q.shape), tuple(k.shape), e)
        return _into(out, _sdpa(q, *_joined(sources)))
    return extend_attention(q, tails, partials, out=out)


def _into(out: Tensor | None, result: Tensor) -> Tensor:
    """result, or result copied into out when the caller gave one."""
    return result if out is None else out.copy_(result)


def _joined(sources: tuple[tuple[Tensor, Tensor], ...]) -> tuple[Tensor, Tensor]:
    """One (k, v) over the sources' keys in order: a copy, unless there is one source."""
    if len(sources) == 1:
        return sources[0]
    return torch.cat([k for k, _ in sources], dim=1), torch.cat([v for _, v in sources], dim=1)


def _triton(q: Tensor, k: Tensor, v: Tensor, kv_limit: Tensor | None = None) -> Tensor:
    from kernels import chunk_attention

    return chunk_attention(q, k, v, kv_limit)


_KERNELS = {"sdpa": _sdpa, "triton": _triton, "cudnn": lambda q, k, v: _cudnn(q, (k, v)),
            "flash": lambda q, k, v: _flash_attn_func()(q, k, v)}
_announced: set[str] = set()


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Mask | None = None,
              context: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """softmax(q k^T / sqrt(d)) v over (B, L, H, d) tensors; `mask=None` means every query sees every key.

    `context`: (keys, values) that come before k and v (a KV cache's context, kept apart from a chunk's own tokens
    so the cache needs no room for them); `mask` then covers [context + k]. The cudnn backend reads the two in
    place; the others attend over their concatenation (a copy).
    """
    backend = select_backend(q.device.type, q.dtype)
    if context is not None:
        if mask is None and backend == "cudnn":
            return _cudnn(q, context, (k, v))
        k, v = _joined((context, (k, v)))
    if mask is not None and mask.dense is not None:
        return _sdpa(q, k, v, mask.dense)
    if backend not in _announced:
        _announced.add(backend)
        log.info("attention backend: %s", backend)
    kernel = _KERNELS[backend]
    if mask is None:
        return kernel(q, k, v)
    if backend == "triton":  # one launch: the blocks' key prefixes become per-query limits (fills, capturable)
        limits = torch.cat([torch.full((b - a,), end, dtype=torch.int32, device=q.device)
                            for a, b, end in mask.prefix_blocks])
        return _triton(q, k, v, limits)
    if backend == "cudnn":  # each block's result written into its rows (a cache refresh's blocks: no concatenation)
        out = torch.empty_like(q)
        for a, b, end in mask.prefix_blocks:
            _cudnn(q[:, a:b], (k[:, :end], v[:, :end]), out=out[:, a:b])
        return out
    return torch.cat([kernel(q[:, a:b], k[:, :end], v[:, :end]) for a, b, end in mask.prefix_blocks], dim=1)
