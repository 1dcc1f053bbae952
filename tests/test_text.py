"""Text encoders: a tiny random UMT5 + word-level tokenizer built here (nothing downloaded), precomputed embedding
files, the LRU cache."""

from __future__ import annotations

import sys
import zlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from streamgen.text import (
    CachedTextEncoder,
    EmbeddingFile,
    TextEncoder,
    UMT5TextEncoder,
    UnknownPromptError,
    clean_prompt,
    save_prompt_embeddings,
)

MAX_LEN = 16
D_MODEL = 32
WORDS = ["a", "cat", "dog", "runs", "jumps", "over", "the", "red", "blue", "sky", "field", "river", "slowly", "quickly"]
PROMPTS = [
    "a cat runs over the red field",
    "",
    "dog",
    "a zebra jumps",  # "zebra" is not in the vocabulary: <unk>
    " ".join(WORDS * 2),  # longer than MAX_LEN: truncated, </s> kept
]


def _token_count(prompt: str) -> int:
    return min(len(prompt.split()) + 1, MAX_LEN)  # one token per word, plus </s>


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    pytest.importorskip("transformers")  # the optional extra; embedding-file and cache tests run without it
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    root = tmp_path_factory.mktemp("pipeline")
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(root / "tokenizer")

    config = UMT5Config(
        vocab_size=len(vocab),
        d_model=D_MODEL,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(0)
    UMT5EncoderModel(config).save_pretrained(root / "text_encoder")
    return root


@pytest.fixture(scope="module")
def encoder(pipeline_dir) -> UMT5TextEncoder:
    return UMT5TextEncoder.from_pretrained(pipeline_dir, max_length=MAX_LEN)


# ---------------------------------------------------------------------------------------------------------------------
# UMT5


def test_umt5_shape_and_zero_padding(encoder):
    assert isinstance(encoder, TextEncoder)
    assert (encoder.dim, encoder.max_length) == (D_MODEL, MAX_LEN)
    out = encoder.encode(PROMPTS)
    assert out.shape == (len(PROMPTS), MAX_LEN, D_MODEL) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    for i, prompt in enumerate(PROMPTS):
        n = _token_count(prompt)
        assert out[i, :n].ne(0).any(dim=-1).all(), f"a zero row inside {prompt!r}"
        assert out[i, n:].eq(0).all(), f"non-zero padding after {prompt!r}"
    assert encoder.encode([]).shape == (0, MAX_LEN, D_MODEL)


def test_umt5_matches_transformers_directly(encoder, pipeline_dir):
    from transformers import AutoTokenizer, UMT5EncoderModel

    tok = AutoTokenizer.from_pretrained(pipeline_dir / "tokenizer")
    model = UMT5EncoderModel.from_pretrained(pipeline_dir / "text_encoder").eval()
    out = encoder.encode(PROMPTS)

    # Wan's recipe spelled out: padded batch with the mask, keep each prompt's first seq_len rows, zeros after.
    batch = tok(PROMPTS, padding="max_length", max_length=MAX_LEN, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    lengths = batch.attention_mask.sum(1)
    ref = torch.stack(
        [torch.cat([h[:n], h.new_zeros(MAX_LEN - n, D_MODEL)]) for h, n in zip(hidden, lengths, strict=True)]
    )
    torch.testing.assert_close(out, ref, rtol=0, atol=0)

    # Each prompt alone, no padding at all: the masked padding must not leak into the prompt's rows.
    for i, prompt in enumerate(PROMPTS):
        ids = tok([prompt], truncation=True, max_length=MAX_LEN, return_tensors="pt").input_ids
        with torch.no_grad():
            alone = model(input_ids=ids).last_hidden_state[0]
        torch.testing.assert_close(out[i, : ids.shape[1]], alone, rtol=1e-5, atol=1e-5)


def test_umt5_deterministic_and_batch_independent(encoder):
    a = encoder.encode(PROMPTS)
    assert torch.equal(a, encoder.encode(PROMPTS))
    for i, prompt in enumerate(PROMPTS):
        torch.testing.assert_close(encoder.encode([prompt])[0], a[i], rtol=1e-5, atol=1e-5)


def test_umt5_prompt_cleanup(encoder):
    assert clean_prompt("  a\tcat \n\n runs  ") == "a cat runs"
    assert clean_prompt("a cat &amp;amp; dog") == "a cat & dog"
    out = encoder.encode(["a cat runs", "  a\n cat   runs "])
    assert torch.equal(out[0], out[1])


def test_umt5_rejects_a_bare_string(encoder):
    with pytest.raises(TypeError, match="sequence of prompts"):
        encoder.encode("a cat runs")


def test_umt5_explicit_folders_and_dtype(encoder, pipeline_dir):
    explicit = UMT5TextEncoder.from_pretrained(
        text_encoder=pipeline_dir / "text_encoder", tokenizer=pipeline_dir / "tokenizer", max_length=MAX_LEN
    )
    assert torch.equal(explicit.encode(PROMPTS), encoder.encode(PROMPTS))

    bf16 = UMT5TextEncoder.from_pretrained(pipeline_dir, dtype=torch.bfloat16, max_length=MAX_LEN)
    out = bf16.encode(PROMPTS)
    assert out.dtype == torch.bfloat16
    ref = encoder.encode(PROMPTS)
    assert torch.equal(out.eq(0).all(-1), ref.eq(0).all(-1))  # same zero rows
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.1)


def test_missing_folders_name_the_path(tmp_path, pipeline_dir):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        UMT5TextEncoder.from_pretrained(tmp_path / "nowhere")

    (tmp_path / "p" / "text_encoder").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"text_encoder.*config\.json"):
        UMT5TextEncoder.from_pretrained(tmp_path / "p")

    with pytest.raises(FileNotFoundError, match=r"p/tokenizer: no such tokenizer folder"):
        UMT5TextEncoder.from_pretrained(tmp_path / "p", text_encoder=pipeline_dir / "text_encoder")

    (tmp_path / "p" / "tokenizer").mkdir()
    with pytest.raises(FileNotFoundError, match=r"p/tokenizer: not a tokenizer folder"):
        UMT5TextEncoder.from_pretrained(tmp_path / "p", text_encoder=pipeline_dir / "text_encoder")

    with pytest.raises(ValueError, match="both"):
        UMT5TextEncoder.from_pretrained(text_encoder=pipeline_dir / "text_encoder")


