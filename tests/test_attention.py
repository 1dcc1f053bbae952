"""The attention dispatch: backend choice, and the flash-attn path exercised through a mocked `flash_attn` module."""

import sys
import types

import pytest
import torch

from streamgen import attention as attn
from streamgen.attention import Mask, attention, select_backend


@pytest.fixture(autouse=True)
def fresh_import():
    """`flash_attn` is imported once per process; each test mocks it its own way."""
    attn._flash_attn_func.cache_clear()
    yield
    attn._flash_attn_func.cache_clear()


@pytest.fixture
def fake_flash(monkeypatch):
    calls = []

    def flash_attn_func(q, k, v):  # flash-attn's layout: (B, L, H, d) in and out
        calls.append((q.shape, k.shape))
        return attn._sdpa(q, k, v)

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=flash_attn_func))
    return calls


def test_backend_choice(monkeypatch, fake_flash):
    monkeypatch.delenv("STREAMGEN_ATTENTION", raising=False)
    assert select_backend("cuda", torch.bfloat16) == "flash"
    assert select_backend("cuda", torch.float32) == "sdpa"
    assert select_backend("cpu", torch.bfloat16) == "sdpa"
    monkeypatch.setenv("STREAMGEN_ATTENTION", "triton")
    assert select_backend("cuda", torch.float16) == "triton"
    monkeypatch.setenv("STREAMGEN_ATTENTION", "cudnn")
    assert select_backend("cuda", torch.float16) == "cudnn"
    assert select_backend("cuda", torch.float32) == "sdpa"
    monkeypatch.setenv("STREAMGEN_ATTENTION", "bogus")
    with pytest.raises(ValueError, match="STREAMGEN_ATTENTION"):
        select_backend("cuda", torch.float16)


def test_without_flash_attn(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import fails
    monkeypatch.delenv("STREAMGEN_ATTENTION", raising=False)
    assert select_backend("cuda", torch.bfloat16) == attn.cuda_default()
    monkeypatch.setenv("STREAMGEN_ATTENTION", "flash")
    with pytest.raises(ImportError, match="streamgen\\[flash\\]"):
        select_backend("cuda", torch.bfloat16)


def test_flash_path_serves_prefix_blocks(monkeypatch, fake_flash):
    monkeypatch.setattr(attn, "select_backend", lambda device_type, dtype: "flash")
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 5, 2, 8), torch.randn(1, 7, 2, 8), torch.randn(1, 7, 2, 8)
    mask = Mask.from_runs(torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool), [2, 3], [2, 2, 3])
    out = attention(q, k, v, mask)
    assert [tuple(c[1]) for c in fake_flash] == [(1, 4, 2, 8), (1, 7, 2, 8)]  # one call per block, over a key prefix
    dense = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    dense = dense.repeat_interleave(torch.tensor([2, 3]), 0).repeat_interleave(torch.tensor([2, 2, 3]), 1)
    assert torch.allclose(out, attn._sdpa(q, k, v, dense), atol=1e-6)
    fake_flash.clear()
    attention(q, k, v, Mask(None, dense))  # dense masks never reach flash-attn
    assert not fake_flash


def test_triton_path_serves_prefix_blocks_in_one_launch(monkeypatch):
    """The Triton kernel takes the blocks' key prefixes as per-query limits (run here in Triton's interpreter)."""
    import kernels

    calls = []
    real = kernels.chunk_attention
    monkeypatch.setattr(kernels, "chunk_attention", lambda q, k, v, kv_limit=None: (
        calls.append(None if kv_limit is None else kv_limit.tolist()), real(q, k, v, kv_limit))[1])
    monkeypatch.setattr(attn, "select_backend", lambda device_type, dtype: "triton")
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 5, 2, 16), torch.randn(1, 7, 2, 16), torch.randn(1, 7, 2, 16)
    visible = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    out = attention(q, k, v, Mask.from_runs(visible, [2, 3], [2, 2, 3]))
    assert calls == [[4, 4, 7, 7, 7]]
    dense = visible.repeat_interleave(torch.tensor([2, 3]), 0).repeat_interleave(torch.tensor([2, 2, 3]), 1)
    torch.testing.assert_close(out, attn._sdpa(q, k, v, dense), rtol=1e-5, atol=1e-5)


