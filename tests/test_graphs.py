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
