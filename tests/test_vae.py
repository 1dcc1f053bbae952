"""Wan2.1 VAE: diffusers layout, causal chunked coding equal to whole-video coding and to a plain reference."""

from __future__ import annotations

import json
import math
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from safetensors.torch import load_file, save_file
from torch import nn

from kernels._launch import INTERPRET
from streamgen.checkpoint import WEIGHTS_NAME, CheckpointError
from streamgen.vae import (
    AttentionBlock,
    CausalConv3d,
    Resample,
    ResidualBlock,
    TimeCache,
    VaeConfig,
    WanVAE,
    preset,
    set_frame_convs,
    to_uint8_frames,
    upsample2x_conv,
)

H = W = 16  # video size; latents are 2x2

# The CUDA inference path's Triton kernels run on these CPU modules only in Triton's interpreter (the CPU default);
# on a GPU machine triton compiles for the GPU and refuses CPU tensors.
interpreted = pytest.mark.skipif(not INTERPRET, reason="runs the fused path's Triton kernels in Triton's interpreter")


def tiny_config(**overrides) -> VaeConfig:
    fields = {
        "base_dim": 8, "z_dim": 4, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1, "attn_scales": [0.5],
        "temperal_downsample": [False, True, True], "latents_mean": [0.1, -0.2, 0.3, 0.0],
        "latents_std": [1.5, 0.5, 2.0, 1.0],
    }
    return VaeConfig(**{**fields, **overrides})


