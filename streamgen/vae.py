"""Wan2.1 video VAE in the diffusers `AutoencoderKLWan` layout, with exact chunk-by-chunk (streaming) coding.

Released checkpoints (`vae/config.json` + `vae/diffusion_pytorch_model.safetensors`) load unchanged: every parameter
name and shape is diffusers' own (`encoder.down_blocks.0.norm1.gamma`, `decoder.up_blocks.0.upsamplers.0.time_conv`,
`post_quant_conv`, ...).

Time is causal everywhere, so a video can be coded a chunk of frames at a time and give the frames a whole-video pass
gives. What each temporal layer sees, written for the whole video (this is what diffusers' frame-by-frame loop with
its feature cache computes):

- a causal 3D conv with temporal kernel 3 sees its input with two zero frames in front;
- the decoder's temporal upsampler passes the video's first frame through unchanged and runs its `time_conv` on the
  remaining frames (again with two zero frames in front), each of which becomes two frames (first half of the output
  channels, then the second half);
- the encoder's temporal downsampler passes the first frame through and adds one frame per stride-2 window starting
  at the first frame, so a 1 + 2m frame input gives 1 + m frames.

Every other layer (RMS norm, SiLU, spatial resampling, per-frame attention) acts on each frame alone. Chunked coding
keeps, per layer, the last input frames it still needs (`TimeCache`) and runs each layer once over
[kept frames + chunk], so a chunk of many frames costs one pass per layer rather than one per frame.

Memory traffic, not arithmetic, is most of what is left to save around the convs. A causal conv's input is built in
one buffer: the kept frames (or zeros) are copied to its head and the layer before it writes the chunk straight into
its tail (`CausalConv3d.convolve`), so no [kept frames + chunk] concatenation is made; a one-frame chunk skips the
buffer (each tap then reads one whole frame) and its kept frames are kept by reference. On CUDA without autograd
the RMS norm (+ SiLU) is one Triton kernel (`kernels/vae_ops.py`) that writes there; `set_fused_kernels(False)`
selects the plain torch ops, which autograd and CPUs always use. Every step keeps the activations' memory format, so
`WanVAE.to_channels_last()` runs the whole network channels-last (cuDNN's native layout) without layout changes.
There, on CUDA, each causal 3x3x3 conv is Triton implicit GEMMs (`kernels/conv3d.py`, `set_triton_convs`) that read
the kept frames where they lie and the chunk from a buffer of its own zero-padded frames (the zero ring is the
conv's spatial padding), so nothing is copied in front of the chunk; all 27 taps are summed in registers and the
bias and a residual block's shortcut are added as the result is written, once; at up to 128 output channels a
residual block's first conv also applies the second conv's norm + SiLU as it writes (`kernels.conv3d.fuses_norm`).
Other convs, and all convs when it is off or on CPUs, run as sums of 2D convolutions over whole frames
(`set_frame_convs`), which beat the 3D ones (measured on an H100 and on a 2-core CPU). Each nearest-2x upsampling +
3x3 conv runs as one 2x2-phase convolution (`upsample2x_conv`). The blocks after the last temporal upsampler take a
chunk a few frames at a time (`WanVAE.decode_pass_frames`, 2 by default): they hold the full-resolution activations.
Timings: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from streamgen.checkpoint import CheckpointError, component_dir, load_weights, read_config, save_weights
from streamgen.config import Count, Width

# Per-channel latent statistics of the released Wan2.1 VAE (its config.json carries them too).
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)


class VaeConfig(BaseModel):
    """`AutoencoderKLWan` config.json. Architecture fields default to the released Wan2.1 VAE (as in diffusers); the
    latent statistics are required, because guessing them would silently shift every decoded frame."""

    model_config = ConfigDict(extra="allow", frozen=True)

    base_dim: Width = 96
    decoder_base_dim: Width | None = None
    z_dim: Width = 16
    dim_mult: Annotated[list[Count], Field(max_length=16)] = [1, 2, 4, 4]
    num_res_blocks: Count = 2
    attn_scales: list[float] = []
    temperal_downsample: list[bool] = [False, True, True]  # diffusers' spelling
    dropout: float = 0.0
    latents_mean: list[float]
    latents_std: list[float]
    in_channels: Width = 3
    out_channels: Width = 3
    is_residual: bool = False  # True is the Wan2.2 VAE, a different architecture
    patch_size: int | None = None  # set by the Wan2.2 VAE only

    @model_validator(mode="after")
    def _consistent(self) -> VaeConfig:
        if self.is_residual or (self.patch_size or 1) != 1:
            raise ValueError("is_residual / patch_size describe the Wan2.2 VAE; only the Wan2.1 VAE is supported")
        if len(self.dim_mult) < 1 or len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"temperal_downsample needs one entry per downsampling stage (len(dim_mult) - 1 = "
                f"{len(self.dim_mult) - 1}), got {len(self.temperal_downsample)}"
            )
        for name in ("latents_mean", "latents_std"):
            if len(getattr(self, name)) != self.z_dim:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries, z_dim is {self.z_dim}")
        if any(s <= 0 for s in self.latents_std):
            raise ValueError("latents_std entries must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        return self

    @property
    def temporal_factor(self) -> int:
        """Video frames per latent frame (after the first, which maps 1 to 1)."""
        return 2 ** sum(self.temperal_downsample)

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    def to_json_dict(self) -> dict:
        return self.model_dump(mode="json")


def preset(name: str) -> VaeConfig:
    """The released Wan2.1 VAE ("wan2.1", for benchmarks with random weights) and a tiny one for tests ("tiny",
    16 latent channels like the real one so it pairs with the tiny transformer)."""
    stats = {"latents_mean": list(WAN21_LATENTS_MEAN), "latents_std": list(WAN21_LATENTS_STD)}
    presets = {
        "wan2.1": {"_class_name": "AutoencoderKLWan"},
        "tiny": {"base_dim": 8, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1},
    }
    if name not in presets:
        raise KeyError(f"unknown VAE preset {name!r}; known: {', '.join(presets)}")
    return VaeConfig(**stats, **presets[name])


_fused_kernels = True


def set_fused_kernels(enabled: bool) -> None:
    """Use the Triton RMS norm (+ SiLU) kernel of `kernels/vae_ops.py` on CUDA (default) or plain torch ops.

    The torch path is the reference the benchmark checks the fused one against; autograd always takes it.
    """
    global _fused_kernels
    _fused_kernels = enabled


_frame_convs = True
_triton_convs = True


def set_frame_convs(enabled: bool) -> None:
    """Run each causal 3D convolution of time kernel kt as kt 2D convolutions of whole frames, summed
    (`conv_by_frames`), instead of a 3D convolution: on CPUs, and on CUDA with channels-last activations (default).
    Measured (benchmarks/RESULTS.md): on an H100 the 81-frame 480x832 decode took 0.929 s this way against 1.021 s;
    on a 2-core CPU the built-in model's 29-frame decode 0.16 s instead of 0.29 s. Folding the kt taps into the
    input channels instead (one 2D convolution, each frame written kt times, no sums) measured no faster on the
    H100 (0.933 s) and slower on the CPU, so it is not kept. `False` is the plain path."""
    global _frame_convs
    _frame_convs = enabled


def set_triton_convs(enabled: bool) -> None:
    """Run the causal 3x3x3 convs (input and output channels multiples of 16) as one Triton implicit GEMM each
    (`kernels.conv3d.padded_conv3d`) where the fused kernels run (CUDA inference) with channels-last activations
    (default), or as frame convolutions summed by cuDNN; likewise the RGB conv (`kernels.few_outputs_conv`) and the
    upsamplers' convs (`kernels.upsample_conv`). Measured against cuDNN (benchmarks/RESULTS.md). Switch between
    videos: a conv's kept frames differ between the two paths."""
    global _triton_convs
    _triton_convs = enabled