def test_cudnn_path_gives_cudnn_an_aligned_key_prefix_and_folds_in_the_rest(cudnn_stand_in):
    """cuDNN (stood in for by float64 torch, this machine has none) sees keys up to a multiple of 128; the rest are
    folded in by kernels.extend_attention (Triton's interpreter here); prefix blocks of a mask each go that way."""
    prefixes = cudnn_stand_in
    torch.manual_seed(0)
    for lk, prefix in ((300, [256]), (256, []), (100, [])):  # aligned or shorter than 128: plain SDPA
        q, k, v = torch.randn(1, 40, 2, 16), torch.randn(1, lk, 2, 16), torch.randn(1, lk, 2, 16)
        prefixes.clear()
        torch.testing.assert_close(attention(q, k, v), attn._sdpa(q, k, v), rtol=1e-5, atol=1e-5)
        assert prefixes == prefix
    visible = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    q, k, v = torch.randn(1, 50, 2, 16), torch.randn(1, 330, 2, 16), torch.randn(1, 330, 2, 16)
    prefixes.clear()
    out = attention(q, k, v, Mask.from_runs(visible, [20, 30], [130, 150, 50]))
    assert prefixes == [256, 256]  # blocks over 280 and 330 keys
    dense = visible.repeat_interleave(torch.tensor([20, 30]), 0).repeat_interleave(torch.tensor([130, 150, 50]), 1)
    torch.testing.assert_close(out, attn._sdpa(q, k, v, dense), rtol=1e-5, atol=1e-5)
    # each block written into its rows: one over 256 keys (aligned: plain SDPA, copied in), one merged in place
    prefixes.clear()
    out = attention(q, k[:, :306], v[:, :306], Mask.from_runs(visible, [20, 30], [128, 128, 50]))
    assert prefixes == [256]
    dense = visible.repeat_interleave(torch.tensor([20, 30]), 0).repeat_interleave(torch.tensor([128, 128, 50]), 1)
    torch.testing.assert_close(out, attn._sdpa(q, k[:, :306], v[:, :306], dense), rtol=1e-5, atol=1e-5)
    # a cached context and a chunk's own tokens, held apart: cuDNN over each one's aligned prefix, one merge
    for lc, lk, prefix in ((300, 140, [256, 128]), (256, 200, [256, 128]), (300, 60, [256]), (90, 40, [])):
        q, k, v = torch.randn(1, 40, 2, 16), torch.randn(1, lk, 2, 16), torch.randn(1, lk, 2, 16)
        kc, vc = torch.randn(1, lc, 2, 16), torch.randn(1, lc, 2, 16)
        prefixes.clear()
        out = attention(q, k, v, context=(kc, vc))
        assert prefixes == prefix
        torch.testing.assert_close(out, attn._sdpa(q, torch.cat([kc, k], 1), torch.cat([vc, v], 1)), rtol=1e-5,
                                   atol=1e-5)


def test_cudnn_path_splits_a_prefix_into_a_batch_of_two_halves_where_waves_are_short(cudnn_stand_in, monkeypatch):
    """Where kernels.key_splits says two halves fill the GPU's last wave better (as on an H100 for a denoising
    chunk), cuDNN takes an aligned prefix as a batch of two halves, each a multiple of 128 (q repeated by stride 0,
    not copied; an odd 128 keys join the tail), and extend_attention merges the stacked results: the same attention
    over all keys. Two streams (B = 2) are not split."""
    import kernels

    monkeypatch.setattr(kernels, "key_splits", lambda programs, lk, device: 2 if lk >= 256 else 1)
    inner, calls = attn._cudnn_with_lse, []

    def recording(q, k, v):
        calls.append((q.shape[0], k.shape[1], q.stride(0)))
        return inner(q, k, v)

    monkeypatch.setattr(attn, "_cudnn_with_lse", recording)
    torch.manual_seed(4)
    for lc, lk, expect in ((700, 300, [(2, 256, 0), (2, 128, 0)]), (520, 100, [(2, 256, 0)]),
                           (200, 530, [(1, 128, None), (2, 256, 0)])):
        q, k, v = torch.randn(1, 40, 2, 16), torch.randn(1, lk, 2, 16), torch.randn(1, lk, 2, 16)
        kc, vc = torch.randn(1, lc, 2, 16), torch.randn(1, lc, 2, 16)
        calls.clear()
        out = attention(q, k, v, context=(kc, vc))
        assert [(b, n, stride if b == 2 else None) for b, n, stride in calls] == expect
        torch.testing.assert_close(out, attn._sdpa(q, torch.cat([kc, k], 1), torch.cat([vc, v], 1)), rtol=1e-5,
                                   atol=1e-5)
    q, k, v = torch.randn(2, 40, 2, 16), torch.randn(2, 300, 2, 16), torch.randn(2, 300, 2, 16)
    kc, vc = torch.randn(2, 700, 2, 16), torch.randn(2, 700, 2, 16)
    calls.clear()
    out = attention(q, k, v, context=(kc, vc))
    assert [(b, n) for b, n, _ in calls] == [(2, 640), (2, 256)]
    torch.testing.assert_close(out, attn._sdpa(q, torch.cat([kc, k], 1), torch.cat([vc, v], 1)), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "flash", "triton"])