def randomize(vae: WanVAE, seed: int = 0) -> WanVAE:
    """Default inits keep activations tiny; give norms and biases spread so every path matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return vae.eval()


@pytest.fixture(scope="module")
def vae() -> WanVAE:
    torch.manual_seed(0)
    return randomize(WanVAE(tiny_config()))


@pytest.fixture(scope="module")
def vae64(vae) -> WanVAE:
    out = WanVAE(vae.config)
    out.load_state_dict(vae.state_dict())
    return out.double().eval()


# --- an independent whole-video reference: no cache, explicit padding, loops over frames -----------------------

def ref_conv(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    kt, kh, kw = conv.weight.shape[2:]
    x = F.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2, kt - 1, 0))  # all past in time, "same" in space
    return F.conv3d(x, conv.weight, conv.bias)


def ref_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    rms = x.pow(2).sum(1, keepdim=True).sqrt().clamp_min(1e-12)
    return x / rms * math.sqrt(x.shape[1]) * norm.gamma


def ref_residual(block: ResidualBlock, x: torch.Tensor) -> torch.Tensor:
    h = x if isinstance(block.conv_shortcut, nn.Identity) else ref_conv(block.conv_shortcut, x)
    y = ref_conv(block.conv1, F.silu(ref_norm(block.norm1, x)))
    return ref_conv(block.conv2, F.silu(ref_norm(block.norm2, y))) + h


def ref_attention(block: AttentionBlock, x: torch.Tensor) -> torch.Tensor:
    b, c, t, h, w = x.shape
    frames = []
    for i in range(t):
        f = ref_norm(block.norm, x[:, :, i])
        q, k, v = F.conv2d(f, block.to_qkv.weight, block.to_qkv.bias).flatten(2).split(c, dim=1)  # (b, c, hw)
        attn = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(c), dim=-1)
        o = (attn @ v.transpose(1, 2)).transpose(1, 2).reshape(b, c, h, w)
        frames.append(F.conv2d(o, block.proj.weight, block.proj.bias) + x[:, :, i])
    return torch.stack(frames, 2)


def ref_resample(block: Resample, x: torch.Tensor) -> torch.Tensor:
    c = x.shape[1]
    frames = list(x.unbind(2))
    if block.mode == "upsample3d":  # first frame kept; every later one becomes two (channel halves)
        y = ref_conv(block.time_conv, x[:, :, 1:])
        frames = [frames[0]] + [half for j in range(y.shape[2]) for half in (y[:, :c, j], y[:, c:, j])]
    conv = block.resample[1]
    if block.mode.startswith("up"):
        frames = [F.conv2d(f.repeat_interleave(2, -1).repeat_interleave(2, -2), conv.weight, conv.bias, padding=1)
                  for f in frames]
    else:
        frames = [F.conv2d(F.pad(f, (0, 1, 0, 1)), conv.weight, conv.bias, stride=2) for f in frames]
    x = torch.stack(frames, 2)
    if block.mode == "downsample3d":  # first frame kept, then stride-2 windows from the first frame
        wt, bt = block.time_conv.weight, block.time_conv.bias
        outs = [x[:, :, 0]] + [F.conv3d(x[:, :, s : s + 3], wt, bt)[:, :, 0] for s in range(0, x.shape[2] - 2, 2)]
        x = torch.stack(outs, 2)
    return x


def ref_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(block, ResidualBlock):
        return ref_residual(block, x)
    if isinstance(block, AttentionBlock):
        return ref_attention(block, x)
    return ref_resample(block, x)


def ref_mid(mid: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return ref_residual(mid.resnets[1], ref_attention(mid.attentions[0], ref_residual(mid.resnets[0], x)))


def ref_decode(vae: WanVAE, latents: torch.Tensor) -> torch.Tensor:
    cfg, dec = vae.config, vae.decoder
    shape = (1, -1, 1, 1, 1)
    z = latents * torch.tensor(cfg.latents_std, dtype=latents.dtype).view(shape) + torch.tensor(
        cfg.latents_mean, dtype=latents.dtype).view(shape)
    x = ref_mid(dec.mid_block, ref_conv(dec.conv_in, ref_conv(vae.post_quant_conv, z)))
    for up in dec.up_blocks:
        for resnet in up.resnets:
            x = ref_residual(resnet, x)
        if up.upsamplers is not None:
            x = ref_resample(up.upsamplers[0], x)
    return ref_conv(dec.conv_out, F.silu(ref_norm(dec.norm_out, x))).clamp(-1, 1)


def ref_encode(vae: WanVAE, video: torch.Tensor) -> torch.Tensor:
    cfg, enc = vae.config, vae.encoder
    x = ref_conv(enc.conv_in, video)
    for block in enc.down_blocks:
        x = ref_block(block, x)
    x = ref_conv(enc.conv_out, F.silu(ref_norm(enc.norm_out, ref_mid(enc.mid_block, x))))
    mean = ref_conv(vae.quant_conv, x)[:, : cfg.z_dim]
    shape = (1, -1, 1, 1, 1)
    return (mean - torch.tensor(cfg.latents_mean, dtype=x.dtype).view(shape)) / torch.tensor(
        cfg.latents_std, dtype=x.dtype).view(shape)


def latents(n: int, batch: int = 1, z: int = 4, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(batch, z, n, H // 8, W // 8, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def video(frames: int, batch: int = 1, seed: int = 2, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, 3, frames, H, W, generator=g, dtype=dtype) * 2 - 1)


# --- causal conv ---------------------------------------------------------------------------------------------------

@pytest.fixture(params=[True, False], ids=["frame-convs", "conv3d"])
def conv_path(request):
    set_frame_convs(request.param)
    yield request.param
    set_frame_convs(True)


@pytest.mark.parametrize("kernel, padding", [((3, 3, 3), (1, 1, 1)), ((3, 1, 1), (1, 0, 0)), ((3, 3, 1), (1, 1, 0))])
@pytest.mark.parametrize("batch, channels_last", [(1, True), (2, True), (2, False)])
@pytest.mark.parametrize("out_channels", [5, 3], ids=["taps", "taps-as-outputs"])  # 3: few_outputs_by_frames
def test_causal_conv_cache_equals_full_padded_sequence(conv_path, kernel, padding, batch, channels_last, out_channels):
    torch.manual_seed(0)
    conv = CausalConv3d(3, out_channels, kernel, padding=padding).double()
    x = torch.randn(batch, 3, 9, 6, 7, dtype=torch.float64)
    if channels_last:  # as WanVAE.to_channels_last() lays them out
        x = x.contiguous(memory_format=torch.channels_last_3d)
        conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last_3d)
    full = F.conv3d(F.pad(x, (padding[2],) * 2 + (padding[1],) * 2 + (2 * padding[0], 0)), conv.weight, conv.bias)
    cache = TimeCache()
    chunks = [conv(c, cache) for c in x.split([1, 3, 1, 4], dim=2)]  # chunks shorter than the kept frames too
    torch.testing.assert_close(torch.cat(chunks, 2), full, rtol=0, atol=1e-12)
    torch.testing.assert_close(conv(x), full, rtol=0, atol=1e-12)  # no cache: the video start
    if conv_path:  # frame convs keep x's layout (the CPU's float64 conv3d returns channels-first regardless)
        assert all(c.is_contiguous(memory_format=torch.channels_last_3d) == channels_last for c in chunks)


def test_one_frame_chunks_keep_their_frames_by_reference():
    """One-frame chunks (one-frame decode passes) copy no kept frames: the newest kept frame is the chunk's own input
    buffer and the older one the previous newest; the result is still the whole sequence's."""
    torch.manual_seed(0)
    conv = CausalConv3d(3, 5, 3, padding=1).double()
    x = torch.randn(1, 3, 4, 6, 7, dtype=torch.float64).contiguous(memory_format=torch.channels_last_3d)
    cache, kept, chunks = TimeCache(), [], []
    for frame in x.split(1, dim=2):
        chunks.append(conv(frame, cache))
        kept.append(cache.past[conv])
    for before, after, frame in zip(kept, kept[1:], x.split(1, dim=2)[1:]):
        assert after[0] is before[1] and torch.equal(after[1], frame)
    full = F.conv3d(F.pad(x, (1, 1, 1, 1, 2, 0)), conv.weight, conv.bias)
    torch.testing.assert_close(torch.cat(chunks, 2), full, rtol=0, atol=1e-12)