def conv_by_frames(x: torch.Tensor | Sequence[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None,
                   padding: tuple[int, int]) -> torch.Tensor:
    """conv3d(x, weight, bias, stride 1, padding (0, *padding)) of x (B, C, T_in, H, W) with weight (O, C, kt, kh, kw)
    as out[:, :, t] = sum_k conv2d(x[:, :, t + k], weight[:, :, k]): each 2D convolution covers every output frame
    at once (frames folded into the batch; a view when B = 1 and x is channels-last). For one output frame x may
    also be its kt input frames as separate (B, C, 1, H, W) tensors. Returns (B, O, T, H', W') in x's memory
    format."""
    kt = weight.shape[2]
    fmt = _frame_format(x if isinstance(x, torch.Tensor) else x[0])
    if isinstance(x, torch.Tensor):
        b, c, t_in, h, w = x.shape
        t = t_in - kt + 1
        frames = x.transpose(1, 2)  # (B, T_in, C, H, W)
        windows = (frames[:, k : k + t].reshape(b * t, c, h, w) for k in range(kt))  # one at a time: B > 1 copies
    else:  # one output frame, from kt separate input frames
        b, c, _, h, w = x[0].shape
        t = 1
        windows = (frame[:, :, 0] for frame in x)
    out = None
    for k, window in enumerate(windows):
        if weight.shape[3:] == (1, 1) and (y := _pointwise(window, weight[:, :, k], bias, out)) is not None:
            out = y  # a time conv: GEMMs summing the taps in their epilogue
            continue
        y = F.conv2d(window, weight[:, :, k].contiguous(memory_format=fmt), bias if k == 0 else None, padding=padding)
        out = y if out is None else out.add_(y)
    return out.reshape(b, t, *out.shape[1:]).transpose(1, 2)


def _pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               into: torch.Tensor | None = None) -> torch.Tensor | None:
    """A 1x1 conv (`weight` (O, C, 1, ...)) of a channels-last x (N, C, *positions) as one GEMM with the bias in
    its epilogue, or added to `into` (an earlier result: the GEMM reads and sums it, no pass of its own); cuDNN
    added the bias and tap sums in passes of their own. Returns (N, O, *positions) channels-last, or None when x's
    channels are not the rows of one (positions, C) matrix (the caller convolves)."""
    rows = x.movedim(1, -1)
    if not rows.is_contiguous() or (into is not None and not into.movedim(1, -1).is_contiguous()):
        return None
    rows, w = rows.view(-1, x.shape[1]), weight.reshape(weight.shape[0], -1).t()
    if into is not None:
        into.movedim(1, -1).view(-1, into.shape[1]).addmm_(rows, w)
        return into
    y = rows @ w if bias is None else torch.addmm(bias, rows, w)
    return y.view(*x.shape[:1], *x.shape[2:], -1).movedim(-1, 1)


FEW_OUTPUTS = 4  # convs with at most this many output channels (the decoder's RGB conv) fold their taps into outputs


