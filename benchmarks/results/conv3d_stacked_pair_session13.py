"""One-off: a "stacked pair" variant of `kernels.conv3d`'s two-frames-per-program (PAIR) mode for the decoder's
96-channel full-resolution conv, the biggest cost of the decode. Ran (`conv3d_stacked_pair_session13.txt`) at commit
7fe579c's `kernels.conv3d`, whose PAIR mode ("engine pair" below) had four separate accumulators and no norm; the
engine's two-frame kernel is this variant since the next commit (`kernels.conv3d._pair_kernel`), so run today the
"engine" rows time the variant too.

In PAIR mode a program computes output frames t and t + 1 (96 channels each, 64 + 32 accumulators per frame: four)
from input frames t .. t + 3. Each input tile of the middle frames (f = 1, 2) feeds four small MMAs (N = 64, 32 for
frame t with time tap f; N = 64, 32 for frame t + 1 with tap f - 1), so it is read from shared memory four times.
Here the two frames' 192 output channels are one pair of accumulators, columns [frame t's 96 | frame t + 1's 96]:
acc1 (BLOCK_M x 128: frame t's 96 and frame t + 1's first 32) and acc2 (BLOCK_M x 64: frame t + 1's last 64). Input
frame t + f multiplies a stacked weight B_f = [W_tap(f) (zeros for f = 3) | W_tap(f - 1) (zeros for f = 0)], a
(4 * 9 C, 192) tap-major matrix kept per weight: two MMAs per K block instead of four for f = 1, 2 (one for f = 0,
whose acc2 weights are all zero; two for f = 3). The price: 704 MMA columns per K row instead of 576 (22% more
tensor-core work on zero weight columns), for 7 reads of each input tile from shared memory instead of 12 and wider
MMAs (N = 128, 64). The epilogue splits acc1 into four 32-channel blocks (reshape / permute / split, as Triton's
matmul tutorials subtile an epilogue) and writes them and acc2 as `_write_frame` writes (bias, residual, rounded to
the output dtype; ring positions and a frame t + 1 = T not stored). For f = 3 frame t's columns take the input times
zero weights, so when frame t + 1 does not exist (odd T, last pair) that K loop is skipped: the frame it would read
is outside the buffer (garbage or NaN there would reach frame t through 0 * NaN).

With ``norm_silu`` (the decoder's residual-block conv1, whose output only feeds conv2 through silu(RMSNorm)) each
frame is stored as `_write_frame` stores with NORM: silu(y / max(||y||, eps) * sqrt(96) * gamma), y rounded to the
output dtype first and the norm over that frame's 96 channels (frame t: acc1's blocks 0..2; frame t + 1: block 3 and
acc2). Frame t is rounded, summed, scaled and stored before frame t + 1 is touched, so beyond the 192 accumulators
only one frame's per-position scale and one block's bias / gamma are live. The engine keeps its normed conv at one
frame per program (its 4-accumulator pair + norm spilled and measured 0.98x). Compiled for sm_90a with Triton 3.6 on
a CPU (no GPU: `triton.compile` through a stub driver, ptxas -v), this one uses 255 registers and spills nothing at
block_m 128 / 4 warps (242 without the norm, 250 with a residual, as measured); capped with maxnreg it fits 240
without spilling, as the residual variant does (232: 48 bytes spilled). Norm with a residual: 104 bytes spilled.

Checked against `padded_conv3d` (the engine's PAIR kernel) and an fp32 conv3d, then timed with do_bench (median ms,
TFLOP/s = 2 * CO * T * H * W * 27 * C) against the engine's pair and one-frame kernels, with and without a residual,
and with the norm (no residual, written into the inside of a padded buffer as the decoder does) against the engine's
normed conv:

    PYTHONPATH=$PWD python benchmarks/results/conv3d_stacked_pair_session13.py     # on the GPU machine

On the CPU, in Triton's interpreter (float32, small shapes, against fp64):

    TRITON_INTERPRET=1 PYTHONPATH=$PWD python -c "import sys; sys.path.insert(0, 'benchmarks/results'); \
import conv3d_stacked_pair_session13 as m; m.check_on_cpu()"
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from functools import partial

import torch
import triton
import triton.language as tl
from torch.utils.weak import WeakIdKeyDictionary
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels._launch import INTERPRET, check_tensors
from kernels.conv3d import (
    _blocks,
    _conv_value,
    _padded_conv3d_kernel,
    _silu_scaled,
    _store,
    padded_conv3d,
    padded_conv3d_reference,
)
from kernels.vae_ops import channel_rms_norm_reference

CO_STACKED = 96  # the only output channel count supported: 2 x 96 = 128 + 64 accumulator columns


@triton.jit
def _halves(x, BLOCK_M: tl.constexpr, N: tl.constexpr):
    """The column halves (BLOCK_M x N / 2 each) of a BLOCK_M x N tile."""
    return tl.split(tl.permute(tl.reshape(x, (BLOCK_M, 2, N // 2)), (0, 2, 1)))


@triton.jit
def _write_block(y, offs_n, inside, pix_o, pix_r, bias_ptr, res_ptr, out_ptr,
                 HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr):
    """Store one block of output channels (offs_n) of one frame: + bias + residual, rounded to the output dtype."""
    y = _conv_value(y, offs_n, inside, pix_r, bias_ptr, res_ptr, out_ptr, 96, HAS_BIAS, HAS_RES)
    _store(y, offs_n, inside, pix_o, out_ptr, 96)


@triton.jit
def _normed_scale(squares, norm_scale, norm_eps):
    """Per position: sqrt(CO) / max(||y||_2, eps), from the sum of squares over the frame's CO channels."""
    return norm_scale / tl.maximum(tl.sqrt(squares), norm_eps)