def test_few_output_convs_keep_partial_sums_not_input_frames(monkeypatch):
    """A conv with few outputs (the decoder's RGB conv) keeps, between chunks, the partial sums of its next kt - 1
    outputs (kt - 1 frames of O channels) instead of kt - 1 input frames of C channels, and convolves each input frame
    once; the result is the whole sequence's."""
    torch.manual_seed(0)
    conv = CausalConv3d(8, 3, 3, padding=1).double()
    x = torch.randn(2, 8, 7, 6, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last_3d)
    frames_convolved = []
    real = F.conv2d

    def conv2d(inp, *args, **kwargs):
        frames_convolved.append(inp.shape[0])
        return real(inp, *args, **kwargs)

    monkeypatch.setattr(F, "conv2d", conv2d)
    cache, chunks = TimeCache(), []
    for chunk in x.split([1, 1, 3, 2], dim=2):
        chunks.append(conv(chunk, cache))
        assert cache.past[conv].shape == (2, 2, 3, 6, 5)  # (B, kt - 1, O, H, W)
    assert frames_convolved == [2 * 1, 2 * 1, 2 * 3, 2 * 2]  # batch x new frames: none twice
    full = F.conv3d(F.pad(x, (1, 1, 1, 1, 2, 0)), conv.weight, conv.bias)
    torch.testing.assert_close(torch.cat(chunks, 2), full, rtol=0, atol=1e-12)


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=interpreted)])
def test_causal_conv_holds_its_kept_frames_once(monkeypatch, fused):
    # A residual block's second conv's `fill` is the whole first conv: a second copy of the kept frames alive then
    # is memory the GPU holds twice. The torch path copies them into its input buffer and drops them before `fill`;
    # the Triton path (CUDA inference) reads them where they lie: `fill` writes a buffer of the chunk's frames alone.
    from streamgen import vae as vae_module

    if fused:  # Triton's interpreter here: padded frames and the implicit GEMM
        monkeypatch.setattr(vae_module, "_fused", lambda x: not torch.is_grad_enabled())
    torch.manual_seed(0)
    b, c, h, w = 1, 16, 4, 6
    conv = CausalConv3d(c, c, 3, padding=1)
    x = torch.randn(b, c, 5, h, w).contiguous(memory_format=torch.channels_last_3d)
    cache, chunks, alive, frames = TimeCache(), [], [], []

    def fill(chunk):
        def write(out):
            alive.extend(ref() is not None for ref in kept)
            frames.append(out.untyped_storage().nbytes() // (4 * c * ((h + 2) * (w + 2) if fused else h * w)))
            out.copy_(chunk)
        return write

    with torch.no_grad():
        kept = []
        for chunk in x.split([2, 3], dim=2):
            chunks.append(conv.convolve(chunk, fill(chunk), cache))
            kept = [weakref.ref(frame) for frame in cache.past[conv]]
    assert len(kept) == 2
    assert frames == ([2, 3] if fused else [4, 5])  # the chunk's frames, or 2 kept + the chunk's
    assert fused or alive == [False, False]
    full = F.conv3d(F.pad(x.double(), (1, 1, 1, 1, 2, 0)), conv.weight.double(), conv.bias.double())
    torch.testing.assert_close(torch.cat(chunks, 2).double(), full, rtol=0, atol=1e-4)


@interpreted
def test_fused_few_output_conv_continues_the_video(monkeypatch):
    """On the CUDA inference path (run here in Triton's interpreter) the RGB conv of 16 channels is one Triton pass
    over a chunk's padded frames (`kernels.few_outputs_conv`), keeping fp32 partial sums between chunks; fp32
    output; chunks of one frame and longer continue the whole video's conv."""
    import kernels.few_outputs_conv
    from streamgen import vae as vae_module

    torch.manual_seed(0)
    conv = CausalConv3d(16, 3, 3, padding=1)
    x = torch.randn(2, 16, 6, 5, 7).contiguous(memory_format=torch.channels_last_3d)
    full = F.conv3d(F.pad(x.double(), (1, 1, 1, 1, 2, 0)), conv.weight.double(), conv.bias.double())
    calls = []
    kernel = kernels.few_outputs_conv.few_outputs_conv3d
    monkeypatch.setattr(kernels.few_outputs_conv, "few_outputs_conv3d",
                        lambda *a, **k: calls.append(a[0].shape[1]) or kernel(*a, **k))
    monkeypatch.setattr(vae_module, "_fused", lambda x: not torch.is_grad_enabled())
    cache, chunks = TimeCache(), []
    with torch.no_grad():
        for chunk in x.split([1, 3, 2], dim=2):
            chunks.append(conv(chunk, cache))
            assert cache.past[conv].shape == (2, 2, 3, 5, 7) and cache.past[conv].dtype == torch.float32
    assert calls == [1, 3, 2]
    torch.testing.assert_close(torch.cat(chunks, 2).double(), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_streaming_decode_by_frames_equals_the_conv3d_path(vae64, channels_last):
    gen = torch.Generator().manual_seed(3)
    latents = torch.randn(1, vae64.config.z_dim, 5, 2, 2, generator=gen, dtype=torch.float64)
    outs = {}
    try:
        vae64.to_channels_last(channels_last)
        for enabled in (False, True):
            set_frame_convs(enabled)
            outs[enabled] = vae64.decode(latents, [1, 2, 2])
    finally:
        set_frame_convs(True)
        vae64.to_channels_last(False)
    torch.testing.assert_close(outs[True], outs[False], rtol=0, atol=1e-10)


@pytest.fixture
def triton_conv_calls(monkeypatch) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) of every call the VAE makes to the Triton conv (`kernels.conv3d.causal_conv3d`, with the
    kept frames first), which still runs."""
    import kernels.conv3d

    calls = []
    conv = kernels.conv3d.causal_conv3d
    monkeypatch.setattr(kernels.conv3d, "causal_conv3d", lambda *a, **k: calls.append((a, k)) or conv(*a, **k))
    return calls


@interpreted
def test_fused_batch_decode_and_encode_equal_the_torch_path(vae, monkeypatch, triton_conv_calls):
    """Two videos at once through the Triton convs (batch strides of padded buffers and of kept frames), and the
    encoder's residual blocks through them too (I2V / V2V context), against the torch path."""
    from streamgen import vae as vae_module

    z, clip = latents(3, batch=2), video(9, batch=2)
    vae.to_channels_last(True)
    try:
        expected = vae.decode(z, [1, 2]), vae.encode(clip, 4)
        monkeypatch.setattr(vae_module, "_fused", lambda x: not torch.is_grad_enabled())
        decoded = vae.decode(z, [1, 2])
        in_decode = len(triton_conv_calls)
        encoded = vae.encode(clip, 4)
    finally:
        vae.to_channels_last(False)
    torch.testing.assert_close(decoded, expected[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(encoded, expected[1], rtol=0, atol=1e-4)
    batches = {len(args[0][0]) for args, _ in triton_conv_calls}  # the batch each Triton conv saw
    assert 0 < in_decode < len(triton_conv_calls) and batches == {2}


@interpreted
@pytest.mark.parametrize("pass_frames,norm_epilogue", [(None, True), (1, True), (None, False)])
def test_fused_decode_equals_the_torch_path(vae, monkeypatch, triton_conv_calls, pass_frames, norm_epilogue):
    """The CUDA inference path (Triton norm kernel, and the 16-channel causal convs as Triton implicit GEMMs over
    zero-padded frames with their shortcut added, or the next norm applied, as they write; run here in Triton's
    interpreter) decodes the frames of the torch path, in chunks of one and two latent frames, whole or one frame per
    pass; and with the norm after the conv where the conv cannot apply it (`fuses_norm` false: wider convs)."""
    import kernels.conv3d
    from streamgen import vae as vae_module

    if not norm_epilogue:
        monkeypatch.setattr(kernels.conv3d, "fuses_norm", lambda c, co: False)

    z = latents(5)
    vae.to_channels_last(True)
    monkeypatch.setattr(vae, "decode_pass_frames", pass_frames)
    try:
        expected = vae.decode(z, [1, 2, 2])
        assert not triton_conv_calls  # the torch path on CPU
        monkeypatch.setattr(vae_module, "_fused", lambda x: not torch.is_grad_enabled())
        got = vae.decode(z, [1, 2, 2])
    finally:
        vae.to_channels_last(False)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    residuals = [k.get("residual") is not None for _, k in triton_conv_calls]
    norms = [k.get("norm_silu") is not None for _, k in triton_conv_calls]  # each block's conv1 writes conv2's input
    assert any(residuals) and not all(residuals) and any(norms) == norm_epilogue and not all(norms)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "inference"])
def test_upsample2x_conv_equals_nearest_upsampling_then_conv_float64(channels_last, bias, grad):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, 7, 4, generator=g, dtype=torch.float64)  # odd and even sides
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    conv = nn.Conv2d(5, 6, 3, padding=1, bias=bias).double()
    with torch.set_grad_enabled(grad):  # the bias is added in the interleaving pass (out=) without autograd only
        out = upsample2x_conv(x, conv)
    assert out.requires_grad == grad
    expected = conv(x.repeat_interleave(2, -1).repeat_interleave(2, -2))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@interpreted