def few_outputs_by_frames(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: tuple[int, int],
                          pending: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A causal conv with few output channels O of new frames x (B, C, T, H, W), continuing a video.

    One conv2d with kt * O outputs reads each frame once instead of kt times (cuDNN's few-output kernels are bound by
    those reads: the decoder's RGB conv of a 12-frame chunk on an H100 3.63 -> 1.58 ms; with 96 outputs folding is
    slower, 4.7 -> 6.9 ms). So what the next frames need of the frames before them is not those frames but their
    taps' outputs, summed per output frame: `pending` (B, kt - 1, O, H', W'), the partial sums of the next kt - 1
    outputs (None at the video start, where the frames before are zeros). Keeping those instead of kt - 1 input
    frames (96 channels at full resolution in the Wan decoder) is 32x less state, and no input frame is convolved
    twice. Each output sums its taps in order k = 0, 1, ... as the whole-video conv does. Returns the outputs
    (B, O, T, H', W') and the new pending sums."""
    b, c, t, h, w = x.shape
    o, _, kt, kh, kw = weight.shape
    fmt = _frame_format(x)
    taps = weight.permute(2, 0, 1, 3, 4).reshape(kt * o, c, kh, kw).contiguous(memory_format=fmt)
    y = F.conv2d(x.transpose(1, 2).reshape(b * t, c, h, w), taps, padding=padding)
    y = y.unflatten(0, (b, t)).unflatten(2, (kt, o))  # (B, T, kt, O, H', W'): tap k of each new frame
    # partial sums of outputs 0 .. T + kt - 2 (the last kt - 1 are the next chunk's), channels innermost when x's are
    n, like = kt - 1 + t, dict(dtype=y.dtype, device=y.device)
    sums = (torch.empty((b, n, *y.shape[-2:], o), **like).movedim(-1, 2) if fmt == torch.channels_last
            else torch.empty((b, n, o, *y.shape[-2:]), **like))
    if pending is None:
        sums[:, : kt - 1].zero_()
    else:
        sums[:, : kt - 1].copy_(pending)
    sums[:, kt - 1 :].copy_(y[:, :, 0])
    for k in range(1, kt):  # new frame i is tap k of output i + kt - 1 - k
        sums[:, kt - 1 - k : kt - 1 - k + t] += y[:, :, k]
    out = sums[:, :t] if bias is None else sums[:, :t] + bias.view(-1, 1, 1)
    return out.transpose(1, 2), sums[:, t:].clone()  # clone: don't pin the chunk's sums


def _fused(x: torch.Tensor) -> bool:
    return _fused_kernels and x.is_cuda and not torch.is_grad_enabled() and not torch.compiler.is_compiling()


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """The format for new activations made from x: channels_last(_3d) when channels are x's innermost dim (a
    channels-last activation or a slice of one), else contiguous."""
    if x.dim() in (4, 5) and x.shape[1] > 1 and x.stride(1) == 1 and x.shape[2:].numel() > 1:
        return torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return torch.contiguous_format


def _frame_format(x: torch.Tensor) -> torch.memory_format:
    """Memory format for (B * T, C, H, W) frames made from the 5D activation x: channels_last if x is channels-last."""
    return torch.channels_last if _memory_format(x) == torch.channels_last_3d else torch.contiguous_format


class TimeCache:
    """What the temporal layers of one encoder or decoder keep between chunks of one video.

    `past[layer]` holds the last input frames that layer still needs (a causal conv: one (B, C, 1, H, W) tensor per
    frame; one with few outputs: the partial sums of its next outputs instead, see `few_outputs_by_frames`; a
    temporal downsampler: its last frame); a layer with no entry sees zeros (or, for a resampler, the start of the
    video). `started` is False until the first chunk has gone through.
    """

    def __init__(self) -> None:
        self.past: dict[nn.Module, torch.Tensor | tuple[torch.Tensor, ...]] = {}
        self.started = False


def _triple(v: int | tuple[int, int, int]) -> tuple[int, int, int]:
    return (v, v, v) if isinstance(v, int) else tuple(v)


class CausalConv3d(nn.Conv3d):
    """Conv3d whose temporal padding is all in the past (2 * padding frames); spatial padding is symmetric.

    The past frames are zeros at the video start and the previous chunk's last input frames afterwards, so a video
    convolved chunk by chunk equals the video convolved at once.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int],
        stride: int | tuple[int, int, int] = 1,
        padding: int | tuple[int, int, int] = 0,
    ) -> None:
        pad_t, pad_h, pad_w = _triple(padding)
        # Spatial zero padding is left to the conv kernel (saves a padded copy); time padding is done by hand.
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=(0, pad_h, pad_w))
        self.past_frames = 2 * pad_t

    def forward(self, x: torch.Tensor, cache: TimeCache | None = None) -> torch.Tensor:
        if not self.past_frames:  # CPU 3D convs return channels-first whatever x is: keep x's format
            if self.kernel_size == (1, 1, 1) and (y := _pointwise(x, self.weight, self.bias)) is not None:
                return y
            return super().forward(x).contiguous(memory_format=_memory_format(x))
        return self.convolve(x, lambda out: out.copy_(x), cache)

    def convolve(self, x: torch.Tensor, fill: Callable[[torch.Tensor], object], cache: TimeCache | None,
                 residual: torch.Tensor | None = None,
                 then_norm: tuple[RMSNorm, torch.Tensor] | None = None) -> torch.Tensor:
        """This conv of a chunk shaped like x (B, C, T, H, W) that `fill(out)` writes, plus `residual` if given:
        `out` (x's shape) is the tail of the conv's input buffer, after the kept frames of the previous chunk (zeros
        at the video start), so the chunk (x itself, or the norm before the conv) is written once, straight where
        the conv reads it and no [kept frames + chunk] concatenation is made. Keeps the buffer's last frames in
        `cache` for the next chunk. `then_norm` = (norm, dest): returns dest holding silu(norm(conv)) instead (the
        Triton conv applies the norm as it writes, so the conv itself is never stored).

        The kept frames are taken out of `cache`. Where they are copied into the buffer they are dropped right
        after, before `fill` runs (for a residual block's second conv, the whole first conv) and before the new ones
        are cloned; the Triton convs (`_padded_conv`) read them where they lie instead of copying them."""
        b, c, t, h, w = x.shape
        p, fmt, like = self.past_frames, _memory_format(x), dict(dtype=x.dtype, device=x.device)
        by_frames = (_frame_convs and self.stride == (1, 1, 1) and self.groups == 1
                     and (not x.is_cuda or fmt == torch.channels_last_3d))  # not CUDA channels-first
        implicit = (_triton_convs and _fused(x) and fmt == torch.channels_last_3d and self.kernel_size == (3, 3, 3)
                    and self.padding == (0, 1, 1) and p == 2 and self.stride == (1, 1, 1) and self.groups == 1
                    and c % 16 == 0)
        few_outputs = self.out_channels <= FEW_OUTPUTS
        del x  # a tensor `fill` reads must not outlive it here
        if implicit and few_outputs:
            return self._few_outputs_conv((b, c, t, h, w), like, fill, cache, residual, then_norm)
        if implicit and self.out_channels % 16 == 0:
            return self._padded_conv((b, c, t, h, w), like, fill, cache, residual, then_norm)
        past = _taken(cache, self)
        sums = few_outputs and by_frames  # it keeps partial sums of its next outputs, not frames
        if past is None and not sums:  # the video start
            past = (torch.empty((b, c, 1, h, w), **like, memory_format=fmt).zero_(),) * p
        if sums:
            new = torch.empty((b, c, t, h, w), **like, memory_format=fmt)
            fill(new)
            out, pending = few_outputs_by_frames(new, self.weight, self.bias, self.padding[1:], past)
            if cache is not None:
                cache.past[self] = pending
        elif by_frames and t == 1:
            # One frame (one-frame decode passes, a video's first latent frame): each tap reads one whole frame, so
            # the frames stay apart and the kept ones are kept by reference. Copying them in and out was a quarter
            # of a one-frame-per-pass decode's time on an H100.
            new = torch.empty((b, c, 1, h, w), **like, memory_format=fmt)
            fill(new)
            frames = (*past, new)
            if cache is not None:
                cache.past[self] = frames[-p:]
            out = conv_by_frames(frames, self.weight, self.bias, self.padding[1:])
        else:
            buffer = torch.empty((b, c, p + t, h, w), **like, memory_format=fmt)
            for i in range(p):  # no loop variable left holding a frame
                buffer[:, :, i : i + 1].copy_(past[i])
            past = None  # in the buffer now
            fill(buffer[:, :, p:])
            if cache is not None:
                cache.past[self] = buffer[:, :, -p:].clone().split(1, dim=2)  # clone: don't pin the whole chunk
            out = (conv_by_frames(buffer, self.weight, self.bias, self.padding[1:]) if by_frames
                   else super().forward(buffer))
        return _normed(out if residual is None else out.add_(residual), then_norm)

    def _few_outputs_conv(self, shape: tuple[int, ...], like: dict, fill: Callable[[torch.Tensor], object],
                          cache: TimeCache | None, residual: torch.Tensor | None,
                          then_norm: tuple[RMSNorm, torch.Tensor] | None) -> torch.Tensor:
        """`convolve` with at most `FEW_OUTPUTS` outputs (the decoder's RGB conv) as one Triton pass over the chunk's
        padded frames (`kernels.few_outputs_conv`: each frame read once, the time taps rolled through fp32 partial
        sums kept in `cache` between chunks); fp32 output. H100, 12 frames at 480x832, 96 -> 3: 0.64 ms against 1.60
        for cuDNN's 9-output conv2d and the tap sums (benchmarks/RESULTS.md)."""
        from kernels.few_outputs_conv import few_outputs_conv3d

        frames = _padded_chunk(shape, like, fill)
        out, pending = few_outputs_conv3d(frames, self.weight, self.bias, _taken(cache, self))
        if cache is not None:
            cache.past[self] = pending
        return _normed(out if residual is None else out.add_(residual), then_norm)

    def _padded_conv(self, shape: tuple[int, ...], like: dict, fill: Callable[[torch.Tensor], object],
                     cache: TimeCache | None, residual: torch.Tensor | None,
                     then_norm: tuple[RMSNorm, torch.Tensor] | None) -> torch.Tensor:
        """`convolve` as Triton implicit GEMMs (`kernels.conv3d.causal_conv3d`): `fill` writes the inside of the
        chunk's padded frames (B, T, H + 2, W + 2, C), whose zero ring is the spatial padding, and the kept frames
        are read where they lie, so nothing is copied in front of the chunk. The chunk's last two frames are kept by
        reference when they are all of it (and with the frame before for one-frame chunks), else cloned, not to pin
        the whole chunk."""
        from kernels.conv3d import causal_conv3d, fuses_norm

        b, c, t, h, w = shape
        p = self.past_frames
        past = _taken(cache, self) or (torch.zeros((b, 1, h + 2, w + 2, c), **like),) * p
        chunk = _padded_chunk(shape, like, fill)
        if cache is not None:
            cache.past[self] = ((*past, *chunk.split(1, dim=1))[-p:] if t <= p
                                else chunk[:, -p:].clone().split(1, dim=1))
        if then_norm is not None and fuses_norm(c, self.out_channels):
            norm, dest = then_norm
            return causal_conv3d(past, chunk, self.weight, self.bias, residual=residual, norm_silu=norm.gamma,
                                 out=dest)
        return _normed(causal_conv3d(past, chunk, self.weight, self.bias, residual=residual), then_norm)


