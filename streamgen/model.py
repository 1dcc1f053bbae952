"""The FAR-Wan2.1 causal flow-map transformer, parameter for parameter as the released checkpoints name it.

A forward pass takes *runs*: groups of latent frames that share a time pair (t, r), a start frame and a kind (full
resolution, or compressed through `far_patch_embedding`). Their tokens attend to each other as a run-level visibility
matrix allows, and to an optional cached past (keys stored already rotated). That one interface serves the
denoising of a chunk (one noisy run over the cached context), the cache refresh (clean runs, chunk-causal) and
training (noisy and clean runs with a teacher-forcing mask).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from pydantic import ValidationError
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from streamgen.attention import Mask, attention, select_backend
from streamgen.checkpoint import CheckpointError, component_dir, load_weights, read_config, save_weights
from streamgen.config import TransformerConfig
from streamgen.graphs import GraphRunner, tensor_key
from streamgen.rope import RotaryTables, apply_rotary

# Parameters kept in float32 whatever dtype the model runs in (the names are path components of their keys).
FP32_MODULES = ("time_embedder", "delta_embedder", "scale_shift_table", "norm1", "norm2", "norm3")

_fused_kernels = True


def set_fused_kernels(enabled: bool) -> None:
    """Use the Triton kernels of `kernels/` for norms, modulation and rotary on CUDA (default) or plain torch.

    The torch path is the reference the benchmark checks the fused one against; autograd always takes it.
    """
    global _fused_kernels
    _fused_kernels = enabled


def _fused(x: Tensor) -> bool:
    return _fused_kernels and x.is_cuda and not torch.is_grad_enabled()


def _gelu_epilogue(x: Tensor) -> bool:
    """The FFN's first linear as one cuBLASLt GEMM with a tanh-GELU epilogue (fp32, one rounding to bf16; H100,
    1.3B shapes: 1.14-1.18x the linear + GELU pair, benchmarks/results/gelu_epilogue_session7.txt). x.is_cuda on
    its own: tests run `_fused`'s Triton kernels on the CPU, where torch._addmm_activation computes exact GELU, not
    Wan's tanh approximation."""
    return _fused(x) and x.is_cuda


@dataclass
class Run:
    """Latent frames (B, C, F, H, W) entering the transformer together, at times t and r of shape (B,)."""

    latents: Tensor
    t: Tensor
    r: Tensor
    first_frame: int
    compressed: bool = False


@dataclass
class Past:
    """Cached context: per layer key/value buffers (B, capacity, H, d) whose first `length` tokens are the context.

    Keys are stored rotated at their positions. A forward pass attends over the context and its own tokens; with
    `store` (the cache refresh, whose tokens become context) it writes their keys and values right after the
    context first and attends over one contiguous view, else (a denoising step) they stay out of the buffers.
    """

    keys: list[Tensor] | Tensor
    values: list[Tensor] | Tensor
    length: int
    store: bool = False


@dataclass
class Output:
    velocities: list[Tensor | None]  # per run: u (B, C, F, H, W) float32, None for compressed runs or when not asked
    keys: list[Tensor] | None  # per layer: the new tokens' rotated keys (B, L, H, d), when asked
    values: list[Tensor] | None