def test_without_transformers_the_error_says_what_to_install(tmp_path, monkeypatch):
    for name in ("text_encoder", "tokenizer"):  # folders that pass the checks made before the import
        (tmp_path / name).mkdir()
    (tmp_path / "text_encoder" / "config.json").write_text("{}")
    (tmp_path / "tokenizer" / "tokenizer.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'streamgen\[text\]'"):
        UMT5TextEncoder.from_pretrained(tmp_path, max_length=MAX_LEN)


# ---------------------------------------------------------------------------------------------------------------------
# Embedding files


def test_embedding_file_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    embs = {
        "a cat runs": torch.randn(5, 8, generator=g),
        "": torch.randn(1, 8, generator=g),
        'une "citation", \n ünïcödé — 猫': torch.randn(3, 8, generator=g),
    }
    path = tmp_path / "sub" / "prompts.safetensors"
    save_prompt_embeddings(path, embs)
    assert [p.name for p in path.parent.iterdir()] == ["prompts.safetensors"]  # no temporary left behind

    f = EmbeddingFile(path, max_length=MAX_LEN)
    assert isinstance(f, TextEncoder)
    assert (f.dim, f.max_length, len(f)) == (8, MAX_LEN, 3) and set(f.prompts) == set(embs)
    order = ["", "a cat runs", 'une "citation", \n ünïcödé — 猫', "a cat runs"]
    out = f.encode(order)
    assert out.shape == (4, MAX_LEN, 8) and out.dtype == torch.float32
    for i, p in enumerate(order):
        n = embs[p].shape[0]
        assert torch.equal(out[i, :n], embs[p]) and out[i, n:].eq(0).all()

    as_bf16 = EmbeddingFile(path, max_length=MAX_LEN, dtype=torch.bfloat16).encode(order)
    assert as_bf16.dtype == torch.bfloat16 and torch.equal(as_bf16, out.bfloat16())