def _taken(cache: TimeCache | None, layer: nn.Module):
    """What `layer` kept in `cache` (None: the video start, or no cache), taken out: the caller holds the only
    reference, so it can drop the kept frames as soon as they are copied where the layer reads them."""
    return cache.past.pop(layer, None) if cache is not None else None


def _normed(out: torch.Tensor, then_norm: tuple[RMSNorm, torch.Tensor] | None) -> torch.Tensor:
    """out, or for then_norm = (norm, dest) silu(norm(out)) written into dest (see `CausalConv3d.convolve`)."""
    return out if then_norm is None else then_norm[0](out, silu=True, out=then_norm[1])


def _padded_chunk(shape: tuple[int, ...], like: dict, fill: Callable[[torch.Tensor], object]) -> torch.Tensor:
    """The chunk (B, C, T, H, W) of `shape` that `fill` writes, as the padded frames (B, T, H + 2, W + 2, C) the
    Triton convs read: `fill` gets their inside (a (B, C, T, H, W) view), the outer ring of rows and columns is zeros
    (the convs' spatial padding)."""
    b, c, t, h, w = shape
    frames = torch.empty((b, t, h + 2, w + 2, c), **like)
    frames[:, :, 0::h + 1].zero_()  # the first and last row
    frames[:, :, 1:-1, 0::w + 1].zero_()  # the first and last column
    fill(frames[:, :, 1:-1, 1:-1].permute(0, 4, 1, 2, 3))
    return frames


class RMSNorm(nn.Module):
    """Wan's RMS norm over channels (dim 1): unit L2 norm times sqrt(dim) times a learned gain `gamma`."""

    def __init__(self, dim: int, frames: bool = True) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1, 1) if frames else torch.ones(dim, 1, 1))

    def forward(self, x: torch.Tensor, silu: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
        """Normalise x (B, C, ...) over C, then SiLU if `silu`; written into `out` (x's shape) when given."""
        if _fused(x):
            from kernels.vae_ops import channel_rms_norm

            return channel_rms_norm(x, self.gamma, silu=silu, out=out)
        y = F.normalize(x, dim=1) * self.scale * self.gamma.view(-1, *(1,) * (x.dim() - 2))
        if silu:
            y = F.silu(y)
        return y if out is None else out.copy_(y)


def _norm_silu_conv(norm: RMSNorm, conv: CausalConv3d, x: torch.Tensor, cache: TimeCache | None,
                    residual: torch.Tensor | None = None,
                    then_norm: tuple[RMSNorm, torch.Tensor] | None = None) -> torch.Tensor:
    """conv(silu(norm(x))) (+ residual), the norm writing its output straight into the conv's input; `then_norm` as
    in `CausalConv3d.convolve`."""
    return conv.convolve(x, lambda out: norm(x, silu=True, out=out), cache, residual, then_norm)


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = RMSNorm(in_dim)
        self.conv1 = CausalConv3d(in_dim, out_dim, 3, padding=1)
        self.norm2 = RMSNorm(out_dim)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(out_dim, out_dim, 3, padding=1)
        self.conv_shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: TimeCache | None = None) -> torch.Tensor:
        h = self.conv_shortcut(x)
        if self.training and self.dropout.p > 0:
            x = _norm_silu_conv(self.norm1, self.conv1, x, cache)
            return self.conv2(self.dropout(self.norm2(x, silu=True)), cache).add_(h)

        def conv1_into(out: torch.Tensor) -> torch.Tensor:  # conv2's input, silu(norm2(conv1)), written once
            return _norm_silu_conv(self.norm1, self.conv1, x, cache, then_norm=(self.norm2, out))

        # h is shaped like conv1's output; the shortcut is added as conv2 writes
        return self.conv2.convolve(h, conv1_into, cache, residual=h)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (no attention across time)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, frames=False)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: TimeCache | None = None) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = torch.empty((b * t, c, h, w), dtype=x.dtype, device=x.device,
                        memory_format=_frame_format(x))
        self.norm(x, out=y.view(b, t, c, h, w).transpose(1, 2))  # frames batched, without a transposed copy of x
        qkv = _pointwise(y, self.to_qkv.weight, self.to_qkv.bias)
        qkv = (self.to_qkv(y) if qkv is None else qkv).flatten(2).transpose(1, 2).unsqueeze(1)  # (b*t, 1, h*w, 3c)
        q, k, v = qkv.chunk(3, dim=-1)
        y = pixel_attention(q, k, v)  # (b*t, 1, h*w, c): channels-last frames' rows
        y = _pointwise(y.reshape(b * t, h, w, c).permute(0, 3, 1, 2), self.proj.weight, self.proj.bias)
        return x + y.view(b, t, c, h, w).transpose(1, 2)