@triton.jit
def _write_normed(y, offs_n, inside, pix_o, scale, gamma_ptr, out_ptr):
    """Store one block of output channels (offs_n) of one frame as silu(y * scale[position] * gamma[channel])."""
    _store(_silu_scaled(y, scale, gamma_ptr, offs_n, 96), offs_n, inside, pix_o, out_ptr, 96)


@triton.jit
def _stacked_pair_kernel(
    x0_desc, x1_desc, x2_desc, w1_desc, w2_desc, bias_ptr, res_ptr, gamma_ptr, out_ptr,
    T, H, W, rows0_b, rows1_b, rows2_b,
    srb, srt, srh, srw,
    sob, sot, soh, sow,
    norm_scale, norm_eps,
    C: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, NORM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """grid = (cdiv(HP * WP, BLOCK_M), B * cdiv(T, 2)): BLOCK_M consecutive positions of the padded frame (HP x WP,
    row-major) of output frames t and t + 1 of batch b, all 2 x 96 channels: acc1 = [frame t's 96 | frame t + 1's
    channels 0..31], acc2 = frame t + 1's channels 32..95. Input frame t + f (f = 0..3; window f at frame t for
    f < 3, the last window at t + 1 for f = 3) times rows f * 9 C .. (f + 1) * 9 C of the stacked weight. NORM: each
    frame is stored as silu(rms_norm(y) * gamma), y its conv + bias + residual rounded to the output dtype, the norm
    over that frame's 96 channels (frame t: acc1's blocks 0..2; frame t + 1: block 3 and acc2)."""
    pid_m = tl.program_id(0)
    TP = (T + 1) // 2
    bt = tl.program_id(1)
    b = bt // TP
    t = (bt % TP) * 2
    WP = W + 2
    FP = (H + 2) * WP
    p0 = pid_m * BLOCK_M
    NK: tl.constexpr = 9 * C // BLOCK_K  # K blocks per input frame (C % BLOCK_K == 0: one spatial tap each)
    acc1 = tl.zeros((BLOCK_M, 128), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, 64), dtype=tl.float32)

    for f in tl.static_range(4):
        if f == 0:
            desc = x0_desc
            row0 = b * rows0_b + t * FP
            n_k = NK
        elif f == 1:
            desc = x1_desc
            row0 = b * rows1_b + t * FP
            n_k = NK
        elif f == 2:
            desc = x2_desc
            row0 = b * rows2_b + t * FP
            n_k = NK
        else:  # frame t + 1's last tap; none when t + 1 = T (frame t's columns would take 0 x whatever lies there)
            desc = x2_desc
            row0 = b * rows2_b + (t + 1) * FP
            n_k = NK * tl.minimum(T - 1 - t, 1)
        row0 += p0 - WP - 1  # tap (0, 0) of the tile's first position
        for i in range(n_k):
            tap = (i * BLOCK_K) // C
            a = desc.load([row0 + (tap // 3) * WP + tap % 3, (i * BLOCK_K) % C])
            k = f * 9 * C + i * BLOCK_K
            acc1 = tl.dot(a, w1_desc.load([k, 0]), acc1)
            if f >= 1:  # f = 0: frame t + 1 takes nothing from input frame t (zero weights)
                acc2 = tl.dot(a, w2_desc.load([k, 128]), acc2)

    p = p0 + tl.arange(0, BLOCK_M)
    h = p // WP - 1
    w = p % WP - 1
    inside = (p < FP) & (h >= 0) & (h < H) & (w >= 0) & (w < W)
    inside_next = inside & (p * 0 + t + 1 < T)  # as a vector: the interpreter rejects a mask from a scalar condition
    h64 = h.to(tl.int64)
    w64 = w.to(tl.int64)
    pix_o = h64 * soh + w64 * sow + b.to(tl.int64) * sob + t.to(tl.int64) * sot
    pix_r = h64 * srh + w64 * srw + b.to(tl.int64) * srb + t.to(tl.int64) * srt
    lo, hi = _halves(acc1, BLOCK_M, 128)
    c0, c1 = _halves(lo, BLOCK_M, 64)
    c2, c3 = _halves(hi, BLOCK_M, 64)
    offs = tl.arange(0, 32)
    if NORM:
        # frame t whole first (its three blocks rounded in place, their squares summed, each scaled, SiLU'd and
        # stored), then frame t + 1: the only values live beyond the accumulators are one frame's per-position
        # scale and one block's bias / gamma, and frame t's registers are free before frame t + 1's epilogue.
        # (Rounding frame t + 1 first and keeping it in the output dtype, half the registers, spilled more under a
        # maxnreg cap: its bias / residual work then overlaps all 192 accumulators.)
        y0 = _conv_value(c0, offs, inside, pix_r, bias_ptr, res_ptr, out_ptr, 96, HAS_BIAS, HAS_RES)
        y1 = _conv_value(c1, 32 + offs, inside, pix_r, bias_ptr, res_ptr, out_ptr, 96, HAS_BIAS, HAS_RES)
        y2 = _conv_value(c2, 64 + offs, inside, pix_r, bias_ptr, res_ptr, out_ptr, 96, HAS_BIAS, HAS_RES)
        squares = tl.sum(y0 * y0, axis=1) + tl.sum(y1 * y1, axis=1) + tl.sum(y2 * y2, axis=1)
        scale = _normed_scale(squares, norm_scale, norm_eps)
        _write_normed(y0, offs, inside, pix_o, scale, gamma_ptr, out_ptr)
        _write_normed(y1, 32 + offs, inside, pix_o, scale, gamma_ptr, out_ptr)
        _write_normed(y2, 64 + offs, inside, pix_o, scale, gamma_ptr, out_ptr)
        offs2 = 32 + tl.arange(0, 64)
        y3 = _conv_value(c3, offs, inside_next, pix_r + srt, bias_ptr, res_ptr, out_ptr, 96, HAS_BIAS, HAS_RES)
        y4 = _conv_value(acc2, offs2, inside_next, pix_r + srt, bias_ptr, res_ptr, out_ptr, 96, HAS_BIAS, HAS_RES)
        scale = _normed_scale(tl.sum(y3 * y3, axis=1) + tl.sum(y4 * y4, axis=1), norm_scale, norm_eps)
        _write_normed(y3, offs, inside_next, pix_o + sot, scale, gamma_ptr, out_ptr)
        _write_normed(y4, offs2, inside_next, pix_o + sot, scale, gamma_ptr, out_ptr)
    else:
        _write_block(c0, offs, inside, pix_o, pix_r, bias_ptr, res_ptr, out_ptr, HAS_BIAS, HAS_RES)
        _write_block(c1, 32 + offs, inside, pix_o, pix_r, bias_ptr, res_ptr, out_ptr, HAS_BIAS, HAS_RES)
        _write_block(c2, 64 + offs, inside, pix_o, pix_r, bias_ptr, res_ptr, out_ptr, HAS_BIAS, HAS_RES)
        _write_block(c3, offs, inside_next, pix_o + sot, pix_r + srt, bias_ptr, res_ptr, out_ptr, HAS_BIAS, HAS_RES)
        _write_block(acc2, 32 + tl.arange(0, 64), inside_next, pix_o + sot, pix_r + srt, bias_ptr, res_ptr, out_ptr,
                     HAS_BIAS, HAS_RES)


_STACKED = WeakIdKeyDictionary()  # weight -> ((its storage, version counter, dtype), stacked matrix)


def stacked_taps(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A conv weight (CO, C, 3, 3, 3) as the (4 * 9 C, 2 CO) matrix in `dtype` the kernel reads: block f (rows
    f * 9 C ..) = [time tap f for frame t (zeros for f = 3) | tap f - 1 for frame t + 1 (zeros for f = 0)], each tap
    (kh, kw, C) x CO as `kernels.conv3d.tap_major` lays it out; kept while the weight keeps its storage and version."""
    key = (weight.data_ptr(), weight._version, dtype)
    kept = _STACKED.get(weight)
    if kept is not None and kept[0] == key:
        return kept[1]
    CO, C = weight.shape[:2]
    taps = weight.detach().to(dtype).permute(2, 3, 4, 1, 0).reshape(3, 9 * C, CO)
    stacked = torch.zeros(4, 9 * C, 2 * CO, dtype=dtype, device=weight.device)
    stacked[:3, :, :CO] = taps
    stacked[1:, :, CO:] = taps
    stacked = stacked.reshape(4 * 9 * C, 2 * CO)
    _STACKED[weight] = (key, stacked)
    return stacked


_LAST: dict = {}  # the last launch's compiled kernel (registers, spills), for main()


def stacked_pair_conv3d(
    windows: Sequence[torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    *,
    norm_silu: torch.Tensor | None = None,
    norm_eps: float = 1e-12,
    out: torch.Tensor | None = None,
    block_m: int = 128,
    num_warps: int = 4,
    num_stages: int = 4,
) -> torch.Tensor:
    """`padded_conv3d(windows, weight, bias, residual=residual, norm_silu=norm_silu, norm_eps=norm_eps, out=out)`
    for a 3x3x3 weight with 96 output channels and windows that are one buffer of padded frames shifted by a frame
    each (any T >= 1), two output frames per program in stacked accumulators. ``norm_silu``: 96 gains; then each
    frame is stored as silu(y / max(||y||, norm_eps) * sqrt(96) * gain), y the conv (+ bias + residual) rounded to
    the windows' dtype, the norm over its 96 channels. Returns ``out``."""
    if weight.dim() != 5 or weight.shape[0] != CO_STACKED or tuple(weight.shape[2:]) != (3, 3, 3):
        raise ValueError(f"weight must be ({CO_STACKED}, C, 3, 3, 3), got {tuple(weight.shape)}")
    C = weight.shape[1]
    if C % 16:
        raise ValueError(f"input channels must be a multiple of 16, got {C}")
    if len(windows) != 3:
        raise ValueError(f"need 3 windows (one per time tap), got {len(windows)}")
    x = windows[0]
    if x.dim() != 5 or x.shape[4] != C or x.shape[2] < 3 or x.shape[3] < 3:
        raise ValueError(f"windows must be (B, T, H + 2, W + 2, {C}), got {tuple(x.shape)}")
    B, T, HP, WP, _ = x.shape
    H, W = HP - 2, WP - 2
    dense = (HP * WP * C, WP * C, C, 1)
    step = x.stride(1) * x.element_size()
    for k, win in enumerate(windows):
        if win.shape != x.shape or win.dtype != x.dtype or win.stride()[1:] != dense or win.stride(0) % C:
            raise ValueError(f"windows must share shape {tuple(x.shape)} and dtype {x.dtype}, with dense padded "
                             f"frames (strides (*, {dense})), got {tuple(win.shape)} {win.dtype} {win.stride()}")
        if win.data_ptr() != x.data_ptr() + k * step or win.stride(0) != x.stride(0):
            raise ValueError("windows must be one buffer of padded frames shifted by a frame each")
    shape = (B, CO_STACKED, T, H, W)
    for name, t in (("residual", residual), ("out", out)):
        if t is not None and (t.shape != shape or t.stride(1) != 1):
            raise ValueError(f"{name} must be {shape} with channel stride 1, got {tuple(t.shape)} {t.stride()}")
    for name, t in (("bias", bias), ("norm_silu", norm_silu)):
        if t is not None and (t.numel() != CO_STACKED or not t.is_contiguous()):
            raise ValueError(f"{name} must hold {CO_STACKED} contiguous values, got shape {tuple(t.shape)}")
    block_k = _blocks(C, CO_STACKED)[2]
    stacked = stacked_taps(weight, x.dtype)
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last_3d)
    check_tensors(*windows, stacked, bias, residual, norm_silu, out)
    if out.numel() == 0:
        return out
    # each window as (rows, C): batch b's frame t, padded position p is row b * stride(0) / C + t * HP * WP + p
    descs = [TensorDescriptor(win, [(B - 1) * win.stride(0) // C + T * HP * WP, C], [C, 1], [block_m, block_k])
             for win in windows]
    w_descs = [TensorDescriptor(stacked, list(stacked.shape), [2 * CO_STACKED, 1], [block_k, n]) for n in (128, 64)]
    res = residual if residual is not None else out
    grid = (triton.cdiv(HP * WP, block_m), B * triton.cdiv(T, 2))
    _LAST["kernel"] = _stacked_pair_kernel[grid](
        *descs, *w_descs, bias if bias is not None else stacked, res,
        norm_silu if norm_silu is not None else stacked, out,
        T, H, W, *(win.stride(0) // C for win in windows),
        res.stride(0), res.stride(2), res.stride(3), res.stride(4),
        out.stride(0), out.stride(2), out.stride(3), out.stride(4),
        float(CO_STACKED) ** 0.5, float(norm_eps),
        C=C, HAS_BIAS=bias is not None, HAS_RES=residual is not None, NORM=norm_silu is not None,
        BLOCK_M=block_m, BLOCK_K=block_k,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def check_on_cpu() -> None:
    """Triton's interpreter, float32: the variant against fp64 `padded_conv3d_reference` (within 1e-5) and against
    `padded_conv3d` for B = 2, C = 16 / 32, T = 1, 2, 3, 5, frames 4x5 and 3x7, 32-row tiles, with and without bias
    + residual, with and without the norm + SiLU epilogue (``norm_silu``), into a strided `out` (the inside of padded
    frames, one frame more than T) of which nothing else is written. The windows' buffer has one NaN frame more per
    video (outside the windows: the odd-T last pair must not reach it for frame t)."""
    if not INTERPRET:
        raise RuntimeError("run with TRITON_INTERPRET=1 set before triton is imported")
    torch.manual_seed(0)
    n = n_norm = 0
    # Positions the kernel computes but does not store (ring, past the frame) may read garbage: with the norm,
    # a row whose frame t + 1 block 3 took 0 x NaN from input frame t while acc2 did not gets the eps scale (max
    # drops the NaN), and its SiLU overflows exp in numpy. Stored positions are checked against fp64 below.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="overflow encountered in exp", category=RuntimeWarning)
        for c, t, (h, w) in [(c, t, hw) for c in (16, 32) for t in (1, 2, 3, 5) for hw in ((4, 5), (3, 7))]:
            b, co = 2, CO_STACKED
            big = torch.full((b, t + 3, h + 2, w + 2, c), float("nan"))
            big[:, : t + 2] = torch.nn.functional.pad(torch.randn(b, t + 2, h, w, c), (0, 0, 1, 1, 1, 1))
            buf = big[:, : t + 2]
            windows = [buf[:, k : k + t] for k in range(3)]
            weight = torch.randn(co, c, 3, 3, 3) * (27 * c) ** -0.5
            gamma = 1 + 0.5 * torch.randn(co, 1, 1, 1)  # shaped as the VAE's RMSNorm gain
            for with_extras, g in ((e, g) for e in (True, False) for g in (None, gamma)):
                bias = torch.randn(co) if with_extras else None
                r = torch.randn(b, co, t, h, w).contiguous(memory_format=torch.channels_last_3d)
                r = r if with_extras else None
                following = torch.full((b, t + 1, h + 2, w + 2, co), 7.0)
                inside = following[:, :t, 1:-1, 1:-1].permute(0, 4, 1, 2, 3)
                assert stacked_pair_conv3d(windows, weight, bias, r, norm_silu=g, out=inside, block_m=32) is inside
                ref = padded_conv3d_reference([win.double() for win in windows], weight.double(),
                                              *(None if v is None else v.double() for v in (bias, r, g)))
                torch.testing.assert_close(inside.double(), ref, rtol=1e-5, atol=1e-5)
                engine = padded_conv3d(windows, weight, bias, residual=r, norm_silu=g, block_m=32)
                torch.testing.assert_close(inside, engine, rtol=1e-5, atol=1e-5)
                n_norm += g is not None
                untouched = torch.ones_like(following, dtype=torch.bool)
                untouched[:, :t, 1:-1, 1:-1] = False
                assert (following[untouched] == 7.0).all(), "wrote outside out"
                n += 1
    # the stacked matrix: block f = [tap f | tap f - 1], zeros where a frame takes nothing from input frame t + f
    weight = torch.randn(96, 16, 3, 3, 3)
    s = stacked_taps(weight, torch.float32).reshape(4, 9, 16, 192)
    for f in range(4):
        for half, tap in ((0, f), (1, f - 1)):
            block = s[f, :, :, half * 96 : (half + 1) * 96]
            expect = weight[:, :, tap].permute(2, 3, 1, 0).reshape(9, 16, 96) if 0 <= tap < 3 else 0 * block
            assert torch.equal(block, expect)
    assert stacked_taps(weight, torch.float32) is stacked_taps(weight, torch.float32)  # kept per weight
    for bad in (torch.randn(48, 16, 3, 3, 3), torch.randn(96, 8, 3, 3, 3)):
        try:
            stacked_pair_conv3d(windows, bad)
        except ValueError:
            pass
        else:
            raise AssertionError(f"accepted weight {tuple(bad.shape)}")
    try:
        stacked_pair_conv3d(windows, weight, norm_silu=torch.ones(48))
    except ValueError:
        pass
    else:
        raise AssertionError("accepted 48 norm gains")
    print(f"check_on_cpu: {n} cases ({n_norm} with norm_silu; B 2, C 16/32, T 1/2/3/5, 4x5 and 3x7, with and "
          "without bias + residual) match fp64 within 1e-5 and padded_conv3d; nothing outside out written; stacked "
          "weights checked")


def _compiled(fn) -> dict:
    """id -> compiled kernel, for every compilation of a @triton.jit function so far (Triton 3.x keeps them per
    device in a tuple whose first item is the kernel cache; empty where that differs: no register counts then)."""
    try:
        return {id(k): k for entry in fn.device_caches.values() for k in entry[0].values()}
    except (AttributeError, IndexError, KeyError, TypeError):
        return {}


def _regs(k) -> str:
    return f", {k.n_regs} registers, {k.n_spills} spilled" if hasattr(k, "n_regs") else ""


def main() -> None:
    F = torch.nn.functional
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    torch.manual_seed(0)
    B, c, o, t, h, w = 1, 96, 96, 12, 480, 832
    dtype = torch.bfloat16
    buf = torch.randn(B, c, t + 2, h, w, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last_3d)
    weight = (torch.randn(o, c, 3, 3, 3, device="cuda") / (27 * c) ** 0.5).to(dtype).contiguous(
        memory_format=torch.channels_last_3d)
    bias = torch.randn(o, device="cuda", dtype=dtype)
    residual = torch.randn(B, o, t, h, w, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last_3d)
    padded = F.pad(buf.permute(0, 2, 3, 4, 1), (0, 0, 1, 1, 1, 1)).contiguous()  # zero ring, as the VAE
    windows = [padded[:, k : k + t] for k in range(3)]
    flops = 2 * o * t * h * w * 27 * c * B

    ref = F.conv3d(buf.float(), weight.float(), bias.float(), padding=(0, 1, 1))
    for res in (None, residual):
        exact = ref if res is None else ref + res.float()
        mine = stacked_pair_conv3d(windows, weight, bias, res)
        engine = padded_conv3d(windows, weight, bias, residual=res)
        tag = "with residual" if res is not None else "no residual"
        print(f"check ({tag}): stacked vs padded_conv3d max abs diff "
              f"{(mine.float() - engine.float()).abs().max().item():.3e}; max abs error vs fp32 conv3d: stacked "
              f"{(mine.float() - exact).abs().max().item():.3e}, padded_conv3d "
              f"{(engine.float() - exact).abs().max().item():.3e}", flush=True)
        del exact, mine, engine
    del ref
    torch.cuda.empty_cache()

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")

    for res in (None, residual):
        tag = "+ residual" if res is not None else "no residual"
        out = torch.empty(B, o, t, h, w, device="cuda", dtype=dtype, memory_format=torch.channels_last_3d)
        for name, fn in (("engine pair (padded_conv3d)", partial(padded_conv3d, windows, weight, bias, residual=res,
                                                                 out=out)),
                         ("engine one frame (pair_frames=False)", partial(padded_conv3d, windows, weight, bias,
                                                                          residual=res, out=out, pair_frames=False))):
            ms = bench(fn)
            print(f"{tag}: {name}: {ms:.3f} ms ({flops / ms * 1e-9:.0f} TFLOP/s)", flush=True)
        for block_m, warps, stages in ((128, 4, 3), (128, 4, 4), (128, 8, 3), (128, 8, 4), (64, 4, 4)):
            name = f"{tag}: stacked pair block_m {block_m} warps {warps} stages {stages}"
            try:
                fn = partial(stacked_pair_conv3d, windows, weight, bias, res, out=out, block_m=block_m,
                             num_warps=warps, num_stages=stages)
                fn()
                k = _LAST.get("kernel")
                regs = f", {k.n_regs} registers, {k.n_spills} spilled" if hasattr(k, "n_regs") else ""
                ms = bench(fn)
                print(f"{name}: {ms:.3f} ms ({flops / ms * 1e-9:.0f} TFLOP/s){regs}", flush=True)
            except Exception as e:  # out of shared memory or registers
                print(f"{name}: failed: {type(e).__name__}: {str(e)[:160]}", flush=True)
        # the engine's pair kernel again, to see drift over the run
        ms = bench(partial(padded_conv3d, windows, weight, bias, residual=res, out=out))
        print(f"{tag}: engine pair (padded_conv3d) again: {ms:.3f} ms ({flops / ms * 1e-9:.0f} TFLOP/s)", flush=True)
    del out, residual
    torch.cuda.empty_cache()

    # The decoder's normed conv: each residual block's conv1 (bias, no residual) with silu(norm2(.)) applied as it
    # writes, into the inside of conv2's padded input buffer (2 past frames first), as CausalConv3d._padded_conv
    # does. The engine runs it one frame per program (its pair + norm measured 0.98x); the stacked pair with norm
    # against it. TFLOP/s counts the conv only.
    tag = "norm, no residual"
    gamma = (1 + 0.1 * torch.randn(o, 1, 1, 1, device="cuda")).to(dtype)
    following = torch.zeros(B, t + 2, h + 2, w + 2, o, device="cuda", dtype=dtype)
    inside = following[:, 2:, 1:-1, 1:-1].permute(0, 4, 1, 2, 3)
    known = _compiled(_padded_conv3d_kernel)
    padded_conv3d(windows, weight, bias, norm_silu=gamma, out=inside)
    engine_kernels = [k for i, k in _compiled(_padded_conv3d_kernel).items() if i not in known]
    engine = inside.float()
    stacked_pair_conv3d(windows, weight, bias, norm_silu=gamma, out=inside)
    mine = inside.float()
    exact = channel_rms_norm_reference(F.conv3d(buf.float(), weight.float(), bias.float(), padding=(0, 1, 1)),
                                       gamma, silu=True, compute_dtype=torch.float32)
    print(f"check ({tag}): stacked vs padded_conv3d(norm_silu) max abs diff "
          f"{(mine - engine).abs().max().item():.3e} ({(mine != engine).float().mean().item():.2e} of the values "
          f"differ); max abs error vs fp32 conv3d + norm + SiLU: stacked {(mine - exact).abs().max().item():.3e}, "
          f"padded_conv3d {(engine - exact).abs().max().item():.3e}", flush=True)
    assert (following[:, :2] == 0).all() and (following[:, :, 0] == 0).all() and (following[:, :, -1] == 0).all() \
        and (following[:, :, :, 0] == 0).all() and (following[:, :, :, -1] == 0).all(), "wrote outside out"
    del engine, mine, exact
    torch.cuda.empty_cache()

    engine_fn = partial(padded_conv3d, windows, weight, bias, norm_silu=gamma, out=inside)
    ms = bench(engine_fn)
    regs = _regs(engine_kernels[0]) if len(engine_kernels) == 1 else ""
    print(f"{tag}: engine normed conv (padded_conv3d, one frame per program): {ms:.3f} ms "
          f"({flops / ms * 1e-9:.0f} TFLOP/s){regs}", flush=True)
    for block_m, warps, stages, g in ((128, 4, 3, gamma), (128, 4, 4, gamma), (128, 8, 3, gamma), (128, 8, 4, gamma),
                                      (128, 4, 3, None)):
        name = f"{tag}: stacked pair{' with norm' if g is not None else ', NO norm (the epilogue cost)'} " \
               f"block_m {block_m} warps {warps} stages {stages}"
        try:
            fn = partial(stacked_pair_conv3d, windows, weight, bias, norm_silu=g, out=inside, block_m=block_m,
                         num_warps=warps, num_stages=stages)
            fn()
            regs = _regs(_LAST.get("kernel"))
            ms = bench(fn)
            print(f"{name}: {ms:.3f} ms ({flops / ms * 1e-9:.0f} TFLOP/s){regs}", flush=True)
        except Exception as e:  # out of shared memory or registers
            print(f"{name}: failed: {type(e).__name__}: {str(e)[:160]}", flush=True)
    ms = bench(engine_fn)
    print(f"{tag}: engine normed conv (padded_conv3d) again: {ms:.3f} ms ({flops / ms * 1e-9:.0f} TFLOP/s)",
          flush=True)


if __name__ == "__main__":
    main()
