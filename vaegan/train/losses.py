"""The loss terms of the VAE-GAN objective, as pure functions of tensors.

Reductions: every term that goes into the autoencoder loss is a **mean over elements** (pixels for the
reconstruction, latent elements for the KL), not latent diffusion's sum per image. With means the loss,
and therefore `kl_weight`, do not depend on the image resolution or batch size. To reuse a weight from an
ldm/taming config (sums divided by the batch size) multiply it by (latent elements) / (pixel elements) per
image:

    kl_weight_mean = kl_weight_ldm * (c * h * w) / (3 * H * W)     # f8, 4 channels: kl_weight_ldm / 48

The ldm loss is (3HW) times the mean loss with that weight, a constant factor that Adam is invariant to and
that the adaptive GAN weight cancels (it is a ratio of gradient norms).

The discriminator, the perceptual network and the learnable log-variance belong to the training module;
these functions only combine what they produce.

The diffusability regularisers are in `vaegan.train.regularizers`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from vaegan.autoencoder.network import DiagonalGaussian
from vaegan.train.regularizers import term_schedule

GanLossKind = Literal["hinge", "vanilla", "non_saturating"]


# ---------------------------------------------------------------- reconstruction and prior


def reconstruction_loss(
    x: torch.Tensor, x_hat: torch.Tensor, kind: Literal["l1", "l2"] = "l1"
) -> torch.Tensor:
    """Per-pixel reconstruction error, unreduced: (B, C, H, W) -> (B, C, H, W).

    `l1` is the latent-diffusion recipe; `l2` is sd-vae-ft-MSE's (smoother, higher PSNR).
    """
    if kind == "l1":
        return (x - x_hat).abs()
    if kind == "l2":
        return (x - x_hat).pow(2)
    raise ValueError(f"unknown reconstruction loss {kind!r}; choose 'l1' or 'l2'")


def nll_loss(rec_map: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of the reconstruction under a learned scalar variance; a mean over elements.

    `rec_map / exp(logvar) + logvar` is, up to constants, the NLL of a Laplace (for L1) or Gaussian (for L2)
    likelihood whose scale `exp(logvar)` is learned: as the reconstruction improves the model sharpens its
    likelihood, which raises the weight of the reconstruction relative to the KL term. `logvar` is a
    scalar `nn.Parameter` owned by the caller, who must hand it to the optimizer (ldm defines it but never
    trains it).

    Args:
        rec_map: per-element reconstruction loss, e.g. L1 + perceptual broadcast over pixels, (B, C, H, W).
        logvar: scalar log-variance.

    Returns:
        scalar: the mean over all elements (ldm sums per image instead; see the module docstring).
    """
    return (rec_map / torch.exp(logvar) + logvar).mean()


def kl_loss(posterior: DiagonalGaussian) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) as a mean over latent elements (and the batch): a scalar.

    ldm reports the per-image sum, `posterior.kl().mean()`; this is that divided by c * h * w.
    """
    elements_per_image = posterior.mean[0].numel()
    return posterior.kl().mean() / elements_per_image


# ---------------------------------------------------------------- adversarial


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Hinge discriminator loss, 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat))): a scalar.

    The means run over the batch and the patch logits; the 0.5 matches latent diffusion.
    """
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def vanilla_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy discriminator loss on logits: a scalar.

    0.5 * (mean softplus(-D(x)) + mean softplus(D(x_hat))): softplus(-l) = -log sigmoid(l) is the BCE of a
    real logit, softplus(l) that of a fake one.
    """
    return 0.5 * (F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean())


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator loss of latent diffusion and taming: -mean D(x_hat), a scalar."""
    return -fake_logits.mean()


