"""Triton kernels against their plain-torch references, across shapes, dtypes, strides and masks.

Without a GPU the kernels run in Triton's interpreter (numpy on the CPU; `kernel_support`, imported first, sets it
up).

Tolerances: fp32 is checked tightly (1e-5). 16-bit outputs of the memory-bound kernels do fp32 math and round once,
so they must lie within one ulp of the fp64 truth (the interpreter truncates fp32 -> bf16 instead of rounding: still
within one ulp). For attention, FlashAttention-style: the kernel's max error against fp64 must stay within twice
the error of the same computation done by plain torch in the low precision. bf16 attention runs on GPU only (the
interpreter computes bf16 `tl.dot` wrongly).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from kernel_support import DEVICE, INTERPRET, f64, padded_frames, rand

from kernels import conv3d
from kernels.attention import attention_reference, chunk_attention, extend_attention
from kernels.conv3d import causal_conv3d, fuses_norm, padded_conv3d, padded_conv3d_reference
from kernels.modulate import (
    gated_residual,
    gated_residual_reference,
    layernorm_modulate,
    layernorm_modulate_reference,
)
from kernels.qk_norm_rope import rms_norm_rope, rms_norm_rope_reference, rope, rope_reference
from kernels.vae_ops import (
    channel_rms_norm,
    channel_rms_norm_reference,
    scaled_softmax,
    scaled_softmax_reference,
)

LOW = [torch.float16, torch.bfloat16]
ALL = [torch.float32, *LOW]
ATTN_DTYPES = [torch.float32, torch.float16] + ([] if INTERPRET else [torch.bfloat16])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def check_ulp(out: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype) -> None:
    """fp32: |out - ref| <= 1e-5 (abs + rel); 16-bit: within one ulp of the fp64 truth (+ 1e-5 near zero)."""
    assert out.dtype == dtype
    eps = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
    err = (out.double() - ref64).abs()
    tol = 1e-5 + eps * ref64.abs()
    assert torch.isfinite(out).all()
    assert (err <= tol).all(), f"{dtype}: max err {err.max().item():.3g}, worst excess {(err - tol).max().item():.3g}"


# ----------------------------------------------------------------------------------------- layernorm_modulate


@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("shape", [(1, 1, 64), (2, 37, 192), (1, 3, 1536), (2, 4, 100)])
def test_layernorm_modulate(shape, dtype):
    B, L, D = shape
    x = rand(B, L, D, dtype=dtype, scale=3.0) + 0.5
    shift, scale = rand(B, D), rand(B, D, scale=0.5)
    out = layernorm_modulate(x, shift, scale, 1e-6)
    check_ulp(out, layernorm_modulate_reference(*f64(x, shift, scale), 1e-6), dtype)


def test_layernorm_modulate_strided_broadcast_offset():
    """Non-contiguous x, (B, 1, D) / (D,) modulation, and a large mean (two-pass variance stays accurate)."""
    B, L, D = 2, 9, 96
    base = rand(B, D, 2 * L) + 100.0
    x = base.transpose(1, 2)[:, ::2]  # (B, L, D), strides (2LD, 2, 2L)
    shift, scale = rand(B, 1, D), rand(D)
    out = layernorm_modulate(x, shift, scale, 1e-6)
    # a plain fp32 mean of values near 100 is off by ~D ulps (3e-5 at the output for eager torch here); the
    # kernel's corrected two-pass mean keeps it within the 1e-5 fp32 bound
    check_ulp(out, layernorm_modulate_reference(*f64(x, shift, scale), 1e-6), torch.float32)


def test_layernorm_modulate_into_slices_of_one_output():
    """Segments with their own modulation write their slices of one (B, L, D) output: no concatenation; the rows
    outside a slice are untouched; a wrong out is an error."""
    x = rand(2, 10, 64)
    mods = [(rand(2, 64), rand(2, 64, scale=0.5)) for _ in range(2)]
    out = torch.full_like(x, float("nan"))
    for (a, b), (shift, scale) in zip([(0, 3), (3, 10)], mods):
        got = layernorm_modulate(x[:, a:b], shift, scale, 1e-6, out=out[:, a:b])
        assert got.data_ptr() == out[:, a:b].data_ptr()
        check_ulp(out[:, a:b], layernorm_modulate_reference(*f64(x[:, a:b], shift, scale), 1e-6), torch.float32)
    with pytest.raises(ValueError, match="out must be"):
        layernorm_modulate(x, *mods[0], 1e-6, out=out[:, :3])
    with pytest.raises(ValueError, match="out must be"):
        layernorm_modulate(x, *mods[0], 1e-6, out=out.double())


def test_layernorm_modulate_reference_matches_torch():
    x, shift, scale = rand(2, 5, 64), rand(2, 64), rand(2, 64)
    expect = torch.nn.functional.layer_norm(x, (64,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    torch.testing.assert_close(layernorm_modulate_reference(x, shift, scale, 1e-6), expect)


# ------------------------------------------------------------------------------------------------ gated_residual


@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("shape", [(1, 1, 64), (2, 37, 192), (1, 3, 1536)])
def test_gated_residual(shape, dtype):
    x, y = rand(*shape, dtype=dtype), rand(*shape, dtype=dtype)
    gate = rand(shape[0], shape[2])
    out = gated_residual(x, y, gate)
    check_ulp(out, gated_residual_reference(*f64(x, y, gate)), dtype)


@pytest.mark.parametrize("dtype", LOW)
def test_gated_residual_in_place_mixed_dtypes(dtype):
    """out=x updates the residual stream in place; y may be fp32 while x is 16-bit; gate may be (B, 1, D)."""
    x, y, gate = rand(2, 11, 192, dtype=dtype), rand(2, 11, 192), rand(2, 1, 192)
    ref = gated_residual_reference(*f64(x, y, gate))
    ptr = x.data_ptr()
    out = gated_residual(x, y, gate, out=x)
    assert out is x and x.data_ptr() == ptr
    check_ulp(x, ref, dtype)


# ------------------------------------------------------------------------------------------ rms_norm_rope / rope


def rope_tables(L, d, batch=None):
    """Random angles (not only the real 3D RoPE ones): any (cos, sin) pair must rotate correctly."""
    shape = (L, d // 2) if batch is None else (batch, L, d // 2)
    ang = rand(*shape, scale=3.0)
    return ang.cos(), ang.sin()


NORM_SHAPES = [(1, 1, 1, 64), (2, 9, 3, 64), (1, 17, 2, 32), (1, 4, 12, 128), (1, 3, 2, 48)]  # (B, L, H, d)


@pytest.mark.parametrize("rotate", [True, False])
@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("shape", NORM_SHAPES)
def test_rms_norm_rope(shape, dtype, rotate):
    B, L, H, d = shape
    x = rand(B, L, H * d, dtype=dtype, scale=2.0)
    w = rand(H * d) + 1.0
    cos, sin = rope_tables(L, d) if rotate else (None, None)
    out = rms_norm_rope(x, w, 1e-6, cos, sin, H)
    assert out.shape == (B, L, H, d)
    check_ulp(out, rms_norm_rope_reference(*f64(x, w), 1e-6, *f64(cos, sin), H), dtype)


def test_rms_norm_rope_strided_qkv_and_batch_tables():
    """q read in place from a fused qkv projection output; per-batch (B, L, d/2) tables."""
    B, L, H, d = 2, 7, 3, 32
    qkv = rand(B, L, 3 * H * d)
    q = qkv[..., H * d:2 * H * d]  # (B, L, H*d) with row stride 3*H*d
    w = rand(H * d)
    cos, sin = rope_tables(L, d, batch=B)
    out = rms_norm_rope(q, w, 1e-6, cos, sin, H)
    check_ulp(out, rms_norm_rope_reference(*f64(q, w), 1e-6, *f64(cos, sin), H), torch.float32)


def test_rms_norm_rope_into_a_cache_slice():
    """out= writes a slice of a larger (B, capacity, H, d) buffer (the KV cache) in place, leaving the rest; a wrong
    out is an error."""
    B, L, H, d = 2, 5, 3, 32
    x, w = rand(B, L, H * d), rand(H * d)
    cos, sin = rope_tables(L, d)
    cache = torch.full((B, 11, H, d), 7.0, device=DEVICE)
    got = rms_norm_rope(x, w, 1e-6, cos, sin, H, out=cache[:, 4:4 + L])
    assert got.data_ptr() == cache[:, 4:].data_ptr()
    check_ulp(cache[:, 4:4 + L], rms_norm_rope_reference(*f64(x, w), 1e-6, *f64(cos, sin), H), torch.float32)
    assert (cache[:, :4] == 7).all() and (cache[:, 4 + L:] == 7).all()
    with pytest.raises(ValueError, match="out must be"):
        rms_norm_rope(x, w, 1e-6, cos, sin, H, out=cache[:, :L].double())


def test_rms_norm_reference_matches_torch():
    x, w = rand(2, 5, 192), rand(192)
    expect = torch.nn.functional.rms_norm(x, (192,), w, eps=1e-6).unflatten(-1, (3, 64))
    torch.testing.assert_close(rms_norm_rope_reference(x, w, 1e-6, None, None, 3), expect)


@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("shape", [(1, 1, 1, 64), (2, 9, 3, 64), (1, 5, 2, 16)])
def test_rope(shape, dtype):
    _, L, _, d = shape
    x = rand(*shape, dtype=dtype)
    cos, sin = rope_tables(L, d)
    out = rope(x, cos, sin)
    check_ulp(out, rope_reference(*f64(x, cos, sin)), dtype)


def test_rope_on_cache_view_and_conventions():
    """Keys read from a (B, Lmax, H, d) cache slice; the reference equals complex multiplication of adjacent
    pairs (x[2i] + i x[2i+1]) * e^(i angle), and zero angles are the identity."""
    B, Lmax, L, H, d = 2, 20, 13, 3, 32
    cache = rand(B, Lmax, H, d)
    k = cache[:, 3:3 + L]
    ang = rand(L, d // 2, scale=3.0)
    out = rope(k, ang.cos(), ang.sin())
    complex_rot = torch.view_as_real(torch.view_as_complex(k.double().unflatten(-1, (d // 2, 2)).contiguous())
                                     * torch.polar(torch.ones_like(ang.double()), ang.double())[:, None])
    torch.testing.assert_close(rope_reference(*f64(k, ang.cos(), ang.sin())), complex_rot.flatten(-2))
    check_ulp(out, complex_rot.flatten(-2), torch.float32)
    zero = torch.zeros(L, d // 2, device=DEVICE)
    torch.testing.assert_close(rope(k, zero.cos(), zero.sin()), k, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------- attention


def monotone_limits(Lq, Lk, low=0):
    return torch.sort(torch.randint(low, Lk + 1, (Lq,), device=DEVICE))[0].to(torch.int32)


def chunk_causal_limits(q_chunks, k_before):
    """The cache refresh: query chunk j (lengths q_chunks) sees k_before keys plus chunks 0..j."""
    ends = torch.cumsum(torch.tensor(q_chunks), 0) + k_before
    return torch.repeat_interleave(ends, torch.tensor(q_chunks)).to(torch.int32).to(DEVICE)


def check_attention(out, q, k, v, kv_limit=None, scale=None):
    ref = attention_reference(*f64(q, k, v), kv_limit, scale)
    assert out.dtype == q.dtype and out.shape == q.shape[:3] + (v.shape[-1],)
    assert torch.isfinite(out).all()
    err = (out.double() - ref).abs().max().item()
    if q.dtype == torch.float32:
        assert err <= 1e-5, err
    else:  # FlashAttention rule: no worse than twice plain torch in the same low precision
        base = attention_reference(q, k, v, kv_limit, scale, compute_dtype=q.dtype)
        base_err = (base.double() - ref).abs().max().item()
        assert err <= 2 * base_err + 1e-5, (err, base_err)


ATTN_SHAPES = [  # (B, Lq, Lk, H, d): L=1, ragged tails, exact tile multiples, several tiles, d 16..128
    (1, 1, 1, 1, 64),
    (1, 1, 70, 2, 64),
    (2, 37, 75, 2, 64),
    (1, 64, 64, 1, 32),
    (1, 45, 130, 3, 32),
    (1, 20, 40, 1, 128),
    (1, 33, 50, 2, 16),
]


@pytest.mark.parametrize("mask", ["all", "monotone"])
@pytest.mark.parametrize("dtype", ATTN_DTYPES)
@pytest.mark.parametrize("shape", ATTN_SHAPES)
def test_chunk_attention(shape, dtype, mask):
    """Fixed 32x32 tiles (on a GPU the autotuner would compile a dozen configs per shape: see the next test)."""
    B, Lq, Lk, H, d = shape
    q, k, v = rand(B, Lq, H, d, dtype=dtype), rand(B, Lk, H, d, dtype=dtype), rand(B, Lk, H, d, dtype=dtype)
    kv_limit = None if mask == "all" else monotone_limits(Lq, Lk)
    check_attention(chunk_attention(q, k, v, kv_limit, block_m=32, block_n=32), q, k, v, kv_limit)


@pytest.mark.parametrize("mask", ["all", "monotone"])
@pytest.mark.parametrize("dtype", ATTN_DTYPES)
def test_chunk_attention_autotuned(dtype, mask):
    """The default path (autotuner; one small config under the interpreter)."""
    B, Lq, Lk, H, d = 1, 70, 150, 2, 64
    q, k, v = rand(B, Lq, H, d, dtype=dtype), rand(B, Lk, H, d, dtype=dtype), rand(B, Lk, H, d, dtype=dtype)
    kv_limit = None if mask == "all" else monotone_limits(Lq, Lk)
    check_attention(chunk_attention(q, k, v, kv_limit), q, k, v, kv_limit)


@pytest.mark.parametrize("blocks", [(16, 16), (16, 64), (64, 16), (32, 32)])
@pytest.mark.parametrize("dtype", ATTN_DTYPES)
def test_chunk_attention_blocks_and_chunk_causal(blocks, dtype):
    """Explicit tile sizes (BLOCK_M != BLOCK_N both ways) on the refresh mask: 20 cached keys, then runs of
    query chunks of ragged lengths; tiles past a query tile's limit are skipped, partial ones masked."""
    chunks = [9, 30, 25]
    Lq, Lk, H, d = sum(chunks), 20 + sum(chunks), 2, 32
    q, k, v = rand(1, Lq, H, d, dtype=dtype), rand(1, Lk, H, d, dtype=dtype), rand(1, Lk, H, d, dtype=dtype)
    kv_limit = chunk_causal_limits(chunks, 20)
    out = chunk_attention(q, k, v, kv_limit, block_m=blocks[0], block_n=blocks[1])
    check_attention(out, q, k, v, kv_limit)