def test_fused_upsample2x_conv_is_the_triton_kernel(monkeypatch):
    """On the CUDA inference path (run here in Triton's interpreter) a channels-last upsampling with channels that
    are multiples of 16 is one `kernels.upsample_conv` call; frames of other layouts or channel counts, or the
    Triton convs switched off, keep the cuDNN-phase path; both equal nearest upsampling then the conv."""
    import kernels.upsample_conv
    from streamgen import vae as vae_module

    torch.manual_seed(0)
    calls = []
    kernel = kernels.upsample_conv.upsample2x_conv2d
    monkeypatch.setattr(kernels.upsample_conv, "upsample2x_conv2d", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    monkeypatch.setattr(vae_module, "_fused", lambda x: not torch.is_grad_enabled())
    cases = [(16, 32, True, True, True), (16, 8, True, True, False), (16, 32, False, True, False),
             (16, 32, True, False, False)]
    for c, o, channels_last, triton_convs, expect_kernel in cases:
        monkeypatch.setattr(vae_module, "_triton_convs", triton_convs)
        conv = nn.Conv2d(c, o, 3, padding=1)
        x = torch.randn(2, c, 3, 5)
        x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        expected = F.conv2d(x.double().repeat_interleave(2, -1).repeat_interleave(2, -2), conv.weight.double(),
                            conv.bias.double(), padding=1)
        calls.clear()
        with torch.no_grad():
            out = upsample2x_conv(x, conv)
        assert bool(calls) == expect_kernel
        torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)


