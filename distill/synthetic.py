"""Procedural videos of one coloured shape moving over a flat background, with the caption that describes them.

Every clip is a pure function of (seed, index), so a dataset needs no files, two machines draw the same clips, and a
clip's labels (colour, shape, motion) are known exactly: the caption is built from them and a classifier trained on
them later checks whether generated videos show what their prompt asked for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

COLOURS = {
    "red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (235, 215, 40),
    "white": (245, 245, 245), "purple": (150, 60, 200),
}
BACKGROUNDS = {"black": (10, 10, 10), "gray": (120, 120, 120), "brown": (110, 70, 30)}
SHAPES = ("square", "circle", "triangle")
MOTIONS = ("moving left", "moving right", "moving up", "moving down", "bouncing", "turning")
LABELS = {"colour": tuple(COLOURS), "shape": SHAPES, "motion": MOTIONS}

_DIRECTIONS = {"moving left": (-1, 0), "moving right": (1, 0), "moving up": (0, -1), "moving down": (0, 1)}


@dataclass(frozen=True)
class Clip:
    video: torch.Tensor  # (3, F, H, W) float32 in [-1, 1]
    caption: str
    labels: dict[str, int]  # index into LABELS[name] per name


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    motion: str
    background: str
    size: float  # circumradius, as a fraction of the frame
    start: tuple[float, float]  # centre at frame 0, fractions of width and height
    speed: float  # frame widths per clip (moves) or turns per clip (turning)

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} {self.motion} on a {self.background} background"

    @property
    def labels(self) -> dict[str, int]:
        return {name: LABELS[name].index(getattr(self, name)) for name in LABELS}


def draw_scene(rng: np.random.Generator) -> Scene:
    colour = str(rng.choice(list(COLOURS)))
    shape = str(rng.choice(SHAPES))
    motions = [m for m in MOTIONS if not (shape == "circle" and m == "turning")]  # a turning circle looks still
    motion = str(rng.choice(motions))
    background = str(rng.choice(list(BACKGROUNDS)))
    size = float(rng.uniform(0.14, 0.2))
    if motion in _DIRECTIONS:  # start on the side it leaves, so the whole move stays in frame
        dx, dy = _DIRECTIONS[motion]
        along = 0.5 - 0.25 * rng.uniform(0.8, 1.0)
        across = rng.uniform(0.35, 0.65)
        start = (0.5 - (0.5 - along) * dx if dx else across, 0.5 - (0.5 - along) * dy if dy else across)
        speed = float(rng.uniform(0.4, 0.5))
    else:
        start = (float(rng.uniform(0.3, 0.7)), float(rng.uniform(0.3, 0.7)))
        speed = float(rng.uniform(0.8, 1.2)) if motion == "bouncing" else float(rng.uniform(0.25, 0.4))
    return Scene(colour, shape, motion, background, size, (float(start[0]), float(start[1])), speed)


def _bounce(x: float, lo: float, hi: float) -> float:
    """Position of a point moving freely, reflected between walls lo and hi."""
    span = hi - lo
    u = (x - lo) % (2 * span)
    return lo + (u if u <= span else 2 * span - u)


def render(scene: Scene, frames: int, height: int, width: int) -> np.ndarray:
    """(F, H, W, 3) uint8. Positions in units of the frame: x to the right, y down."""
    ys = (np.arange(height) + 0.5) / height
    xs = (np.arange(width) + 0.5) / width
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    out = np.empty((frames, height, width, 3), np.uint8)
    out[:] = BACKGROUNDS[scene.background]
    colour = np.array(COLOURS[scene.colour], np.uint8)
    r = scene.size
    for f in range(frames):
        p = f / max(frames - 1, 1)  # progress through the clip
        cx, cy = scene.start
        angle = 0.0
        if scene.motion in _DIRECTIONS:
            dx, dy = _DIRECTIONS[scene.motion]
            cx, cy = cx + dx * scene.speed * p, cy + dy * scene.speed * p
        elif scene.motion == "bouncing":  # diagonal, reflected by the frame's edges
            cx = _bounce(cx + scene.speed * p, r, 1 - r)
            cy = _bounce(cy + 1.3 * scene.speed * p, r, 1 - r)
        else:
            angle = 2 * math.pi * scene.speed * p
        # pixel offsets in the shape's own (rotated) frame
        ox, oy = gx - cx, gy - cy
        lx = math.cos(angle) * ox + math.sin(angle) * oy
        ly = -math.sin(angle) * ox + math.cos(angle) * oy
        if scene.shape == "square":
            inside = np.maximum(np.abs(lx), np.abs(ly)) <= r * 0.75
        elif scene.shape == "circle":
            inside = lx**2 + ly**2 <= r**2
        else:  # equilateral, apex up: inside all three edges (inradius r/2, outward normals at -90, 30, 150 deg)
            inside = np.ones_like(lx, bool)
            for deg in (-90.0, 30.0, 150.0):
                a = math.radians(deg)
                inside &= lx * math.cos(a) - ly * math.sin(a) <= r / 2
        out[f][inside] = colour
    return out


class _PixelCache:
    """Rendered clips (uint8) kept by (seed, index, frames, height, width) until `budget` bytes are held.

    Training draws every clip once per epoch (the VAE, the caption classifier, the shard writer): drawing a clip costs
    more than a training step spends on it on a GPU, so without this the GPU waits for the CPU. Clips past the budget
    are drawn again each time, so a large dataset costs time, never memory.
    """

    def __init__(self, budget: int):
        self.budget, self.used, self.clips = budget, 0, {}

    def get(self, key: tuple[int, ...], draw) -> np.ndarray:
        pixels = self.clips.get(key)
        if pixels is None:
            pixels = draw()
            if self.used + pixels.nbytes <= self.budget:
                self.clips[key] = pixels
                self.used += pixels.nbytes
        return pixels


PIXEL_CACHE = _PixelCache(4 * 2**30)  # per process; 2048 clips of 29 frames of 64x64 pixels are 0.7 GiB


class SyntheticVideos:
    """Clip i of the dataset `seed`: `frames` frames (1 + 4k for the Wan VAE) of height x width pixels."""

    def __init__(self, count: int, seed: int = 0, frames: int = 29, height: int = 64, width: int = 64):
        self.count, self.seed, self.frames, self.height, self.width = count, seed, frames, height, width

    def __len__(self) -> int:
        return self.count

    def scene(self, index: int) -> Scene:
        if not 0 <= index < self.count:
            raise IndexError(f"clip {index} of a {self.count}-clip dataset")
        return draw_scene(np.random.default_rng([self.seed, index]))

    def pixels(self, index: int) -> np.ndarray:
        """Clip `index` as (F, H, W, 3) uint8 (shared with the cache: don't write to it)."""
        scene = self.scene(index)
        key = (self.seed, index, self.frames, self.height, self.width)
        return PIXEL_CACHE.get(key, lambda: render(scene, self.frames, self.height, self.width))

    def __getitem__(self, index: int) -> Clip:
        scene = self.scene(index)
        video = torch.from_numpy(self.pixels(index)).permute(3, 0, 1, 2).float() / 127.5 - 1.0
        return Clip(video, scene.caption, scene.labels)

    def batch(self, indices: list[int]) -> dict:
        """Stacked clips, for the sharded loader: video (B, 3, F, H, W), captions, labels (B, 3) long."""
        scenes = [self.scene(i) for i in indices]
        pixels = torch.from_numpy(np.stack([self.pixels(i) for i in indices])).permute(0, 4, 1, 2, 3).contiguous()
        return {
            "video": pixels.float().div_(127.5).sub_(1.0),  # one conversion for the batch, of contiguous bytes
            "captions": [s.caption for s in scenes],
            "labels": torch.tensor([[s.labels[n] for n in LABELS] for s in scenes]),
        }