def test_chunk_attention_strided_views_and_scale():
    """q/k/v read in place from a fused (B, L, 3, H, d) projection and k/v from a longer cache buffer."""
    B, L, H, d = 2, 21, 2, 32
    qkv = rand(B, L, 3, H, d)
    q = qkv[:, :, 0]
    k_cache, v_cache = rand(B, 50, H, d), rand(B, 50, H, d)
    k, v = k_cache[:, :33], v_cache[:, :33]
    check_attention(chunk_attention(q, k, v, scale=0.3), q, k, v, scale=0.3)
    k, v = qkv[:, :, 1], qkv[:, :, 2]
    kv_limit = monotone_limits(L, L, low=1)
    check_attention(chunk_attention(q, k, v, kv_limit), q, k, v, kv_limit)


def test_chunk_attention_limit_edge_cases():
    """Limit 0 gives zero rows (not NaN); limits past Lk are clamped; d = 8 and 48 are padded to 16 / 64."""
    q, k, v = rand(1, 40, 2, 32), rand(1, 50, 2, 32), rand(1, 50, 2, 32)
    kv_limit = monotone_limits(40, 50)
    kv_limit[:7] = 0
    kv_limit[-3:] = 1000
    out = chunk_attention(q, k, v, kv_limit)
    assert (out[:, :7] == 0).all()
    check_attention(out, q, k, v, kv_limit.clamp(max=50))
    for d in (8, 48):
        q, k, v = rand(1, 19, 1, d), rand(1, 35, 1, d), rand(1, 35, 1, d)
        check_attention(chunk_attention(q, k, v), q, k, v)


