"""Reading images and videos given as I2V / V2V context: file -> (1, 3, F, H, W) float in [-1, 1] at a target size."""

from __future__ import annotations

import os

import av
import numpy as np
import torch
import torch.nn.functional as F


class MediaError(ValueError):
    """A context file that cannot be read as asked."""


def read_frames(path: str | os.PathLike, max_frames: int | None = None) -> np.ndarray:
    """Decode up to `max_frames` RGB frames (N, H, W, 3) uint8 from an image or video file (PyAV)."""
    frames = []
    try:
        with av.open(str(path)) as container:
            stream = next((s for s in container.streams if s.type == "video"), None)
            if stream is None:
                raise MediaError(f"{path}: no video or image stream")
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
                if max_frames is not None and len(frames) >= max_frames:
                    break
    except MediaError:
        raise
    except (av.FFmpegError, OSError) as e:
        raise MediaError(f"{path}: cannot read as image or video ({e})") from None
    if not frames:
        raise MediaError(f"{path}: holds no frames")
    return np.stack(frames)


def fit_frames(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    """(N, h, w, 3) uint8 -> (1, 3, N, height, width) in [-1, 1]: centre-crop to the aspect ratio, then resize."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    h, w = x.shape[-2:]
    if h * width > w * height:  # too tall: crop rows
        crop = round(w * height / width)
        x = x[..., (h - crop) // 2:(h - crop) // 2 + crop, :]
    else:
        crop = round(h * width / height)
        x = x[..., (w - crop) // 2:(w - crop) // 2 + crop]
    x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(-1, 1).permute(1, 0, 2, 3).unsqueeze(0)
