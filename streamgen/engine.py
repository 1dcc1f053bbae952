"""The chunk loop: prompt in, final latent chunks out, one at a time, in order.

For each chunk: draw (or take) its noise, run its step budget of flow-map jumps against the cached context, hand the
final latents to the caller, then bring the cache up to date for the next chunk. Context frames (I2V / V2V) are
treated as chunks that are already final: they only go through the cache step.

`Generator.open` gives that loop as an object, `LatentStream`, one chunk per `next()`: between chunks the caller may
change the prompt (optionally re-encoding the cached context under it) and the step budget. With `num_frames=None` the
stream is endless: the context is bounded to an anchor (the first chunk) plus a window of compressed chunks, at
positions re-indexed into the trained range, in preallocated buffers (see `streamgen.cache` for what stays exact).
`Generator.stream` is a loop over a `LatentStream`.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from streamgen.cache import BufferPool, Entry, KVCache, context_layout, window_layout
from streamgen.model import CausalWanTransformer, Past, Run
from streamgen.schedule import Schedule, as_schedule, jump

Budget = int | Schedule
EVICTION = ("keep", "recompute")
Predict = Callable[[Tensor, float, float], Tensor]  # (z, t, r) -> the model's output u for the chunk
Step = Callable[[Predict, Tensor, float, float, "torch.Generator | None"], Tensor]  # (predict, z, t, r, rng) -> z_r


def flow_map_step(predict: Predict, z: Tensor, t: float, r: float, rng: torch.Generator | None) -> Tensor:
    """The default sampler: one flow-map jump t -> r."""
    return jump(z, predict(z, t, r), t, r)


def run_schedule(model: CausalWanTransformer, step: Step, z: Tensor, schedule: Schedule, text: list, past: Past,
                 position: int, rng: torch.Generator | None) -> Tensor:
    """Take a chunk's latents `z` (rows of one or several streams) through `schedule` against the cached `past`."""
    def predict(z: Tensor, t: float, r: float) -> Tensor:
        tt = torch.full((z.shape[0],), t, device=z.device)
        rr = torch.full((z.shape[0],), r, device=z.device)
        return model([Run(z, tt, rr, position)], text, past=past).velocities[0]

    for t, r in schedule:
        z = step(predict, z, t, r, rng)
    return z


@dataclass
class LatentChunk:
    index: int  # chunk index in the video
    first_frame: int  # latent frame index of its first frame
    latents: Tensor  # (B, C, f, H, W) float32, final
    steps: int  # flow-map jumps taken (0 for context chunks)
    from_context: bool  # given by the caller (I2V/V2V), not generated
    marks: tuple[Mark, Mark, Mark, Mark]  # start, cache refreshed, denoising started, latents final (see `mark`)
    position: int = -1  # rotary frame index of its first frame (differs from first_frame once an endless stream
    #                     re-indexed; -1 when unknown)
    recomputed: int = 0  # cache entries (re)computed before this chunk
    batch: int = 1  # streams whose chunks were denoised in the same forwards as this one (`Generator.next_chunks`)

    @property
    def context_s(self) -> float:
        """Seconds spent refreshing the KV cache before this chunk (waits for the chunk's work on CUDA)."""
        return seconds(self.marks[0], self.marks[1])

    @property
    def denoise_s(self) -> float:
        """Seconds spent denoising this chunk, shared with the other chunks of its batch (waits on CUDA)."""
        return seconds(self.marks[2], self.marks[3])

    @property
    def ready(self) -> torch.cuda.Event | None:
        """On CUDA, the event after which the latents are final: another stream waits on it, not on the whole queue."""
        return self.marks[3] if isinstance(self.marks[3], torch.cuda.Event) else None


Mark = float | torch.cuda.Event


def mark(device: torch.device) -> Mark:
    """A point on the device's timeline: a recorded CUDA event (no stall: the generator keeps queueing work while
    the caller decodes the previous chunk), else the wall clock."""
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def seconds(start: Mark, end: Mark) -> float:
    if isinstance(end, torch.cuda.Event):
        end.synchronize()
        return start.elapsed_time(end) / 1000
    return end - start