def prefix_result(q, k, v):
    """Attention over the first keys and its natural-log sum of exp scores (B, H, Lq), in float64."""
    q, k, v = f64(q, k, v)
    s = (q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return (torch.softmax(s, -1) @ v.transpose(1, 2)).transpose(1, 2), torch.logsumexp(s, -1)


@pytest.mark.parametrize("dtype", ATTN_DTYPES)
@pytest.mark.parametrize("shape, tail", [((1, 37, 64, 2, 64), 1), ((2, 45, 128, 3, 32), 37), ((1, 20, 96, 1, 128), 70),
                                         ((1, 33, 50, 2, 16), 0), ((1, 5, 10, 1, 32), 90)])
def test_extend_attention_equals_attention_over_all_keys(shape, tail, dtype):
    """The result over the first keys (as cuDNN returns it: output in the inputs' dtype, lse in fp32) extended by
    the remaining ones equals attention over all the keys; the tail may span several tiles, or be empty."""
    B, Lq, Lk, H, d = shape
    q = rand(B, Lq, H, d, dtype=dtype)
    k, v = rand(B, Lk + tail, H, d, dtype=dtype), rand(B, Lk + tail, H, d, dtype=dtype)
    prev, lse = prefix_result(q, k[:, :Lk], v[:, :Lk])
    out = extend_attention(q, [(k[:, Lk:], v[:, Lk:])], [(prev.to(dtype), lse.float())])
    check_attention(out, q, k, v)
    rows = torch.full((B, Lq + 3, H, d), float("nan"), dtype=dtype, device=DEVICE)  # into a slice of a larger output
    assert extend_attention(q, [(k[:, Lk:], v[:, Lk:])], [(prev.to(dtype), lse.float())], out=rows[:, 2:-1]) is not None
    assert torch.equal(rows[:, 2:-1], out) and rows[:, :2].isnan().all() and rows[:, -1].isnan().all()


@pytest.mark.parametrize("dtype", ATTN_DTYPES)
@pytest.mark.parametrize("cuts", [(40, 7, 30, 5), (64, 0, 33, 70), (0, 20, 50, 45), (0, 0, 0, 3), (19, 0, 0, 0)])
def test_extend_attention_merges_two_partials_and_two_segments(cuts, dtype):
    """Keys in four parts (context prefix, context tail, own prefix, own tail: what the engine's cudnn path makes of
    a cached context and a chunk's own tokens held apart): results over the prefixes (none, one or two) merged and
    both tails folded in equal attention over all the keys, whichever parts are empty."""
    B, Lq, H, d = 2, 29, 2, 32
    lens = list(cuts)
    q = rand(B, Lq, H, d, dtype=dtype)
    k, v = rand(B, sum(lens), H, d, dtype=dtype), rand(B, sum(lens), H, d, dtype=dtype)
    bounds = torch.tensor([0, *lens]).cumsum(0).tolist()
    parts = [(k[:, a:b], v[:, a:b]) for a, b in itertools.pairwise(bounds)]
    partials = [tuple(t.to(dtype) if t.dim() == 4 else t.float() for t in prefix_result(q, *parts[i]))
                for i in (0, 2) if lens[i]]
    check_attention(extend_attention(q, [parts[1], parts[3]], partials), q, k, v)


def test_extend_attention_rejects_mismatched_shapes():
    q, k = rand(1, 8, 2, 32), rand(1, 4, 2, 32)
    prev, lse = prefix_result(q, k, k)
    with pytest.raises(ValueError, match="lse must be"):
        extend_attention(q, [(k, k)], [(prev.float(), lse.float().transpose(1, 2))])
    with pytest.raises(ValueError, match="matching q"):
        extend_attention(q, [(k[..., :16], k[..., :16])], [(prev.float(), lse.float())])
    with pytest.raises(ValueError, match="two key segments"):
        extend_attention(q, [(k, k)] * 3)
    with pytest.raises(ValueError, match="partial result must be"):
        extend_attention(q, [(k, k)], [(prev.float()[:, :4], lse.float())])
    with pytest.raises(ValueError, match="stack of at most two"):
        extend_attention(q, [(k, k)], [(prev.float().expand(3, *q.shape), lse.float().expand(3, *lse.shape))])
    with pytest.raises(ValueError, match="stacked like its result"):
        extend_attention(q, [(k, k)], [(prev.float().expand(2, *q.shape), lse.float())])
    with pytest.raises(ValueError, match="out must be"):
        extend_attention(q, [(k, k)], out=rand(1, 7, 2, 32))


@pytest.mark.parametrize("dtype", ATTN_DTYPES)
@pytest.mark.parametrize("halves, own, tails", [(24, 16, (7, 5)), (32, 0, (0, 9)), (8, 40, (0, 0))])
def test_extend_attention_merges_stacked_halves(halves, own, tails, dtype):
    """What the engine's cudnn path makes of a long context when a batch of two fills the GPU better than one call:
    results over two equal halves of the context's prefix, stacked ((2, B, Lq, H, d), as one batched call returns
    them), merged with the own prefix's result (if any) and both tails folded in equal attention over all the
    keys."""
    B, Lq, H, d = 1, 21, 2, 32
    q = rand(B, Lq, H, d, dtype=dtype)
    lens = [halves, halves, tails[0], own, tails[1]]
    k, v = rand(B, sum(lens), H, d, dtype=dtype), rand(B, sum(lens), H, d, dtype=dtype)
    bounds = torch.tensor([0, *lens]).cumsum(0).tolist()
    parts = [(k[:, a:b], v[:, a:b]) for a, b in itertools.pairwise(bounds)]
    first, second = prefix_result(q, *parts[0]), prefix_result(q, *parts[1])
    stacked = (torch.stack([first[0], second[0]]).to(dtype), torch.stack([first[1], second[1]]).float())
    partials = [stacked] + ([tuple(t.to(dtype) if t.dim() == 4 else t.float() for t in prefix_result(q, *parts[3]))]
                            if own else [])
    check_attention(extend_attention(q, [parts[2], parts[4]], partials), q, k, v)


@pytest.mark.parametrize("blocks", [(16, 16), (32, 32)])
def test_chunk_attention_never_reads_past_limits(blocks):
    """Keys/values past the largest limit (e.g. cache slots not yet written) are NaN: whole tiles past a query
    tile's limits are skipped and the partial tile stops loading at its largest limit, so no NaN leaks in."""
    Lq, Lk, H, d = 40, 90, 2, 32
    q, k, v = rand(1, Lq, H, d), rand(1, Lk, H, d), rand(1, Lk, H, d)
    kv_limit = chunk_causal_limits([10, 30], 20)  # 30, then 60: keys 60..89 are never visible
    k[:, 60:] = float("nan")
    v[:, 60:] = float("nan")
    out = chunk_attention(q, k, v, kv_limit, block_m=blocks[0], block_n=blocks[1])
    check_attention(out, q, k[:, :60], v[:, :60], kv_limit)


def test_attention_reference_matches_sdpa():
    """The reference's prefix mask and scale agree with torch SDPA given the equivalent boolean mask."""
    B, Lq, Lk, H, d = 2, 13, 29, 3, 16
    q, k, v = f64(rand(B, Lq, H, d), rand(B, Lk, H, d), rand(B, Lk, H, d))
    kv_limit = monotone_limits(Lq, Lk, low=1)
    keep = torch.arange(Lk, device=DEVICE)[None] < kv_limit[:, None].long()
    expect = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=keep, scale=0.2
    ).transpose(1, 2)
    torch.testing.assert_close(attention_reference(q, k, v, kv_limit, scale=0.2, compute_dtype=torch.float64), expect)