# --- decoding ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sizes", [[1, 3, 3, 2], [1] * 6, [3, 2, 4], [9]])
def test_chunked_decode_equals_whole_decode(vae, sizes):
    n = sum(sizes)
    z = latents(n, batch=len(sizes) % 2 + 1)
    whole = vae.decode(z, latents_per_chunk=None)
    assert whole.shape == (z.shape[0], 3, 1 + 4 * (n - 1), H, W) and whole.dtype == torch.float32
    assert whole.abs().max() <= 1.0 and whole.std() > 0.05  # not all clamped, not flat
    decoder = vae.stream_decoder()
    parts = []
    for i, chunk in enumerate(z.split(sizes, dim=2)):
        out = decoder.decode(chunk)
        f = chunk.shape[2]
        assert out.shape[2] == (1 + 4 * (f - 1) if i == 0 else 4 * f)
        parts.append(out)
    torch.testing.assert_close(torch.cat(parts, 2), whole, rtol=0, atol=2e-5)
    torch.testing.assert_close(vae.decode(z, sizes), whole, rtol=0, atol=2e-5)  # the same chunks, given as sizes


@pytest.mark.parametrize("pass_frames", [1, 2, 3, 4, 5, 8])
def test_decode_in_smaller_passes_equals_whole_decode(vae, pass_frames, monkeypatch):
    z = latents(7)
    monkeypatch.setattr(vae, "decode_pass_frames", None)  # the whole video in one pass
    whole = vae.decode(z, latents_per_chunk=None)
    decoder = vae.stream_decoder()
    seen = []  # frames per call of the full-resolution blocks
    first = vae.decoder.up_blocks[-1].resnets[0]
    hook = first.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[2]))
    try:
        vae.decode_pass_frames = pass_frames
        parts = [decoder.decode(chunk) for chunk in z.split([1, 3, 3], dim=2)]
        whole_in_passes = vae.decode(z, latents_per_chunk=None)  # no stream: the passes carry a cache of their own
    finally:
        hook.remove()
    assert decoder.latent_frames == 7
    assert max(seen) <= pass_frames and sum(seen) == 2 * 25  # every frame once per decode
    torch.testing.assert_close(torch.cat(parts, 2), whole, rtol=0, atol=2e-5)
    torch.testing.assert_close(whole_in_passes, whole, rtol=0, atol=2e-5)