_MM_FP32_OUT = "dtype" in torch.ops.aten.mm.overloads()  # torch.mm(..., out_dtype=torch.float32) for 16-bit inputs
ATTENTION_SCORES_BYTES = 256 * 2**20  # the most pixel_attention holds for scores and probabilities at once


def pixel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(c)) v over each frame's pixels, (F, 1, N, c) tensors (one head).

    The mid block's head dim is 384, which no flash or cuDNN kernel takes: SDPA runs its memory-efficient kernel
    (H100: 1.63 ms for a 3-frame chunk at 480x832, 110 TFLOP/s). Where the fused kernels run, each frame's scores
    are instead one cuBLAS GEMM with fp32 output, the softmax one Triton pass writing 16-bit probabilities (rounded
    as flash attention rounds them), and the output a second GEMM: 0.63 ms, same error against float64
    (benchmarks/results/vae_attention_session12.txt). The scores and probabilities of as many query rows as fit
    `ATTENTION_SCORES_BYTES` are held at once (a whole 480x832 frame, 234 MB; larger frames go in blocks of rows);
    frames over `SOFTMAX_MAX_ROW` pixels stay on SDPA."""
    from kernels.vae_ops import SOFTMAX_MAX_ROW, scaled_softmax

    n = q.shape[2]
    wide = q.dtype == torch.float32 or (q.dtype in (torch.float16, torch.bfloat16) and _MM_FP32_OUT)
    if not (_fused(q) and wide and n <= SOFTMAX_MAX_ROW):
        return F.scaled_dot_product_attention(q, k, v)
    rows = max(1, min(n, ATTENTION_SCORES_BYTES // ((4 + q.element_size()) * n)))
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    scores = torch.empty((rows, n), dtype=torch.float32, device=q.device)
    probs = torch.empty((rows, n), dtype=q.dtype, device=q.device)
    fp32 = {} if q.dtype == torch.float32 else {"out_dtype": torch.float32}
    for i in range(q.shape[0]):
        for r in range(0, n, rows):
            m = min(rows, n - r)
            torch.mm(q[i, 0, r:r + m], k[i, 0].t(), out=scores[:m], **fp32)
            p = scaled_softmax(scores[:m], q.shape[-1] ** -0.5, out=probs[:m])
            torch.mm(p, v[i, 0], out=out[i, 0, r:r + m])
    return out


def upsample2x_conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """conv(nearest 2x upsampling of x) for x (N, C, H, W) and a 3x3, padding-1 conv, without making the upsampled
    input. Output pixel (2i + a, 2j + b) reads input rows (i - 1, i) for a = 0 and (i, i + 1) for a = 1 (columns
    alike), so each phase (a, b) is a 2x2 convolution of x whose taps are sums of the 3x3 taps that land on one
    input pixel: 2.25x fewer multiply-adds. On CUDA inference (channels-last, channels multiples of 16) that is one
    Triton kernel, each phase an implicit GEMM written straight to its interleaved pixels with the bias
    (`kernels.upsample_conv`; H100: 1.4-1.6x cuDNN's phase conv and an interleave pass, benchmarks/RESULTS.md).
    Elsewhere the four phases come out of one convolution (4 O channels, padding 1, phase (a, b) at offset (a, b) of
    its (H + 1, W + 1) output) and one strided pass interleaves them, adding the bias. Returns (N, O, 2H, 2W) in x's
    memory format."""
    from kernels.upsample_conv import phase_weights, upsample2x_conv2d

    n, c, h, w = x.shape
    o = conv.out_channels
    if _triton_convs and _fused(x) and x.stride(1) == 1 and c % 16 == 0 and o % 16 == 0:
        return upsample2x_conv2d(x.contiguous(memory_format=torch.channels_last), conv.weight, conv.bias)
    fmt = _memory_format(x)
    w4 = phase_weights(conv.weight).flatten(0, 1).to(x.dtype)  # the phases' 2x2 taps, summed in fp32 at least
    y = F.conv2d(x, w4.contiguous(memory_format=fmt), padding=1)  # (N, 4 O, H + 1, W + 1)
    out = torch.empty((n, o, 2 * h, 2 * w), dtype=y.dtype, device=y.device, memory_format=fmt)
    sn, sc, sh, sw = y.stride()
    # y[n, (2a + b) O + o, i + a, j + b] for (n, a, b, o, i, j): one strided view, no copy
    split = y.as_strided((n, 2, 2, o, h, w), (sn, 2 * o * sc + sh, o * sc + sw, sc, sh, sw), y.storage_offset())
    phased = out.unflatten(2, (h, 2)).unflatten(4, (w, 2)).permute(0, 3, 5, 1, 2, 4)
    if conv.bias is None:
        phased.copy_(split)
    elif torch.is_grad_enabled():  # out= has no autograd
        phased.copy_(split + conv.bias.view(o, 1, 1))
    else:  # the bias added as the phases are interleaved: cuDNN would add it to y in a pass of its own
        torch.add(split, conv.bias.view(o, 1, 1).to(y.dtype), out=phased)
    return out


class Resample(nn.Module):
    """2x spatial up/downsampling per frame, and for the *3d modes 2x in time as well (see the module docstring)."""

    def __init__(self, dim: int, mode: str, upsample_out_dim: int | None = None) -> None:
        super().__init__()
        self.mode = mode
        if mode in ("upsample2d", "upsample3d"):
            # diffusers' layout (resample.1 is the conv); forward runs the pair as `upsample2x_conv`
            up = nn.Upsample(scale_factor=2.0, mode="nearest-exact")
            self.resample = nn.Sequential(up, nn.Conv2d(dim, upsample_out_dim or dim // 2, 3, padding=1))
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode in ("downsample2d", "downsample3d"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        else:
            raise ValueError(f"unknown resample mode {mode!r}")

    def forward(self, x: torch.Tensor, cache: TimeCache | None = None) -> torch.Tensor:
        at_start = cache is None or not cache.started
        if self.mode == "upsample3d":
            x = self._double_frames(x, cache, at_start)
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        y = upsample2x_conv(frames, self.resample[1]) if self.mode.startswith("up") else self.resample(frames)
        x = y.view(b, t, *y.shape[1:]).transpose(1, 2)
        if self.mode == "downsample3d":
            x = self._halve_frames(x, cache, at_start)
        return x

    def _double_frames(self, x: torch.Tensor, cache: TimeCache | None, at_start: bool) -> torch.Tensor:
        # The video's first frame is not doubled; time_conv's stream starts at the second frame.
        head, body = (x[:, :, :1], x[:, :, 1:]) if at_start else (x[:, :, :0], x)
        if body.shape[2] == 0:
            return x
        y = self.time_conv(body, cache)
        b, c2, t, h, w = y.shape
        n = head.shape[2]
        # Written frame-major ((B * F, C, H, W) memory), so the per-frame spatial conv that follows needs no copy.
        out = torch.empty((b * (n + 2 * t), c2 // 2, h, w), dtype=y.dtype, device=y.device,
                          memory_format=_frame_format(x))
        out = out.view(b, n + 2 * t, c2 // 2, h, w).transpose(1, 2)
        out[:, :, :n] = head
        out[:, :, n:].unflatten(2, (t, 2)).copy_(y.view(b, 2, c2 // 2, t, h, w).permute(0, 2, 3, 1, 4, 5))
        return out

    def _halve_frames(self, x: torch.Tensor, cache: TimeCache | None, at_start: bool) -> torch.Tensor:
        # Stride-2 windows are aligned to the video's first frame, which is also passed through on its own.
        if at_start:
            if x.shape[2] % 2 != 1:
                raise ValueError(f"temporal downsampling: the first chunk needs an odd frame count, got {x.shape[2]}")
            out = x[:, :, :1] if x.shape[2] == 1 else torch.cat([x[:, :, :1], self.time_conv(x)], dim=2)
        else:
            if x.shape[2] % 2:
                raise ValueError(f"temporal downsampling: later chunks need an even frame count, got {x.shape[2]}")
            out = self.time_conv(torch.cat([cache.past[self], x], dim=2))
        if cache is not None:
            cache.past[self] = x[:, :, -1:].clone()
        return out


class MidBlock(nn.Module):
    def __init__(self, dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.attentions = nn.ModuleList([AttentionBlock(dim)])
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim, dropout), ResidualBlock(dim, dim, dropout)])

    def forward(self, x: torch.Tensor, cache: TimeCache | None = None) -> torch.Tensor:
        x = self.resnets[0](x, cache)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(attn(x), cache)
        return x


class Encoder3d(nn.Module):
    def __init__(self, config: VaeConfig) -> None:
        super().__init__()
        dims = [config.base_dim * m for m in [1, *config.dim_mult]]
        self.conv_in = CausalConv3d(config.in_channels, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        scale = 1.0
        last = len(config.dim_mult) - 1
        for i, (in_dim, out_dim) in enumerate(pairwise(dims)):
            for _ in range(config.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim, config.dropout))
                if scale in config.attn_scales:
                    blocks.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != last:
                blocks.append(Resample(out_dim, "downsample3d" if config.temperal_downsample[i] else "downsample2d"))
                scale /= 2.0
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock(dims[-1], config.dropout)
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], 2 * config.z_dim, 3, padding=1)  # mean and log-variance

    def forward(self, x: torch.Tensor, cache: TimeCache | None = None) -> torch.Tensor:
        x = self.conv_in(x, cache)
        for block in self.down_blocks:
            x = block(x, cache)
        x = self.mid_block(x, cache)
        return _norm_silu_conv(self.norm_out, self.conv_out, x, cache)


class UpBlock(nn.Module):
    """A decoder stage's residual blocks and its upsampler (diffusers' parameter layout); `Decoder3d.forward` runs
    their layers in one flat loop (`layers`)."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, dropout: float, mode: str | None) -> None:
        super().__init__()
        dims = [in_dim] + [out_dim] * num_res_blocks
        self.resnets = nn.ModuleList([ResidualBlock(d, out_dim, dropout) for d in dims])
        self.upsamplers = nn.ModuleList([Resample(out_dim, mode)]) if mode else None

    @property
    def layers(self) -> list[nn.Module]:
        """The stage's layers in the order they run."""
        return [*self.resnets, *(self.upsamplers or ())]


