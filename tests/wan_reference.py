"""A float64 transcription of the spec's transformer (one full-resolution run, no cache, no mask).

Written independently of streamgen.model, from the spec's text: if the two agree, the model computes what the
spec says, not just what it did yesterday.
"""

import math

import torch
import torch.nn.functional as F


def _linear(sd, name, x):
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def _mlp(sd, name, x):
    return _linear(sd, name + ".linear_2", F.silu(_linear(sd, name + ".linear_1", x)))


def _sinusoid(t, dim):
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    angles = t[:, None] * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1)  # flip_sin_to_cos


def _layer_norm(x, eps, weight=None, bias=None):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + eps)
    return y if weight is None else y * weight + bias


def _rms(x, weight, eps):
    return x / torch.sqrt((x**2).mean(-1, keepdim=True) + eps) * weight


def rotary_phases(cfg, positions):
    """positions (L, 3) float64 of (frame, row, col) -> complex (L, d/2)."""
    d = cfg.attention_head_dim
    parts = [d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)]
    phases = []
    for axis, n in enumerate(parts):
        freqs = 10000.0 ** (-torch.arange(0, n, 2, dtype=torch.float64) / n)
        phases.append(torch.exp(1j * positions[:, axis : axis + 1] * freqs))
    return torch.cat(phases, dim=-1)


def _rotate(x, phases):
    xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(xc * phases[:, None, :]).flatten(-2)


def _attend(q, k, v):
    scores = torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("bhlm,bmhd->blhd", scores.softmax(-1), v)


def velocity(model, z, t, r, prompt, first_frame=0):
    """u(z, t, r) for latents z (B, C, F, H, W), times t, r (B,), prompt embeddings (B, Lt, text_dim)."""
    cfg = model.config
    sd = {k: v.detach().double() for k, v in model.state_dict().items()}
    z, t, r, prompt = z.double(), t.double(), r.double(), prompt.double()
    B = z.shape[0]
    heads, D, eps, g = cfg.num_attention_heads, cfg.dim, cfg.eps, cfg.gate_value
    pt, ph, pw = cfg.patch_size
    x = F.conv3d(z, sd["patch_embedding.weight"], sd["patch_embedding.bias"], stride=cfg.patch_size)
    nf, nh, nw = x.shape[2:]
    x = x.flatten(2).transpose(1, 2)
    grid = torch.stack(torch.meshgrid(torch.arange(nf) + first_frame, torch.arange(nh), torch.arange(nw),
                                      indexing="ij"), -1).reshape(-1, 3).double()
    phases = rotary_phases(cfg, grid)

    second = r if cfg.deltatime_type == "r" else t - r
    emb = (1 - g) * _mlp(sd, "condition_embedder.time_embedder", _sinusoid(t, cfg.freq_dim)) + g * _mlp(
        sd, "condition_embedder.delta_embedder", _sinusoid(second, cfg.freq_dim))
    mod = _linear(sd, "condition_embedder.time_proj", F.silu(emb)).view(B, 6, D)
    ctx = _linear(sd, "condition_embedder.text_embedder.linear_2",
                  F.gelu(_linear(sd, "condition_embedder.text_embedder.linear_1", prompt), approximate="tanh"))

    def heads_of(y):
        return y.view(*y.shape[:2], heads, -1)

    for i in range(cfg.num_layers):
        p = f"blocks.{i}."
        m = sd[p + "scale_shift_table"] + mod
        h = _layer_norm(x, eps) * (1 + m[:, 1:2]) + m[:, 0:1]
        q = heads_of(_rms(_linear(sd, p + "attn1.to_q", h), sd[p + "attn1.norm_q.weight"], eps))
        k = heads_of(_rms(_linear(sd, p + "attn1.to_k", h), sd[p + "attn1.norm_k.weight"], eps))
        v = heads_of(_linear(sd, p + "attn1.to_v", h))
        o = _attend(_rotate(q, phases), _rotate(k, phases), v).flatten(2)
        x = x + _linear(sd, p + "attn1.to_out.0", o) * m[:, 2:3]
        h = _layer_norm(x, eps, sd[p + "norm2.weight"], sd[p + "norm2.bias"])
        q = heads_of(_rms(_linear(sd, p + "attn2.to_q", h), sd[p + "attn2.norm_q.weight"], eps))
        k = heads_of(_rms(_linear(sd, p + "attn2.to_k", ctx), sd[p + "attn2.norm_k.weight"], eps))
        v = heads_of(_linear(sd, p + "attn2.to_v", ctx))
        x = x + _linear(sd, p + "attn2.to_out.0", _attend(q, k, v).flatten(2))
        h = _layer_norm(x, eps) * (1 + m[:, 4:5]) + m[:, 3:4]
        f = _linear(sd, p + "ffn.net.2", F.gelu(_linear(sd, p + "ffn.net.0.proj", h), approximate="tanh"))
        x = x + f * m[:, 5:6]

    shift, scale = (sd["scale_shift_table"] + emb[:, None]).unbind(1)
    x = _layer_norm(x, eps) * (1 + scale[:, None]) + shift[:, None]
    x = _linear(sd, "proj_out", x)
    x = x.view(B, nf, nh, nw, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(B, -1, nf * pt, nh * ph, nw * pw)