@pytest.mark.parametrize("pass_frames", [None, 2])
def test_decoder_frees_each_layers_input_once_the_next_layer_runs(vae, pass_frames, monkeypatch):
    # Nothing but the layer loop may hold an activation: a block's input kept alive through the block's later
    # layers is a whole chunk of full-resolution frames on the GPU.
    previous = []  # a weak reference to the last layer's input
    dead = []

    def check(module, args):
        if previous:
            dead.append(previous[0]() is None)
        previous[:] = [weakref.ref(args[0])]

    decoder = vae.decoder
    hooks = [m.register_forward_pre_hook(check) for m in decoder.low_res_layers + decoder.per_frame_layers]
    monkeypatch.setattr(vae, "decode_pass_frames", pass_frames)
    try:
        stream = vae.stream_decoder()
        for chunk in latents(4).split([1, 3], dim=2):
            stream.decode(chunk)
    finally:
        for h in hooks:
            h.remove()
    layers = len(decoder.low_res_layers) + len(decoder.per_frame_layers)
    assert len(dead) >= 2 * layers - 1 and all(dead)


def test_decode_pass_size_must_be_positive(vae, monkeypatch):
    assert vae.decode_pass_frames == 2  # the default: as fast as whole chunks on the GPU, with less memory
    monkeypatch.setattr(vae, "decode_pass_frames", 0)
    with pytest.raises(ValueError, match="decode_pass_frames must be None or >= 1, got 0"):
        vae.stream_decoder().decode(latents(1))


def test_decode_matches_independent_reference_float64(vae64):
    # Outputs are float32 whatever the model dtype, so float32 rounding (~6e-8) bounds the agreement.
    z = latents(5, batch=2, dtype=torch.float64)
    expected = ref_decode(vae64, z).float()
    torch.testing.assert_close(vae64.decode(z, latents_per_chunk=None), expected, rtol=0, atol=1e-6)
    decoder = vae64.stream_decoder()
    streamed = torch.cat([decoder.decode(c) for c in z.split([1, 1, 3], dim=2)], dim=2)
    torch.testing.assert_close(streamed, expected, rtol=0, atol=1e-6)


def test_channels_last_decode_matches_independent_reference_float64(vae64, monkeypatch):
    """Channels-last, the 1x1 convs (shortcuts, time convs' taps, the attention's projections) run as GEMMs on the
    activations' rows, with bias and tap sums in the GEMM: still the reference's frames."""
    import streamgen.vae as vae_module

    z = latents(5, dtype=torch.float64)
    gemms = []
    real = vae_module._pointwise

    def pointwise(*args):
        out = real(*args)
        gemms.append(out is not None)
        return out

    monkeypatch.setattr(vae_module, "_pointwise", pointwise)
    try:
        vae64.to_channels_last()
        decoder = vae64.stream_decoder()
        streamed = torch.cat([decoder.decode(c) for c in z.split([1, 1, 3], dim=2)], dim=2)
    finally:
        vae64.to_channels_last(False)
    torch.testing.assert_close(streamed, ref_decode(vae64, z).float(), rtol=0, atol=1e-6)
    assert sum(gemms) > 10  # the GEMMs ran (post_quant_conv, attention, time convs)


