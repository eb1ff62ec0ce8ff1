"""The diffusability regularisers, as pure functions: EQ-VAE's and scale equivariance, latent noise, VA-VAE's
alignment to a vision model, and the schedule that switches each on and off in batches.

Each is off by default in the training module. EQ-VAE and scale equivariance share `equivariance_loss` and differ
in the transform they draw; latent noise is `latent_noise_loss`; alignment to a frozen vision model is `vf_loss`.
Whatever they draw at random comes from a `torch.Generator` the caller passes in, never from the global random
state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from vaegan.images.transforms import LatentTransform, _at_least_fp32, resize


def term_schedule(batch_index: int, start: int, ramp: int, end: int | None = None) -> float:
    """Factor on a loss term at a batch: 0 before `start`, up over `ramp` batches, 1, down over `ramp` from `end`.

    The rise gives (n + 1) / ramp at batch `start + n` (as `gan_weight_schedule`); from batch `end` on the factor
    falls the same way, 1 - (n + 1) / ramp at `end + n`, and is 0 from `end + ramp - 1` on. `ramp` 0 switches
    at once; `end` None never switches off. Stages such as VA-VAE's (alignment on, then off for the last
    batches) are one schedule each; a fine-tune from a trained VAE is another run.
    """
    if batch_index < start:
        return 0.0
    rise = 1.0 if ramp <= 0 else min(1.0, (batch_index - start + 1) / ramp)
    if end is None or batch_index < end:
        return rise
    fall = 0.0 if ramp <= 0 else max(0.0, 1.0 - (batch_index - end + 1) / ramp)
    return min(rise, fall)


def eq_vae_transform(
    latent_size: tuple[int, int], generator: torch.Generator, min_scale: float = 0.25, scale: bool = True,
    rotate: bool = True,
) -> LatentTransform:
    """EQ-VAE's τ (Kouzelis et al., "EQ-VAE: Equivariance Regularized Latent Space for Improved Generative Image
    Modeling", 2025): a bilinear downscale by s ~ U[min_scale, 1) and a rotation by k·90° with k ~ {1, 2, 3}.

    As in the authors' code, both are applied together; `scale=False` or `rotate=False` leaves one out. The
    scaled latent is round(s·h) × round(s·w) (at least 1), and the image is scaled to f times that, both with
    `resize` (antialiased, where the authors' code resamples without a low-pass filter). Every draw comes from
    `generator` (a CPU generator).
    """
    if not (scale or rotate):
        raise ValueError("EQ-VAE needs at least one kind of transform: scale, rotate or both")
    size, quarter_turns = None, 0
    if scale:
        s = min_scale + (1.0 - min_scale) * float(torch.rand((), generator=generator))
        size = (max(1, round(s * latent_size[0])), max(1, round(s * latent_size[1])))
    if rotate:
        quarter_turns = int(torch.randint(1, 4, (1,), generator=generator))
    return LatentTransform(size, quarter_turns)


def scale_equivariance_transform(
    latent_size: tuple[int, int], generator: torch.Generator, factors: tuple[int, ...] = (2, 4)
) -> LatentTransform:
    """The τ of scale equivariance (Skorokhodov et al., "Improving the Diffusability of Autoencoders", 2025): a
    bilinear downsample by one of `factors`, drawn uniformly from `generator`; the latent becomes h/k × w/k."""
    factor = factors[int(torch.randint(len(factors), (1,), generator=generator))]
    return LatentTransform((max(1, latent_size[0] // factor), max(1, latent_size[1] // factor)))


Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def equivariance_loss(
    decode: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor, images: torch.Tensor,
    transform: LatentTransform, distance: Distance,
) -> torch.Tensor:
    """L = d(D(τ·z), τ·x): decode the transformed latent and compare it with the same transform of the image.

    The loss of EQ-VAE (τ from `eq_vae_transform`; Kouzelis et al. 2025 report DiT-XL/2 converging about 7×
    faster on an SD-VAE fine-tuned with it for 5 epochs, rFID 0.90 -> 0.82) and of scale equivariance (τ from
    `scale_equivariance_transform`; Skorokhodov et al. 2025: -19 % FID on ImageNet-256 after a 10-20k-step
    fine-tune). A decoder that renders a downscaled or rotated latent as the downscaled or rotated image has a
    latent space without the high-frequency detail that only the decoder can read, which diffusion learns more
    easily.

    Args:
        decode: the decoder, raw latents (B, C, h', w') -> images (B, 3, h'·f, w'·f).
        latents: z = E(x), (B, C, h, w): the posterior sample the reconstruction decodes.
        images: x, (B, 3, h·f, w·f).
        transform: τ.
        distance: d(x_hat, x), any shape; averaged to a scalar.
    """
    factor = images.shape[-1] // latents.shape[-1]
    return distance(decode(transform(latents)), transform(images, factor)).mean()


def noisy_latents(latents: torch.Tensor, generator: torch.Generator, sigma_scale: float) -> torch.Tensor:
    """z + σ·ε per image: σ = |n|·std(z), n ~ N(0, sigma_scale²), ε ~ N(0, I); (B, C, h, w) -> same.

    std(z) is taken over each image's latent elements and detached, so the noise follows the latent's scale
    (which the KL term leaves free) without a gradient through it. Noise is drawn from `generator`, which must
    live on the latents' device.
    """
    batch = latents.shape[0]
    std = latents.detach().float().flatten(1).std(dim=1)  # (B,)
    sigma = torch.randn(batch, generator=generator, device=latents.device).abs() * sigma_scale * std
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    return latents + sigma.view(batch, 1, 1, 1).to(latents.dtype) * noise


def latent_noise_loss(
    decode: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor, images: torch.Tensor,
    generator: torch.Generator, sigma_scale: float, distance: Distance,
) -> torch.Tensor:
    """L = d(D(z + σ·ε), x), σ drawn per image as in `noisy_latents`.

    The decoder learns to render the clean image from a perturbed latent, as a diffusion sampler's latents are
    never exact: the noise augmentation of σ-VAE (Sun et al., "Multimodal Latent Language Modeling with
    Next-Token Diffusion", 2024) and l-DeTok (Yang et al., "Latent Denoising Makes Good Visual Tokenizers",
    2025), here as a term beside the clean reconstruction rather than in its place.
    """
    return distance(decode(noisy_latents(latents, generator, sigma_scale)), images).mean()


class VFLoss(NamedTuple):
    """VA-VAE's vision-foundation loss: its two terms (add them) and the mean cosine, for logging."""

    margin_cosine: torch.Tensor  # scalar
    margin_distance: torch.Tensor  # scalar
    mean_cosine: torch.Tensor  # scalar, detached


def vf_loss(
    projected: torch.Tensor, features: torch.Tensor, margin_cosine: float = 0.5, margin_distance: float = 0.25,
    center_features: bool = False,
) -> VFLoss:
    """VA-VAE's alignment of latents to a frozen vision model (Yao et al., "Reconstruction vs. Generation: Taming
    Optimization Dilemma with Visual Foundation Model Aligned Latent Diffusion Models", 2025).

    With z' = W·z the latents through a learned 1×1 conv (`projected`, (B, D, h, w), resized bilinearly to the
    features' grid) and f the vision features (B, D, g, g'), at every position i of an image:

        L_mcos = mean_i ReLU(1 - m1 - cos(z'_i, f_i))                      (m1 = margin_cosine)
        L_mdms = mean_ij ReLU(|cos(z'_i, z'_j) - cos(f_i, f_j)| - m2)      (m2 = margin_distance, all pairs i, j)

    The first pulls each latent position towards its feature, the second makes the latents' self-similarity
    match the features'; the margins stop both once they are close enough, so reconstruction keeps the
    capacity. VA-VAE weights the sum adaptively against the reconstruction at the encoder's last layer
    (`adaptive_weight`, times 0.1) and reports f16c32 generation FID-10K 22.6 -> 15.8 at equal reconstruction.
    Computed in fp32 with autocast off (normalised dot products of hundreds of channels).

    `center_features` subtracts the batch's mean feature (over images and positions) from f first. A CNN's
    features after a ReLU all point into one orthant: for AlexNet's last block the mean feature alone has a
    cosine of 0.39 with every feature, so the projection's bias meets much of L_mcos and the latents need not
    change. Centred, only what varies from position to position is left to align to.
    """
    with torch.autocast(device_type=projected.device.type, enabled=False):
        projected = resize(_at_least_fp32(projected), tuple(features.shape[-2:]))
        features = _at_least_fp32(features.detach())
        if center_features:
            features = features - features.mean(dim=(0, 2, 3), keepdim=True)
        z = F.normalize(projected.flatten(2), dim=1)  # (B, D, N)
        f = F.normalize(features.flatten(2), dim=1)  # (B, D, N)
        cosine = (z * f).sum(dim=1)  # (B, N)
        margin_cosine_term = F.relu(1.0 - margin_cosine - cosine).mean()
        similarity_z = z.transpose(1, 2) @ z  # (B, N, N)
        similarity_f = f.transpose(1, 2) @ f  # (B, N, N)
        margin_distance_term = F.relu((similarity_z - similarity_f).abs() - margin_distance).mean()
    return VFLoss(margin_cosine_term, margin_distance_term, cosine.mean().detach())
