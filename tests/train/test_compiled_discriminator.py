"""The compiled discriminator gives the generator the same gradient as the eager one, after it has taken steps.

A minimal form of the training step's use of the PatchGAN: the generator's pass with the discriminator's
parameters frozen (`requires_grad=False`, as Lightning's `toggled_optimizer` leaves them), the adaptive weight
differentiating that graph twice (`autograd.grad` with `retain_graph=True`) before the backward, Adam stepping
each network in place, and the discriminator's own pass with its parameters trainable: so the compiled
discriminator is called alternately under two `requires_grad` states (two graphs, chosen by dynamo's guards)
and with parameters that the optimizer has changed in place since the last call. The training module once kept
the discriminator eager after a compiled run's updates differed by 112 %; with torch 2.14.1 neither this nor the
whole training run (tests/train/test_training.py) shows a difference beyond rounding.
"""

import pytest
import skimage.data
import torch
import torch._functorch.config
import torch.nn.functional as F
from torch import nn

from vaegan.train.discriminator import PatchDiscriminator
from vaegan.train.losses import adaptive_gan_weight, discriminator_loss, generator_adversarial_loss

ROUNDS = 3


def photos() -> torch.Tensor:
    """Two 32x32 crops of skimage's astronaut in [-1, 1]: (2, 3, 32, 32)."""
    image = torch.from_numpy(skimage.data.astronaut()).permute(2, 0, 1).float() / 127.5 - 1  # (3, 512, 512)
    image = F.interpolate(image[None], size=64, mode="area")[0]
    return torch.stack([image[:, :32, :32], image[:, 32:, 32:]])


# As in `VAEGAN.training_step`: a compiled backward that donates its saved buffers (BatchNorm's, here) refuses
# the adaptive weight's `retain_graph=True` with a RuntimeError; it never gives a wrong gradient.
@torch._functorch.config.patch(donated_buffer=False)
def train(norm: str, channels_last: bool, compiled: bool) -> list[tuple[str, torch.Tensor]]:
    """`ROUNDS` generator and discriminator steps; every gradient, adaptive weight and BatchNorm statistic."""
    torch.manual_seed(0)
    generator = nn.Conv2d(3, 3, 3, padding=1)  # stands for the decoder: its weight is the adaptive weight's layer
    discriminator = PatchDiscriminator(3, base_channels=8, num_layers=2, norm=norm)
    images = photos()
    if channels_last:
        for network in (generator, discriminator):
            network.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    if compiled:
        discriminator.compile()
    opt_g = torch.optim.Adam(generator.parameters(), lr=1e-3)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=2e-4)
    seen = []
    for step in range(ROUNDS):
        discriminator.requires_grad_(False)
        reconstructions = generator(images)
        nll = (reconstructions - images).abs().mean()
        adversarial = generator_adversarial_loss("hinge", discriminator(reconstructions))
        weight = adaptive_gan_weight(nll, adversarial, generator.weight)
        (nll + weight * adversarial).backward()
        seen += [(f"{step}: adaptive weight", weight), (f"{step}: generator grad", generator.weight.grad.clone())]
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)

        discriminator.requires_grad_(True)
        d_loss = discriminator_loss("hinge", discriminator(images), discriminator(reconstructions.detach()))
        d_loss.backward()
        seen += [(f"{step}: discriminator {name} grad", p.grad.clone())
                 for name, p in discriminator.named_parameters()]
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)
    seen += [(f"buffer {name}", buffer.clone()) for name, buffer in discriminator.named_buffers()]
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("norm, channels_last", [("group", False), ("batch", True)])
def test_compiled_discriminator_gives_the_eager_gradients(norm, channels_last):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager = train(norm, channels_last, compiled=False)
    compiled = train(norm, channels_last, compiled=True)
    # One graph per requires_grad state of the parameters: the guards tell the two uses apart.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    for (name, expected), (actual_name, actual) in zip(eager, compiled, strict=True):
        assert actual_name == name
        expected, actual = expected.double(), actual.double()  # BatchNorm's step count is an integer
        # Rounding only: measured at most 1.5e-6 relative (torch 2.14.1, CPU).
        difference = ((actual - expected).norm() / expected.norm().clamp_min(1e-12)).item()
        assert difference < 1e-4, f"{name}: compiled differs from eager by {difference:.2e}"
