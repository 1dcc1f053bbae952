import pytest
import torch
from wan_reference import rotary_phases, velocity

from streamgen import CausalWanTransformer, preset
from streamgen.attention import Mask, attention
from streamgen.model import Run
from streamgen.schedule import jump


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def model_velocity(model, z, t, r, prompt, first_frame=0):
    text = model.encode_text(prompt)
    return model([Run(z, t, r, first_frame)], text).velocities[0]


@pytest.mark.parametrize("deltatime_type", ["r", "t-r"])
def test_velocity_matches_float64_reference(tiny_model, prompt, deltatime_type):
    model = tiny_model
    if deltatime_type != "r":
        model = CausalWanTransformer(preset("tiny").model_copy(update={"deltatime_type": deltatime_type}))
        model.load_state_dict(tiny_model.state_dict())
    torch.manual_seed(2)
    z = torch.randn(2, 16, 3, 16, 16)
    t, r = torch.tensor([900.0, 400.0]), torch.tensor([500.0, 0.0])
    prompts = prompt.repeat(2, 1, 1)
    with torch.no_grad():
        ours = model_velocity(model, z, t, r, prompts, first_frame=4)
    ref = velocity(model, z, t, r, prompts, first_frame=4)
    assert rel_err(ours, ref) < 1e-5


def test_time_pair_and_relative_position_change_the_output(tiny_model, prompt):
    z0, z1 = torch.randn(1, 16, 1, 16, 16), torch.randn(1, 16, 1, 16, 16)
    t, zero = torch.tensor([700.0]), torch.tensor([0.0])
    text = tiny_model.encode_text(prompt)
    with torch.no_grad():
        base = model_velocity(tiny_model, z1, t, zero, prompt)
        other_r = model_velocity(tiny_model, z1, t, torch.tensor([300.0]), prompt)
        shifted = model_velocity(tiny_model, z1, t, zero, prompt, first_frame=5)
        near = tiny_model([Run(z0, t, zero, 0), Run(z1, t, zero, 1)], text).velocities[1]
        far = tiny_model([Run(z0, t, zero, 0), Run(z1, t, zero, 5)], text).velocities[1]
    assert rel_err(other_r, base) > 1e-3
    assert rel_err(shifted, base) < 1e-5  # rotary positions are relative: a lone run does not see a global shift
    assert rel_err(far, near) > 1e-3


def test_r_equal_t_is_euler_on_the_velocity(tiny_model, prompt):
    """With delta_embedder = time_embedder (the student's initialisation), u(z, t, t) is the teacher velocity and a
    jump t -> r with it is one plain Euler step."""
    with torch.no_grad():
        tiny_model.condition_embedder.delta_embedder.load_state_dict(
            tiny_model.condition_embedder.time_embedder.state_dict())
    teacher = CausalWanTransformer(preset("tiny").model_copy(update={"gate_value": 0.0}))
    teacher.load_state_dict(tiny_model.state_dict())
    z = torch.randn(1, 16, 2, 16, 16)
    t = torch.tensor([640.0])
    with torch.no_grad():
        u = model_velocity(tiny_model, z, t, t, prompt)
        v = model_velocity(teacher, z, t, t, prompt)
    assert rel_err(u, v) < 1e-6
    euler = z.double() + (250.0 - 640.0) / 1000.0 * v.double()
    assert rel_err(jump(z, u, 640.0, 250.0), euler) < 1e-6


def test_rotary_tables_full_and_compressed(tiny_model):
    cfg = tiny_model.config
    cos, sin = tiny_model.rope.run(7, (2, 4, 3), compressed=False, device="cpu")
    grid = torch.stack(torch.meshgrid(torch.arange(2) + 7, torch.arange(4), torch.arange(3), indexing="ij"), -1)
    ref = rotary_phases(cfg, grid.reshape(-1, 3).double())
    assert torch.allclose(cos.double(), ref.real, atol=1e-6) and torch.allclose(sin.double(), ref.imag, atol=1e-6)

    # compressed token (f, y, x) covers full patches rows 2y..2y+1, cols 2x..2x+1 of frame f
    cos, sin = tiny_model.rope.run(3, (1, 2, 2), compressed=True, device="cpu")
    expected = []
    for y in range(2):
        for x in range(2):
            footprint = torch.tensor([[3, 2 * y + a, 2 * x + b] for a in range(2) for b in range(2)]).double()
            phases = rotary_phases(cfg, footprint)
            d_t = cfg.attention_head_dim - 4 * (cfg.attention_head_dim // 6)
            pooled = phases.mean(0)
            pooled[d_t // 2:] = pooled[d_t // 2:] / pooled[d_t // 2:].abs()
            expected.append(pooled)
    expected = torch.stack(expected)
    assert torch.allclose(cos.double(), expected.real, atol=1e-6)
    assert torch.allclose(sin.double(), expected.imag, atol=1e-6)


def test_bf16_close_to_fp32(tiny_model, prompt):
    z = torch.randn(1, 16, 2, 16, 16)
    t, r = torch.tensor([800.0]), torch.tensor([200.0])
    with torch.no_grad():
        full = model_velocity(tiny_model, z, t, r, prompt)
        low = CausalWanTransformer(tiny_model.config)
        low.load_state_dict(tiny_model.state_dict())
        low.to_dtype(torch.bfloat16)
        half = model_velocity(low, z, t, r, prompt)
    assert low.blocks[0].scale_shift_table.dtype == torch.float32
    assert low.condition_embedder.delta_embedder.linear_1.weight.dtype == torch.float32
    assert low.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert rel_err(half, full) < 2e-2


def test_mask_from_runs_detects_prefixes():
    causal = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    m = Mask.from_runs(causal, [2, 1, 3], [2, 1, 3])
    assert m.prefix_blocks == [(0, 2, 2), (2, 3, 3), (3, 6, 6)] and m.dense is None
    teacher_forcing = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)  # run 2 skips run 1
    m = Mask.from_runs(teacher_forcing, [1, 1, 2], [1, 1, 2])
    assert m.prefix_blocks is None
    assert m.dense.tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 1], [1, 0, 1, 1]]


