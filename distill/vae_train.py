"""Training objective of the small Wan-architecture VAE: reconstruction + KL, and the latent statistics afterwards.

The transformer works on normalised latents (`(z - latents_mean) / latents_std`); a freshly trained VAE's latents
have no agreed scale, so after training the per-channel statistics are measured on data and written into its config.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from streamgen.vae import WanVAE


class VaeObjective(nn.Module):
    """The module DDP wraps for VAE training (WanVAE has no forward of its own: it encodes and decodes)."""

    def __init__(self, vae: WanVAE):
        super().__init__()
        self.vae = vae

    def forward(self, video: Tensor, gen: torch.Generator, kl_weight: float) -> tuple[Tensor, dict]:
        return vae_loss(self.vae, video, gen, kl_weight)


def vae_loss(vae: WanVAE, video: Tensor, gen: torch.Generator, kl_weight: float) -> tuple[Tensor, dict]:
    """L1 + MSE reconstruction of the video through a sampled latent, plus `kl_weight` * KL to N(0, 1)."""
    moments = vae.quant_conv(vae.encoder(video))
    mean, logvar = moments.chunk(2, dim=1)
    logvar = logvar.clamp(-30.0, 20.0)
    z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=gen).to(mean)
    recon = vae.decoder(vae.post_quant_conv(z))
    rec = F.l1_loss(recon, video) + F.mse_loss(recon, video)
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
    return rec + kl_weight * kl, {"reconstruction": rec.detach().item(), "kl": kl.detach().item()}


@torch.no_grad()
def with_latent_stats(vae: WanVAE, videos: Tensor) -> WanVAE:
    """A copy of `vae` whose config carries the per-channel mean and std of its posterior means on `videos`."""
    z = torch.cat([vae.denormalize(vae.encode(v[None].to(vae.device, vae.dtype))) for v in videos]).float()
    dims = [0, 2, 3, 4]
    stats = {"latents_mean": z.mean(dims).tolist(), "latents_std": z.std(dims).clamp(min=1e-3).tolist()}
    fitted = WanVAE(vae.config.model_copy(update=stats)).to(vae.device, vae.dtype)
    fitted.load_state_dict(vae.state_dict())
    return fitted.eval()