class Decoder3d(nn.Module):
    def __init__(self, config: VaeConfig) -> None:
        super().__init__()
        base = config.decoder_base_dim or config.base_dim
        mult = config.dim_mult
        dims = [base * m for m in [mult[-1], *mult[::-1]]]
        temporal = config.temperal_downsample[::-1]
        self.conv_in = CausalConv3d(config.z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0], config.dropout)
        blocks, modes = [], []
        for i, (in_dim, out_dim) in enumerate(pairwise(dims)):
            if i > 0:
                in_dim //= 2  # the previous block's upsampler halved its channels
            modes.append(None if i == len(mult) - 1 else ("upsample3d" if temporal[i] else "upsample2d"))
            blocks.append(UpBlock(in_dim, out_dim, config.num_res_blocks, config.dropout, modes[-1]))
        self.up_blocks = nn.ModuleList(blocks)
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], config.out_channels, 3, padding=1)
        # Past the last temporal upsampler every layer is a causal conv with a cache or works per frame, so those
        # blocks may take a chunk's frames a few at a time (the same frames): they hold the full-resolution
        # activations, most of the decoder's memory.
        per_frame_from = max((i + 1 for i, m in enumerate(modes) if m == "upsample3d"), default=0)
        self.low_res_layers = [layer for block in blocks[:per_frame_from] for layer in block.layers]
        self.per_frame_layers = [layer for block in blocks[per_frame_from:] for layer in block.layers]

    def forward(self, x: torch.Tensor, cache: TimeCache | None = None, pass_frames: int | None = None) -> torch.Tensor:
        """Latents (B, z, f, h, w) -> video (B, 3, F, 8h, 8w); `pass_frames` video frames at a time (None: all)
        through the blocks after the last temporal upsampler.

        The layers run in flat loops whose variable is their input's only reference here, so each activation is
        freed once the layer after it has run: a loop per block would keep a block's input alive through all its
        layers (at full resolution a whole chunk's 96-channel frames, 0.9 GB at 480x832)."""
        x = self.mid_block(self.conv_in(x, cache), cache)
        for layer in self.low_res_layers:
            x = layer(x, cache)
        if pass_frames is not None:
            cache = cache if cache is not None else TimeCache()  # frames in turn: causal convs carry the past over
        parts = [x] if pass_frames is None else list(x.split(pass_frames, dim=2))
        del x
        out = []
        while parts:
            x = parts.pop(0)
            for layer in self.per_frame_layers:
                x = layer(x, cache)
            out.append(_norm_silu_conv(self.norm_out, self.conv_out, x, cache))
        return out[0] if len(out) == 1 else torch.cat(out, dim=2)