def non_saturating_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss (Goodfellow et al. 2014): mean softplus(-D(x_hat)), a scalar.

    That is -mean log sigmoid(D(x_hat)), whose gradient does not vanish when the discriminator confidently
    rejects the fakes.
    """
    return F.softplus(-fake_logits).mean()


def discriminator_loss(
    kind: GanLossKind, real_logits: torch.Tensor, fake_logits: torch.Tensor
) -> torch.Tensor:
    """The discriminator loss of a GAN formulation: hinge for `hinge`, BCE for the other two."""
    if kind == "hinge":
        return hinge_d_loss(real_logits, fake_logits)
    if kind in ("vanilla", "non_saturating"):
        return vanilla_d_loss(real_logits, fake_logits)
    raise ValueError(f"unknown GAN loss {kind!r}; choose 'hinge', 'vanilla' or 'non_saturating'")


def generator_adversarial_loss(kind: GanLossKind, fake_logits: torch.Tensor) -> torch.Tensor:
    """The generator's adversarial loss of a GAN formulation.

    `hinge` and `vanilla` use -mean D(x_hat), exactly as latent diffusion and taming do for both of their
    discriminator losses; `non_saturating` uses mean softplus(-D(x_hat)), the textbook partner of the BCE
    discriminator loss.
    """
    if kind in ("hinge", "vanilla"):
        return hinge_g_loss(fake_logits)
    if kind == "non_saturating":
        return non_saturating_g_loss(fake_logits)
    raise ValueError(f"unknown GAN loss {kind!r}; choose 'hinge', 'vanilla' or 'non_saturating'")


# ---------------------------------------------------------------- balancing the adversarial term


def adaptive_weight(
    reference: torch.Tensor,
    term: torch.Tensor,
    layer_weight: torch.Tensor,
    max_weight: float = 1e4,
    eps: float = 1e-4,
) -> torch.Tensor:
    """Weight that makes `term`'s gradient at one layer as large as `reference`'s: a detached fp32 scalar.

    lambda = ||d reference / d w|| / (||d term / d w|| + eps), clamped to [0, max_weight], where `w` is
    `layer_weight`. The adversarial term compares at the decoder's output conv (`adaptive_gan_weight`), VA-VAE's
    alignment term at the encoder's output conv.

    The norms are taken in fp32 with autocast off: under mixed precision the squared gradient norms overflow
    or underflow in half precision, and a NaN would survive the clamp and poison every weight (as it does in
    the public trainers under mixed precision). When the ratio is not finite (a NaN or inf gradient, or an inf
    reference gradient) the weight is **0**: that step simply has no such term, and the caller needs no host
    synchronisation to check. Both gradients are taken with `retain_graph=True`, so the caller can still
    backpropagate the total loss afterwards; neither is accumulated into `.grad`.
    """
    with torch.autocast(device_type=layer_weight.device.type, enabled=False):
        (reference_grad,) = torch.autograd.grad(reference, layer_weight, retain_graph=True)
        (term_grad,) = torch.autograd.grad(term, layer_weight, retain_graph=True)
        weight = torch.linalg.vector_norm(reference_grad.float()) / (
            torch.linalg.vector_norm(term_grad.float()) + eps
        )
        weight = torch.where(torch.isfinite(weight), weight.clamp(0.0, max_weight), torch.zeros_like(weight))
    return weight.detach()


def adaptive_gan_weight(
    nll: torch.Tensor,
    g_loss: torch.Tensor,
    last_layer_weight: torch.Tensor,
    max_weight: float = 1e4,
    eps: float = 1e-4,
) -> torch.Tensor:
    """Weight that makes the adversarial gradient as large as the reconstruction gradient at the last layer.

    lambda = ||d nll / d w|| / (||d g_loss / d w|| + eps), clamped to [0, max_weight] and detached, where `w`
    is the decoder's output conv weight (Esser et al. 2021). Multiply it by the configured `disc_weight`.
    Computed in fp32, 0 when not finite, the graph retained: see `adaptive_weight`.

    Returns:
        a detached fp32 scalar tensor on the weight's device.
    """
    return adaptive_weight(nll, g_loss, last_layer_weight, max_weight, eps)


def gan_weight_schedule(batch_index: int, start: int, warmup: int) -> float:
    """Factor on the adversarial term: 0 before batch `start`, then a linear ramp to 1 over `warmup` batches.

    Counts **batches** (not Lightning's `global_step`, which advances once per optimizer, i.e. twice per
    batch once the discriminator trains, which silently halves `disc_start` in trainers that count steps). The
    ramp gives (n + 1) / warmup at batch `start + n`: 1/warmup at `start`, 1 from `start + warmup - 1` on.
    `warmup` 0 (or 1) switches the term on at once, as latent diffusion does; a ramp keeps a fresh
    discriminator from wrecking the reconstructions (taming-transformers #44).
    """
    return term_schedule(batch_index, start, warmup)