@pytest.mark.parametrize("splits, blocks", [(2, (32, 32)), (3, (16, 64)), (2, (None, None))])
@pytest.mark.parametrize("Lk", [70, 300, 530])
def test_chunk_attention_split_keys(splits, blocks, Lk):
    """Keys folded in ranges of whole 128-key spans, merged by the combine kernel; with Lk = 70 every split but
    the first is empty (its rows must not turn NaN)."""
    B, Lq, H, d = 2, 45, 3, 32
    q, k, v = rand(B, Lq, H, d), rand(B, Lk, H, d), rand(B, Lk, H, d)
    out = chunk_attention(q, k, v, splits=splits, block_m=blocks[0], block_n=blocks[1])
    check_attention(out, q, k, v, None)


def test_chunk_attention_rejects_bad_inputs():
    q = rand(1, 8, 2, 32)
    with pytest.raises(ValueError):
        chunk_attention(q, rand(1, 8, 3, 32), rand(1, 8, 3, 32))
    with pytest.raises(ValueError):
        chunk_attention(q, q, q, kv_limit=torch.zeros(7, dtype=torch.int32, device=DEVICE))
    with pytest.raises(TypeError):
        chunk_attention(q, q.half(), q.half())
    with pytest.raises(ValueError):
        chunk_attention(rand(1, 8, 1, 256), rand(1, 8, 1, 256), rand(1, 8, 1, 256))
    with pytest.raises(ValueError, match="splits must be"):
        chunk_attention(q, q, q, kv_limit=torch.full((8,), 4, dtype=torch.int32, device=DEVICE), splits=2)