class WanVAE(nn.Module):
    """The Wan2.1 VAE. Latents at its public API are normalised (`(z - latents_mean) / latents_std`), the form the
    transformer works in; video is (B, C, F, H, W) in [-1, 1]."""

    def __init__(self, config: VaeConfig) -> None:
        super().__init__()
        self.config = config
        z = config.z_dim
        self.encoder = Encoder3d(config)
        self.quant_conv = CausalConv3d(2 * z, 2 * z, 1)
        self.post_quant_conv = CausalConv3d(z, z, 1)
        self.decoder = Decoder3d(config)
        self.memory_format = torch.contiguous_format  # of activations (and conv weights); see to_channels_last
        # Most video frames a decoder pass holds at full resolution (None: a whole chunk); the low-resolution
        # blocks take the latent frames that make them. Memory grows with it. Two frames is the fewest that the
        # 96-channel convs' two-frame programs take, and on CUDA as fast as whole chunks: an H100 decoding 81 frames
        # of 480x832 in 3-latent chunks runs 0.56 s of kernels either way, peaking 2.26 GiB above the weights
        # against 4.38 (1 frame: 2.07 GiB, 0.62 s; 1.7 GiB is the kept frames, whatever the pass), and the 4-step
        # stream peaks 8.17 GiB against 10.29 at the same speed (benchmarks/results/decode_passes_ab_session14.txt).
        self.decode_pass_frames: int | None = 2
        self._stats: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def dtype(self) -> torch.dtype:
        return self.post_quant_conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.post_quant_conv.weight.device

    # -- loading -------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> WanVAE:
        """Load from a pipeline folder (its `vae/`) or a VAE folder itself, in diffusers layout, strictly."""
        folder = component_dir(path, "vae")
        try:
            config = VaeConfig.model_validate(read_config(folder))
        except ValidationError as e:
            raise CheckpointError(f"{folder / 'config.json'}: invalid VAE config\n{e}") from None
        with torch.device("meta"):
            vae = cls(config)
        load_weights(vae, folder, dtype, device)
        return vae.eval()

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write `config.json` and safetensors weights that diffusers' `AutoencoderKLWan` can read too."""
        config = self.config.to_json_dict()
        config.setdefault("_class_name", "AutoencoderKLWan")
        save_weights(self, Path(folder), config)

    def to_channels_last(self, enabled: bool = True) -> WanVAE:
        """Store conv weights channels-last and code with channels-last activations (False: back to channels-first).

        cuDNN computes its fast convolutions channels-last, so this saves it converting every conv's input and
        output; all other layers keep whatever format they are given. Results equal the default layout's within
        the convolution algorithms' rounding. Checkpoints are written contiguous either way.
        """
        self.memory_format = torch.channels_last_3d if enabled else torch.contiguous_format
        for m in self.modules():
            if isinstance(m, nn.Conv3d | nn.Conv2d):
                fmt = (torch.channels_last_3d if m.weight.dim() == 5 else torch.channels_last) if enabled else None
                m.weight.data = m.weight.data.contiguous(memory_format=fmt or torch.contiguous_format)
        return self

    # -- latent normalisation ------------------------------------------------------------------------------------

    def _mean_std(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (z.device, torch.promote_types(z.dtype, torch.float32))  # at least float32 arithmetic
        if key not in self._stats:  # built once per device: avoids a host-to-device copy on every chunk
            shape = (1, self.config.z_dim, 1, 1, 1)
            mean = torch.tensor(self.config.latents_mean, dtype=key[1], device=key[0]).view(shape)
            std = torch.tensor(self.config.latents_std, dtype=key[1], device=key[0]).view(shape)
            self._stats[key] = (mean, std)
        return self._stats[key]

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents -> the normalised latents the transformer uses: (z - mean) / std, in >= float32."""
        mean, std = self._mean_std(z)
        return ((z.to(mean.dtype) - mean) / std).to(z.dtype)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> raw VAE latents: z * std + mean (the spec's convention), in >= float32."""
        mean, std = self._mean_std(z)
        return (z.to(mean.dtype) * std + mean).to(z.dtype)

    # -- coding --------------------------------------------------------------------------------------------------

    def stream_encoder(self) -> StreamingEncoder:
        return StreamingEncoder(self)

    def stream_decoder(self) -> StreamingDecoder:
        return StreamingDecoder(self)

    @torch.no_grad()
    def encode(self, video: torch.Tensor, frames_per_chunk: int | None = 4) -> torch.Tensor:
        """(B, 3, 1 + 4k, H, W) video in [-1, 1] -> normalised latents (B, z_dim, 1 + k, H/8, W/8), the posterior mean.

        Like Wan, the first frame goes first and then `frames_per_chunk` frames at a time (a multiple of 4), which
        bounds activation memory; None codes the whole video in one pass. The result does not depend on the chunking.
        """
        tf = self.config.temporal_factor
        if video.ndim != 5 or video.shape[2] % tf != 1 % tf:
            raise ValueError(f"expected video (B, C, 1 + {tf}k, H, W), got {tuple(video.shape)}")
        if frames_per_chunk is None:
            return self._encode_chunk(video, None)
        return self.stream_encoder().encode_chunks(video, frames_per_chunk)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, latents_per_chunk: int | Sequence[int] | None = 4) -> torch.Tensor:
        """Normalised latents (B, z_dim, n, h, w) -> video (B, 3, 1 + 4(n - 1), 8h, 8w) float32 in [-1, 1].

        Decodes `latents_per_chunk` latent frames per pass (bounded memory; a list: each pass's size, e.g. a stream's
        chunks; None: one pass); the frames do not depend on the chunking.
        """
        if latents_per_chunk is None:
            return self._decode_chunk(latents, None)
        decoder = self.stream_decoder()
        return torch.cat([decoder.decode(c) for c in latents.split(latents_per_chunk, dim=2)], dim=2)

    def _encode_chunk(self, video: torch.Tensor, cache: TimeCache | None) -> torch.Tensor:
        if video.ndim != 5 or video.shape[1] != self.config.in_channels:
            raise ValueError(f"expected video (B, {self.config.in_channels}, F, H, W), got {tuple(video.shape)}")
        s = self.config.spatial_factor
        if video.shape[3] % s or video.shape[4] % s:
            raise ValueError(f"video height and width must be multiples of {s}, got {tuple(video.shape[3:])}")
        h = self.encoder(video.to(self.device, self.dtype, memory_format=self.memory_format), cache)
        z = self.config.z_dim
        mean = F.conv3d(h, self.quant_conv.weight[:z], self.quant_conv.bias[:z])  # the log-variance half is unused
        return self.normalize(mean.contiguous())

    def _decode_chunk(self, latents: torch.Tensor, cache: TimeCache | None) -> torch.Tensor:
        if latents.ndim != 5 or latents.shape[1] != self.config.z_dim or latents.shape[2] == 0:
            raise ValueError(f"expected latents (B, {self.config.z_dim}, f >= 1, h, w), got {tuple(latents.shape)}")
        x = self.denormalize(latents.to(self.device, torch.promote_types(self.dtype, torch.float32)))
        x = self.decoder(self.post_quant_conv(x.to(self.dtype, memory_format=self.memory_format)), cache,
                         self.decode_pass_frames)
        return x.to(torch.float32, memory_format=torch.contiguous_format).clamp_(-1.0, 1.0)