def upload(x: Tensor, device: torch.device) -> Tensor:
    """x as float32 on `device`, without the host waiting for the device: torch copies from pageable host memory to
    CUDA and then waits for the stream, which held the host at every chunk until the cache refresh it had just queued
    was done, with nothing else queued behind it. From pinned memory the copy is queued like any kernel (torch keeps
    the pinned block until the copy has run)."""
    if device.type == "cuda" and x.device.type == "cpu":
        return x.float().pin_memory().to(device, non_blocking=True)
    return x.to(device, torch.float32)


def now(device: torch.device) -> float:
    """Wall-clock seconds once the device's queued work is done (for whole-request timings)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclass
class Begun:
    """A chunk whose context is in the cache and whose starting latents are drawn: what is left is denoising."""

    index: int
    first_frame: int
    z: Tensor  # noise (or the given context latents when `schedule` is None)
    schedule: Schedule | None  # None: a context chunk, final as given
    position: int  # rotary frame index of its first frame
    recomputed: int
    marks: tuple[Mark, Mark]  # start, cache refreshed


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

    def __init__(self, model: CausalWanTransformer, shift: float = 5.0, step: Step = flow_map_step):
        """`step` moves a chunk from t to r (default: one flow-map jump; `distill.consistency` has another)."""
        self.model = model
        self.shift = shift
        self.step = step
        self.buffers = BufferPool()  # KV buffers reused by the next stream of the same size (and its CUDA graphs)

    @property
    def default_frames(self) -> int:
        return sum(self.model.config.chunk_partition)

    def open(
        self,
        prompt_embeds: Tensor,
        *,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        steps: Budget = 4,
        seed: int | None = None,
        noise: Tensor | None = None,
        context: Tensor | None = None,
        window: int | None = None,
        max_frames: int | None = None,
        evict: str = "keep",
    ) -> LatentStream:
        """A stream of latent chunks, one per `next()`; `num_frames=None` (and no `noise`) makes it endless.

        Arguments as for `stream`, with one budget `steps` (change it between chunks with `set_steps` or per chunk
        with `next_chunk(steps=...)`). Endless streams only: `max_frames` positions the context and the chunk being
        generated may span (default: the trained length, `sum(chunk_partition)`), `window` caps the compressed
        chunks kept besides the anchor (default: as many as fit), `evict` is "keep" (rotate kept entries: constant
        cost, approximate) or "recompute" (re-encode after an eviction: exact). See `streamgen.cache`.
        """
        return LatentStream(self, prompt_embeds, height=height, width=width, num_frames=num_frames, steps=steps,
                            seed=seed, noise=noise, context=context, window=window, max_frames=max_frames,
                            evict=evict)

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
        num_frames: latent frames (default: the trained length; for an endless stream use `open`).
        steps: one budget for every generated chunk, or a sequence with one budget per generated chunk.
        noise: (B, C, F, H, W) for the whole video, consumed chunk by chunk; else drawn per chunk from `seed`.
        context: (B, C, Fc, H, W) normalised latents of given frames (I2V/V2V), covering whole chunks.
        """
        if num_frames is None and noise is None:
            num_frames = self.default_frames
        single = isinstance(steps, (int, Schedule))
        with self.open(prompt_embeds, height=height, width=width, num_frames=num_frames, steps=steps if single else 1,
                       seed=seed, noise=noise, context=context) as video:
            budgets = None if single else self._budgets(steps, video.num_chunks - video.num_context)
            for k in range(video.num_chunks):
                generated = k - video.num_context
                yield video.next_chunk(None if budgets is None or generated < 0 else budgets[generated])

    def generate(self, prompt_embeds: Tensor, **kwargs) -> Tensor:
        """The whole latent video (B, C, F, H, W), context frames included."""
        return torch.cat([chunk.latents for chunk in self.stream(prompt_embeds, **kwargs)], dim=2)

    @torch.no_grad()
    def next_chunks(self, streams: Sequence[LatentStream], steps: Sequence[Budget | None] | None = None
                    ) -> list[LatentChunk | Exception]:
        """The next chunk of each stream (its `steps` overrides its budget for this chunk), denoised in shared
        forwards where the chunks allow it.

        Chunks share a forward when they have the same size, context length, rotary position, prompt length and step
        schedule (streams of one video size that are at the same point, or endless ones past their window) and the
        sampler is the deterministic flow-map jump: their batch then equals making them one by one up to float
        rounding. For that the group's contexts are copied into one batch of KV buffers (from `buffers`, so repeated
        groups replay their CUDA graphs) once per chunk, not per step. Each stream's outcome is its own: an error
        (out of memory, a closed stream) is returned in its place, and a failed shared forward is retried stream by
        stream, so one stream's failure does not end the others.
        """
        steps = [None] * len(streams) if steps is None else list(steps)
        if len(steps) != len(streams):
            raise ValueError(f"got {len(steps)} step budgets for {len(streams)} streams")
        if any(s.model is not self.model for s in streams):
            raise ValueError("every stream must come from this generator")
        if len(set(map(id, streams))) != len(streams):
            raise ValueError("a stream makes one chunk at a time: it is listed twice")
        results: list[LatentChunk | Exception | None] = [None] * len(streams)
        begun: dict[int, Begun] = {}
        for i, (stream, budget) in enumerate(zip(streams, steps)):
            try:
                begun[i] = stream.begin_chunk(budget)
            except Exception as e:
                results[i] = e
        groups: dict[tuple, list[int]] = {}
        for i, b in begun.items():
            key = streams[i].batch_key(b) if self.step is flow_map_step else None
            groups.setdefault(key if key is not None else ("alone", i), []).append(i)
        for members in groups.values():
            if len(members) > 1:
                try:
                    start = mark(self.model.device)
                    latents = self._denoise_together([streams[i] for i in members], [begun[i] for i in members])
                    end = mark(self.model.device)
                except Exception:  # e.g. out of memory for the batch: each stream on its own below
                    latents = None
                if latents is not None:
                    for i, z in zip(members, latents):
                        results[i] = streams[i].end_chunk(begun[i], z, (start, end), batch=len(members))
                    continue
            for i in members:
                try:
                    results[i] = streams[i].end_chunk(begun[i], *streams[i].denoise(begun[i]))
                except Exception as e:
                    results[i] = e
        return results

    def _denoise_together(self, streams: list[LatentStream], begun: list[Begun]) -> list[Tensor]:
        """Denoise chunks of equal `batch_key` in one forward per step; their latents, stream by stream."""
        first, n = streams[0], streams[0].cache.length
        rows = [s.batch for s in streams]
        z = torch.cat([b.z for b in begun])
        keys, values = first.cache.keys, first.cache.values
        shape = (keys.shape[0], sum(rows), n, *keys.shape[3:])
        batch_keys = self.buffers.take(shape, keys.dtype, keys.device)
        batch_values = self.buffers.take(shape, values.dtype, values.device)
        try:
            row = 0
            for s in streams:
                batch_keys[:, row:row + s.batch, :n] = s.cache.keys[:, :, :n]
                batch_values[:, row:row + s.batch, :n] = s.cache.values[:, :, :n]
                row += s.batch
            text = [tuple(torch.cat([s.text[layer][j] for s in streams]) for j in range(2))
                    for layer in range(len(first.text))]
            z = run_schedule(self.model, self.step, z, begun[0].schedule, text, Past(batch_keys, batch_values, n),
                             begun[0].position, None)
            return list(z.split(rows))
        finally:
            self.buffers.give(batch_keys)
            self.buffers.give(batch_values)

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


