"""`kernels.upsample_conv.upsample2x_conv2d` (nearest 2x upsampling + 3x3 conv as one implicit GEMM) against the
plain-torch reference in float64 and against the VAE's cuDNN-shaped path `streamgen.vae.upsample2x_conv`.

Without a GPU the kernel runs in Triton's interpreter (`kernel_support`, imported first, sets it up). fp32 is
checked to 1e-5 (4 C products summed in fp32, the phase taps rounded to fp32 once); fp16 loosely; bf16 on GPU only
(the interpreter computes bf16 `tl.dot` wrongly).
"""

from __future__ import annotations

import pytest
import torch
from kernel_support import DEVICE, INTERPRET, f64, rand

from kernels.upsample_conv import phase_taps, upsample2x_conv2d, upsample2x_conv2d_reference


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def frames(n: int, c: int, h: int, w: int, dtype=torch.float32) -> torch.Tensor:
    """Random channels-last frames (N, C, H, W)."""
    return rand(n, h, w, c, dtype=dtype).permute(0, 3, 1, 2)


def conv_weight(o: int, c: int, dtype=torch.float32) -> torch.Tensor:
    return rand(o, c, 3, 3, dtype=dtype, scale=(9 * c) ** -0.5)


# (N, C, O, H, W, block_m): one accumulator (O 16; 48 masked to 64), two (96 = 64 + 32, 192 = 128 + 64), several
# programs along O (256 = 2 x 128); tiles crossing the frame's right and bottom edges, frames narrower than a tile
# row (W <= 8: 8-wide tiles) or smaller than a whole tile (1 x 1, 2 x 3), several frames
CASES = [(1, 16, 16, 3, 5, 16), (3, 32, 48, 4, 7, 32), (1, 64, 96, 5, 9, 32), (2, 16, 192, 2, 3, 16),
         (1, 32, 256, 1, 1, 16), (1, 48, 96, 6, 17, 32)]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("bias", [False, True])
def test_matches_upsample_then_conv(case, bias):
    n, c, o, h, w, block_m = case
    x, weight = frames(n, c, h, w), conv_weight(o, c)
    b = rand(o) if bias else None
    out = upsample2x_conv2d(x, weight, b, block_m=block_m)
    assert out.shape == (n, o, 2 * h, 2 * w) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    ref = upsample2x_conv2d_reference(*f64(x, weight, b))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_writes_a_strided_out_in_place():
    """out = the inside of a larger channels-last buffer (a channel slice too): every value there written, nothing
    outside touched; a (C, 1, 1)-shaped bias and tiles 4 x 4."""
    n, c, o, h, w = 2, 32, 96, 3, 6
    x, weight, bias = frames(n, c, h, w), conv_weight(o, c), rand(o, 1, 1)
    buf = torch.full((n, 2 * h + 3, 2 * w + 2, o + 32), 7.0, device=DEVICE)
    out = buf[:, 1 : 1 + 2 * h, 2 : 2 + 2 * w, 16 : 16 + o].permute(0, 3, 1, 2)
    assert upsample2x_conv2d(x, weight, bias, out=out, block_m=16, block_w=4) is out
    ref = upsample2x_conv2d_reference(x.double(), weight.double(), bias.reshape(o).double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    outside = torch.ones_like(buf, dtype=torch.bool)
    outside[:, 1 : 1 + 2 * h, 2 : 2 + 2 * w, 16 : 16 + o] = False
    assert (buf[outside] == 7.0).all()


def test_reads_frames_of_a_larger_buffer():
    """x = every other frame of a channels-last batch (frame stride twice a frame) and a channels-first weight."""
    x = frames(4, 16, 3, 4)[::2]
    weight = conv_weight(32, 16)
    ref = upsample2x_conv2d_reference(x.double(), weight.double())
    torch.testing.assert_close(upsample2x_conv2d(x, weight, block_m=16).double(), ref, rtol=1e-5, atol=1e-5)


def test_matches_the_vae_phase_conv(monkeypatch):
    """Against `streamgen.vae.upsample2x_conv` (the phases as one conv with 4 O outputs, then interleaved): the
    same phase taps, so agreement up to fp32 summation order (cuDNN kept off tf32 on a GPU)."""
    from streamgen.vae import upsample2x_conv

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    conv = torch.nn.Conv2d(32, 96, 3, padding=1).to(DEVICE)
    x = frames(2, 32, 5, 6)
    with torch.no_grad():
        expected = upsample2x_conv(x, conv)
        got = upsample2x_conv2d(x, conv.weight, conv.bias, block_m=32)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16] + ([] if INTERPRET else [torch.bfloat16]), ids=str)
