"""CUDA-graph runner bookkeeping that needs no GPU: static input buffers shared across graphs by slot."""

from __future__ import annotations

import torch

from streamgen.graphs import GraphRunner


def test_static_buffers_are_shared_by_slot():
    runner = GraphRunner()
    text_k, text_v = torch.randn(1, 8, 4), torch.randn(1, 8, 4)
    latents = torch.randn(1, 2, 3)
    first = runner._static_buffers([latents, text_k, text_v])
    # two inputs of one layout in one call get two buffers (their rank tells them apart) ...
    assert first[1].data_ptr() != first[2].data_ptr()
    # ... and another call (another graph) with the same layouts gets the very same buffers
    again = runner._static_buffers([torch.randn(1, 2, 3), torch.randn(1, 8, 4), torch.randn(1, 8, 4)])
    assert [b.data_ptr() for b in again] == [b.data_ptr() for b in first]
    # another shape, stride or dtype is another slot
    other = runner._static_buffers([torch.randn(1, 2, 4), torch.randn(1, 4, 8).transpose(1, 2),
                                    torch.randn(1, 8, 4, dtype=torch.float64)])
    assert not {b.data_ptr() for b in other} & {b.data_ptr() for b in first}
    assert other[1].stride() == (32, 1, 8) and other[2].dtype == torch.float64
    runner.clear()
    assert runner.statics == {} and runner.graphs == {} and runner.pool is None


def test_fill_skips_a_buffer_that_holds_its_unchanged_source():
    runner = GraphRunner()
    text, latents = torch.randn(8, 4), torch.randn(2, 3)
    static = runner._static_buffers([text, latents])
    runner._fill(static, [text, latents])
    assert torch.equal(static[0], text) and torch.equal(static[1], latents)
    static[0].data.zero_()  # changes the buffer behind its version counter: a skipped copy leaves the zeros
    runner._fill(static, [text, torch.randn(2, 3)])
    assert not static[0].any()
    text.add_(1)  # the source changed: copied again
    runner._fill(static, [text, latents])
    assert torch.equal(static[0], text)
    runner._fill(static, [text.clone(), latents])
    static[0].data.zero_()
    runner._fill(static, [text, latents])  # another tensor than the last copied, even with the same values: copied
    assert torch.equal(static[0], text)
    static[0].data.zero_()
    static[0].add_(0)  # the buffer itself written (its version moves): copied again
    runner._fill(static, [text, latents])
    assert torch.equal(static[0], text) and torch.equal(static[1], latents)
    runner.clear()
    assert runner.filled == {}
