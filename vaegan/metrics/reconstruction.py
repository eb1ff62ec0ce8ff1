"""Reconstruction metrics, one implementation for training validation and for evaluation.

Conventions follow the papers and their evaluation scripts: images are compared as uint8 in [0, 255] (a [-1, 1]
range mistake costs 6.02 dB), PSNR is computed per image and then averaged, SSIM uses an 11-tap Gaussian window
(sigma 1.5) on each RGB channel, MS-SSIM the five standard scales. The Fréchet distance of rFID is in
`vaegan.metrics.distribution`, its Inception features in `vaegan.pretrained.inception`, LPIPS in
`vaegan.pretrained.lpips`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(reference: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB (B,) of uint8 images (B, C, H, W); identical images give +inf."""
    error = (reference.double() - reconstruction.double()).pow(2).mean(dim=(1, 2, 3))
    return (10 * torch.log10(255.0**2 / error)).float()


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    kernel = torch.exp(-(coords**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def _ssim_terms(
    reference: torch.Tensor, reconstruction: torch.Tensor, sample_covariance: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel SSIM and contrast-structure term (B, C) each, over the valid region of the 11-tap window.

    `sample_covariance` multiplies (co)variances by n / (n - 1) with n = 121 window taps: the convention of the
    original SSIM code and scikit-image. The MS-SSIM implementations (TensorFlow's `ssim_multiscale`,
    pytorch-msssim) use population covariances, so MS-SSIM turns it off to give their numbers.
    """
    x, y = reference.double(), reconstruction.double()
    window = _gaussian_window().to(x.device)
    # All five local statistics of all channels of all images in one separable blur: every (B, C) plane of
    # the five maps becomes one channel of a single image, a vertical then a horizontal depthwise 11-tap pass
    # (blurring map by map is slower: the float64 conv loops over images and groups).
    maps = torch.stack([x, y, x * x, y * y, x * y])                      # (5, B, C, H, W)
    planes = maps.flatten(0, 2).unsqueeze(0)                             # (1, 5BC, H, W)
    count = planes.shape[1]
    planes = F.conv2d(planes, window.view(1, 1, -1, 1).expand(count, 1, -1, 1), groups=count)
    planes = F.conv2d(planes, window.view(1, 1, 1, -1).expand(count, 1, 1, -1), groups=count)
    mu_x, mu_y, mean_xx, mean_yy, mean_xy = planes.view(5, *x.shape[:2], *planes.shape[-2:])

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    n = window.numel() ** 2
    correction = n / (n - 1) if sample_covariance else 1.0
    var_x = (mean_xx - mu_x**2) * correction
    var_y = (mean_yy - mu_y**2) * correction
    cov_xy = (mean_xy - mu_x * mu_y) * correction
    cs_map = (2 * cov_xy + c2) / (var_x + var_y + c2)
    ssim_map = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1) * cs_map
    return ssim_map.mean(dim=(2, 3)), cs_map.mean(dim=(2, 3))


def ssim(reference: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (B,) of uint8 images (B, C, H, W): Wang et al. 2004 with the 11-tap Gaussian window.

    Statistics are taken over the valid region only (no padding), per channel, then averaged, as in
    scikit-image's `structural_similarity(gaussian_weights=True, sigma=1.5, data_range=255)`.
    """
    per_channel, _ = _ssim_terms(reference, reconstruction, sample_covariance=True)
    return per_channel.mean(dim=1).float()


# Wang, Simoncelli & Bovik 2003: the exponents of the five scales, fitted to human judgements.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
# The 11-tap window must still fit after four halvings: (11 - 1) * 2^4 + 1 pixels on the smaller side.
MS_SSIM_MIN_SIZE = (11 - 1) * 2 ** (len(MS_SSIM_WEIGHTS) - 1) + 1


def ms_ssim(reference: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """Per-image MS-SSIM (B,) of uint8 images (B, C, H, W), both sides at least `MS_SSIM_MIN_SIZE` (161).

    The five-scale MS-SSIM of Wang et al. 2003 as TensorFlow's `tf.image.ssim_multiscale` and pytorch-msssim
    compute it: at each scale the contrast-structure term, at the coarsest the full SSIM, per channel, each
    clamped at 0 (a negative value has no real fractional power) and raised to its weight; the product over
    scales is averaged over channels. Between scales both images are 2x2 average-pooled (odd sides padded).
    """
    height, width = reference.shape[-2:]
    if min(height, width) < MS_SSIM_MIN_SIZE:
        raise ValueError(
            f"MS-SSIM needs images of at least {MS_SSIM_MIN_SIZE}x{MS_SSIM_MIN_SIZE} pixels (the 11-tap window "
            f"after four 2x halvings), got {height}x{width}"
        )
    x, y = reference.double(), reconstruction.double()
    factors = []
    for level, weight in enumerate(MS_SSIM_WEIGHTS):
        per_channel_ssim, per_channel_cs = _ssim_terms(x, y, sample_covariance=False)  # (B, C) each
        if level == len(MS_SSIM_WEIGHTS) - 1:
            factors.append(per_channel_ssim.clamp(min=0) ** weight)
            break
        factors.append(per_channel_cs.clamp(min=0) ** weight)
        padding = (x.shape[-2] % 2, x.shape[-1] % 2)
        x, y = F.avg_pool2d(x, 2, padding=padding), F.avg_pool2d(y, 2, padding=padding)
    return torch.stack(factors).prod(dim=0).mean(dim=1).float()


def latent_bits_per_pixel(
    latent_shape: tuple[int, int, int], image_size: tuple[int, int], dtype: torch.dtype
) -> float:
    """Bits the latent (C, h, w) takes per image pixel when stored in `dtype`: C * h * w * bits / (H * W).

    The uncompressed RGB image takes 24; a diffusion model's cost grows with C * h * w, the storage of a
    latent dataset with the bits as well.
    """
    channels, height, width = latent_shape
    bits = torch.finfo(dtype).bits if dtype.is_floating_point else torch.iinfo(dtype).bits
    return channels * height * width * bits / (image_size[0] * image_size[1])