def timestep_features(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal features of t (cosines first), float32, as the Wan time embedding expects."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x.to(self.linear_1.weight.dtype))))


class TextProjection(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


class ConditionEmbedder(nn.Module):
    """Time pair (t, r) -> modulation; prompt embeddings -> text tokens."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        dim = cfg.dim
        self.freq_dim = cfg.freq_dim
        self.gate = cfg.gate_value  # fixed mixing weight, not a checkpoint tensor
        self.delta_is_difference = cfg.deltatime_type == "t-r"
        self.time_embedder = TimestepEmbedding(cfg.freq_dim, dim)
        self.delta_embedder = TimestepEmbedding(cfg.freq_dim, dim)
        self.time_proj = nn.Linear(dim, 6 * dim)
        self.text_embedder = TextProjection(cfg.text_dim, dim)

    def time(self, t: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
        """(emb (B, D), modulation (B, 6, D)), both in the model's dtype."""
        second = t - r if self.delta_is_difference else r
        emb_t = self.time_embedder(timestep_features(t, self.freq_dim))
        emb_r = self.delta_embedder(timestep_features(second, self.freq_dim))
        emb = ((1.0 - self.gate) * emb_t + self.gate * emb_r).to(self.time_proj.weight.dtype)
        return emb, self.time_proj(F.silu(emb)).unflatten(-1, (6, -1))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, eps: float):
        super().__init__()
        self.heads, self.eps = heads, eps
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)

    def split(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.heads, -1))

    def norm_rope(self, x: Tensor, weight: Tensor, rope: tuple[Tensor, Tensor] | None,
                  out: Tensor | None = None) -> Tensor:
        """RMSNorm across heads (fp32), then rotary if given: (B, L, H*d) -> (B, L, H, d), into `out` if given."""
        if _fused(x):
            from kernels import rms_norm_rope

            return rms_norm_rope(x, weight, self.eps, *(rope or (None, None)), self.heads, out=out)
        y = self.split(rms_norm(x, weight, self.eps))
        y = y if rope is None else apply_rotary(y, *rope)
        return y if out is None else out.copy_(y)

    def query(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        return self.norm_rope(self.to_q(x), self.norm_q.weight, rope)

    def key_value(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None,
                  out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """Keys (normed, rotated) and values (B, L, H, d); with `out` (slices of the KV cache) written there: the
        norm kernel and, for one stream, the values' GEMM write the cache directly instead of a copy after them."""
        if out is None:
            return self.norm_rope(self.to_k(x), self.norm_k.weight, rope), self.split(self.to_v(x))
        keys, values = out
        self.norm_rope(self.to_k(x), self.norm_k.weight, rope, out=keys)
        if x.shape[0] == 1 and values.is_contiguous():
            torch.addmm(self.to_v.bias, x[0], self.to_v.weight.t(), out=values[0].view(x.shape[1], -1))
        else:
            values.copy_(self.split(self.to_v(x)))
        return keys, values

    def out(self, o: Tensor) -> Tensor:
        return self.to_out[0](o.flatten(-2))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        proj = nn.Module()
        proj.proj = nn.Linear(dim, hidden)
        self.net = nn.ModuleList([proj, nn.Identity(), nn.Linear(hidden, dim)])

    def forward(self, x: Tensor) -> Tensor:
        up = self.net[0].proj
        if _gelu_epilogue(x):  # bias and GELU in the GEMM's epilogue: no pass over the (tokens, ffn_dim) hidden
            h = torch._addmm_activation(up.bias, x.reshape(-1, x.shape[-1]), up.weight.t(), use_gelu=True)
            return self.net[2](h.view(*x.shape[:-1], -1))
        return self.net[2](F.gelu(up(x), approximate="tanh"))


@dataclass
class Segment:
    """Consecutive tokens [start, end) sharing one time pair."""

    start: int
    end: int
    emb: Tensor  # (B, D)
    mod: Tensor  # (B, 6, D)


def modulated_norm(x: Tensor, segments: list[Segment], shift: int, scale: int, eps: float) -> Tensor:
    """LayerNorm (fp32, no affine) then `* (1 + scale) + shift`, each segment with its own modulation vectors."""
    if _fused(x):
        from kernels import layernorm_modulate

        if len(segments) == 1:
            return layernorm_modulate(x, segments[0].mod[:, shift], segments[0].mod[:, scale], eps)
        out = torch.empty_like(x)
        for s in segments:  # each writes its slice: no concatenation
            layernorm_modulate(x[:, s.start:s.end], s.mod[:, shift], s.mod[:, scale], eps, out=out[:, s.start:s.end])
        return out
    normed = F.layer_norm(x.float(), x.shape[-1:], eps=eps)
    parts = [
        normed[:, s.start:s.end] * (1 + s.mod[:, scale, None].float()) + s.mod[:, shift, None].float()
        for s in segments
    ]
    return torch.cat(parts, dim=1).to(x.dtype) if len(parts) > 1 else parts[0].to(x.dtype)


def affine_norm(x: Tensor, norm: nn.LayerNorm) -> Tensor:
    """LayerNorm with its affine parameters, in fp32 (fused: the modulation kernel with scale = w - 1, shift = b)."""
    if _fused(x):
        from kernels import layernorm_modulate

        return layernorm_modulate(x, norm.bias, norm.weight - 1, norm.eps)
    return norm(x.float()).to(x.dtype)


def gated_add(x: Tensor, y: Tensor, segments: list[Segment], gate: int) -> Tensor:
    """x + y * gate in fp32, per segment (in place on x when fused)."""
    if _fused(x):
        from kernels import gated_residual

        for s in segments:
            part = x[:, s.start:s.end]
            gated_residual(part, y[:, s.start:s.end], s.mod[:, gate], out=part)
        return x
    parts = [x[:, s.start:s.end].float() + y[:, s.start:s.end].float() * s.mod[:, gate, None].float()
             for s in segments]
    return torch.cat(parts, dim=1).to(x.dtype) if len(parts) > 1 else parts[0].to(x.dtype)


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        dim, eps = cfg.dim, cfg.eps
        self.eps = eps
        self.norm1 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.attn1 = Attention(dim, cfg.num_attention_heads, eps)
        self.norm2 = nn.LayerNorm(dim, eps=eps) if cfg.cross_attn_norm else nn.Identity()
        self.attn2 = Attention(dim, cfg.num_attention_heads, eps)
        self.norm3 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.ffn = FeedForward(dim, cfg.ffn_dim)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self,
        x: Tensor,
        segments: list[Segment],
        rope: tuple[Tensor, Tensor],
        text_kv: tuple[Tensor, Tensor] | Tensor,
        mask: Mask | None,
        past: Past | None,
        kv_only: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Returns the new hidden states and this layer's (rotated) keys and values of the new tokens. `kv_only`:
        stop once the keys and values are made (and stored), returning x unchanged: the last layer of a forward that
        wants no velocity (a cache refresh) needs nothing after them."""
        table = self.scale_shift_table.float()
        segments = [Segment(s.start, s.end, s.emb, table + s.mod) for s in segments]  # fp32 + mod: one fp32 add
        h = modulated_norm(x, segments, shift=0, scale=1, eps=self.eps)
        if past is not None and past.store:  # the new tokens' keys and values go straight into the cache
            n, end = past.length, past.length + h.shape[1]
            k, v = self.attn1.key_value(h, rope, out=(past.keys[:, n:end], past.values[:, n:end]))
        else:
            k, v = self.attn1.key_value(h, rope)
        if kv_only:
            return x, k, v
        q = self.attn1.query(h, rope)
        if past is None:
            out = attention(q, k, v, mask)
        elif past.store:
            out = attention(q, past.keys[:, :end], past.values[:, :end], mask)
        else:
            out = attention(q, k, v, mask, context=(past.keys[:, :past.length], past.values[:, :past.length]))
        x = gated_add(x, self.attn1.out(out), segments, gate=2)

        h = affine_norm(x, self.norm2) if isinstance(self.norm2, nn.LayerNorm) else x
        if isinstance(text_kv, Tensor):  # projected text tokens: keys/values made here, inside the block's forward
            text_kv = self.attn2.key_value(text_kv)
        x = x + self.attn2.out(attention(self.attn2.query(h), *text_kv))

        h = modulated_norm(x, segments, shift=3, scale=4, eps=self.eps)
        x = gated_add(x, self.ffn(h), segments, gate=5)
        return x, k, v


class CausalWanTransformer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.config = cfg
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_channels, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.far_patch_embedding = nn.Conv3d(
            cfg.in_channels, dim, kernel_size=cfg.compressed_patch_size, stride=cfg.compressed_patch_size
        )
        self.condition_embedder = ConditionEmbedder(cfg)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.norm_out = nn.LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, cfg.out_channels * math.prod(cfg.patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)
        self.rope = RotaryTables(cfg.attention_head_dim, cfg.patch_size, cfg.compressed_patch_size)
        self.gradient_checkpointing = False
        self.cuda_graphs = GraphRunner()  # inference on CUDA replays captured graphs; `.enabled = False` to opt out

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    def to_dtype(self, dtype: torch.dtype) -> CausalWanTransformer:
        """Cast to `dtype`, keeping the float32 islands (time embedders, modulation tables, norms) in float32."""
        for name, p in self.named_parameters():
            keep = any(part in name.split(".") for part in FP32_MODULES)
            p.data = p.data.to(torch.float32 if keep else dtype)
        return self

    def encode_text(self, prompt_embeds: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Cross-attention keys/values per layer for prompt embeddings (B, L, text_dim); compute once per prompt."""
        ctx = self.condition_embedder.text_embedder(prompt_embeds.to(self.dtype))
        return [block.attn2.key_value(ctx) for block in self.blocks]

    def token_grid(self, latents: Tensor, compressed: bool) -> tuple[int, int, int]:
        size = self.config.compressed_patch_size if compressed else self.config.patch_size
        f, h, w = latents.shape[2:]
        if f % size[0] or h % size[1] or w % size[2]:
            kind = "compressed" if compressed else "full"
            raise ValueError(f"latent frames {tuple(latents.shape[2:])} do not divide into {kind} patches {size}")
        return f // size[0], h // size[1], w // size[2]

    def forward(
        self,
        runs: list[Run],
        text: list[tuple[Tensor, Tensor]] | Tensor,
        visible: Tensor | None = None,
        past: Past | None = None,
        want_velocity: bool = True,
        want_kv: bool = False,
    ) -> Output:
        """Run the transformer over `runs`.

        text: per layer cross-attention keys/values (`encode_text`), or the projected text tokens (B, L, D) from
        `condition_embedder.text_embedder`, whose keys/values each block then makes inside its own forward (what
        per-block wrappers such as FSDP need: every block's parameters are used only within its forward).
        visible: (R, R) bool, run i's tokens may attend run j's tokens; None = all see all. The past is always visible.
        Inference on CUDA goes through captured CUDA graphs: the velocities returned are then valid until the next
        call.
        """
        if (self.device.type != "cuda" or torch.is_grad_enabled() or want_kv or not self.cuda_graphs.enabled
                or isinstance(text, Tensor)):
            return self._forward(runs, text, visible, past, want_velocity, want_kv)
        fresh = [x for run in runs for x in (run.latents, run.t, run.r)] + [x for kv in text for x in kv]
        key = (
            tuple((tuple(r.latents.shape), r.latents.dtype, r.first_frame, r.compressed) for r in runs),
            tuple(tuple(x.shape) for x in fresh),
            None if visible is None else visible.cpu().numpy().tobytes(),
            None if past is None else (tensor_key(past.keys), tensor_key(past.values), past.length, past.store),
            want_velocity,
            (_fused_kernels, select_backend(self.device.type, self.dtype)),  # a graph bakes in the kernels it ran
        )

        def replayable(*tensors: Tensor) -> Output:
            it = iter(tensors)
            static_runs = [Run(next(it), next(it), next(it), r.first_frame, r.compressed) for r in runs]
            static_text = [(next(it), next(it)) for _ in text]
            return self._forward(static_runs, static_text, visible, past, want_velocity, False)

        return self.cuda_graphs(key, replayable, fresh)

    def _forward(
        self,
        runs: list[Run],
        text: list[tuple[Tensor, Tensor]] | Tensor,
        visible: Tensor | None,
        past: Past | None,
        want_velocity: bool,
        want_kv: bool,
    ) -> Output:
        grids = [self.token_grid(run.latents, run.compressed) for run in runs]
        lens = [math.prod(g) for g in grids]
        tokens, cos, sin, segments = [], [], [], []
        start = 0
        for run, grid, n in zip(runs, grids, lens):
            embed = self.far_patch_embedding if run.compressed else self.patch_embedding
            tokens.append(embed(run.latents.to(self.dtype)).flatten(2).transpose(1, 2))
            c, s = self.rope.run(run.first_frame, grid, run.compressed, self.device)
            cos.append(c)
            sin.append(s)
            emb, mod = self.condition_embedder.time(run.t, run.r)
            segments.append(Segment(start, start + n, emb, mod))
            start += n
        x = torch.cat(tokens, dim=1)
        rope = (torch.cat(cos), torch.cat(sin))
        if past is not None and past.store:
            if past.length + x.shape[1] > past.keys[0].shape[1]:
                raise RuntimeError(f"KV buffers hold {past.keys[0].shape[1]} tokens: too few for {past.length} "
                                   f"cached and {x.shape[1]} new")
            if torch.is_grad_enabled():
                raise RuntimeError("a forward that stores into the KV cache runs without autograd (torch.no_grad)")

        mask = None
        if visible is not None and not bool(visible.all()):
            past_len = 0 if past is None else past.length
            if past_len:
                visible = torch.cat([torch.ones(len(runs), 1, dtype=torch.bool, device=visible.device), visible], 1)
            mask = Mask.from_runs(visible, lens, ([past_len] if past_len else []) + lens, device=x.device)

        keys, values = [], []
        for i, block in enumerate(self.blocks):
            layer_past = None if past is None else Past(past.keys[i], past.values[i], past.length, past.store)
            layer_text = text if isinstance(text, Tensor) else text[i]
            kv_only = not want_velocity and i == len(self.blocks) - 1
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x, k, v = checkpoint(block, x, segments, rope, layer_text, mask, layer_past, kv_only,
                                     use_reentrant=False)
            else:
                x, k, v = block(x, segments, rope, layer_text, mask, layer_past, kv_only)
            if want_kv:
                keys.append(k)
                values.append(v)

        velocities: list[Tensor | None] = [None] * len(runs)
        if want_velocity:
            table = self.scale_shift_table.float()
            for j, (run, grid, seg) in enumerate(zip(runs, grids, segments)):
                if run.compressed:
                    continue
                shift, scale = (table + seg.emb.float()[:, None]).unbind(1)
                h = F.layer_norm(x[:, seg.start:seg.end].float(), (x.shape[-1],), eps=self.config.eps)
                h = self.proj_out((h * (1 + scale[:, None]) + shift[:, None]).to(x.dtype))
                pt, ph, pw = self.config.patch_size
                velocities[j] = rearrange(
                    h.float(), "b (f h w) (pt ph pw c) -> b c (f pt) (h ph) (w pw)",
                    f=grid[0], h=grid[1], w=grid[2], pt=pt, ph=ph, pw=pw,
                )
        return Output(velocities, keys if want_kv else None, values if want_kv else None)


def load_transformer(path, dtype: torch.dtype = torch.bfloat16, device="cpu") -> CausalWanTransformer:
    """Load `transformer/` of a diffusers-layout folder (or the folder itself), built on meta, filled from disk."""
    folder = component_dir(path, "transformer")
    raw = read_config(folder)
    try:
        cfg = TransformerConfig(**raw)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'config'}: {err['msg']}" for err in e.errors())
        raise CheckpointError(f"{folder / 'config.json'}: {problems}") from None
    with torch.device("meta"):
        model = CausalWanTransformer(cfg)
    load_weights(model, folder, dtype, device, FP32_MODULES)
    return model.eval()


def save_transformer(model: CausalWanTransformer, folder, max_shard_bytes: int | None = None) -> None:
    """Write the model as a `transformer/`-style folder that `load_transformer` reads back unchanged."""
    save_weights(model, Path(folder), model.config.to_json_dict(), max_shard_bytes)
