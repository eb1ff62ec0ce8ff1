"""Flow matching on latents (rectified flow, as SiT, LightningDiT and SD3 train): pure functions.

A latent x0 and Gaussian noise e are joined by the straight path x_t = (1 - t) x0 + t e, t in [0, 1]; the
network learns the velocity along it, v = e - x0, by regression. Sampling integrates dx/dt = v from t = 1
(noise) to t = 0 with Euler steps.

The loss is a mean over every latent element, so it is a per-dimension number: on latents normalised to unit
variance it compares between latent shapes. A model that predicts 0 scores E[(e - x0)^2] = 2 there.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t noise, for latents (B, C, h, w) and times t (B,)."""
    t = t.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
    return (1 - t) * x0 + t * noise


def velocity(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The regression target along the straight path: dx_t/dt = noise - x0."""
    return noise - x0


def flow_matching_loss(predicted: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Mean squared velocity error per sample (B,), averaged over every latent element (a per-dimension loss)."""
    return (predicted.float() - velocity(x0, noise).float()).pow(2).flatten(1).mean(dim=1)


Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t (B, C, h, w), t (B,)) -> (B, C, h, w)


@torch.no_grad()
def euler_sample(model: Velocity, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """Integrate from t = 1 (the noise, (B, C, h, w)) to t = 0 in `steps` equal Euler steps; returns x0."""
    if steps < 1:
        raise ValueError(f"steps={steps} must be at least 1")
    x = noise
    times = torch.linspace(1.0, 0.0, steps + 1, device=noise.device)
    for t, t_next in zip(times[:-1], times[1:], strict=True):
        x = x + (t_next - t) * model(x, t.expand(x.shape[0]))
    return x


def guided(model: Callable[..., torch.Tensor], labels: torch.Tensor | None, null_label: int, scale: float) -> Velocity:
    """The velocity of a (class-conditional) model as `euler_sample` calls it, with classifier-free guidance:
    v = v_null + scale * (v_label - v_null). Scale 1 (or no labels) runs the model once, unguided."""
    if labels is None:
        return lambda x, t: model(x, t, None)
    if scale == 1.0:
        return lambda x, t: model(x, t, labels)

    def velocity_field(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, torch.full_like(labels, null_label)]))
        conditional, unconditional = both.chunk(2)
        return unconditional + scale * (conditional - unconditional)

    return velocity_field