def test_prefix_blocks_equal_dense_mask():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 2, 8), torch.randn(2, 9, 2, 8), torch.randn(2, 9, 2, 8)
    visible = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    prefix = Mask.from_runs(visible, [2, 1, 3], [3, 2, 1, 3])
    dense = visible.repeat_interleave(torch.tensor([2, 1, 3]), 0).repeat_interleave(torch.tensor([3, 2, 1, 3]), 1)
    assert torch.allclose(attention(q, k, v, prefix), attention(q, k, v, Mask(None, dense)), atol=1e-6)


def test_masked_runs_equal_separate_calls(tiny_model, prompt):
    """A run that may not see a later run gives the same output as when that run is absent."""
    z0, z1 = torch.randn(1, 16, 1, 16, 16), torch.randn(1, 16, 2, 16, 16)
    t = torch.tensor([500.0])
    text = tiny_model.encode_text(prompt)
    with torch.no_grad():
        alone = tiny_model([Run(z0, t, t, 0)], text).velocities[0]
        visible = torch.tensor([[True, False], [True, True]])
        both = tiny_model([Run(z0, t, t, 0), Run(z1, t, t, 1)], text, visible=visible).velocities[0]
    assert rel_err(both, alone) < 1e-6


def test_ffn_gelu_epilogue_is_the_linear_then_tanh_gelu(monkeypatch):
    """On CUDA inference the FFN's first linear is torch._addmm_activation (cuBLASLt: bias and tanh GELU in the GEMM
    epilogue; the GPU benchmark checks its numerics). Here the op is stood in for by float64 addmm + tanh GELU, which
    is what cuBLASLt computes: the wiring (bias, weight transpose, batch and token dims folded and restored) must
    give the plain path's result."""
    from streamgen import model as model_module

    ffn = model_module.FeedForward(48, 80).double()
    x = torch.randn(2, 5, 48, dtype=torch.float64)
    plain = ffn(x)
    calls = []

    def stand_in(bias, mat1, mat2, use_gelu=False):
        calls.append((mat1.shape, mat2.data_ptr(), mat2.stride(), use_gelu))
        return torch.nn.functional.gelu(torch.addmm(bias, mat1, mat2), approximate="tanh")

    monkeypatch.setattr(torch, "_addmm_activation", stand_in)
    monkeypatch.setattr(model_module, "_gelu_epilogue", lambda x: True)
    fused = ffn(x)
    weight = ffn.net[0].proj.weight
    assert calls == [((10, 48), weight.data_ptr(), weight.t().stride(), True)]
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)


def test_forward_without_velocity_stops_the_last_layer_at_its_keys(tiny_model, prompt):
    """A forward that wants keys and values but no velocity (a cache refresh) skips the last block after its keys
    and values: its attention, cross-attention and FFN never run, and every layer's keys and values are the ones
    the full forward makes."""
    torch.manual_seed(3)
    z = torch.randn(1, 16, 2, 16, 16)
    runs = [Run(z, torch.tensor([0.0]), torch.tensor([0.0]), 0)]
    text = tiny_model.encode_text(prompt)
    last = tiny_model.blocks[-1]
    ran = []
    hooks = [m.register_forward_hook(lambda *_, name=name: ran.append(name))
             for name, m in (("ffn", last.ffn), ("attn out", last.attn1.to_out[0]), ("query", last.attn1.to_q))]
    try:
        with torch.no_grad():
            full = tiny_model(runs, text, want_velocity=True, want_kv=True)
            assert ran == ["query", "attn out", "ffn"]
            ran.clear()
            kv = tiny_model(runs, text, want_velocity=False, want_kv=True)
    finally:
        for h in hooks:
            h.remove()
    assert ran == [] and kv.velocities == [None]
    assert len(kv.keys) == len(tiny_model.blocks)
    for a, b in zip(kv.keys + kv.values, full.keys + full.values):
        assert torch.equal(a, b)
