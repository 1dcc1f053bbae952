"""Training data as shards of precomputed latents and prompt embeddings, and a loader that shards by rank and resumes.

Encoding video and text once, before training, takes the VAE and the text encoder out of every training step. A
dataset folder holds `index.json` and `shard-NNNNN.safetensors` files, each with `latents` (n, C, F, h, w) and
`prompt_embeds` (n, L, D) plus the captions and labels as metadata, and `negative.safetensors`: the embedding of the
negative prompt that stage 1 distils guidance with. The index also records the text encoder, so a trained model can
be exported with the same conditioning.

`Loader` walks any dataset with `__len__` and `batch(indices)` in a seeded random order per epoch, hands each rank
its slice of every global batch, and its whole state is (epoch, position): a resumed run draws exactly the batches
the interrupted one would have drawn next.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from streamgen.text import TextEncoder, WordHashEncoder
from streamgen.vae import WanVAE

INDEX_NAME = "index.json"
NEGATIVE_NAME = "negative.safetensors"


def text_encoder_config(encoder: TextEncoder) -> dict:
    """The `text_encoder/config.json` a pipeline folder needs to rebuild `encoder` (word-hash encoders only)."""
    if not isinstance(encoder, WordHashEncoder):
        raise TypeError(f"only WordHashEncoder conditioning can be recorded, got {type(encoder).__name__}")
    return {"_class_name": "WordHashEncoder", "dim": encoder.dim, "max_length": encoder.max_length,
            "seed": encoder.seed}


@torch.no_grad()
def write_latent_shards(
    folder: str | os.PathLike, videos, vae: WanVAE, text_encoder: TextEncoder, *, shard_size: int = 256,
    batch_size: int = 8, negative_prompt: str = "",
) -> Path:
    """Encode every clip of `videos` (a dataset with `__len__` and `batch`) into shards; written to a temporary
    folder that replaces `folder` at the end, so a crash never leaves a half-written dataset behind."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards, latents, embeds, captions, labels = [], [], [], [], []

    def flush() -> None:
        name = f"shard-{len(shards):05d}.safetensors"
        meta = {"captions": json.dumps(captions), "labels": json.dumps(labels)}
        save_file({"latents": torch.cat(latents), "prompt_embeds": torch.cat(embeds)}, str(tmp / name), meta)
        shards.append({"file": name, "count": len(captions)})
        latents.clear(), embeds.clear(), captions.clear(), labels.clear()

    for start in range(0, len(videos), batch_size):
        batch = videos.batch(list(range(start, min(start + batch_size, len(videos)))))
        latents.append(vae.encode(batch["video"].to(vae.device, vae.dtype)).float().cpu())
        embeds.append(text_encoder.encode(batch["captions"]).float().cpu())
        captions.extend(batch["captions"])
        labels.extend(batch["labels"].tolist())
        if len(captions) >= shard_size:
            flush()
    if captions:
        flush()
    save_file({"prompt_embeds": text_encoder.encode([negative_prompt]).float().cpu()}, str(tmp / NEGATIVE_NAME),
              {"prompt": negative_prompt})
    index = {"count": sum(s["count"] for s in shards), "shards": shards, "negative_prompt": negative_prompt,
             "text_encoder": text_encoder_config(text_encoder)}
    (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


class LatentShards:
    """Reads a shard folder lazily: one sample's rows are sliced out of its shard on demand."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.index = json.loads((self.folder / INDEX_NAME).read_text())
        self._starts, self._files, self._captions = [], [], []
        start = 0
        for shard in self.index["shards"]:
            self._starts.append(start)
            self._files.append(self.folder / shard["file"])
            start += shard["count"]
        self._handles: dict[int, object] = {}
        with safe_open(self.folder / NEGATIVE_NAME, framework="pt") as f:
            self.negative = f.get_tensor("prompt_embeds")  # (1, L, D)

    def __len__(self) -> int:
        return self.index["count"]

    def _locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} of {len(self)}")
        shard = max(s for s, start in enumerate(self._starts) if start <= i)
        return shard, i - self._starts[shard]

    def _handle(self, shard: int):
        if shard not in self._handles:
            self._handles[shard] = safe_open(self._files[shard], framework="pt")
        return self._handles[shard]

    def metadata(self, i: int) -> tuple[str, list[int]]:
        """(caption, labels) of sample i."""
        shard, row = self._locate(i)
        meta = self._handle(shard).metadata()
        return json.loads(meta["captions"])[row], json.loads(meta["labels"])[row]

    def batch(self, indices: Sequence[int]) -> dict:
        rows = [self._locate(i) for i in indices]
        get = lambda name: torch.stack([self._handle(s).get_slice(name)[r] for s, r in rows])  # noqa: E731
        return {"latents": get("latents"), "prompt_embeds": get("prompt_embeds")}


class Loader:
    """Global batches of `batch_size * world_size` samples in a seeded random order; rank r takes slice r.

    An epoch ends when fewer samples are left than a global batch (they are dropped, so every rank always gets a full
    batch and the ranks never disagree about where an epoch ends).
    """

    def __init__(self, dataset, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        global_batch = batch_size * world_size
        if len(dataset) < global_batch:
            raise ValueError(f"{len(dataset)} samples cannot fill a global batch of {global_batch}")
        self.dataset, self.batch_size, self.rank, self.world_size, self.seed = (
            dataset, batch_size, rank, world_size, seed)
        self.epoch, self.position = 0, 0  # position: global batches already drawn in this epoch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def next_indices(self) -> list[int]:
        global_batch = self.batch_size * self.world_size
        if (self.position + 1) * global_batch > len(self.dataset):
            self.epoch, self.position = self.epoch + 1, 0
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        start = self.position * global_batch + self.rank * self.batch_size
        self.position += 1
        return order[start:start + self.batch_size].tolist()

    def next(self) -> dict:
        return self.dataset.batch(self.next_indices())