def test_embedding_file_stores_padded_rows_trimmed(tmp_path):
    batch = torch.zeros(2, MAX_LEN, 4)
    batch[0, :3] = 1.0
    batch[1, :MAX_LEN] = 2.0
    path = tmp_path / "e.safetensors"
    save_prompt_embeddings(path, {"short": batch[0], "full": batch[1:2]})  # rows sharing storage; (1, L, dim)
    with safe_open(str(path), framework="pt") as fh:
        names = fh.keys()
        assert sorted(tuple(fh.get_slice(k).get_shape()) for k in names) == [(3, 4), (MAX_LEN, 4)]
    assert torch.equal(EmbeddingFile(path, max_length=MAX_LEN).encode(["short", "full"]), batch)

    save_prompt_embeddings(path, {"short": batch[0]}, trim=False)  # overwrite; stored padded
    assert torch.equal(EmbeddingFile(path, max_length=4).encode(["short"]), batch[0:1, :4])  # zeros dropped
    with pytest.raises(ValueError, match="more than max_length"):
        EmbeddingFile(path, max_length=2).encode(["short"])


def test_embedding_file_unknown_prompt(tmp_path):
    path = tmp_path / "e.safetensors"
    save_prompt_embeddings(path, {f"prompt number {i}": torch.ones(2, 4) for i in range(20)})
    f = EmbeddingFile(path, max_length=MAX_LEN)
    with pytest.raises(KeyError) as info:
        f.encode(["prompt number 3", "a dragon"])
    assert isinstance(info.value, UnknownPromptError)
    message = str(info.value)
    assert "'a dragon'" in message and "20 prompts" in message and "'prompt number 0'" in message
    assert "prompt number 19" not in message  # a few, not all


def test_embedding_file_keys_as_prompts_and_bad_inputs(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"a cat": torch.ones(2, 4), "a dog": torch.full((1, 3, 4), 2.0)}, str(path))
    out = EmbeddingFile(path, max_length=6).encode(["a dog", "a cat"])
    assert out.shape == (2, 6, 4) and out[0, :3].eq(2).all() and out[1, :2].eq(1).all() and out[:, 3:].eq(0).all()

    with pytest.raises(FileNotFoundError, match=r"missing\.safetensors"):
        EmbeddingFile(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="no embeddings"):
        save_prompt_embeddings(tmp_path / "x.safetensors", {})
    with pytest.raises(ValueError, match="dim"):
        save_prompt_embeddings(tmp_path / "x.safetensors", {"a": torch.ones(2, 4), "b": torch.ones(2, 5)})
    assert not (tmp_path / "x.safetensors").exists()


def test_umt5_embeddings_through_a_file(encoder, tmp_path):
    out = encoder.encode(PROMPTS)
    path = tmp_path / "umt5.safetensors"
    save_prompt_embeddings(path, dict(zip(PROMPTS, out, strict=True)))
    assert torch.equal(EmbeddingFile(path, max_length=MAX_LEN).encode(PROMPTS[::-1]), out.flip(0))


# ---------------------------------------------------------------------------------------------------------------------
# LRU cache


class CountingEncoder:
    """A stand-in encoder: a fixed random embedding per prompt, len(prompt) + 1 rows; records every call."""

    dim = 4
    max_length = 8

    def __init__(self):
        self.calls: list[list[str]] = []

    def encode(self, prompts):
        self.calls.append(list(prompts))
        out = torch.zeros(len(prompts), self.max_length, self.dim)
        for i, p in enumerate(prompts):
            g = torch.Generator().manual_seed(zlib.crc32(p.encode()))
            n = min(len(p) + 1, self.max_length)
            out[i, :n] = torch.randn(n, self.dim, generator=g)
        return out


