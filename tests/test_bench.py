"""`streamgen bench` end to end on the CPU: a tiny transformer with the real VAE's layers, tiny frames."""

from __future__ import annotations

import json

import pytest

from streamgen import bench


def test_bench_writes_a_table_per_budget(tmp_path):
    args = ["--size", "tiny", "--steps", "1", "2", "--height", "32", "--width", "32", "--frames", "9",
            "--device", "cpu", "--warmup", "0", "--decode-pass-frames", "1", "--out", str(tmp_path)]
    results = bench.main(args)
    assert [r.steps for r in results] == [1, 2]
    for r in results:
        assert r.frames == 9 and 0 < r.first_frame_s <= r.total_s
        assert len(r.chunk_s) == len(r.decode_s) and all(t > 0 for t in r.chunk_s)
    saved = json.loads((tmp_path / "latency_tiny.json").read_text())
    assert [r["steps"] for r in saved["results"]] == [1, 2]
    table = (tmp_path / "latency_tiny.md").read_text()
    assert table.count("\n| 1 |") == 1 and table.count("\n| 2 |") == 1


def test_bench_refuses_an_empty_decode_pass(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--size", "tiny", "--device", "cpu", "--decode-pass-frames", "0"])
    assert "--decode-pass-frames must be >= 1, got 0" in capsys.readouterr().err
