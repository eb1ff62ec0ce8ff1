"""Distances between distributions of features: running moments and the Fréchet distance (FID, rFID)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class FeatureMoments:
    """Running mean and covariance of feature vectors (N, D), in float64: the Gaussian that FID compares.

    Sums are kept instead of the features, so memory is D^2 whatever the number of images (32 MB for
    Inception's 2048 features).
    """

    count: int = 0
    total: torch.Tensor | None = None          # (D,)
    outer_total: torch.Tensor | None = None    # (D, D)

    def update(self, features: torch.Tensor) -> None:
        features = features.detach().double().cpu()  # (N, D)
        if self.total is None:
            self.total = torch.zeros(features.shape[1], dtype=torch.float64)
            self.outer_total = torch.zeros(features.shape[1], features.shape[1], dtype=torch.float64)
        self.count += features.shape[0]
        self.total += features.sum(dim=0)
        self.outer_total += features.T @ features

    def mean_and_covariance(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(D,), (D, D): the sample mean and the unbiased covariance (N - 1), as numpy.cov in pytorch-fid."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}")
        mean = self.total / self.count
        covariance = (self.outer_total - self.count * torch.outer(mean, mean)) / (self.count - 1)
        return mean, covariance


def _symmetric_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix; eigenvalues below 0 (rounding) count as 0."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(
    mean_a: torch.Tensor, covariance_a: torch.Tensor, mean_b: torch.Tensor, covariance_b: torch.Tensor
) -> float:
    """Fréchet distance between N(mean_a, covariance_a) and N(mean_b, covariance_b), as FID defines it.

    d^2 = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2)). The trace of the square root is taken
    through the symmetric matrix S_a^(1/2) S_b S_a^(1/2), which has the eigenvalues of S_a S_b: an `eigh` in
    float64 instead of scipy's `sqrtm` of a non-symmetric product (pytorch-fid), which can return complex
    noise on rank-deficient covariances. Both give the same number where sqrtm is well behaved.
    """
    mean_a, mean_b = mean_a.double(), mean_b.double()
    covariance_a, covariance_b = covariance_a.double(), covariance_b.double()
    root_a = _symmetric_sqrt(covariance_a)
    product = root_a @ covariance_b @ root_a
    trace_sqrt = torch.linalg.eigvalsh((product + product.T) / 2).clamp(min=0).sqrt().sum()
    distance = (mean_a - mean_b).pow(2).sum() + covariance_a.trace() + covariance_b.trace() - 2 * trace_sqrt
    return distance.item()
