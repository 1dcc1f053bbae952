"""Prompt in, RGB frames out, chunk by chunk: text encoder -> causal generator -> streaming VAE decoder.

A pipeline folder is the diffusers layout of the released students (`transformer/`, `vae/`, `text_encoder/`,
`tokenizer/`), optionally with `streamgen.json` giving its natural size and frame rate. Self-trained students
conditioned on synthetic captions carry `text_encoder/config.json` naming `WordHashEncoder` instead of UMT5 weights.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, PositiveFloat, PositiveInt, ValidationError

from streamgen.checkpoint import CheckpointError, read_config
from streamgen.engine import Budget, Generator, LatentChunk, chunk_sizes
from streamgen.media import fit_frames, read_frames
from streamgen.model import CausalWanTransformer, load_transformer, save_transformer
from streamgen.text import CachedTextEncoder, TextEncoder, UMT5TextEncoder, WordHashEncoder
from streamgen.vae import StreamingDecoder, WanVAE, to_uint8_frames

SETTINGS_NAME = "streamgen.json"


class PipelineSettings(BaseModel):
    """Natural output of a model: the released students make 81 frames of 480x832 at 16 fps, shift 5."""

    model_config = ConfigDict(extra="allow")

    height: PositiveInt = 480
    width: PositiveInt = 832
    num_frames: PositiveInt = 81
    fps: PositiveFloat = 16.0
    shift: PositiveFloat = 5.0


@dataclass
class FrameChunk:
    index: int  # chunk index
    first_frame: int  # index of its first video frame
    frames: np.ndarray  # (B, F, H, W, 3) uint8 RGB
    latents: LatentChunk
    decode_s: float


class Pipeline:
    def __init__(self, transformer: CausalWanTransformer, vae: WanVAE, text_encoder: TextEncoder | None,
                 settings: PipelineSettings | None = None):
        self.transformer, self.vae = transformer, vae
        self.text_encoder = None if text_encoder is None else CachedTextEncoder(text_encoder)
        self.settings = settings or PipelineSettings()
        self.generator = Generator(transformer, shift=self.settings.shift)
        self._decode_stream = None
        if vae.device.type == "cuda":
            # High priority: the GPU schedules a decoded chunk's blocks first, so frames leave as soon as possible
            # and the denoising of the next chunk fills the rest.
            self._decode_stream = torch.cuda.Stream(vae.device, priority=-1)
        # Channels-last is cuDNN's and oneDNN's own conv layout: on a 2-core CPU the built-in model's video took
        # 0.256 s to generate and decode this way against 0.426 s channels-first (median of 5 alternating runs).
        vae.to_channels_last()

    # -- loading ---------------------------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, dtype: torch.dtype | None = None,
             device: str | torch.device | None = None) -> Pipeline:
        """Load a pipeline folder; `path=None` gives the built-in default model."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        root = DEFAULT_MODEL if path is None else Path(path)
        if not root.is_dir():
            raise CheckpointError(f"{root}: no such model folder")
        settings = PipelineSettings()
        if (root / SETTINGS_NAME).is_file():
            try:
                settings = PipelineSettings.model_validate_json((root / SETTINGS_NAME).read_text())
            except ValidationError as e:
                raise CheckpointError(f"{root / SETTINGS_NAME}: {e}") from None
        transformer = load_transformer(root, dtype, device)
        vae = WanVAE.from_pretrained(root, dtype, device)
        return cls(transformer, vae, _load_text_encoder(root, device), settings)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write a pipeline folder `load` reads back (word-hash text conditioning only; UMT5 is not re-saved)."""
        root = Path(folder)
        save_transformer(self.transformer, root / "transformer")
        self.vae.save_pretrained(root / "vae")
        encoder = None if self.text_encoder is None else self.text_encoder.encoder
        if isinstance(encoder, WordHashEncoder):
            (root / "text_encoder").mkdir(parents=True, exist_ok=True)
            config = {"_class_name": "WordHashEncoder", "dim": encoder.dim, "max_length": encoder.max_length,
                      "seed": encoder.seed}
            (root / "text_encoder" / "config.json").write_text(json.dumps(config, indent=2))
        (root / SETTINGS_NAME).write_text(self.settings.model_dump_json(indent=2))

    # -- generation ------------------------------------------------------------------------------------------------

    def prompt_embeds(self, prompt: str | Sequence[str] | torch.Tensor) -> torch.Tensor:
        if isinstance(prompt, torch.Tensor):
            return prompt
        if self.text_encoder is None:
            raise ValueError("this model has no text encoder: pass prompt embeddings instead of text")
        return self.text_encoder.encode([prompt] if isinstance(prompt, str) else list(prompt))

    def latent_size(self, height: int, width: int, num_frames: int) -> tuple[int, int, int]:
        """Pixel size and frame count -> latent (frames, height, width), or a ValueError naming the constraint."""
        s, tf = self.vae.config.spatial_factor, self.vae.config.temporal_factor
        multiple = s * self.transformer.config.compressed_patch_size[1]
        if height % multiple or width % multiple or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {multiple}, got {height}x{width}")
        if num_frames < 1 or (num_frames - 1) % tf:
            raise ValueError(f"num_frames must be 1 + {tf}k (1, {1 + tf}, {1 + 2 * tf}, ...), got {num_frames}")
        return 1 + (num_frames - 1) // tf, height // s, width // s

    def context_from_file(self, path: str | os.PathLike, height: int, width: int, num_frames: int) -> torch.Tensor:
        """Frames of an image or video as context: the longest prefix covering whole chunks, leaving one to make."""
        tf = self.vae.config.temporal_factor
        latent_frames = self.latent_size(height, width, num_frames)[0]
        sizes = chunk_sizes(self.transformer.config.chunk_partition, latent_frames)
        allowed = [1 + tf * (sum(sizes[: i + 1]) - 1) for i in range(len(sizes) - 1)]
        if not allowed:
            raise ValueError(f"a {num_frames}-frame video is a single chunk: no room for context")
        frames = read_frames(path, max_frames=allowed[-1])
        usable = [n for n in allowed if n <= len(frames)][-1]
        return fit_frames(frames[:usable], height, width)

    @torch.no_grad()
    def stream(self, prompt: str | Sequence[str] | torch.Tensor, *, height: int | None = None,
               width: int | None = None, num_frames: int | None = None, steps: Budget | Sequence[Budget] = 4,
               seed: int | None = None, context: torch.Tensor | None = None) -> Iterator[FrameChunk]:
        """Yield decoded frames chunk by chunk. `context`: (B, 3, F, H, W) frames in [-1, 1] to continue from."""
        s = self.settings
        height, width, num_frames = height or s.height, width or s.width, num_frames or s.num_frames
        latent_frames, h, w = self.latent_size(height, width, num_frames)
        embeds = self.prompt_embeds(prompt).to(self.transformer.device)
        context_latents = None if context is None else self.vae.encode(context.to(self.vae.device))
        decoder = self.vae.stream_decoder()
        chunks = self.generator.stream(embeds, height=h, width=w, num_frames=latent_frames, steps=steps, seed=seed,
                                       context=context_latents)
        first_frame = 0
        for chunk in (chunks if self._decode_stream is None else _one_ahead(chunks)):
            t0 = time.perf_counter()
            frames = self.decode_chunk(decoder, chunk)
            yield FrameChunk(chunk.index, first_frame, frames, chunk, time.perf_counter() - t0)
            first_frame += frames.shape[1]

    def decode_chunk(self, decoder: StreamingDecoder, chunk: LatentChunk) -> np.ndarray:
        """Frames (B, F, H, W, 3) uint8 of a chunk, decoded on the side stream on CUDA: it waits for this chunk's
        latents only, so the next chunk's denoising (already queued on the main stream) runs alongside. Raises
        NonFiniteError when the latents hold NaN or Inf (read after the host copy, so the check adds no wait)."""
        stream = self._decode_stream
        if stream is not None:
            stream.wait_event(chunk.ready)
            chunk.latents.record_stream(stream)
        with torch.cuda.stream(stream):  # None (CPU): no stream to switch to
            finite = torch.isfinite(chunk.latents).all()
            frames = to_uint8_frames(decoder.decode(chunk.latents))  # the host copy waits for this stream only
            # Read on this stream too: on the generator's, the host would wait for the next chunk's queued work.
            if not bool(finite):
                raise NonFiniteError(f"chunk {chunk.index}: the latents hold NaN or Inf")
        return frames

    def generate(self, prompt, **kwargs) -> np.ndarray:
        """All frames (B, F, H, W, 3) uint8."""
        return np.concatenate([c.frames for c in self.stream(prompt, **kwargs)], axis=1)


class NonFiniteError(FloatingPointError):
    """A chunk's latents hold NaN or Inf: the video ends there (its later chunks would build on them)."""