class StreamingEncoder:
    """Encodes one video chunk by chunk: the first chunk holds 1 + 4j frames, every later one a multiple of 4."""

    def __init__(self, vae: WanVAE) -> None:
        self.vae = vae
        self.reset()

    def reset(self) -> None:
        """Forget the current video; the next chunk starts a new one."""
        self._cache = TimeCache()

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """Next frames (B, 3, f, H, W) -> their normalised latents (B, z_dim, f', H/8, W/8)."""
        tf = self.vae.config.temporal_factor
        f = frames.shape[2] if frames.ndim == 5 else -1
        first = not self._cache.started
        if f < 1 or (f - first) % tf:
            need = f"1 + {tf}j frames (j >= 0)" if first else f"a positive multiple of {tf} frames"
            which = "first" if first else "later"
            raise ValueError(f"{which} encoder chunk needs {need}, got shape {tuple(frames.shape)}")
        out = self.vae._encode_chunk(frames, self._cache)
        self._cache.started = True
        return out

    def encode_chunks(self, video: torch.Tensor, frames_per_chunk: int) -> torch.Tensor:
        """A whole video: the first frame with up to `frames_per_chunk` more, then `frames_per_chunk` at a time."""
        tf = self.vae.config.temporal_factor
        if frames_per_chunk < tf or frames_per_chunk % tf:
            raise ValueError(f"frames_per_chunk must be a positive multiple of {tf}, got {frames_per_chunk}")
        self.reset()
        first = 1 + min(frames_per_chunk, max(video.shape[2] - 1, 0))
        chunks = [video[:, :, :first], *video[:, :, first:].split(frames_per_chunk, dim=2)]
        return torch.cat([self.encode(c) for c in chunks if c.shape[2]], dim=2)


class StreamingDecoder:
    """Decodes one video chunk by chunk with per-layer causal caches; frames equal a whole-video decode.

    The video's first latent frame gives 1 frame, every later latent frame 4 (for the Wan2.1 factor of 4).
    """

    def __init__(self, vae: WanVAE) -> None:
        self.vae = vae
        self.reset()

    def reset(self) -> None:
        """Forget the current video; the next chunk starts a new one."""
        self._cache = TimeCache()
        self.latent_frames = 0

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Next normalised latents (B, z_dim, f, h, w) -> their frames (B, 3, F_out, 8h, 8w), float32 in [-1, 1]."""
        n = self.vae.decode_pass_frames
        if n is not None and n < 1:
            raise ValueError(f"decode_pass_frames must be None or >= 1, got {n}")
        per_pass = None if n is None else max(1, n // self.vae.config.temporal_factor)
        passes = [latents] if per_pass is None or latents.ndim != 5 else latents.split(per_pass, dim=2)
        frames = []
        for part in passes:
            frames.append(self.vae._decode_chunk(part, self._cache))
            self._cache.started = True
            self.latent_frames += part.shape[2]
        return frames[0] if len(frames) == 1 else torch.cat(frames, dim=2)


def to_uint8_frames(frames: torch.Tensor) -> np.ndarray:
    """Frames in [-1, 1] -> uint8 RGB with channels last, for video sinks.

    (B, 3, F, H, W) -> (B, F, H, W, 3); (3, F, H, W) -> (F, H, W, 3). Values map as round((x + 1) * 127.5) after
    clamping. The conversion runs on the frames' device, so only uint8 data crosses to the host.
    """
    if frames.ndim not in (4, 5) or frames.shape[-4] != 3:
        raise ValueError(f"expected frames (B, 3, F, H, W) or (3, F, H, W), got {tuple(frames.shape)}")
    x = frames.detach().float().clamp(-1.0, 1.0).add_(1.0).mul_(127.5).round_().to(torch.uint8)
    return x.movedim(-4, -1).contiguous().cpu().numpy()