class LatentStream:
    """One video in the making: `next_chunk()` (or `next()`) makes the next chunk final and returns it.

    Between chunks the caller may `set_prompt` (the new prompt applies from the next chunk: it is denoised under it and
    every cache entry computed from then on is encoded under it; `recache=True` also re-encodes the entries already
    cached, so the cache equals encoding the whole context under the new prompt) and `set_steps`. Not thread-safe:
    call it from one thread (see `streamgen.session.Session` for a thread-safe front).

    Finite streams (`num_frames` given) are exactly the FAR scheme (what `Generator.stream` yields). Endless streams
    bound their context (see `streamgen.cache.window_layout`): positions are re-indexed into the trained range and the
    buffers are allocated once, so memory is flat however long the stream runs. Until the first eviction an endless
    stream equals the finite one; after it, exactness depends on `evict` (see `streamgen.cache`).
    """

    def __init__(self, generator: Generator, prompt_embeds: Tensor, *, height: int | None, width: int | None,
                 num_frames: int | None, steps: Budget, seed: int | None, noise: Tensor | None,
                 context: Tensor | None, window: int | None, max_frames: int | None, evict: str):
        model = self.model = generator.model
        cfg = model.config
        self.shift = generator.shift
        self.step = generator.step
        self.device = model.device
        if prompt_embeds.ndim != 3 or prompt_embeds.shape[-1] != cfg.text_dim:
            raise ValueError(f"prompt_embeds must be (batch, tokens, {cfg.text_dim}), got {tuple(prompt_embeds.shape)}")
        batch = self.batch = prompt_embeds.shape[0]
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
        generator._check_size(height, width)
        if evict not in EVICTION:
            raise ValueError(f"evict must be one of {', '.join(EVICTION)}, got {evict!r}")
        if window is not None and window < 0:
            raise ValueError(f"window must be >= 0 compressed chunks, got {window}")
        self.height, self.width = height, width
        self.endless = num_frames is None
        self.evict, self.window = evict, window
        self.max_frames = sum(cfg.chunk_partition) if max_frames is None else max_frames
        self.partition = list(cfg.chunk_partition)
        self.sizes = None if self.endless else chunk_sizes(cfg.chunk_partition, num_frames)
        self.num_chunks: int | None = None if self.endless else len(self.sizes)

        self.num_context = 0
        if context is not None:
            expect = (batch, cfg.in_channels, None, height, width)
            if context.ndim != 5 or any(e is not None and e != s for e, s in zip(expect, context.shape)):
                raise ValueError(f"context must be (batch={batch}, {cfg.in_channels}, frames, {height}, {width}), "
                                 f"got {tuple(context.shape)}")
            covered, total = [], 0
            while total < context.shape[2] or len(covered) < 6:
                if self.num_chunks is not None and len(covered) == self.num_chunks:
                    break
                total += self.chunk_size(len(covered))
                covered.append(total)
            if context.shape[2] not in covered:
                raise ValueError(f"context has {context.shape[2]} latent frames; it must cover whole chunks, i.e. one "
                                 f"of {covered[:6]}...")
            self.num_context = covered.index(context.shape[2]) + 1
            if self.num_context == self.num_chunks:
                raise ValueError("context covers the whole video: nothing left to generate")
        self._steps = as_schedule(steps, self.shift)
        self.noise, self.context = noise, context
        self.rng = None
        if noise is None:
            self.rng = torch.Generator("cpu").manual_seed(secrets.randbits(63) if seed is None else seed)

        self._floor = 1
        if self.endless:
            layouts, floor = [[]], 1
            for k in range(1, len(self.partition) + self.max_frames + cfg.full_chunk_limit + 2):
                layout, floor = window_layout(self.chunk_size, k, cfg.full_chunk_limit, self.max_frames, window, floor)
                layouts.append(layout)
        else:
            layouts = [context_layout(self.sizes, k, cfg.full_chunk_limit) for k in range(len(self.sizes))]
        self.text = model.encode_text(prompt_embeds.to(self.device))
        self.cache: KVCache | None = KVCache.for_layouts(model, batch, height, width, layouts, generator.buffers)
        self.final: dict[int, Tensor] = {}  # latents of the chunks the cache may have to (re)encode
        self.layout: list[Entry] = []  # the context of the next chunk, once it is refreshed
        self.index = 0  # next chunk
        self.frame = 0  # its first latent frame in the video
        self._recache = False
        self.prompt_version = 0  # set_prompt calls so far; a chunk is made under the version current at its start

    # -- shape of the video ------------------------------------------------------------------------------------------

    def chunk_size(self, k: int) -> int:
        """Latent frames of chunk k: `chunk_partition`, then its largest size."""
        if self.sizes is not None:
            return self.sizes[k]
        return self.partition[k] if k < len(self.partition) else max(self.partition)

    @property
    def done(self) -> bool:
        return self.cache is None or (self.num_chunks is not None and self.index >= self.num_chunks)

    # -- control between chunks --------------------------------------------------------------------------------------

    @property
    def steps(self) -> Schedule:
        return self._steps

    def set_steps(self, steps: Budget) -> None:
        """Step budget of the chunks generated from now on."""
        self._steps = as_schedule(steps, self.shift)

    def set_prompt(self, prompt_embeds: Tensor, recache: bool = False) -> None:
        """Condition the chunks from the next one on `prompt_embeds` (same batch size); see the class docstring."""
        cfg = self.model.config
        if prompt_embeds.ndim != 3 or prompt_embeds.shape[0] != self.batch or prompt_embeds.shape[-1] != cfg.text_dim:
            raise ValueError(f"prompt_embeds must be (batch={self.batch}, tokens, {cfg.text_dim}), "
                             f"got {tuple(prompt_embeds.shape)}")
        with torch.no_grad():
            self.text = self.model.encode_text(prompt_embeds.to(self.device))
        self._recache = self._recache or recache
        self.prompt_version += 1

    # -- the chunk loop ----------------------------------------------------------------------------------------------

    def __iter__(self) -> LatentStream:
        return self

    def __next__(self) -> LatentChunk:
        if self.done:
            raise StopIteration
        return self.next_chunk()

    @torch.no_grad()
    def next_chunk(self, steps: Budget | None = None) -> LatentChunk:
        """Make chunk `index` final and return it; `steps` overrides the budget for this chunk only."""
        begun = self.begin_chunk(steps)
        return self.end_chunk(begun, *self.denoise(begun))

    # The three parts of `next_chunk`, apart so `Generator.next_chunks` can denoise several streams' chunks together.

    @torch.no_grad()
    def begin_chunk(self, steps: Budget | None = None) -> Begun:
        """Bring the cache up to date for chunk `index` and draw its noise."""
        if self.cache is None:
            raise RuntimeError("the stream is closed")
        if self.done:
            raise RuntimeError(f"the video is complete ({self.num_chunks} chunks)")
        k, size, start = self.index, self.chunk_size(self.index), self.frame
        cfg, device = self.model.config, self.device
        schedule = None if k < self.num_context else (self._steps if steps is None else as_schedule(steps, self.shift))
        t0 = mark(device)
        recomputed = 0
        if self._recache:
            self.cache.clear()
            self._recache = False
        if k:
            if self.endless:
                self.layout, self._floor = window_layout(self.chunk_size, k, cfg.full_chunk_limit, self.max_frames,
                                                         self.window, self._floor)
                self.cache.reindex(self.layout, recompute=self.evict == "recompute")
            else:
                self.layout = context_layout(self.sizes, k, cfg.full_chunk_limit)
            recomputed = self.cache.refresh(self.layout, self.final.__getitem__, self.text)
            keep = {e.chunk for e in self.layout}
            for old in [c for c in self.final if c not in keep]:
                del self.final[old]
        position = sum(e.frames for e in self.layout)
        if schedule is None:
            z = self.context[:, :, start:start + size]
        elif self.noise is not None:
            z = self.noise[:, :, start:start + size]
        else:
            z = torch.randn((self.batch, cfg.in_channels, size, self.height, self.width), generator=self.rng)
        return Begun(k, start, upload(z, device), schedule, position, recomputed, (t0, mark(device)))

    def batch_key(self, begun: Begun) -> tuple | None:
        """Chunks of equal keys can be denoised in one forward per step (None: this one cannot)."""
        if begun.schedule is None:
            return None
        return (tuple(begun.z.shape[1:]), self.cache.length, begun.position, tuple(begun.schedule),
                tuple(self.text[0][0].shape[1:]), self.text[0][0].dtype)

    @torch.no_grad()
    def denoise(self, begun: Begun) -> tuple[Tensor, tuple[Mark, Mark]]:
        """Run the chunk's step budget against this stream's own cache: final latents and (start, end) marks."""
        start = mark(self.device)
        z = begun.z
        if begun.schedule is not None:
            z = run_schedule(self.model, self.step, z, begun.schedule, self.text, self.cache.past(), begun.position,
                             self.rng)
        return z, (start, mark(self.device))

    def end_chunk(self, begun: Begun, z: Tensor, marks: tuple[Mark, Mark], batch: int = 1) -> LatentChunk:
        """Make the denoised latents final: the chunk the caller gets, kept for the cache's next refresh."""
        k = begun.index
        self.final[k] = z
        self.index, self.frame = k + 1, begun.first_frame + z.shape[2]
        steps = 0 if begun.schedule is None else len(begun.schedule)
        return LatentChunk(k, begun.first_frame, z, steps, begun.schedule is None, (*begun.marks, *marks),
                           begun.position, begun.recomputed, batch)

    # -- lifetime ----------------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Free the KV cache and the kept latents at once; the stream makes no more chunks."""
        if self.cache is not None:
            self.cache.release()
            self.cache = None
        self.final.clear()

    def __enter__(self) -> LatentStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