def _one_ahead(chunks: Iterator[LatentChunk]) -> Iterator[LatentChunk]:
    """Yield the first chunk at once, then chunk k once chunk k + 1 has been queued on the device.

    The generator never waits for the device (its timings are CUDA events), so asking it for chunk k + 1 queues that
    chunk's whole denoising; decoding chunk k then fills the GPU time the transformer's small kernels leave idle. One
    thread, no locks: the two overlap on the device. The first chunk goes straight to the decoder: its latency is the
    time to first frame.
    """
    previous = None
    for chunk in chunks:
        if chunk.index == 0:
            yield chunk
            continue
        if previous is not None:
            yield previous
        previous = chunk
    if previous is not None:
        yield previous


def _load_text_encoder(root: Path, device: torch.device) -> TextEncoder | None:
    folder = root / "text_encoder"
    if not (folder / "config.json").is_file():
        return None
    config = read_config(folder)
    if config.get("_class_name") == "WordHashEncoder":
        return WordHashEncoder(config["dim"], config["max_length"], config.get("seed", 0))
    return LazyUMT5(root, device)


class LazyUMT5:
    """UMT5-XXL is 11 GB: load it on the first text prompt, never when prompt embeddings are given."""

    max_length = 512

    def __init__(self, root: Path, device: torch.device):
        self.root, self.device = root, device
        self.dim = read_config(root / "text_encoder").get("d_model", 4096)
        self._encoder: UMT5TextEncoder | None = None

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        if self._encoder is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
            self._encoder = UMT5TextEncoder.from_pretrained(self.root, dtype=dtype, device=self.device)
        return self._encoder.encode(prompts)


BUILTIN_DESCRIPTION = (
    "the built-in default model is a tiny causal student (4 layers, dim 192, 2.8M parameters, 64x64 pixels, 29 "
    "frames at 8 fps) trained on synthetic videos of one coloured shape moving over a flat background: it draws "
    "prompts like 'a red circle moving right on a gray background' (colours red, green, blue, yellow, white, purple; "
    "shapes square, circle, triangle; backgrounds black, gray, brown); colours and backgrounds come out right, shapes "
    "and motion only roughly (distill/RESULTS.md)"
)
# How it was made: distill/h100.sh on one H100 (distill/RESULTS.md, run 3): its stage-1 student, transformer stored
# in bf16.
DEFAULT_MODEL = Path(__file__).parent / "default_model"
