"""Text conditioning: prompts -> UMT5-XXL embeddings, (B, max_length, dim), zero past each prompt's tokens.

Wan's convention, which the released students were trained with: tokenise with padding to `max_length` (512) and
truncation, run the encoder with the attention mask, then zero every position past the prompt's token count (the
closing `</s>` counts as a token, so even "" keeps one non-zero row).

Three encoders share one interface (`TextEncoder`):
- `UMT5TextEncoder`: the real model, from a diffusers-layout folder's `text_encoder/` and `tokenizer/`, local files
  only. Needs transformers (`pip install 'streamgen[text]'`), imported only when a model is loaded.
- `EmbeddingFile`: prompt embeddings computed once and stored in a safetensors file (`save_prompt_embeddings`), so a
  server or a training run can go without the 11 GB encoder.
- `CachedTextEncoder`: an LRU cache in front of either, per prompt.
- `WordHashEncoder`: no weights at all: fixed pseudo-random word and position vectors, for the synthetic captions
  that small self-trained students (tests, demos, the built-in default model) are conditioned on.
"""

from __future__ import annotations

import functools
import hashlib
import html
import json
import os
import re
import tempfile
import threading
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

DEFAULT_MAX_LENGTH = 512
PROMPTS_KEY = "streamgen.prompts"  # safetensors metadata entry: JSON object mapping prompt text -> tensor name
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model")


@runtime_checkable
class TextEncoder(Protocol):
    """Anything that turns prompts into (B, max_length, dim) float embeddings, zero past each prompt's tokens."""

    dim: int
    max_length: int

    def encode(self, prompts: Sequence[str]) -> torch.Tensor: ...


class UnknownPromptError(KeyError):
    """A prompt that an `EmbeddingFile` holds no embedding for."""

    def __str__(self) -> str:  # KeyError's own __str__ would print the message as a quoted repr
        return str(self.args[0])


