"""Flash-attention forward for streaming chunks, in the engine's (B, L, H, d) layout, with per-query key prefixes.

Every mask the engine needs is a key PREFIX per query: a denoising chunk sees all keys (cache + own tokens), and
the chunk-causal cache refresh lets a token see the keys of its own and earlier chunks, which (runs being
ordered by chunk) is ``keys[0 : kv_limit[i])``. So the mask is one int32 per query instead of an (Lq, Lk) tensor.

One program owns BLOCK_M queries of one (batch, head). It walks K/V tiles in two stages: tiles below the
smallest limit of its queries (and inside Lk) need no mask; tiles up to the largest limit are masked; tiles past
it are skipped. Softmax is online (running max and sum, exp2 with the scale folded in), accumulation in fp32.
Rows whose limit is 0 see no key and get 0 (not NaN).

`extend_attention` runs the same tile loop from results over other keys (normalised output + log-sum-exp, as cuDNN
returns them; up to four are merged first): the engine's default on the H100 gives cuDNN the keys up to a multiple
of 128 (of a cached context and of a chunk's own tokens, which it keeps apart; each as two halves in one batched call
where that fills the GPU's last wave better, `key_splits`) and folds the rest in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ._launch import INTERPRET, check_tensors, pow2

__all__ = ["attention_reference", "chunk_attention", "extend_attention", "key_splits"]

_LOG2E = 1.4426950408889634


@triton.jit
def _attn_tiles(
    acc, l_i, m_i, q, lim,
    k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
    start, stop, kv_end, head_dim, qk_scale,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    MASKED: tl.constexpr, HAS_LIMIT: tl.constexpr, EVEN_D: tl.constexpr, IEEE: tl.constexpr,
):
    """Fold K/V tiles [start, stop) into the running (acc, l_i, m_i). MASKED tiles load only keys < kv_end and
    mask scores by the per-query limits (or by kv_end when there are none)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    for start_n in range(start, stop, BLOCK_N):
        cols = start_n + offs_n
        k_ptrs = k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd
        v_ptrs = v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd
        if MASKED:
            kv_mask = cols[:, None] < kv_end
            if not EVEN_D:
                kv_mask = kv_mask & (offs_d[None, :] < head_dim)
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        elif EVEN_D:
            k = tl.load(k_ptrs)
        else:
            k = tl.load(k_ptrs, mask=offs_d[None, :] < head_dim, other=0.0)

        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * qk_scale  # log2 domain
        if MASKED:
            if HAS_LIMIT:
                s = tl.where(cols[None, :] < lim[:, None], s, float("-inf"))
            else:
                s = tl.where(cols[None, :] < kv_end, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet: keep p = 0, not NaN
        else:
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_use = m_new
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]

        if MASKED:
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        elif EVEN_D:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=offs_d[None, :] < head_dim, other=0.0)
        if IEEE:
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lim_ptr,
    H, Lq, Lk, head_dim, qk_scale,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ob, stride_om, stride_oh, stride_od,
    part_ptr, stat_ptr, span,
    LQ_KEY, LK_KEY,  # unused in the body: bucketed lengths for the autotuner key
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LIMIT: tl.constexpr, EVEN_D: tl.constexpr, IEEE: tl.constexpr, SPLITS: tl.constexpr,
):
    """Grid (B*H, cdiv(Lq, BLOCK_M), SPLITS); query tiles are taken last-first so the longest prefixes start
    earliest. With SPLITS > 1 (no limits) split s folds keys [s * span, (s + 1) * span) only and writes its
    unnormalised accumulator to part (SPLITS, B*H, Lq, BLOCK_D) and its (max, sum) to stat (SPLITS, 2, B*H, Lq), for
    `_attn_combine_kernel`."""
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    m_tile = tl.num_programs(1) - 1 - tl.program_id(1)

    rows = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < Lq
    q_mask = row_ok[:, None]
    if not EVEN_D:
        q_mask = q_mask & (offs_d[None, :] < head_dim)
    q_base = q_ptr + b * stride_qb + h * stride_qh
    q = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=q_mask, other=0.0)

    if HAS_LIMIT:
        lim = tl.load(lim_ptr + rows, mask=row_ok, other=0)
        lim = tl.minimum(tl.maximum(lim, 0), Lk)
        lo = tl.min(tl.where(row_ok, lim, Lk), axis=0)  # padding rows must not lower the unmasked stage
        hi = tl.max(lim, axis=0)
    else:
        lim = rows  # placeholder, unused
        lo = Lk
        hi = Lk
    lo = (lo // BLOCK_N) * BLOCK_N  # whole tiles every query of this tile sees
    start = 0
    if SPLITS > 1:  # no limits here: this split's keys, whole tiles, the last split also the partial tail tile
        start = tl.program_id(2) * span
        stop = tl.minimum(start + span, Lk)
        lo = tl.maximum(tl.minimum(stop, lo), start)
        hi = tl.maximum(stop, lo)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    acc, l_i, m_i = _attn_tiles(
        acc, l_i, m_i, q, lim, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        start, lo, Lk, head_dim, qk_scale,
        BLOCK_N, BLOCK_D, False, HAS_LIMIT, EVEN_D, IEEE,
    )
    # masked stage: loads stop at hi (not Lk), so keys past every limit of this tile are never read
    acc, l_i, m_i = _attn_tiles(
        acc, l_i, m_i, q, lim, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        lo, hi, hi, head_dim, qk_scale,
        BLOCK_N, BLOCK_D, True, HAS_LIMIT, EVEN_D, IEEE,
    )

    if SPLITS > 1:
        split = tl.program_id(2).to(tl.int64)
        base = (split * tl.num_programs(0) + bh) * Lq
        tl.store(part_ptr + (base + rows[:, None]) * BLOCK_D + offs_d[None, :], acc, mask=row_ok[:, None])
        stat = stat_ptr + (split * 2 * tl.num_programs(0) + bh) * Lq + rows
        tl.store(stat, m_i, mask=row_ok)
        tl.store(stat + tl.num_programs(0) * Lq, l_i, mask=row_ok)
    else:
        _store_normalized(o_ptr, acc, l_i, b, h, rows, offs_d, stride_ob, stride_om, stride_oh, stride_od, q_mask)


@triton.jit
def _store_normalized(o_ptr, acc, l_i, b, h, rows, offs_d, stride_ob, stride_om, stride_oh, stride_od, mask):
    """acc / l_i (0 for rows that saw no key) into o[b, rows, h, :] in o's dtype."""
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(o_ptr + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _attn_combine_kernel(
    part_ptr, stat_ptr, o_ptr, H, Lq, head_dim,
    stride_ob, stride_om, stride_oh, stride_od,
    SPLITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (B*H, cdiv(Lq, BLOCK_M)): out = sum_s 2^(m_s - m) acc_s / sum_s 2^(m_s - m) l_s, m = max_s m_s."""
    bh = tl.program_id(0)
    BH = tl.num_programs(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < Lq
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for s in range(SPLITS):
        m = tl.maximum(m, tl.load(stat_ptr + (s * 2 * BH + bh) * Lq + rows, mask=row_ok, other=float("-inf")))
    m_use = tl.where(m == float("-inf"), 0.0, m)  # rows that saw no key: all weights 0
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    for s in range(SPLITS):
        stat = stat_ptr + (s * 2 * BH + bh) * Lq + rows
        w = tl.exp2(tl.load(stat, mask=row_ok, other=float("-inf")) - m_use)
        total += w * tl.load(stat + BH * Lq, mask=row_ok, other=0.0)
        part = tl.load(part_ptr + ((s * BH + bh) * Lq + rows[:, None]) * BLOCK_D + offs_d[None, :],
                       mask=row_ok[:, None], other=0.0)
        acc += w[:, None] * part
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    _store_normalized(o_ptr, acc, total, b, h, rows, offs_d, stride_ob, stride_om, stride_oh, stride_od,
                      row_ok[:, None] & (offs_d[None, :] < head_dim))


@triton.jit
def _merge_partial(acc, l_i, m_i, part_base, lse_base, rows, offs_d, stride_pm, stride_pd, stride_lm, mask, row_ok):
    """Merge a normalised attention result over other keys into the running (acc, l_i, m_i): with its rows'
    natural-log sum of exp scores lse, it is a running max of lse * log2(e) and a running sum of 1. Merged into the
    empty state (m_i = -inf) it becomes the state exactly."""
    part = tl.load(part_base + rows[:, None] * stride_pm + offs_d[None, :] * stride_pd, mask=mask, other=0.0)
    m_p = tl.load(lse_base + rows * stride_lm, mask=row_ok, other=0.0).to(tl.float32) * 1.4426950408889634
    m_new = tl.maximum(m_i, m_p)
    alpha, beta = tl.exp2(m_i - m_new), tl.exp2(m_p - m_new)
    return acc * alpha[:, None] + part.to(tl.float32) * beta[:, None], l_i * alpha + beta, m_new


@triton.jit
def _attn_extend_kernel(
    q_ptr, k1_ptr, v1_ptr, k2_ptr, v2_ptr, o_ptr, p1_ptr, lse1_ptr, p2_ptr, lse2_ptr,
    H, Lq, L1, L2, head_dim, qk_scale,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_k1b, stride_k1n, stride_k1h, stride_k1d,
    stride_v1b, stride_v1n, stride_v1h, stride_v1d,
    stride_k2b, stride_k2n, stride_k2h, stride_k2d,
    stride_v2b, stride_v2n, stride_v2h, stride_v2d,
    stride_ob, stride_om, stride_oh, stride_od,
    stride_p1s, stride_p1b, stride_p1m, stride_p1h, stride_p1d,
    stride_p2s, stride_p2b, stride_p2m, stride_p2h, stride_p2d,
    stride_l1s, stride_l1b, stride_l1h, stride_l1m,
    stride_l2s, stride_l2b, stride_l2h, stride_l2m,
    S1: tl.constexpr, S2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, IEEE: tl.constexpr,
):
    """Grid (B*H, cdiv(Lq, BLOCK_M)): start the online softmax from partial attention results over other keys, S1
    stacked in the first partial tensor and S2 in the second (0-2 each), then fold in keys [0, L1) of the first
    segment and [0, L2) of the second."""
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < Lq
    mask = row_ok[:, None]
    if not EVEN_D:
        mask = mask & (offs_d[None, :] < head_dim)
    tile = rows[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + tile, mask=mask, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for s in tl.static_range(S1):
        acc, l_i, m_i = _merge_partial(
            acc, l_i, m_i, p1_ptr + s * stride_p1s + b * stride_p1b + h * stride_p1h,
            lse1_ptr + s * stride_l1s + b * stride_l1b + h * stride_l1h, rows, offs_d, stride_p1m, stride_p1d,
            stride_l1m, mask, row_ok,
        )
    for s in tl.static_range(S2):
        acc, l_i, m_i = _merge_partial(
            acc, l_i, m_i, p2_ptr + s * stride_p2s + b * stride_p2b + h * stride_p2h,
            lse2_ptr + s * stride_l2s + b * stride_l2b + h * stride_l2h, rows, offs_d, stride_p2m, stride_p2d,
            stride_l2m, mask, row_ok,
        )
    acc, l_i, m_i = _attn_tiles(
        acc, l_i, m_i, q, rows, k1_ptr + b * stride_k1b + h * stride_k1h, v1_ptr + b * stride_v1b + h * stride_v1h,
        stride_k1n, stride_k1d, stride_v1n, stride_v1d, 0, L1, L1, head_dim, qk_scale,
        BLOCK_N, BLOCK_D, True, False, EVEN_D, IEEE,
    )
    acc, l_i, m_i = _attn_tiles(
        acc, l_i, m_i, q, rows, k2_ptr + b * stride_k2b + h * stride_k2h, v2_ptr + b * stride_v2b + h * stride_v2h,
        stride_k2n, stride_k2d, stride_v2n, stride_v2d, 0, L2, L2, head_dim, qk_scale,
        BLOCK_N, BLOCK_D, True, False, EVEN_D, IEEE,
    )
    _store_normalized(o_ptr, acc, l_i, b, h, rows, offs_d, stride_ob, stride_om, stride_oh, stride_od, mask)


def _h100_configs() -> list[triton.Config]:
    """A small H100 search space (d <= 128, 16-bit inputs in mind); see :func:`_prune_configs`."""
    shapes = [
        (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 4, 3), (128, 64, 4, 4),
        (128, 64, 8, 4), (64, 128, 4, 3), (64, 64, 4, 3), (64, 64, 4, 4), (64, 128, 4, 2),
        (128, 128, 4, 2), (128, 32, 4, 4),
    ]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


def _prune_configs(configs, named_args, **kwargs):
    """Drop configs that clearly cannot fit in shared memory (fp32 inputs) and query tiles far longer than Lq.

    The estimate (stages - 1 K/V tiles in flight, plus Q) is a lower bound: a config that still overflows fails to
    compile with OutOfResources, which the autotuner records as infinitely slow rather than an error.
    """
    elem = named_args["q_ptr"].element_size()
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 128))
    lq = named_args["Lq"]
    kept = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        smem = (max(c.num_stages - 1, 1) * 2 * bn + bm) * block_d * elem
        if smem <= 227 * 1024 and (bm <= 64 or lq > 64):
            kept.append(c)
    return kept or configs[-1:]


# The interpreter runs one numpy op per tile op, so it gets one small fixed config (and no benchmarking).
_INTERPRET_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]

_attn_fwd_tuned = triton.autotune(
    configs=_INTERPRET_CONFIGS if INTERPRET else _h100_configs(),
    key=["LQ_KEY", "LK_KEY", "BLOCK_D", "HAS_LIMIT", "IEEE", "SPLITS"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_attn_fwd_kernel)


def chunk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_limit: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """Softmax attention of q (B, Lq, H, d) over k, v (B, Lk, H, d); returns (B, Lq, H, d) in q.dtype.

    Any strides (views into a fused qkv output or a KV cache are read in place). Dtypes bf16/fp16/fp32, d <= 128
    (padded to a power of two >= 16 inside the kernel). ``kv_limit``: int32 (Lq,), query i attends keys
    [0, kv_limit[i]) (values clamped to [0, Lk]; 0 gives a zero row; keys at or past the largest limit are never
    read, so they may be unwritten cache slots); None: all keys. ``scale`` defaults to
    1/sqrt(d). fp32 inputs use IEEE fp32 products (exact reference checks), 16-bit inputs the tensor cores.
    ``block_m``/``block_n`` bypass the autotuner (tests, experiments). ``splits`` (without ``kv_limit``): fold the
    keys in that many ranges in parallel and merge them in a second small kernel; default: 2 where that fills the
    GPU's last wave of programs better (`key_splits`), else 1.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be (B, L, H, d)")
    B, Lq, H, d = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2:] != (H, d):
        raise ValueError(f"k and v must be (B, Lk, H, d) matching q {tuple(q.shape)}, got {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"q, k, v must share one dtype among fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    if d > 128:
        raise ValueError(f"head dim up to 128 is supported, got {d}")
    Lk = k.shape[1]
    if kv_limit is not None:
        if kv_limit.shape != (Lq,):
            raise ValueError(f"kv_limit must be ({Lq},), got {tuple(kv_limit.shape)}")
        if kv_limit.dtype != torch.int32:
            kv_limit = kv_limit.to(torch.int32)
        kv_limit = kv_limit.contiguous()
    check_tensors(q, k, v, kv_limit)
    out = torch.empty((B, Lq, H, d), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if Lk == 0:
        return out.zero_()

    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    block_d = max(16, pow2(d))
    if splits is None:
        splits = 1 if kv_limit is not None else key_splits(B * H * triton.cdiv(Lq, 128), Lk, q.device)
    if splits < 1 or (splits > 1 and kv_limit is not None):
        raise ValueError(f"splits must be >= 1, and 1 with kv_limit, got {splits}")
    span = triton.cdiv(triton.cdiv(Lk, splits), 128) * 128  # a whole number of tiles for every BLOCK_N
    part = stat = out
    if splits > 1:
        part = torch.empty((splits, B * H, Lq, block_d), dtype=torch.float32, device=q.device)
        stat = torch.empty((splits, 2, B * H, Lq), dtype=torch.float32, device=q.device)
    args = (
        q, k, v, out, kv_limit if kv_limit is not None else q,
        H, Lq, Lk, d, scale * _LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        part, stat, span,
        pow2(Lq), pow2(Lk),
    )
    flags = dict(BLOCK_D=block_d, HAS_LIMIT=kv_limit is not None, EVEN_D=block_d == d, IEEE=q.dtype == torch.float32,
                 SPLITS=splits)
    if block_m is not None or block_n is not None:
        bm, bn = block_m or 64, block_n or 64
        _attn_fwd_kernel[(B * H, triton.cdiv(Lq, bm), splits)](
            *args, BLOCK_M=bm, BLOCK_N=bn, **flags, num_warps=4 if bm <= 64 else 8, num_stages=2
        )
    else:
        def grid(meta):
            return (B * H, triton.cdiv(Lq, meta["BLOCK_M"]), splits)

        _attn_fwd_tuned[grid](*args, **flags)
    if splits > 1:
        _attn_combine_kernel[(B * H, triton.cdiv(Lq, 64))](
            part, stat, out, H, Lq, d, *out.stride(), SPLITS=splits, BLOCK_M=64, BLOCK_D=block_d, num_warps=4
        )
    return out


def extend_attention(q: torch.Tensor, keys: Sequence[tuple[torch.Tensor, torch.Tensor]],
                     partials: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
                     scale: float | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of q (B, Lq, H, d) over the union of some key sets, given `partials`: up to two results over some
    of them, each a (prev (B, Lq, H, d), lse (B, H, Lq)) pair, its output and the natural-log sum of exp(scaled
    scores) (what cuDNN and FlashAttention-style kernels return), or a stack of two such results over different
    keys ((2, B, Lq, H, d), (2, B, H, Lq): a batched call over two halves of the keys), and `keys`: up to two
    further (k, v) segments (B, Lk, H, d), folded in here one tile at a time. For a few trailing keys: cuDNN
    attention is 8-9% faster over a key count that is a multiple of 128 (H100), so the engine gives it those
    prefixes (of the cached context and of the chunk's own tokens, kept apart) and folds the rest in here. Returns
    (B, Lq, H, d) in q.dtype, written into `out` if given (a slice of a larger output). Any strides. One pipeline
    stage: the engine's segments are one or two tiles, so more stages only took shared memory (H100, 1.3B shapes: 80
    -> 55 us for a denoising chunk, 113 -> 72 us for a refresh, same output;
    benchmarks/results/extend_configs_session7.txt)."""
    B, Lq, H, d = q.shape
    if not 1 <= len(keys) <= 2 or len(partials) > 2:
        raise ValueError(f"one or two key segments and at most two partial results, got {len(keys)}, "
                         f"{len(partials)}")
    for k, v in keys:
        if k.shape != v.shape or k.shape[0] != B or k.shape[2:] != (H, d):
            raise ValueError(f"k, v must be (B, Lk, H, d) matching q {tuple(q.shape)}, got k {tuple(k.shape)}, "
                             f"v {tuple(v.shape)}")
    stacks = []
    for prev, lse in partials:
        prev, lse = (prev, lse) if prev.dim() == 5 else (prev.unsqueeze(0), lse.unsqueeze(0))
        if prev.shape[1:] != q.shape or not 1 <= prev.shape[0] <= 2:
            raise ValueError(f"a partial result must be {tuple(q.shape)} or a stack of at most two, got "
                             f"{tuple(prev.shape)}")
        if lse.shape != (prev.shape[0], B, H, Lq):
            raise ValueError(f"lse must be ({B}, {H}, {Lq}), stacked like its result, got {tuple(lse.shape)}")
        stacks.append((prev, lse))
    if d > 128:
        raise ValueError(f"head dim up to 128 is supported, got {d}")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype):
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype}, got {tuple(out.shape)} {out.dtype}")
    check_tensors(q, out, *(t for pair in (*keys, *stacks) for t in pair))
    out = torch.empty((B, Lq, H, d), dtype=q.dtype, device=q.device) if out is None else out
    if out.numel() == 0:
        return out
    (k1, v1), (k2, v2) = keys[0], keys[-1]
    L2 = k2.shape[1] if len(keys) == 2 else 0
    counts = [p.shape[0] for p, _ in stacks] + [0] * (2 - len(stacks))
    unused = (q.unsqueeze(0), q[:, 0].unsqueeze(0))  # pointers and strides for an absent partial: never read
    (p1, lse1), (p2, lse2) = (stacks + [unused, unused])[:2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    block_d = max(16, pow2(d))
    block_m, block_n = (32, 32) if INTERPRET else (64, 128)
    _attn_extend_kernel[(B * H, triton.cdiv(Lq, block_m))](
        q, k1, v1, k2, v2, out, p1, lse1, p2, lse2, H, Lq, k1.shape[1], L2, d, scale * _LOG2E,
        *q.stride(), *k1.stride(), *v1.stride(), *k2.stride(), *v2.stride(), *out.stride(), *p1.stride(),
        *p2.stride(), *lse1.stride(), *lse2.stride(),
        S1=counts[0], S2=counts[1], BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, EVEN_D=block_d == d,
        IEEE=q.dtype == torch.float32, num_warps=4, num_stages=1,
    )
    return out


def key_splits(programs: int, Lk: int, device: torch.device) -> int:
    """2 when splitting the keys in two fills the last wave of programs (one per SM at the H100's tile sizes) at
    least 10% better, with at least 8 tiles of 128 keys per split; else 1. At the 1.3B denoising shapes 444
    programs on 132 SMs fill 84% of their 4 waves, 888 fill 96% of 7. Holds for cuDNN's attention too (one
    program per 128 queries and head): over two halves of 12,032 keys as a batch of two, 589 -> 551 us
    (benchmarks/results/cudnn_batched_split_session7.txt)."""
    if device.type != "cuda" or Lk < 16 * 128:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count

    def fill(n: int) -> float:
        return n / (triton.cdiv(n, sms) * sms)

    return 2 if fill(2 * programs) > 1.1 * fill(programs) else 1


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_limit: torch.Tensor | None = None,
    scale: float | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Explicit softmax(q k^T * scale, prefix mask) v, out in q.dtype.

    Same semantics as :func:`chunk_attention`, including zero rows for ``kv_limit[i] == 0``. Math in the wider of
    q.dtype and ``compute_dtype``: fp64 inputs give the ground truth for tests; ``compute_dtype=q.dtype`` is plain
    torch in low precision, the yardstick for the kernel's tolerance.
    """
    cd = torch.promote_types(q.dtype, compute_dtype)
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    qh, kh, vh = (t.to(cd).transpose(1, 2) for t in (q, k, v))  # (B, H, L, d)
    s = (qh @ kh.transpose(-1, -2)) * scale
    Lk = k.shape[1]
    if kv_limit is not None:
        keep = torch.arange(Lk, device=q.device)[None, :] < kv_limit.to(q.device).long()[:, None]  # (Lq, Lk)
        s = s.masked_fill(~keep, float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # rows without keys: 0
    else:
        p = torch.softmax(s, dim=-1)
    out = p @ vh
    return out.transpose(1, 2).to(q.dtype)
