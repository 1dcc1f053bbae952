"""The few-output causal conv (the VAE decoder's RGB conv_out) against plain torch: one chunk against its fp64
reference, a video decoded in chunks through the pending sums against one conv3d of the whole video, into strided
outputs, in fp16 (bf16 on a GPU only: the interpreter computes bf16 `tl.dot` wrongly), and bad arguments.

Without a GPU the kernel runs in Triton's interpreter (`kernel_support`, imported first, sets it up)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_support import DEVICE, INTERPRET, f64, padded_frames, rand

from kernels.few_outputs_conv import few_outputs_conv3d, few_outputs_conv3d_reference, few_outputs_taps


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def conv_weight(o: int, c: int, dtype=torch.float32) -> torch.Tensor:
    return rand(o, c, 3, 3, 3, dtype=dtype, scale=(27 * c) ** -0.5)


def close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol)


# (B, C, O, T, H, W, (block_h, block_w)): tiles crossing the frame's right and bottom edges (5 x 9 in 2 x 8 tiles,
# 7 x 20 in 4 x 16, 6 x 33 in 6 x 8: the last tile one column wide), frames narrower or smaller than a tile (4 x 6,
# 2 x 3), several tiles per frame in both directions, the default 8 x 64 tiles, one frame and several, 1 to 4
# outputs, one to five K blocks per horizontal tap
CASES = [(2, 16, 3, 1, 4, 6, (2, 8)), (2, 32, 1, 2, 5, 9, (2, 8)), (2, 96, 4, 5, 4, 6, None),
         (2, 16, 3, 5, 2, 3, (4, 16)), (1, 48, 2, 2, 7, 20, (4, 16)), (1, 80, 3, 3, 6, 33, (6, 8))]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_one_chunk_matches_the_reference(case):
    """Outputs and new pending sums of a chunk continuing a video (random pending, bias) within 1e-5 of fp64; the
    frames a view of a longer buffer whose other frame is NaN (rows that positions outside the frame read and drop)."""
    b, c, o, t, h, w, blocks = case
    buf = padded_frames(b, t + 1, h, w, c)
    buf[:, 0] = float("nan")
    frames = buf[:, 1:]
    weight, bias, pending = conv_weight(o, c), rand(o), rand(b, 2, o, h, w)
    tiles = {} if blocks is None else dict(block_h=blocks[0], block_w=blocks[1])
    out, new = few_outputs_conv3d(frames, weight, bias, pending, **tiles)
    ref_out, ref_new = few_outputs_conv3d_reference(*f64(frames, weight, bias, pending))
    assert out.shape == (b, o, t, h, w) and out.dtype == torch.float32 and out.is_contiguous()
    assert new.shape == (b, 2, o, h, w) and new.dtype == torch.float32
    close(out, ref_out)
    close(new, ref_new)


def test_the_reference_is_the_conv_of_the_video_with_its_past():
    """Pending sums made from two earlier frames give the chunk's outputs of conv3d over [earlier frames + chunk]."""
    b, c, o, t, h, w = 1, 16, 3, 3, 4, 5
    frames = padded_frames(b, 2 + t, h, w, c).double()
    weight = conv_weight(o, c).double()
    _, pending = few_outputs_conv3d_reference(frames[:, :2], weight)
    out, _ = few_outputs_conv3d_reference(frames[:, 2:], weight, None, pending)
    video = frames[:, :, 1:-1, 1:-1].permute(0, 4, 1, 2, 3)
    close(out, F.conv3d(video, weight, padding=(0, 1, 1)), 1e-12)


@pytest.mark.parametrize("o", [3, 4])
def test_a_video_in_chunks_equals_the_whole_video(o):
    """Chunks of 1, 3, 1, 2 frames through the pending sums (a one-frame chunk combining the old pending with its
    frame) = one conv3d of the whole fp64 video with two zero frames before it and one zero pixel around."""
    b, c, h, w = 2, 32, 5, 9
    video = padded_frames(b, 7, h, w, c)
    weight, bias = conv_weight(o, c), rand(o)
    outs, pending, start = [], None, 0
    for t in (1, 3, 1, 2):
        chunk = video[:, start : start + t].contiguous()
        out, pending = few_outputs_conv3d(chunk, weight, bias, pending, block_h=2, block_w=8)
        outs.append(out)
        start += t
    plain = video[:, :, 1:-1, 1:-1].permute(0, 4, 1, 2, 3).double()
    ref = F.conv3d(F.pad(plain, (1, 1, 1, 1, 2, 0)), weight.double(), bias.double())
    close(torch.cat(outs, dim=2), ref)


def test_no_pending_is_zero_pending():
    b, c, o, t, h, w = 2, 16, 3, 2, 3, 4
    frames, weight = padded_frames(b, t, h, w, c), conv_weight(o, c)
    none = few_outputs_conv3d(frames, weight, block_h=2, block_w=8)
    zero = few_outputs_conv3d(frames, weight, None, torch.zeros(b, 2, o, h, w, device=DEVICE), block_h=2, block_w=8)
    for a, z in zip(none, zero):
        torch.testing.assert_close(a, z, rtol=0, atol=0)
    close(none[0], few_outputs_conv3d_reference(*f64(frames, weight))[0])