def test_reset_starts_a_new_video(vae):
    z = latents(3)
    decoder = vae.stream_decoder()
    first = decoder.decode(z)
    decoder.decode(latents(2, seed=7))
    decoder.reset()
    torch.testing.assert_close(decoder.decode(z), first, rtol=0, atol=0)


def test_decode_rejects_wrong_latents(vae):
    with pytest.raises(ValueError, match="latents"):
        vae.stream_decoder().decode(torch.zeros(1, 3, 2, 4, 4))


# --- encoding ------------------------------------------------------------------------------------------------------

def test_encode_shapes_and_chunking(vae):
    x = video(13, batch=2)
    whole = vae.encode(x, frames_per_chunk=None)
    assert whole.shape == (2, 4, 4, H // 8, W // 8)
    torch.testing.assert_close(vae.encode(x), whole, rtol=0, atol=2e-5)  # Wan's 1, 4, 4, 4
    encoder = vae.stream_encoder()
    parts = [encoder.encode(c) for c in x.split([5, 8], dim=2)]
    assert [p.shape[2] for p in parts] == [2, 2]
    torch.testing.assert_close(torch.cat(parts, 2), whole, rtol=0, atol=2e-5)
    frames = vae.decode(whole)
    assert frames.shape == (2, 3, 13, H, W)


def test_encode_matches_independent_reference_float64(vae64):
    x = video(9, dtype=torch.float64)
    torch.testing.assert_close(vae64.encode(x, frames_per_chunk=4), ref_encode(vae64, x), rtol=0, atol=1e-10)


def test_encode_rejects_misaligned_chunks(vae):
    encoder = vae.stream_encoder()
    with pytest.raises(ValueError, match="first encoder chunk"):
        encoder.encode(video(4))
    encoder.encode(video(1))
    with pytest.raises(ValueError, match="multiple of 4"):
        encoder.encode(video(3))
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        vae.encode(video(8))


# --- normalisation and config --------------------------------------------------------------------------------------

def test_normalize_denormalize_are_inverses(vae):
    z = latents(3)
    torch.testing.assert_close(vae.normalize(vae.denormalize(z)), z)
    torch.testing.assert_close(vae.denormalize(z)[:, 1], z[:, 1] * 0.5 - 0.2)  # x = z * std + mean


def test_config_missing_key_fails_clearly():
    fields = tiny_config().to_json_dict()
    del fields["latents_std"]
    with pytest.raises(ValidationError, match="latents_std"):
        VaeConfig.model_validate(fields)


def test_config_rejects_inconsistent_fields():
    with pytest.raises(ValidationError, match="latents_mean"):
        tiny_config(latents_mean=[0.0] * 3)
    with pytest.raises(ValidationError, match="temperal_downsample"):
        tiny_config(temperal_downsample=[True])
    with pytest.raises(ValidationError, match=r"Wan2\.2"):
        tiny_config(is_residual=True)


def test_config_keeps_unknown_keys_and_defaults_to_wan21():
    cfg = VaeConfig.model_validate({"_class_name": "AutoencoderKLWan", "foo": [1, 2], "latents_mean": [0.0] * 16,
                                    "latents_std": [1.0] * 16})
    assert cfg.model_extra == {"_class_name": "AutoencoderKLWan", "foo": [1, 2]}
    assert cfg.to_json_dict()["foo"] == [1, 2]
    assert (cfg.base_dim, cfg.z_dim, cfg.dim_mult, cfg.num_res_blocks, cfg.attn_scales, cfg.temperal_downsample) == (
        96, 16, [1, 2, 4, 4], 2, [], [False, True, True])
    assert (cfg.temporal_factor, cfg.spatial_factor) == (4, 8)


# --- checkpoints ---------------------------------------------------------------------------------------------------

def test_real_config_has_diffusers_names_and_shapes():
    with torch.device("meta"):
        sd = WanVAE(preset("wan2.1")).state_dict()
    expected = {
        "encoder.conv_in.weight": (96, 3, 3, 3, 3),
        "encoder.down_blocks.0.norm1.gamma": (96, 1, 1, 1),
        "encoder.down_blocks.2.resample.1.weight": (96, 96, 3, 3),
        "encoder.down_blocks.3.conv_shortcut.weight": (192, 96, 1, 1, 1),
        "encoder.down_blocks.5.time_conv.weight": (192, 192, 3, 1, 1),
        "encoder.mid_block.attentions.0.norm.gamma": (384, 1, 1),
        "encoder.mid_block.attentions.0.to_qkv.weight": (1152, 384, 1, 1),
        "encoder.conv_out.weight": (32, 384, 3, 3, 3),
        "quant_conv.weight": (32, 32, 1, 1, 1),
        "post_quant_conv.weight": (16, 16, 1, 1, 1),
        "decoder.conv_in.weight": (384, 16, 3, 3, 3),
        "decoder.mid_block.resnets.1.conv2.weight": (384, 384, 3, 3, 3),
        "decoder.up_blocks.0.upsamplers.0.time_conv.weight": (768, 384, 3, 1, 1),
        "decoder.up_blocks.0.upsamplers.0.resample.1.weight": (192, 384, 3, 3),
        "decoder.up_blocks.1.resnets.0.conv_shortcut.weight": (384, 192, 1, 1, 1),
        "decoder.up_blocks.2.upsamplers.0.resample.1.weight": (96, 192, 3, 3),
        "decoder.up_blocks.3.resnets.2.conv1.weight": (96, 96, 3, 3, 3),
        "decoder.norm_out.gamma": (96, 1, 1, 1),
        "decoder.conv_out.weight": (3, 96, 3, 3, 3),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert "decoder.up_blocks.2.upsamplers.0.time_conv.weight" not in sd  # the last upsampler is spatial only
    assert not any(".residual." in k for k in sd)  # original-Wan naming, not diffusers'
    assert len(sd) == 194
    assert sum(t.numel() for t in sd.values()) == 126_892_531


def test_save_load_round_trip(vae, tmp_path):
    cfg = tiny_config().to_json_dict() | {"_diffusers_version": "0.33.0"}
    vae = WanVAE(VaeConfig.model_validate(cfg))
    vae.load_state_dict(randomize(WanVAE(tiny_config()), seed=3).state_dict())
    vae.save_pretrained(tmp_path / "vae")
    saved = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert saved["_class_name"] == "AutoencoderKLWan" and saved["_diffusers_version"] == "0.33.0"
    keys = set(load_file(tmp_path / "vae" / WEIGHTS_NAME))
    assert {"decoder.conv_in.weight", "post_quant_conv.weight", "encoder.down_blocks.0.norm1.gamma"} <= keys
    loaded = WanVAE.from_pretrained(tmp_path)  # pipeline folder -> vae/
    assert not loaded.training and loaded.config.to_json_dict() == saved
    z = latents(3)
    assert torch.equal(loaded.decode(z), vae.eval().decode(z))
    x = video(5)
    assert torch.equal(loaded.encode(x), vae.encode(x))


def test_wrong_checkpoint_fails(vae, tmp_path):
    vae.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    tensors["decoder.conv_in.weight"] = tensors["decoder.conv_in.weight"][:, :2].contiguous()
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    with pytest.raises(CheckpointError, match=r"decoder\.conv_in\.weight"):
        WanVAE.from_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["z_dim"], config["latents_mean"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="latents_mean"):
        WanVAE.from_pretrained(tmp_path)


# --- frames for sinks ----------------------------------------------------------------------------------------------

def test_to_uint8_frames_layout_and_values():
    frames = torch.zeros(2, 3, 5, 4, 6)
    frames[:, 0] = -1.0
    frames[:, 1] = 1.0
    frames[:, 2, :, 0, 0] = 2.0  # clamped
    out = to_uint8_frames(frames)
    assert out.shape == (2, 5, 4, 6, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    assert (out[..., 0] == 0).all() and (out[..., 1] == 255).all()
    assert out[0, 0, 0, 0, 2] == 255 and out[0, 0, 1, 1, 2] == 128
    single = to_uint8_frames(frames[0])
    assert single.shape == (5, 4, 6, 3) and np.array_equal(single, out[0])
    with pytest.raises(ValueError):
        to_uint8_frames(torch.zeros(2, 4, 5, 4, 6))
