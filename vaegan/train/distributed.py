"""Data-parallel training of the two networks of a GAN: Lightning's DDP processes, without its DDP wrapper.

Lightning's `ddp` strategy wraps the whole LightningModule in one `DistributedDataParallel`, whose gradient
hooks expect every registered parameter in every backward pass. A VAE-GAN runs two backward passes per batch,
each touching only one network (and, with the adaptive weight, an extra `autograd.grad`), so the wrapper hangs
or fails (Lightning issues #20328, #20866; `find_unused_parameters` does not fix it). This is how GAN codebases
outside Lightning do it (StyleGAN2-ADA, for one): every rank starts from the same weights, and before each
optimizer step the gradients of that optimizer's parameters are averaged across ranks in one all-reduce.

    vaegan fit --config configs/sd-f8c4.yaml --trainer.strategy=gan_ddp --trainer.devices=8

Multi-node works the same way (`--trainer.num_nodes`). FSDP is not supported: a VAE of the released sizes
(84 M parameters, 0.3 GB in fp32) and its optimizer states fit on one GPU, so sharding buys nothing.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry

STRATEGY_NAME = "gan_ddp"


class GANDDPStrategy(DDPStrategy):
    """Lightning's DDP launcher and process group; the LightningModule averages its gradients itself."""

    def configure_ddp(self) -> None:
        # What DistributedDataParallel's constructor would have done: start every rank from rank 0's state.
        broadcast_state(self.model)


def broadcast_state(module: torch.nn.Module, source: int = 0) -> None:
    """Overwrite every parameter and buffer with rank `source`'s values."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    for tensor in module.state_dict().values():  # state-dict tensors share storage with the module's own
        dist.broadcast(tensor, source)


def average_gradients(parameters: list[torch.nn.Parameter]) -> None:
    """Replace each gradient by its mean over all ranks, in one all-reduce of the flattened gradients.

    A parameter without a gradient counts as zero, so every rank sends a buffer of the same layout.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    for parameter in parameters:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
    gradients = [parameter.grad for parameter in parameters]
    flat = torch.cat([gradient.reshape(-1) for gradient in gradients])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for gradient, averaged in zip(gradients, flat.split([g.numel() for g in gradients]), strict=True):
        gradient.copy_(averaged.view_as(gradient))


def on_every_rank(condition: torch.Tensor) -> bool:
    """Whether a boolean tensor is true on every rank: one all-reduce, so that all ranks take the same branch."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        condition = condition.to(torch.int32)
        dist.all_reduce(condition, op=dist.ReduceOp.MIN)
    return bool(condition)


if STRATEGY_NAME not in StrategyRegistry:
    StrategyRegistry.register(
        STRATEGY_NAME, GANDDPStrategy,
        description="DDP for GANs: the module averages each optimizer's gradients (vaegan.train.distributed)",
    )