def test_into_a_strided_out():
    """`out` a channels-last slice of a bigger tensor (fp32, then the frames' fp16) is written in place and nothing
    outside it; the pending sums given channels-innermost, as the kernel returns them."""
    b, c, o, t, h, w = 2, 16, 3, 2, 4, 6
    frames, weight, bias = padded_frames(b, t, h, w, c), conv_weight(o, c), rand(o)
    pending = rand(b, 2, h, w, o).permute(0, 1, 4, 2, 3)
    ref = few_outputs_conv3d_reference(*f64(frames, weight, bias, pending))[0]
    for dtype in (torch.float32, torch.float16):
        if dtype == torch.float16:
            frames, weight = frames.half(), weight.half()
            ref = few_outputs_conv3d_reference(*f64(frames, weight, bias, pending))[0]
        big = torch.full((b, t + 1, h, w, o + 2), 7.0, dtype=dtype, device=DEVICE).permute(0, 4, 1, 2, 3)
        out = big[:, 1 : o + 1, 1:]
        assert few_outputs_conv3d(frames, weight, bias, pending, out=out, block_h=2, block_w=8)[0] is out
        close(out, ref, 1e-5 if dtype == torch.float32 else 2e-3)
        inside = torch.zeros_like(big, dtype=torch.bool)
        inside[:, 1 : o + 1, 1:] = True
        assert (big[~inside] == 7.0).all()


@pytest.mark.parametrize("dtype", [torch.float16] + ([] if INTERPRET else [torch.bfloat16]))
def test_half_frames(dtype):
    """16-bit frames and weight: fp32 sums of exact products, so fp32 outputs within 1e-5 of the fp64 conv of the
    same 16-bit values and 16-bit outputs within their rounding."""
    b, c, o, t, h, w = 2, 96, 3, 2, 3, 5
    frames, weight, bias = padded_frames(b, t, h, w, c, dtype), conv_weight(o, c, dtype), rand(o)
    ref_out, ref_new = few_outputs_conv3d_reference(*f64(frames, weight, bias))
    out, new = few_outputs_conv3d(frames, weight, bias, block_h=2, block_w=8)
    close(out, ref_out, 1e-4)
    close(new, ref_new, 1e-4)
    low = torch.empty(b, o, t, h, w, dtype=dtype, device=DEVICE)
    few_outputs_conv3d(frames, weight, bias, out=low, block_h=2, block_w=8)
    close(low, ref_out, 2 * torch.finfo(dtype).eps)


def test_weight_copy_layout_and_refresh():
    """Row 16 dw + c, column 16 dh + 8 (k // 2) + 2 o + k % 2 is weight[o, c, k, dh, dw], the other columns (dh = 3,
    k = 3, o >= 3) zero; the kept copy follows in-place changes."""
    weight = conv_weight(3, 16)
    taps = few_outputs_taps(weight, torch.float32)
    assert taps.shape == (48, 64)
    torch.testing.assert_close(taps[16 * 2 + 5, 16 * 1 + 8 * 1 + 2 * 2 + 0], weight[2, 5, 2, 1, 2], rtol=0, atol=0)
    by_tap = taps.view(3, 16, 4, 2, 4, 2).permute(0, 1, 2, 4, 3, 5).reshape(3, 16, 4, 4, 4)  # (dw, c, dh, o, k)
    expected = torch.zeros(3, 16, 4, 4, 4, device=DEVICE)
    expected[:, :, :3, :3, :3] = weight.permute(4, 1, 3, 0, 2)
    torch.testing.assert_close(by_tap, expected, rtol=0, atol=0)
    assert few_outputs_taps(weight, torch.float32) is few_outputs_taps(weight, torch.float32)
    weight.mul_(2.0)
    torch.testing.assert_close(few_outputs_taps(weight, torch.float32), 2 * taps)


def test_rejects_bad_arguments():
    frames, weight = padded_frames(1, 2, 3, 4, 16), conv_weight(3, 16)
    with pytest.raises(ValueError, match="frames must be"):
        few_outputs_conv3d(frames[0], weight)
    with pytest.raises(ValueError, match="weight must be"):
        few_outputs_conv3d(frames, conv_weight(3, 32))
    with pytest.raises(ValueError, match="weight must be"):
        few_outputs_conv3d(frames, rand(3, 16, 3, 1, 1))
    with pytest.raises(ValueError, match="1 to 4 output channels, got 5"):
        few_outputs_conv3d(frames, conv_weight(5, 16))
    with pytest.raises(ValueError, match="multiple of 16, got 8"):
        few_outputs_conv3d(padded_frames(1, 2, 3, 4, 8), conv_weight(3, 8))
    with pytest.raises(ValueError, match="at least one frame"):
        few_outputs_conv3d(frames[:, :0], weight)
    with pytest.raises(ValueError, match="dense padded frames"):
        few_outputs_conv3d(frames[:, :, :, 1:], weight)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        few_outputs_conv3d(frames.double(), weight)
    with pytest.raises(ValueError, match="pending must be"):
        few_outputs_conv3d(frames, weight, None, rand(1, 3, 3, 3, 4))
    with pytest.raises(ValueError, match="pending must be"):
        few_outputs_conv3d(frames, weight, None, rand(1, 2, 3, 3, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match="out must be"):
        few_outputs_conv3d(frames, weight, out=rand(1, 3, 2, 4, 3))
    with pytest.raises(ValueError, match="out must be"):
        few_outputs_conv3d(frames, weight, out=rand(1, 3, 2, 3, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match="bias must hold 3"):
        few_outputs_conv3d(frames, weight, rand(4))
    with pytest.raises(ValueError, match="block_h must be even and block_w a power of two, got 3 x 8"):
        few_outputs_conv3d(frames, weight, block_h=3, block_w=8)
    with pytest.raises(ValueError, match="block_h must be even and block_w a power of two, got 2 x 24"):
        few_outputs_conv3d(frames, weight, block_h=2, block_w=24)
