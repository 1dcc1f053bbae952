"""Training objective of the small Wan-architecture VAE: reconstruction + KL, and the latent statistics afterwards.

The transformer works on normalised latents (`(z - latents_mean) / latents_std`); a freshly trained VAE's latents
have no agreed scale, so after training the per-channel statistics are measured on data and written into its config.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from streamgen.vae import Resample, WanVAE

INITIAL_LOGVAR = -8.0  # posterior std e**-4 = 0.018 at the start of training


class VaeObjective(nn.Module):
    """The module DDP wraps for VAE training (WanVAE has no forward of its own: it encodes and decodes).

    It starts a fresh VAE where a short run can get somewhere (`init_for_training`).
    """

    def __init__(self, vae: WanVAE):
        super().__init__()
        self.vae = init_for_training(vae)

    def forward(self, video: Tensor, gen: torch.Generator, kl_weight: float, foreground_weight: float = 1.0
                ) -> tuple[Tensor, dict]:
        return vae_loss(self.vae, video, gen, kl_weight, foreground_weight)


@torch.no_grad()
def init_for_training(vae: WanVAE) -> WanVAE:
    """Two changes to a freshly initialised VAE (in place), each worth hundreds of steps of a short run:

    - The posterior starts narrow: the log-variance half of `quant_conv` has zero weights and bias INITIAL_LOGVAR.
      Initialised like the mean half, the log-variances are near 0, i.e. unit noise on latent means of std ~0.1:
      the decoder sees noise, learns the mean colour of the data set and then the background, and the tiny KL
      weight leaves the log-variance to fall by itself (still -0.16 on average after 300 steps). Only training
      samples the posterior: `encode` returns its mean.
    - The temporal resamplers start as nearest-neighbour in time: the encoder's stride-2 `time_conv` passes the last
      frame of its window, the decoder's `time_conv` copies each frame into both frames it makes. Randomly
      initialised, they send every frame but the first (which bypasses them) through a random channel mix, so the
      first frame and the rest are coded by different functions and each has to be learnt separately.
    """
    z = vae.config.z_dim
    vae.quant_conv.weight[z:].zero_()
    vae.quant_conv.bias[z:].fill_(INITIAL_LOGVAR)
    for module in vae.modules():
        if isinstance(module, Resample) and module.mode in ("downsample3d", "upsample3d"):
            weight, bias = module.time_conv.weight, module.time_conv.bias  # (out, in, 3, 1, 1): taps oldest first
            eye = torch.eye(weight.shape[1], dtype=weight.dtype, device=weight.device)
            weight.zero_()
            bias.zero_()
            for half in weight.split(weight.shape[1]):  # one half per output frame when upsampling
                half[:, :, -1, 0, 0] = eye
    return vae


def foreground_weights(video: Tensor, foreground_weight: float) -> Tensor:
    """Per pixel (B, 1, F, H, W): `foreground_weight` where any channel differs from the clip's median colour by more
    than 0.1 (the moving shape), else 1; divided by the clip's mean so the loss keeps its scale.

    The synthetic clips are a flat background with a shape covering a few percent of the pixels: with equal weights
    a VAE first learns the backgrounds and then stays there for a long time (distill/RESULTS.md)."""
    background = video.flatten(2).median(-1).values[:, :, None, None, None]
    shape = (video - background).abs().amax(1, keepdim=True) > 0.1
    weight = 1 + (foreground_weight - 1) * shape.to(video.dtype)
    return weight / weight.mean(dim=(1, 2, 3, 4), keepdim=True)


def vae_loss(vae: WanVAE, video: Tensor, gen: torch.Generator, kl_weight: float, foreground_weight: float = 1.0
             ) -> tuple[Tensor, dict]:
    """L1 + MSE reconstruction of the video through a sampled latent (pixels of the moving shape weighted by
    `foreground_weight`, see `foreground_weights`), plus `kl_weight` * KL to N(0, 1)."""
    moments = vae.quant_conv(vae.encoder(video))
    mean, logvar = moments.chunk(2, dim=1)
    logvar = logvar.clamp(-30.0, 20.0)
    z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=gen).to(mean)
    recon = vae.decoder(vae.post_quant_conv(z))
    error = recon - video
    rec = error.abs() + error.square()
    rec = (rec * foreground_weights(video, foreground_weight)).mean() if foreground_weight != 1 else rec.mean()
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