def test_low_precision(dtype):
    """16-bit inputs and weights (tap sums in fp32, rounded once); the fp32 sum rounded once to 16 bits, against fp64
    of the rounded inputs: within the tap sums' rounding plus one output rounding."""
    n, c, o, h, w = 1, 64, 96, 3, 5
    x, weight, bias = frames(n, c, h, w, dtype), conv_weight(o, c, dtype), rand(o, dtype=dtype)
    out = upsample2x_conv2d(x, weight, bias, block_m=16)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    ref = upsample2x_conv2d_reference(x.double(), weight.double(), bias.double())
    tol = 8 * torch.finfo(dtype).eps
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


def test_phase_tap_copy_follows_the_weight():
    """The phase-tap matrix kept per weight is made again when the weight changes in place or is replaced."""
    x = frames(1, 16, 2, 3)
    weight = torch.nn.Conv2d(16, 16, 3, bias=False).to(DEVICE).weight
    with torch.no_grad():
        first = upsample2x_conv2d(x, weight, block_m=16)
        assert phase_taps(weight, torch.float32) is phase_taps(weight, torch.float32)
        torch.testing.assert_close(upsample2x_conv2d(x, weight, block_m=16), first, rtol=0, atol=0)
        weight.mul_(2.0)
        torch.testing.assert_close(upsample2x_conv2d(x, weight, block_m=16), 2 * first)
        weight.data = -weight.data
        torch.testing.assert_close(upsample2x_conv2d(x, weight, block_m=16), -2 * first)


def test_rejects_bad_arguments():
    x, weight = frames(1, 16, 3, 4), conv_weight(16, 16)
    with pytest.raises(ValueError, match=r"x must be \(N, C, H, W\)"):
        upsample2x_conv2d(x[0], weight)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        upsample2x_conv2d(x.double(), weight)
    with pytest.raises(ValueError, match=r"weight must be \(O, 16, 3, 3\)"):
        upsample2x_conv2d(x, conv_weight(16, 32))
    with pytest.raises(ValueError, match=r"weight must be \(O, 16, 3, 3\)"):
        upsample2x_conv2d(x, rand(16, 16, 5, 5))
    with pytest.raises(ValueError, match="multiples of 16, got 8 and 16"):
        upsample2x_conv2d(frames(1, 8, 3, 4), conv_weight(16, 8))
    with pytest.raises(ValueError, match="multiples of 16, got 16 and 24"):
        upsample2x_conv2d(x, conv_weight(24, 16))
    with pytest.raises(ValueError, match="channels-last with dense positions"):
        upsample2x_conv2d(x.contiguous(), weight)
    with pytest.raises(ValueError, match="channels-last with dense positions"):
        upsample2x_conv2d(frames(1, 16, 3, 6)[..., ::2], weight)
    with pytest.raises(ValueError, match="bias must hold 16"):
        upsample2x_conv2d(x, weight, rand(8))
    with pytest.raises(ValueError, match=r"out must be \(1, 16, 6, 8\) with channel stride 1"):
        upsample2x_conv2d(x, weight, out=torch.empty(1, 16, 6, 8, device=DEVICE))  # channels-first
    with pytest.raises(ValueError, match=r"out must be \(1, 16, 6, 8\)"):
        upsample2x_conv2d(x, weight, out=frames(1, 16, 6, 6))
    with pytest.raises(ValueError, match="block_m must be a power of two"):
        upsample2x_conv2d(x, weight, block_m=48)
    with pytest.raises(ValueError, match="block_w a power of two dividing it"):
        upsample2x_conv2d(x, weight, block_m=16, block_w=32)


@pytest.mark.skipif(INTERPRET, reason="a race between a kernel's programs needs the GPU running them")
def test_same_result_while_another_stream_loads_the_gpu():
    """The decoder's 384-channel upsampler, launched on a side stream while the default stream runs GEMMs (as the
    decode beside the generator): bit-equal to its result alone each time. With three pipeline stages it differed
    every time (benchmarks/results/upsample_race_session15.txt)."""
    x = frames(4, 384, 120, 208, torch.bfloat16)
    w, b = conv_weight(192, 384, torch.bfloat16), rand(192, dtype=torch.bfloat16)
    alone = upsample2x_conv2d(x, w, b)
    load = rand(8192, 8192, dtype=torch.bfloat16)
    side = torch.cuda.Stream(priority=-1)
    for _ in range(6):
        torch.cuda.synchronize()
        for _ in range(20):
            load @ load
        with torch.cuda.stream(side):
            y = upsample2x_conv2d(x, w, b)
        torch.cuda.synchronize()
        assert torch.equal(y, alone)
