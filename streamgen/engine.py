"""The chunk loop: prompt in, final latent chunks out, one at a time, in order.

For each chunk: draw (or take) its noise, run its step budget of flow-map jumps against the cached context, hand the
final latents to the caller, then bring the cache up to date for the next chunk. Context frames (I2V / V2V) are
treated as chunks that are already final: they only go through the cache step.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from streamgen.cache import Entry, KVCache, context_layout, entry_tokens
from streamgen.model import CausalWanTransformer, Run
from streamgen.schedule import Schedule, as_schedule, jump

Budget = int | Schedule


@dataclass
class LatentChunk:
    index: int  # chunk index in the video
    first_frame: int  # latent frame index of its first frame
    latents: Tensor  # (B, C, f, H, W) float32, final
    steps: int  # flow-map jumps taken (0 for context chunks)
    from_context: bool  # given by the caller (I2V/V2V), not generated
    context_s: float  # seconds spent refreshing the KV cache before this chunk
    denoise_s: float  # seconds spent denoising this chunk


def now(device: torch.device) -> float:
    """Wall-clock seconds once the device's queued work is done, so chunk timings are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def chunk_sizes(partition: Sequence[int], num_frames: int) -> list[int]:
    """Split `num_frames` latent frames into chunks following `partition`, then chunks of its largest size."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    sizes, left = [], num_frames
    for size in list(partition) + [max(partition)] * num_frames:
        if left == 0:
            break
        sizes.append(min(size, left))
        left -= sizes[-1]
    return sizes


class Generator:
    """Runs a causal flow-map student chunk by chunk with a KV cache, at any step budget."""

    def __init__(self, model: CausalWanTransformer, shift: float = 5.0):
        self.model = model
        self.shift = shift

    @property
    def default_frames(self) -> int:
        return sum(self.model.config.chunk_partition)

    @torch.no_grad()
    def stream(
        self,
        prompt_embeds: Tensor,
        *,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        steps: Budget | Sequence[Budget] = 4,
        seed: int | None = None,
        noise: Tensor | None = None,
        context: Tensor | None = None,
    ) -> Iterator[LatentChunk]:
        """Yield the video's latent chunks in order as soon as each is final.

        prompt_embeds: (B, L, text_dim). height/width: latent size (taken from `noise` when given).
        steps: one budget for every generated chunk, or a sequence with one budget per generated chunk.
        noise: (B, C, F, H, W) for the whole video, consumed chunk by chunk; else drawn per chunk from `seed`.
        context: (B, C, Fc, H, W) normalised latents of given frames (I2V/V2V), covering whole chunks.
        """
        cfg = self.model.config
        device = self.model.device
        if prompt_embeds.ndim != 3 or prompt_embeds.shape[-1] != cfg.text_dim:
            raise ValueError(f"prompt_embeds must be (batch, tokens, {cfg.text_dim}), got {tuple(prompt_embeds.shape)}")
        batch = prompt_embeds.shape[0]
        if noise is not None:
            if noise.ndim != 5 or noise.shape[0] != batch or noise.shape[1] != cfg.in_channels:
                raise ValueError(
                    f"noise must be (batch={batch}, channels={cfg.in_channels}, frames, height, width), "
                    f"got {tuple(noise.shape)}"
                )
            if num_frames not in (None, noise.shape[2]) or height not in (None, noise.shape[3]) or width not in (
                None, noise.shape[4]
            ):
                raise ValueError(f"noise shape {tuple(noise.shape)} contradicts num_frames/height/width given")
            num_frames, height, width = noise.shape[2:]
        if height is None or width is None:
            raise ValueError("give height and width (latent units) or a noise tensor")
        num_frames = self.default_frames if num_frames is None else num_frames
        self._check_size(height, width)
        sizes = chunk_sizes(cfg.chunk_partition, num_frames)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]

        num_context = 0
        if context is not None:
            expect = (batch, cfg.in_channels, None, height, width)
            if context.ndim != 5 or any(e is not None and e != s for e, s in zip(expect, context.shape)):
                raise ValueError(f"context must be (batch={batch}, {cfg.in_channels}, frames, {height}, {width}), "
                                 f"got {tuple(context.shape)}")
            covered = [sum(sizes[: i + 1]) for i in range(len(sizes))]
            if context.shape[2] not in covered:
                raise ValueError(f"context has {context.shape[2]} latent frames; it must cover whole chunks, i.e. one "
                                 f"of {covered[:6]}...")
            num_context = covered.index(context.shape[2]) + 1
            if num_context == len(sizes):
                raise ValueError("context covers the whole video: nothing left to generate")

        budgets = self._budgets(steps, len(sizes) - num_context)
        if noise is None:
            rng = torch.Generator("cpu").manual_seed(secrets.randbits(63) if seed is None else seed)

        text = self.model.encode_text(prompt_embeds.to(device))
        layouts = [context_layout(sizes, k, cfg.full_chunk_limit) for k in range(1, len(sizes))]
        chunk_tokens = max(entry_tokens(self.model, Entry(0, 0, n, False), height, width) for n in sizes)
        cache = KVCache.for_layouts(self.model, batch, height, width, layouts, chunk_tokens)
        final: dict[int, Tensor] = {}

        for k, (size, start) in enumerate(zip(sizes, starts)):
            t0 = now(device)
            if k:
                cache.refresh(layouts[k - 1], final.__getitem__, text)
                for old in [c for c in final if c <= k - cfg.full_chunk_limit]:
                    del final[old]
            t1 = now(device)
            if k < num_context:
                z, schedule = context[:, :, start:start + size].to(device, torch.float32), None
            else:
                shape = (batch, cfg.in_channels, size, height, width)
                z = (noise[:, :, start:start + size] if noise is not None else torch.randn(shape, generator=rng))
                z = z.to(device, torch.float32)
                schedule = budgets[k - num_context]
                past = cache.past()
                for t, r in schedule:
                    tt = torch.full((batch,), t, device=device)
                    rr = torch.full((batch,), r, device=device)
                    u = self.model([Run(z, tt, rr, start)], text, past=past).velocities[0]
                    z = jump(z, u, t, r)
            t2 = now(device)
            final[k] = z
            yield LatentChunk(k, start, z, 0 if schedule is None else len(schedule), schedule is None, t1 - t0, t2 - t1)

    def generate(self, prompt_embeds: Tensor, **kwargs) -> Tensor:
        """The whole latent video (B, C, F, H, W), context frames included."""
        return torch.cat([chunk.latents for chunk in self.stream(prompt_embeds, **kwargs)], dim=2)

    def _check_size(self, height: int, width: int) -> None:
        ph, pw = self.model.config.compressed_patch_size[1:]
        if height < 1 or width < 1 or height % ph or width % pw:
            raise ValueError(
                f"latent size {height}x{width} must be positive multiples of the compressed patch {ph}x{pw}"
            )

    def _budgets(self, steps: Budget | Sequence[Budget], n: int) -> list[Schedule]:
        if isinstance(steps, (int, Schedule)):
            return [as_schedule(steps, self.shift)] * n
        steps = list(steps)
        if len(steps) != n:
            raise ValueError(f"got {len(steps)} step budgets for {n} generated chunks")
        return [as_schedule(s, self.shift) for s in steps]