def test_cache_hits_misses_and_partial_batches():
    inner = CountingEncoder()
    cache = CachedTextEncoder(inner, capacity=8)
    assert isinstance(cache, TextEncoder) and (cache.dim, cache.max_length) == (4, 8)

    first = cache.encode(["a", "bb"])
    assert (cache.hits, cache.misses, inner.calls) == (0, 2, [["a", "bb"]])
    second = cache.encode(["bb", "ccc", "a"])
    assert inner.calls[-1] == ["ccc"]  # only the new prompt is encoded
    assert (cache.hits, cache.misses) == (2, 3)
    assert torch.equal(second[0], first[1]) and torch.equal(second[2], first[0])
    assert torch.equal(second, CountingEncoder().encode(["bb", "ccc", "a"]))  # cached == uncached

    cache.encode(["bb", "a"])
    assert len(inner.calls) == 2 and (cache.hits, cache.misses) == (4, 3)
    cache.clear()
    assert (len(cache), cache.hits, cache.misses) == (0, 0, 0)


def test_cache_repeated_prompts_in_one_batch():
    inner = CountingEncoder()
    cache = CachedTextEncoder(inner, capacity=8)
    out = cache.encode(["x", "", "x", "x", ""])
    assert inner.calls == [["x", ""]]
    assert (cache.hits, cache.misses) == (3, 2)
    assert torch.equal(out, CountingEncoder().encode(["x", "", "x", "x", ""]))


def test_cache_evicts_least_recently_used():
    inner = CountingEncoder()
    cache = CachedTextEncoder(inner, capacity=2)
    cache.encode(["a"])
    cache.encode(["b"])
    cache.encode(["a"])  # a is now the most recent
    cache.encode(["c"])  # evicts b
    assert "a" in cache and "c" in cache and "b" not in cache and len(cache) == 2
    cache.encode(["b"])  # evicts a
    assert "a" not in cache and "b" in cache and "c" in cache
    assert inner.calls == [["a"], ["b"], ["c"], ["b"]]

    # a batch with more new prompts than the capacity is still answered in full; the last ones stay cached
    out = cache.encode(["p", "q", "r", "p"])
    assert torch.equal(out, CountingEncoder().encode(["p", "q", "r", "p"]))
    assert "q" in cache and "r" in cache and len(cache) == 2

    none = CachedTextEncoder(CountingEncoder(), capacity=0)
    none.encode(["a"])
    none.encode(["a"])
    assert len(none) == 0 and none.misses == 2


def test_cache_over_umt5_equals_uncached(encoder):
    cache = CachedTextEncoder(encoder, capacity=4)
    cache.encode(PROMPTS[:2])
    out = cache.encode(PROMPTS)
    assert (cache.hits, cache.misses) == (2, len(PROMPTS))
    torch.testing.assert_close(out, encoder.encode(PROMPTS), rtol=1e-5, atol=1e-5)
    assert torch.equal(out.eq(0).all(-1), encoder.encode(PROMPTS).eq(0).all(-1))
    out[:] = 0  # the caller's tensor is its own: the cache is not corrupted
    assert cache.encode(PROMPTS[:1]).ne(0).any()


def test_word_hash_encoder_is_deterministic_and_order_aware():
    from streamgen.text import WordHashEncoder

    enc = WordHashEncoder(dim=16, max_length=8)
    a = enc.encode(["A red square on blue", "a red square on blue", "a blue square on red", ""])
    assert a.shape == (4, 8, 16)
    assert torch.equal(a[0], a[1])  # case-insensitive
    assert a[0, :5].ne(0).any(-1).all() and a[0, 5:].eq(0).all()
    assert not torch.allclose(a[0], a[2])  # same words, other order
    assert torch.equal(WordHashEncoder(dim=16, max_length=8).encode(["red"]), enc.encode(["red"]))
    assert not torch.equal(WordHashEncoder(dim=16, max_length=8, seed=1).encode(["red"]), enc.encode(["red"]))
    assert a[3, :1].ne(0).any() and a[3, 1:].eq(0).all()
    long = enc.encode([" ".join(["word"] * 20)])
    assert long.shape == (1, 8, 16) and long.ne(0).any(-1).all()