# ----------------------------------------------------------------------------------------- channel_rms_norm (VAE)


@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("shape", [(1, 12, 3, 5, 7), (2, 96, 2, 4, 4), (1, 8, 6, 6)])
def test_channel_rms_norm(shape, dtype, silu):
    x = rand(*shape, dtype=dtype)
    gamma = rand(shape[1]).reshape(shape[1], *(1,) * (len(shape) - 2))  # stored as the VAE stores it
    bias = rand(shape[1])
    out = channel_rms_norm(x, gamma, bias, silu=silu)
    check_ulp(out, channel_rms_norm_reference(*f64(x, gamma, bias), silu=silu), dtype)


def test_channel_rms_norm_strided_out_and_channels_last():
    x = rand(2, 16, 4, 6, 5)
    gamma = rand(16, 1, 1, 1)
    buffer = torch.zeros(2, 16, 6, 6, 5, device=DEVICE)  # a causal conv's input: 2 kept frames, then the chunk
    channel_rms_norm(x, gamma, silu=True, out=buffer[:, :, 2:])
    ref = channel_rms_norm_reference(*f64(x, gamma), silu=True)
    check_ulp(buffer[:, :, 2:], ref, torch.float32)
    assert (buffer[:, :, :2] == 0).all()
    last = x.contiguous(memory_format=torch.channels_last_3d)
    check_ulp(channel_rms_norm(last, gamma), channel_rms_norm_reference(*f64(x, gamma)), torch.float32)
    frames = rand(2, 4, 16, 6, 5).transpose(1, 2)  # frame-major view
    check_ulp(channel_rms_norm(frames, gamma), channel_rms_norm_reference(*f64(frames, gamma)), torch.float32)


def test_channel_rms_norm_into_the_inside_of_padded_frames():
    """out = the inside of zero-padded frames (B, F, H + 2, W + 2, C) seen as (B, C, F, H, W): three position runs
    (rows, frames, pixels), the layout of a Triton conv's input buffer; the ring stays as it was."""
    x = rand(2, 16, 3, 4, 5).contiguous(memory_format=torch.channels_last_3d)
    gamma = rand(16, 1, 1, 1)
    frames = torch.full((2, 3, 6, 7, 16), 7.0, device=DEVICE)
    inside = frames[:, :, 1:-1, 1:-1].permute(0, 4, 1, 2, 3)
    channel_rms_norm(x, gamma, silu=True, out=inside)
    check_ulp(inside, channel_rms_norm_reference(*f64(x, gamma), silu=True), torch.float32)
    ring = torch.ones_like(frames, dtype=torch.bool)
    ring[:, :, 1:-1, 1:-1] = False
    assert (frames[ring] == 7.0).all()


def test_channel_rms_norm_rejects_bad_arguments():
    with pytest.raises(ValueError, match="one value per channel"):
        channel_rms_norm(rand(1, 4, 3), rand(5))
    with pytest.raises(ValueError, match="out must be"):
        channel_rms_norm(rand(1, 4, 3), rand(4), out=rand(1, 4, 4))


# --------------------------------------------------------------------------------------- scaled_softmax (VAE)


@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("rows,n", [(1, 1), (3, 7), (5, 130), (2, 6240)])
def test_scaled_softmax(rows, n, dtype):
    """Rows of fp32 scores times the scale, softmaxed: within one ulp of fp64 in the output dtype (1e-5 in fp32),
    also from a strided view of a larger score matrix."""
    big = rand(rows, n + 3, scale=8.0)
    scores = big[:, 1:n + 1]
    out = torch.full((rows, n), float("nan"), dtype=dtype, device=DEVICE)
    assert scaled_softmax(scores, 0.3, out) is out
    ref = scaled_softmax_reference(scores.double(), 0.3, torch.empty(rows, n, dtype=torch.float64, device=DEVICE))
    check_ulp(out, ref, dtype)


