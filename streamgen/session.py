"""A live video for applications without the network: prompt in, RGB frames out, chunk by chunk, for as long as wanted.

```python
with Session(Pipeline.load(None), "a red circle", steps=2) as session:   # endless unless frames= is given
    for chunk in session:                         # or: async for chunk in session
        show(chunk.frames)                        # (F, H, W, 3) uint8
        if chunk.index == 10:
            session.prompt("a blue square")       # applies from the next chunk
            session.steps(4)
```

`prompt`, `steps`, `deadline` and `close` may be called from any thread; they take effect at the next chunk boundary.
Frames come from the streaming VAE decoder, so a video's frames are the same however it is cut into chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from streamgen.engine import EVICTION, LatentChunk, LatentStream, now
from streamgen.pipeline import NonFiniteError, Pipeline


@dataclass
class SessionChunk:
    index: int  # chunk index in the video
    first_frame: int  # index of its first video frame
    frames: np.ndarray  # (F, H, W, 3) uint8 RGB
    steps: int  # step budget it was made with
    prompt_version: int  # how many prompt changes were in effect (0: the first prompt)
    position: int  # rotary frame index of its first latent frame (bounded in endless streams)
    switch_s: float  # seconds spent applying a prompt change before it (text encoding)
    cache_s: float  # KV cache refresh (with a recache: the whole context)
    denoise_s: float  # shared with the other chunks of its batch
    decode_s: float
    by_deadline: bool  # the step budget was chosen by the deadline controller
    batch: int = 1  # chunks of streams denoised in the same forwards (`next_chunks`)


@dataclass
class _Turn:
    """What a session decided before its next chunk is made."""

    stream: LatentStream
    steps: int
    version: int
    controller: DeadlineController | None
    switch_s: float


def next_chunks(sessions: Sequence[Session]) -> list[SessionChunk | Exception | None]:
    """The next chunk of each session (None: complete or closed), made together: sessions of one pipeline whose
    chunks match in size, context and budget share the transformer's forwards (`Generator.next_chunks`).

    Each session's outcome is its own: an exception is returned in its place (the session is then as after the
    same exception from `next_chunk`), the others are unaffected. Equal to calling `next_chunk` on each in turn, up
    to float rounding.
    """
    if len(set(map(id, sessions))) != len(sessions):
        raise ValueError("a session can make one chunk at a time: it is listed twice")
    ordered = sorted(sessions, key=id)  # one lock order, whoever else takes two of them
    with contextlib.ExitStack() as held:
        for session in ordered:
            held.enter_context(session._run)
        results: dict[int, SessionChunk | Exception | None] = {}
        turns: dict[int, _Turn] = {}
        for i, session in enumerate(sessions):
            try:
                turn = session._begin_turn()
            except Exception as e:
                results[i] = e
                continue
            if turn is None:
                results[i] = None
            else:
                turns[i] = turn
        by_generator: dict[int, list[int]] = {}
        for i in turns:
            by_generator.setdefault(id(sessions[i].pipeline.generator), []).append(i)
        for members in by_generator.values():
            generator = sessions[members[0]].pipeline.generator
            made = generator.next_chunks([turns[i].stream for i in members], [turns[i].steps for i in members])
            for i, latents in zip(members, made):
                if isinstance(latents, Exception):
                    results[i] = latents
                    continue
                try:
                    results[i] = sessions[i]._finish_turn(turns[i], latents)
                except Exception as e:
                    results[i] = e
    return [results[i] for i in range(len(sessions))]


class DeadlineController:
    """The largest step budget per chunk that keeps up with a target frame rate, from measured costs.

    A chunk of f latent frames yields F video frames that play for F / fps seconds; the controller predicts the time
    of a chunk at N steps as f * (overhead + N * per_step) from running averages per latent frame, and picks the
    largest N <= max_steps that fits into the chunk's play time times `share` (the fraction of the device this stream
    gets: 1 / the number of streams sharing it round-robin). It starts at 1 step and adapts from the first chunk on.
    """

    def __init__(self, fps: float, max_steps: int, smoothing: float = 0.5):
        if not fps > 0:
            raise ValueError(f"target fps must be positive, got {fps}")
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        self.fps, self.max_steps, self.smoothing = float(fps), int(max_steps), smoothing
        self.share = 1.0
        self.per_step: float | None = None  # seconds per step per latent frame
        self.overhead: float | None = None  # seconds per latent frame besides the steps (cache, decode, encode)

    def choose(self, latent_frames: int, video_frames: int) -> int:
        if self.per_step is None or self.overhead is None:
            return 1
        budget = video_frames / self.fps * self.share / latent_frames - self.overhead
        return max(1, min(self.max_steps, math.floor(budget / max(self.per_step, 1e-9))))

    def observe(self, latent_frames: int, steps: int, denoise_s: float, other_s: float) -> None:
        per_step, overhead = denoise_s / (steps * latent_frames), other_s / latent_frames
        a = self.smoothing
        self.per_step = per_step if self.per_step is None else a * per_step + (1 - a) * self.per_step
        self.overhead = overhead if self.overhead is None else a * overhead + (1 - a) * self.overhead

    def add_overhead(self, latent_frames: int, seconds: float) -> None:
        """Time spent on the last chunk outside the session (e.g. a server encoding it)."""
        if self.overhead is not None:
            self.overhead += self.smoothing * seconds / latent_frames


class Session:
    """One video, endless by default, whose prompt and step budget can change between chunks.

    pipeline: default `Pipeline.load(None)` (the built-in tiny model). prompt: text, or prompt embeddings
    (1, L, text_dim). height/width: pixels (default: the model's). frames: video frames (1 + 4k) or None for an
    endless stream. window/max_frames/evict: the endless context (see `Generator.open`). deadline_fps: choose the
    step budget per chunk to keep up with this frame rate, at most `steps`.

    Nothing is computed until the first chunk is asked for; the KV cache lives from then until the video ends or
    `close()`.
    """

    def __init__(self, pipeline: Pipeline | None = None, prompt: str | torch.Tensor = "", *, steps: int = 4,
                 seed: int | None = None, height: int | None = None, width: int | None = None,
                 frames: int | None = None, window: int | None = None, max_frames: int | None = None,
                 evict: str = "keep", deadline_fps: float | None = None):
        self.pipeline = pipeline or Pipeline.load(None)
        s = self.pipeline.settings
        self.height = s.height if height is None else height
        self.width = s.width if width is None else width
        latent_frames, self.latent_height, self.latent_width = self.pipeline.latent_size(
            self.height, self.width, 1 if frames is None else frames)
        self.num_frames = frames
        self.latent_frames = None if frames is None else latent_frames
        self.fps = s.fps
        _check_steps(steps)
        if evict not in EVICTION:  # the stream is opened lazily: refuse what it would refuse now
            raise ValueError(f"evict must be one of {', '.join(EVICTION)}, got {evict!r}")
        if window is not None and window < 0:
            raise ValueError(f"window must be >= 0 compressed chunks, got {window}")
        self._options = dict(seed=seed, window=window, max_frames=max_frames, evict=evict)
        self._lock = threading.Lock()  # guards the pending changes below
        self._run = threading.Lock()  # one chunk at a time
        self._prompt = prompt
        self._steps = steps
        self._pending_prompt: tuple[str | torch.Tensor, bool] | None = None
        self._pending_steps: int | None = None
        self.prompt_version = 0
        self.deadline_controller = None if deadline_fps is None else DeadlineController(deadline_fps, steps)
        self._stream: LatentStream | None = None
        self._decoder = None
        self._frame = 0  # next video frame index
        self._closed = False

    # -- control (any thread) ----------------------------------------------------------------------------------------

    def prompt(self, prompt: str | torch.Tensor, *, recache: bool = False) -> int:
        """Switch to `prompt` from the next chunk on; `recache=True` re-encodes the cached context under it too (a
        smoother transition, at the cost of one encode of the whole context). Returns the new prompt version, which
        the first chunk made under it carries as `prompt_version`."""
        if not isinstance(prompt, str | torch.Tensor):
            raise ValueError(f"a prompt is text or prompt embeddings, got {type(prompt).__name__}")
        with self._lock:
            previous = self._pending_prompt
            self._pending_prompt = (prompt, recache or (previous is not None and previous[1]))
            self.prompt_version += 1
            return self.prompt_version

    def steps(self, steps: int) -> None:
        """Step budget from the next chunk on (in deadline mode: the largest budget the controller may pick)."""
        _check_steps(steps)
        with self._lock:
            self._pending_steps = steps

    def deadline(self, fps: float | None) -> None:
        """Pick the step budget per chunk to keep up with `fps` (None: back to the fixed budget)."""
        with self._lock:
            steps = self._pending_steps or self._steps
            self.deadline_controller = None if fps is None else DeadlineController(fps, steps)

    @property
    def current_prompt(self) -> str | torch.Tensor:
        return self._prompt

    @property
    def done(self) -> bool:
        return self._closed or (self._stream is not None and self._stream.done)

    @property
    def closed(self) -> bool:
        return self._closed

    # -- chunks ------------------------------------------------------------------------------------------------------

    def next_chunk(self) -> SessionChunk | None:
        """Make, decode and return the next chunk; None once the video is complete or the session closed.

        NonFiniteError when the chunk's latents hold NaN or Inf (checked every chunk); the session is closed then."""
        with self._run:
            turn = self._begin_turn()
            if turn is None:
                return None
            return self._finish_turn(turn, turn.stream.next_chunk(turn.steps))

    def _begin_turn(self) -> _Turn | None:
        """Apply the pending prompt and budget changes and pick this chunk's budget (holding `_run`)."""
        if self.done:
            return None
        switch_s = 0.0
        with self._lock:
            pending, self._pending_prompt = self._pending_prompt, None
            if self._pending_steps is not None:
                self._steps, self._pending_steps = self._pending_steps, None
                if self.deadline_controller is not None:
                    self.deadline_controller.max_steps = self._steps
            version = self.prompt_version
            controller = self.deadline_controller
        device = self.pipeline.transformer.device
        if self._stream is None:
            if pending is not None:
                self._prompt = pending[0]
                pending = None
            self._open(device)
        elif pending is not None:
            t0 = now(device)
            self._prompt = pending[0]
            self._stream.set_prompt(self.pipeline.prompt_embeds(self._prompt), recache=pending[1])
            switch_s = now(device) - t0
        stream = self._stream
        size = stream.chunk_size(stream.index)
        video_frames = 1 + 4 * (size - 1) if stream.index == 0 else 4 * size
        steps = self._steps if controller is None else controller.choose(size, video_frames)
        return _Turn(stream, steps, version, controller, switch_s)

    def _finish_turn(self, turn: _Turn, latents: LatentChunk) -> SessionChunk:
        """Decode the chunk's latents into the session's next frames (holding `_run`)."""
        device = self.pipeline.transformer.device
        t0 = now(device)
        try:
            frames = self.pipeline.decode_chunk(self._decoder, latents)[0]
        except NonFiniteError:
            self._closed = True
            self._release()
            raise NonFiniteError(f"chunk {latents.index} ({turn.steps} steps): the latents hold NaN or Inf; the "
                                 "video was ended and its cache freed") from None
        decode_s = now(device) - t0
        controller, size = turn.controller, latents.latents.shape[2]
        if controller is not None and latents.steps:
            controller.observe(size, latents.steps, latents.denoise_s,
                               latents.context_s + decode_s + turn.switch_s)
        chunk = SessionChunk(latents.index, self._frame, frames, latents.steps, turn.version, latents.position,
                             turn.switch_s, latents.context_s, latents.denoise_s, decode_s, controller is not None,
                             latents.batch)
        self._frame += frames.shape[0]
        if turn.stream.done:
            self._release()
        return chunk

    def __iter__(self) -> Iterator[SessionChunk]:
        while (chunk := self.next_chunk()) is not None:
            yield chunk

    def frames(self) -> Iterator[np.ndarray]:
        """Single frames (H, W, 3) uint8, in order."""
        for chunk in self:
            yield from chunk.frames

    async def __aiter__(self) -> AsyncIterator[SessionChunk]:
        """Chunks made in a worker thread, so the event loop stays free while the model runs."""
        while (chunk := await asyncio.to_thread(self.next_chunk)) is not None:
            yield chunk

    async def aframes(self) -> AsyncIterator[np.ndarray]:
        async for chunk in self:
            for frame in chunk.frames:
                yield frame

    # -- lifetime ----------------------------------------------------------------------------------------------------

    def close(self) -> None:
        """End the video and free its KV cache (waits for a chunk in progress in another thread)."""
        self._closed = True
        with self._run:
            self._release()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _open(self, device: torch.device) -> None:
        embeds = self.pipeline.prompt_embeds(self._prompt)
        self._stream = self.pipeline.generator.open(
            embeds.to(device), height=self.latent_height, width=self.latent_width, num_frames=self.latent_frames,
            steps=self._steps, **self._options)
        self._decoder = self.pipeline.vae.stream_decoder()

    def _release(self) -> None:
        if self._stream is not None:
            self._stream.close()
        self._decoder = None


def _check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"a step budget must be an integer >= 1, got {steps!r}")