def _prompt_list(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        raise TypeError("encode takes a sequence of prompts; wrap a single prompt in a list")
    prompts = list(prompts)
    for p in prompts:
        if not isinstance(p, str):
            raise TypeError(f"prompts must be strings, got {type(p).__name__}")
    return prompts


def _prompt_length(embedding: torch.Tensor) -> int:
    """Rows up to the last non-zero one (at least 1). Dropping the rest loses nothing: padding puts zeros back."""
    nonzero = embedding.ne(0).any(dim=-1).nonzero()
    return int(nonzero[-1]) + 1 if len(nonzero) else 1


def _pad(rows: list[torch.Tensor], max_length: int, dim: int, dtype: torch.dtype, device) -> torch.Tensor:
    out = torch.zeros(len(rows), max_length, dim, dtype=dtype, device=device)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out


# ---------------------------------------------------------------------------------------------------------------------
# UMT5 (transformers)


def _import_transformers():
    try:
        import transformers
        from transformers import AutoTokenizer, UMT5EncoderModel
    except ImportError as e:
        raise ImportError(
            "UMT5TextEncoder needs the transformers package, an optional extra of streamgen: "
            "pip install 'streamgen[text]' (or use precomputed embeddings with EmbeddingFile)"
        ) from e
    major, minor = (int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
    dtype_kwarg = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in 4.56
    return AutoTokenizer, UMT5EncoderModel, dtype_kwarg


@functools.cache
def _ftfy():
    try:
        import ftfy
    except ImportError:
        return None
    return ftfy


def clean_prompt(text: str) -> str:
    """Wan's prompt cleanup: `ftfy.fix_text` (when ftfy is installed), HTML unescaped twice, whitespace collapsed."""
    ftfy = _ftfy()
    if ftfy is not None:
        text = ftfy.fix_text(text)
    elif not text.isascii():
        warnings.warn(
            "ftfy is not installed: non-ASCII prompts are not normalised as Wan does (curly quotes, full-width "
            "characters, mojibake), so their embeddings may differ from the reference pipeline's; pip install ftfy",
            stacklevel=3,
        )
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def _require_dir(folder: Path, what: str, needs: tuple[str, ...], any_of: bool) -> None:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such {what} folder")
    present = [name for name in needs if (folder / name).is_file()]
    if (any_of and not present) or (not any_of and len(present) < len(needs)):
        wanted = " or ".join(needs) if any_of else ", ".join(needs)
        raise FileNotFoundError(f"{folder}: not a {what} folder (no {wanted})")


class UMT5TextEncoder:
    """The UMT5 encoder with its tokenizer, applying Wan's tokenisation and zero-padding convention.

    `dtype` is the dtype the model runs in and the embeddings come back in: bfloat16 (as the Wan pipelines run it) or
    float32; T5-family models overflow in float16. Embeddings come back on the model's device.
    """

    def __init__(self, model, tokenizer, *, max_length: int = DEFAULT_MAX_LENGTH, clean: bool = True):
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "right"  # Wan keeps each prompt's first rows; set here, not per call (older APIs)
        self.max_length = max_length
        self.dim = int(model.config.d_model)
        self.clean = clean

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike | None = None,
        *,
        text_encoder: str | os.PathLike | None = None,
        tokenizer: str | os.PathLike | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        max_length: int = DEFAULT_MAX_LENGTH,
        clean: bool = True,
    ) -> UMT5TextEncoder:
        """Load from a pipeline folder (`path/text_encoder`, `path/tokenizer`), or from the two folders given.

        Local files only: nothing is ever downloaded. The weights must be safetensors.
        """
        if path is None and (text_encoder is None or tokenizer is None):
            raise ValueError("give a pipeline folder, or both the text_encoder and tokenizer folders")
        if path is not None and not Path(path).is_dir():
            raise FileNotFoundError(f"{path}: no such pipeline folder")
        encoder_dir = Path(text_encoder) if text_encoder is not None else Path(path) / "text_encoder"
        tokenizer_dir = Path(tokenizer) if tokenizer is not None else Path(path) / "tokenizer"
        _require_dir(encoder_dir, "text encoder", ("config.json",), any_of=False)
        _require_dir(tokenizer_dir, "tokenizer", _TOKENIZER_FILES, any_of=True)

        AutoTokenizer, UMT5EncoderModel, dtype_kwarg = _import_transformers()
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        # Loaded on the CPU then moved: transformers needs accelerate for device_map, which streamgen does not require.
        model = UMT5EncoderModel.from_pretrained(
            str(encoder_dir), local_files_only=True, use_safetensors=True, **{dtype_kwarg: dtype}
        )
        return cls(model.to(device=device, dtype=dtype), tok, max_length=max_length, clean=clean)

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, (B, max_length) each, padded on the right."""
        prompts = _prompt_list(prompts)
        texts = [clean_prompt(p) for p in prompts] if self.clean else prompts
        batch = self.tokenizer(
            texts,
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return batch["input_ids"], batch["attention_mask"]

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        prompts = _prompt_list(prompts)
        if not prompts:
            return torch.zeros(0, self.max_length, self.dim, dtype=self.dtype, device=self.device)
        ids, mask = self.tokenize(prompts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        # no_grad rather than inference_mode: inference tensors cannot be saved for backward, and the embeddings are
        # inputs to a model being trained in distill/.
        with torch.no_grad():
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        lengths = mask.sum(dim=1)  # the prompt's token count, </s> included
        keep = torch.arange(self.max_length, device=self.device) < lengths[:, None]
        return torch.where(keep[..., None], hidden, 0).to(self.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Precomputed embeddings


def save_prompt_embeddings(
    path: str | os.PathLike, embeddings: Mapping[str, torch.Tensor], *, trim: bool = True
) -> None:
    """Write {prompt: embedding} as one safetensors file that `EmbeddingFile` reads, atomically.

    Each embedding is (L, dim) or (1, L, dim), e.g. a row of `encoder.encode(prompts)`. With `trim`, trailing all-zero
    rows (the padding) are not stored. Prompts are kept in the metadata, so any text works, "" included.
    """
    if not embeddings:
        raise ValueError("no embeddings to save")
    tensors: dict[str, torch.Tensor] = {}
    table: dict[str, str] = {}
    dim = None
    for i, (prompt, emb) in enumerate(embeddings.items()):
        if not isinstance(prompt, str):
            raise TypeError(f"prompts must be strings, got {type(prompt).__name__}")
        if emb.ndim == 3 and emb.shape[0] == 1:
            emb = emb[0]
        if emb.ndim != 2 or not emb.is_floating_point():
            raise ValueError(
                f"embedding of {prompt!r}: expected a float (L, dim) tensor, got {emb.dtype} {tuple(emb.shape)}"
            )
        if dim is not None and emb.shape[1] != dim:
            raise ValueError(f"embedding of {prompt!r} has dim {emb.shape[1]}, earlier ones {dim}")
        dim = emb.shape[1]
        if trim:
            emb = emb[: _prompt_length(emb)]
        name = f"prompt.{i}"
        # clone: rows of one batch share storage, which safetensors refuses to write
        tensors[name] = emb.detach().to("cpu").clone()
        table[prompt] = name

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt", PROMPTS_KEY: json.dumps(table)})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class EmbeddingFile:
    """Precomputed prompt embeddings from a safetensors file: `save_prompt_embeddings`'s, or any file whose tensor
    names are the prompts. Tensors are read when asked for, so the file may hold many prompts.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        max_length: int = DEFAULT_MAX_LENGTH,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such embedding file")
        self.max_length = max_length
        self.dtype = dtype
        self.device = torch.device(device)
        self._file = safe_open(str(self.path), framework="pt")
        names = set(self._file.keys())
        metadata = self._file.metadata() or {}
        if PROMPTS_KEY in metadata:
            try:
                table = json.loads(metadata[PROMPTS_KEY])
            except json.JSONDecodeError as e:
                raise ValueError(f"{self.path}: metadata {PROMPTS_KEY!r} is not valid JSON ({e})") from None
            if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
                raise ValueError(f"{self.path}: metadata {PROMPTS_KEY!r} must map prompt text to tensor names")
            absent = sorted(set(table.values()) - names)
            if absent:
                raise ValueError(f"{self.path}: tensors named in the metadata are missing: {', '.join(absent[:5])}")
        else:
            table = {name: name for name in names}
        if not table:
            raise ValueError(f"{self.path}: holds no prompt embeddings")
        self._table: dict[str, str] = table

        dims = set()
        for prompt, name in table.items():
            shape = self._file.get_slice(name).get_shape()
            if len(shape) == 3 and shape[0] == 1:
                shape = shape[1:]
            if len(shape) != 2:
                raise ValueError(f"{self.path}: embedding of {prompt!r} has shape {shape}, expected (L, dim)")
            dims.add(shape[1])
        if len(dims) > 1:
            raise ValueError(f"{self.path}: embeddings of different dims {sorted(dims)}")
        self.dim = dims.pop()

    @property
    def prompts(self) -> list[str]:
        return list(self._table)

    def __len__(self) -> int:
        return len(self._table)

    def __contains__(self, prompt: object) -> bool:
        return prompt in self._table

    def _read(self, prompt: str) -> torch.Tensor:
        emb = self._file.get_tensor(self._table[prompt])
        if emb.ndim == 3:
            emb = emb[0]
        if emb.shape[0] > self.max_length:
            emb = emb[: _prompt_length(emb)]  # stored padded to a longer length than asked for
            if emb.shape[0] > self.max_length:
                raise ValueError(
                    f"{self.path}: embedding of {prompt!r} has {emb.shape[0]} tokens, more than max_length "
                    f"{self.max_length}"
                )
        return emb

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        prompts = _prompt_list(prompts)
        unknown = [p for p in prompts if p not in self._table]
        if unknown:
            known = ", ".join(repr(p if len(p) <= 60 else p[:57] + "...") for p in list(self._table)[:5])
            raise UnknownPromptError(
                f"prompt {unknown[0]!r} is not in {self.path} ({len(self._table)} prompts, e.g. {known})"
            )
        rows = [self._read(p) for p in prompts]
        return _pad(rows, self.max_length, self.dim, self.dtype, self.device)


# ---------------------------------------------------------------------------------------------------------------------
# Cache


class CachedTextEncoder:
    """An LRU cache of embeddings per prompt in front of another encoder.

    A batch sends only its prompts not in the cache to the wrapped encoder, each once. `misses` counts the prompts
    sent, `hits` every other batch entry (so a prompt repeated within one batch is one miss, then hits). Entries are
    stored without their zero padding, on the wrapped encoder's device and in its dtype.
    """

    def __init__(self, encoder: TextEncoder, capacity: int = 64):
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.encoder = encoder
        self.capacity = capacity
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()  # the server encodes from several tasks; the wrapped encoder runs unlocked

    @property
    def dim(self) -> int:
        return self.encoder.dim

    @property
    def max_length(self) -> int:
        return self.encoder.max_length

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, prompt: object) -> bool:
        return prompt in self._entries

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.hits = self.misses = 0

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        prompts = _prompt_list(prompts)
        if not prompts:
            return self.encoder.encode([])
        rows: dict[str, torch.Tensor] = {}
        with self._lock:
            for p in prompts:
                if p not in rows and p in self._entries:
                    self._entries.move_to_end(p)
                    rows[p] = self._entries[p]
        missing = list(dict.fromkeys(p for p in prompts if p not in rows))
        if missing:
            encoded = self.encoder.encode(missing)
            for p, emb in zip(missing, encoded, strict=True):  # an encoder answering short is a bug
                rows[p] = emb[: _prompt_length(emb)].clone()  # clone: do not pin the whole batch's storage
        with self._lock:
            self.misses += len(missing)
            self.hits += len(prompts) - len(missing)
            for p in missing:
                self._entries[p] = rows[p]
                self._entries.move_to_end(p)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        first = rows[prompts[0]]
        return _pad([rows[p] for p in prompts], self.max_length, self.dim, first.dtype, first.device)


class WordHashEncoder:
    """Prompt -> one row per lower-cased word: a fixed random vector of the word plus one of its position.

    The vectors come from a hash of the word (blake2b) and `seed`, so every machine gets the same embeddings without
    shipping a vocabulary. Position vectors keep word order ("red square on blue" differs from "blue square on
    red"); cross-attention has no other way to see it.
    """

    def __init__(self, dim: int, max_length: int = 32, seed: int = 0):
        self.dim, self.max_length, self.seed = dim, max_length, seed

    def _vector(self, token: str) -> torch.Tensor:
        digest = hashlib.blake2b(f"{self.seed}:{token}".encode(), digest_size=8).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
        return torch.randn(self.dim, generator=gen) / self.dim**0.5

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        rows = []
        for prompt in _prompt_list(prompts):
            words = re.findall(r"[\w']+", prompt.lower())[: self.max_length] or [""]
            rows.append(torch.stack([self._vector(w) + 0.5 * self._vector(f"<pos {i}>") for i, w in enumerate(words)]))
        return _pad(rows, self.max_length, self.dim, torch.float32, "cpu")