def test_scaled_softmax_rejects_bad_arguments():
    from kernels.vae_ops import SOFTMAX_MAX_ROW

    with pytest.raises(ValueError, match="one shape"):
        scaled_softmax(rand(2, 5), 1.0, rand(2, 4))
    with pytest.raises(ValueError, match="unit last stride"):
        scaled_softmax(rand(5, 2).t(), 1.0, rand(2, 5))
    with pytest.raises(ValueError, match="do not fit"):
        scaled_softmax(rand(1, SOFTMAX_MAX_ROW + 1), 1.0, rand(1, SOFTMAX_MAX_ROW + 1))


def test_vae_pixel_attention_fused_path(monkeypatch):
    """The VAE mid block's attention where the fused kernels run (GEMM scores in fp32, the softmax kernel, a second
    GEMM; views of one qkv tensor as the block makes them) against float64 SDPA, a frame at once or in blocks of query
    rows under a memory bound; frames over the softmax's row limit and float64 tensors stay on SDPA."""
    import kernels.vae_ops as vae_ops
    import streamgen.vae as vae_module

    monkeypatch.setattr(vae_module, "_fused", lambda x: True)
    qkv = rand(3, 1, 40, 3 * 24)
    q, k, v = qkv.chunk(3, dim=-1)
    ref = torch.nn.functional.scaled_dot_product_attention(*f64(q, k, v))
    calls = []
    real = vae_ops.scaled_softmax
    monkeypatch.setattr(vae_ops, "scaled_softmax", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    torch.testing.assert_close(vae_module.pixel_attention(q, k, v).double(), ref, rtol=0, atol=1e-5)
    assert len(calls) == 3  # one softmax per frame
    monkeypatch.setattr(vae_module, "ATTENTION_SCORES_BYTES", 17 * 8 * 40)  # blocks of 17 query rows: 17, 17, 6
    torch.testing.assert_close(vae_module.pixel_attention(q, k, v).double(), ref, rtol=0, atol=1e-5)
    assert len(calls) == 3 + 3 * 3
    calls.clear()
    monkeypatch.setattr(vae_ops, "SOFTMAX_MAX_ROW", 39)
    torch.testing.assert_close(vae_module.pixel_attention(q, k, v).double(), ref, rtol=0, atol=1e-5)
    monkeypatch.setattr(vae_ops, "SOFTMAX_MAX_ROW", 40)  # float64 (no fp32 scores buffer for it) stays on SDPA too
    torch.testing.assert_close(vae_module.pixel_attention(*f64(q, k, v)), ref, rtol=0, atol=1e-12)
    assert calls == []


# (B, C, CO, T, H, W): one accumulator (CO 16, 48 masked to 64), two (96 = 64 + 32, 192 = 128 + 64), several programs
# along CO (384 = 2 x 192), tiles crossing rows and frames, a frame smaller than one tile
CONV_CASES = [(1, 16, 16, 2, 5, 7), (2, 16, 48, 3, 4, 9), (1, 32, 96, 2, 6, 5), (1, 16, 192, 1, 3, 3),
              (1, 64, 384, 1, 2, 3)]


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
@pytest.mark.parametrize("bias,residual", [(False, False), (True, False), (True, True)])
def test_padded_conv3d_over_a_buffer(case, bias, residual):
    """Windows = a [2 kept frames + chunk] buffer shifted by 0, 1, 2 frames; against fp64 conv3d (27 C products
    summed in fp32: within 1e-5)."""
    b, c, co, t, h, w = case
    buf = padded_frames(b, t + 2, h, w, c)
    windows = [buf[:, k : k + t] for k in range(3)]
    weight = rand(co, c, 3, 3, 3, scale=(27 * c) ** -0.5)
    b_ = rand(co) if bias else None
    r = rand(b, co, t, h, w).contiguous(memory_format=torch.channels_last_3d) if residual else None
    out = padded_conv3d(windows, weight, b_, residual=r, block_m=32)
    ref = padded_conv3d_reference(f64(*windows), weight.double(), *f64(b_, r))
    assert out.shape == (b, co, t, h, w) and out.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    # the same conv with plain padding, as F.conv3d sees an unpadded video
    video = buf[:, :, 1:-1, 1:-1].permute(0, 4, 1, 2, 3).double()
    plain = torch.nn.functional.conv3d(video, weight.double(), None if b_ is None else b_.double(), padding=(0, 1, 1))
    torch.testing.assert_close(out.double(), plain if r is None else plain + r.double(), rtol=1e-5, atol=1e-5)


def test_padded_conv3d_of_separate_frames_and_into_out():
    """A one-frame chunk: three separate padded frames (the kept ones held by reference), one per time tap; the
    result written into a given strided `out`; a channels-last weight (read in place, as the VAE's); fp16 too (where
    the interpreter's dot is right)."""
    frames = [padded_frames(1, 1, 4, 6, 32) for _ in range(3)]
    weight = rand(96, 32, 3, 3, 3, scale=(27 * 32) ** -0.5).contiguous(memory_format=torch.channels_last_3d)
    ref = padded_conv3d_reference(f64(*frames), weight.double())
    out = torch.zeros(1, 2, 4, 6, 96, device=DEVICE).permute(0, 4, 1, 2, 3)[:, :, 1:]  # frame 1 of a (1, 96, 2, ...)
    assert padded_conv3d(frames, weight, out=out).data_ptr() == out.data_ptr()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    half = padded_conv3d([f.half() for f in frames], weight.half())
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.double(), ref, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("case", [case for case in CONV_CASES if fuses_norm(*case[1:3])], ids=str)
def test_padded_conv3d_with_the_next_norm_in_its_epilogue(case):
    """`norm_silu`: the conv (+ bias + residual) goes through the channel RMS norm and SiLU as it is written (one
    program holding all CO channels, masked ones included: 16, 48 in 64, 96 in 64 + 32), into the inside of the next
    conv's padded frames; against fp64 conv3d then the fp64 norm."""
    b, c, co, t, h, w = case
    assert fuses_norm(c, co)
    buf = padded_frames(b, t + 2, h, w, c)
    windows = [buf[:, k : k + t] for k in range(3)]
    weight, bias, gamma = rand(co, c, 3, 3, 3, scale=(27 * c) ** -0.5), rand(co), rand(co, 1, 1, 1)
    r = rand(b, co, t, h, w).contiguous(memory_format=torch.channels_last_3d)
    following = torch.full((b, t, h + 2, w + 2, co), 7.0, device=DEVICE)
    inside = following[:, :, 1:-1, 1:-1].permute(0, 4, 1, 2, 3)
    assert padded_conv3d(windows, weight, bias, residual=r, norm_silu=gamma, out=inside, block_m=32) is inside
    ref = padded_conv3d_reference(f64(*windows), weight.double(), *f64(bias, r), norm_silu=gamma.double())
    torch.testing.assert_close(inside.double(), ref, rtol=1e-5, atol=1e-5)
    ring = torch.ones_like(following, dtype=torch.bool)
    ring[:, :, 1:-1, 1:-1] = False
    assert (following[ring] == 7.0).all()


# positions computed and not stored (past the last frame's end) read the NaN frame; the interpreter's SiLU of them
# overflows numpy's exp
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("t", [3, 4])
@pytest.mark.parametrize("norm,residual", [(False, True), (True, False), (True, True)])
def test_padded_conv3d_two_frames_per_program(t, norm, residual):
    """Over one buffer shifted by a frame (the VAE's chunks), 96 output channels, each program computes two output
    frames from the four input frames they share (`_pair_kernel`: the two frames' 192 channels in stacked
    accumulators, stacked weights): an odd frame count leaves the last program's second frame unstored (and its
    input frame, past the buffer, unread: NaN there), two videos in the batch keep apart, with the next norm in the
    epilogue too (with and without a residual); every value is the one-frame-per-program kernel's and fp64's. 48
    channels keep one frame per program."""
    b, c, h, w, co = 2, 16, 5, 6, 96
    big = torch.cat([padded_frames(b, t + 2, h, w, c), torch.full((b, 1, h + 2, w + 2, c), float("nan"),
                                                                  device=DEVICE)], dim=1)
    buf = big[:, : t + 2]
    windows = [buf[:, k : k + t] for k in range(3)]
    assert conv3d._one_buffer(windows) and not conv3d._one_buffer([buf[:, k : k + 1] for k in (0, 2, 3)])
    weight, bias = rand(co, c, 3, 3, 3, scale=(27 * c) ** -0.5), rand(co)
    gamma = rand(co, 1, 1, 1) if norm else None
    r = rand(b, co, t, h, w).contiguous(memory_format=torch.channels_last_3d) if residual else None
    outs = []
    for pair in (True, False):
        out = torch.full((b, t + 1, h, w, co), 7.0, device=DEVICE).permute(0, 4, 1, 2, 3)
        padded_conv3d(windows, weight, bias, residual=r, norm_silu=gamma, out=out[:, :, :t], pair_frames=pair,
                      block_m=32)
        assert (out[:, :, t] == 7.0).all()  # the frame after the last is not written
        outs.append(out[:, :, :t])
    assert weight in conv3d.pair_taps.kept  # the two-frame kernel ran
    # On the GPU without the norm: the same sums in the same order. The norm's squares are summed in other groups of
    # channels, and the interpreter's dot is numpy's matmul, whose order of summation depends on the matrices' widths
    # (two frames' 192 stacked columns against one frame's 96; seen with Triton 3.9 and numpy 2.4).
    exact = not norm and not INTERPRET
    torch.testing.assert_close(outs[0], outs[1], rtol=0 if exact else 1e-6, atol=0 if exact else 1e-6)
    ref = padded_conv3d_reference(f64(*windows), weight.double(), *f64(bias, r), norm_silu=f64(gamma)[0])
    torch.testing.assert_close(outs[0].double(), ref, rtol=1e-5, atol=1e-5)
    weight48 = rand(48, c, 3, 3, 3, scale=(27 * c) ** -0.5)
    torch.testing.assert_close(padded_conv3d(windows, weight48, block_m=32).double(),
                               padded_conv3d_reference(f64(*windows), weight48.double()), rtol=1e-5, atol=1e-5)
    assert weight48 not in conv3d.pair_taps.kept


@pytest.mark.parametrize("co,t,norm,residual", [
    (96, 1, False, True), (96, 2, True, False), (96, 3, True, True), (96, 4, False, False), (32, 2, False, True),
    (32, 3, True, False), (192, 3, False, True)])
def test_causal_conv3d_reads_the_past_frames_where_they_lie(co, t, norm, residual):
    """A chunk's conv after its video's last two input frames, given as tensors of their own (no [past + chunk]
    buffer), equals the conv over one buffer holding both sum for sum (the same programs pair the same frames: 96
    outputs, the first pair from four separate frames), and float64; only the chunk's output frames are written."""
    b, c, h, w = 2, 16, 5, 6
    buf = padded_frames(b, t + 2, h, w, c)
    past, chunk = [buf[:, k : k + 1].clone() for k in range(2)], buf[:, 2:].clone()
    weight, bias = rand(co, c, 3, 3, 3, scale=(27 * c) ** -0.5), rand(co)
    gamma = rand(co, 1, 1, 1) if norm else None
    r = rand(b, co, t, h, w).contiguous(memory_format=torch.channels_last_3d) if residual else None
    out = torch.full((b, t + 1, h, w, co), 7.0, device=DEVICE).permute(0, 4, 1, 2, 3)
    causal_conv3d(past, chunk, weight, bias, residual=r, norm_silu=gamma, out=out[:, :, :t])
    assert (out[:, :, t] == 7.0).all()
    windows = [buf[:, k : k + t] for k in range(3)]
    whole = padded_conv3d(windows, weight, bias, residual=r, norm_silu=gamma)
    exact = not norm or t % 2 == 0  # an odd last frame's norm: one frame per program sums its squares otherwise
    torch.testing.assert_close(out[:, :, :t], whole, rtol=0 if exact else 1e-6, atol=0 if exact else 1e-6)
    ref = padded_conv3d_reference(f64(*windows), weight.double(), *f64(bias, r), norm_silu=f64(gamma)[0])
    torch.testing.assert_close(out[:, :, :t].double(), ref, rtol=1e-5, atol=1e-5)
    assert (weight in conv3d.pair_taps.kept) == (co == 96 and t > 1)


def test_causal_conv3d_rejects_bad_arguments():
    buf = padded_frames(1, 4, 3, 3, 16)
    past, chunk, weight = [buf[:, :1], buf[:, 1:2]], buf[:, 2:], rand(16, 16, 3, 3, 3)
    with pytest.raises(ValueError, match="last 2 input frames, got 1"):
        causal_conv3d(past[:1], chunk, weight)
    with pytest.raises(ValueError, match=r"past \(B, 1, H \+ 2, W \+ 2, C\)"):
        causal_conv3d([buf[:, :2], buf[:, 1:2]], chunk, weight)
    with pytest.raises(ValueError, match=r"weight must be \(CO, C, 3, 3, 3\)"):
        causal_conv3d(past, chunk, rand(16, 16, 1, 3, 3))
    with pytest.raises(ValueError, match="windows must share shape"):
        causal_conv3d([padded_frames(1, 1, 3, 4, 16), past[1]], chunk, weight)
    with pytest.raises(ValueError, match="residual must be"):
        causal_conv3d(past, chunk, weight, residual=rand(1, 16, 1, 3, 3))  # 1 frame, the chunk has 2


def test_padded_conv3d_weight_copy_follows_the_weight():
    """The tap-major copy kept per weight is made again when the weight changes in place or is replaced."""
    frames = [padded_frames(1, 1, 3, 4, 16) for _ in range(3)]
    weight = torch.nn.Conv3d(16, 16, 3, bias=False, device=DEVICE).weight
    with torch.no_grad():
        first = padded_conv3d(frames, weight)
        torch.testing.assert_close(padded_conv3d(frames, weight), first, rtol=0, atol=0)  # the kept copy
        weight.mul_(2.0)
        torch.testing.assert_close(padded_conv3d(frames, weight), 2 * first)
        weight.data = -weight.data
        torch.testing.assert_close(padded_conv3d(frames, weight), -2 * first)


def test_padded_conv3d_rejects_bad_arguments():
    buf = padded_frames(1, 4, 3, 3, 16)
    windows = [buf[:, k : k + 2] for k in range(3)]
    weight = rand(16, 16, 3, 3, 3)
    with pytest.raises(ValueError, match="3 time taps, got 2 windows"):
        padded_conv3d(windows[:2], weight)
    with pytest.raises(ValueError, match="odd height and width"):
        padded_conv3d(windows, rand(16, 16, 3, 2, 3))
    with pytest.raises(ValueError, match="windows must be"):
        padded_conv3d(windows, rand(16, 32, 3, 3, 3))
    with pytest.raises(ValueError, match="dense padded frames"):
        padded_conv3d([w[:, :, :, 1:] for w in windows], weight)  # a frame's rows no longer dense
    with pytest.raises(ValueError, match="multiples of 16"):
        padded_conv3d([w[..., :8] for w in padded_frames(1, 4, 3, 3, 8).split(1, dim=1)[:3]], rand(16, 8, 3, 3, 3))
    with pytest.raises(ValueError, match="residual must be"):
        padded_conv3d(windows, weight, residual=rand(1, 16, 2, 3, 3))  # channels-first: channel stride is not 1
    with pytest.raises(ValueError, match="bias must hold 16"):
        padded_conv3d(windows, weight, rand(8))
    with pytest.raises(ValueError, match="norm_silu must hold 16"):
        padded_conv3d(windows, weight, norm_silu=rand(8))
    assert [fuses_norm(16, co) for co in (16, 48, 96, 128, 192, 384)] == [True] * 4 + [False] * 2
    with pytest.raises(ValueError, match="at most 128 output channels, all in one program"):
        padded_conv3d(windows, rand(192, 16, 3, 3, 3), norm_silu=rand(192))


def test_channel_rms_norm_reference_matches_the_vae_norm():
    from streamgen.vae import RMSNorm

    norm = RMSNorm(12).double()
    torch.nn.init.normal_(norm.gamma)
    x = torch.randn(2, 12, 3, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(channel_rms_norm_reference(x, norm.gamma), norm(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("channels_last", [False, True])
def test_vae_fused_path_matches_torch(monkeypatch, channels_last):
    """The VAE's fused code path (norm written straight into conv input buffers; channels-last, the 16-channel causal
    convs as Triton implicit GEMMs over zero-padded frames) run through the kernels, on CPU."""
    import streamgen.vae as vae_module
    from streamgen.vae import StreamingDecoder, WanVAE
    from streamgen.vae import preset as vae_preset

    vae = WanVAE(vae_preset("tiny")).eval().to_channels_last(channels_last)
    latents = torch.randn(1, vae.config.z_dim, 3, 4, 4)
    with torch.no_grad():
        expected = vae.decode(latents)
        monkeypatch.setattr(vae_module, "_fused", lambda x: True)
        decoder = StreamingDecoder(vae)
        got = torch.cat([decoder.decode(latents[:, :, :1]), decoder.decode(latents[:, :, 1:])], dim=2)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