def test_other_backends_attend_over_context_and_own_keys_joined(monkeypatch, fake_flash, backend):
    monkeypatch.setattr(attn, "select_backend", lambda device_type, dtype: backend)
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 6, 2, 16), torch.randn(1, 6, 2, 16), torch.randn(1, 6, 2, 16)
    kc, vc = torch.randn(1, 9, 2, 16), torch.randn(1, 9, 2, 16)
    joined = torch.cat([kc, k], 1), torch.cat([vc, v], 1)
    torch.testing.assert_close(attention(q, k, v, context=(kc, vc)), attn._sdpa(q, *joined), rtol=1e-5, atol=1e-5)
    visible = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)  # over [context + own]: runs of 9, 3, 3 keys
    mask = Mask.from_runs(visible, [3, 3], [9, 3, 3])
    dense = visible.repeat_interleave(torch.tensor([3, 3]), 0).repeat_interleave(torch.tensor([9, 3, 3]), 1)
    torch.testing.assert_close(attention(q, k, v, mask, context=(kc, vc)), attn._sdpa(q, *joined, dense),
                               rtol=1e-5, atol=1e-5)
    assert [tuple(c[1]) for c in fake_flash] == ([(1, 15, 2, 16), (1, 12, 2, 16), (1, 15, 2, 16)]
                                                 if backend == "flash" else [])


@pytest.mark.parametrize("capability, op_works, expected", [((9, 0), True, "cudnn"), ((9, 0), False, "sdpa"),
                                                            ((8, 0), True, "sdpa")])
def test_cuda_default_is_cudnn_on_hopper_when_the_op_answers(monkeypatch, capability, op_works, expected):
    def op(q, k, v):
        if not op_works:
            raise AttributeError("'_OpNamespace' 'aten' object has no attribute '_scaled_dot_product_cudnn_attention'")
        return q, q[:, :, :, 0]

    real_zeros = torch.zeros
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch, "zeros", lambda *a, device=None, **kw: real_zeros(*a, **kw))  # no GPU here
    monkeypatch.setattr(attn, "_cudnn_with_lse", op)
    attn.cuda_default.cache_clear()
    try:
        assert attn.cuda_default() == expected
    finally:
        attn.cuda_default.cache_clear()


def test_cudnn_path_falls_back_to_sdpa_where_cudnn_refuses(monkeypatch, caplog):
    def refuse(q, k, v):
        raise RuntimeError("cuDNN Frontend error: No valid execution plans built.")

    monkeypatch.setattr(attn, "_cudnn_with_lse", refuse)
    monkeypatch.setattr(attn, "_announced", set())
    q, k, v = torch.randn(1, 9, 2, 16), torch.randn(1, 200, 2, 16), torch.randn(1, 200, 2, 16)
    with caplog.at_level("WARNING", logger="streamgen"):
        for _ in range(2):
            torch.testing.assert_close(attn._cudnn(q, (k, v)), attn._sdpa(q, k, v))
    assert sum("cuDNN attention refused" in r.message for r in caplog.records) == 1
