"""Distilling a tiny autoencoder from a big VAE: the frozen teacher, and the student shaped for its latent space.

The teacher is any VAE `vaegan.load` reads. It never trains: its parameters are frozen, it is in no optimizer,
it runs under `torch.inference_mode`, and training checkpoints leave its weights out (they are read from the
teacher's path again on resume, and its hash must still match). What the student learns from it:

  decoder  teacher latents -> the real image (L1/L2 + LPIPS + PatchGAN, as the VAE's decoder), and optionally
           the teacher's own decode of the same latents (`teacher_decode_weight`);
  encoder  the image -> the teacher's normalised latents (mean squared error; its posterior mean or samples).

Latents are the teacher's *normalised* ones, the space a diffusion model works in, folded back from FLUX.2's
2x2 patches to the VAE's layout for a patch-normalised teacher (as TAEF2 works). They are computed each batch,
or read from a `vaegan encode` folder of the teacher's (`--data.latents`, `vaegan.train.encoded`).
"""

from __future__ import annotations

import torch
from torch import nn

from vaegan.autoencoder.network import AutoencoderKL, weights_sha256
from vaegan.autoencoder.normalization import LatentNormalization, patchify, unpatchify
from vaegan.autoencoder.tiny import TINY_PRESETS, TinyConfig
from vaegan.formats.load import load
from vaegan.train.encoded import EncodedLatents


class Teacher(nn.Module):
    """A frozen VAE that turns images into the student's target latents and decodes latents for comparison."""

    def __init__(self, source: str):
        super().__init__()
        vae = load(source)
        if not isinstance(vae, AutoencoderKL):
            raise ValueError(f"--model.teacher={source} is a tiny autoencoder; the teacher must be a KL autoencoder")
        self.source = source
        self.vae = vae.requires_grad_(False).eval()
        self.normalization = LatentNormalization.of(vae)
        self.sha256 = weights_sha256(vae)

    def latents(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) -> normalised latents in the VAE's layout (B, C, H/f, W/f): the posterior mean, or
        a sample drawn with `generator` when one is given."""
        with torch.inference_mode():
            posterior = self.vae.encode(images.to(self._dtype))
            z = posterior.sample(generator) if generator is not None else posterior.mode()
            latents = self.normalization.normalize(z)
            if self.normalization.patch_size is not None:
                latents = unpatchify(latents, self.normalization.patch_size)
        return latents.float().clone()  # cloned outside inference mode: autograd may take it as an input

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents in the VAE's layout -> the teacher's images (B, 3, H, W), clamped to [-1, 1]."""
        with torch.inference_mode():
            if self.normalization.patch_size is not None:
                latents = patchify(latents, self.normalization.patch_size)
            images = self.vae.decode(self.normalization.denormalize(latents.to(self._dtype)))
        return images.float().clamp(-1, 1).clone()

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype


def student_config(teacher: Teacher, arch: str | None, block_out_channels: tuple[int, ...] | None) -> TinyConfig:
    """The tiny network for `teacher`'s space: `arch` (a tiny preset), else the published variant for its shape
    (TAEF2's for a patch-normalised teacher, Sana's f32 for a 32x one, TAESD's otherwise), with the teacher's
    latent channels; `block_out_channels` replaces the encoder's widths and, reversed, the decoder's (one per
    level: n widths make an f 2^(n-1) student)."""
    config = teacher.vae.config
    if arch is None:
        arch = "taef2" if config.patch_size is not None else "taesana" if config.downsampling_factor == 32 else "taesd"
    if arch not in TINY_PRESETS:
        raise ValueError(f"--model.arch={arch}: with --model.teacher, arch names the student, one of "
                         f"{', '.join(TINY_PRESETS)}")
    student = TINY_PRESETS[arch].replace(latent_channels=config.latent_channels, patch_size=config.patch_size,
                                         teacher=teacher.source)
    if block_out_channels:
        widths = tuple(block_out_channels)
    elif student.downsampling_factor != config.downsampling_factor and not student.encoder_stem_channels:
        # Another factor (the demo's f4 VAE): as many levels as halvings, each as wide as the preset's.
        widths = (student.encoder_block_out_channels[0],) * (config.downsampling_factor.bit_length())
    else:
        widths = student.encoder_block_out_channels
    if widths != student.encoder_block_out_channels:
        # The preset's blocks per level, the full-resolution ends kept: 1 then 3s (encoder), 3s then 1 (decoder).
        levels = len(widths)
        student = student.replace(
            encoder_block_out_channels=widths, decoder_block_out_channels=widths[::-1],
            num_encoder_blocks=(student.num_encoder_blocks[0],) + (3,) * (levels - 1),
            num_decoder_blocks=(3,) * (levels - 1) + (student.num_decoder_blocks[-1],),
        )
    if student.downsampling_factor != config.downsampling_factor:
        raise ValueError(f"--model.arch={arch} downsamples {student.downsampling_factor}x but the teacher "
                         f"{teacher.source} downsamples {config.downsampling_factor}x")
    return student


def check_stored_latents(teacher: Teacher | None, encoded: EncodedLatents, teacher_latents: str) -> None:
    """Refuse, by option, stored latents that are not the teacher's targets: another VAE's, normalised otherwise,
    or stored without what `teacher_latents` asks for."""
    option = f"--data.latents={encoded.path}"
    if teacher is None:
        raise ValueError(f"{option} holds a teacher's latents, for distillation; name the VAE that encoded them "
                         "with --model.teacher")
    if encoded.vae_sha256 != teacher.sha256:
        raise ValueError(f"{option} was encoded by other weights than --model.teacher={teacher.source}; encode the "
                         "images with the teacher, or name the VAE that encoded them")
    if encoded.normalization != teacher.normalization:
        raise ValueError(f"{option} is normalised as {encoded.normalization}, the teacher as "
                         f"{teacher.normalization}; encode again without overriding the normalisation")
    if teacher_latents == "sample" and encoded.store == "mean":
        raise ValueError(f"{option} stores posterior means, but --model.teacher_latents=sample draws from the "
                         "posterior; encode with --store posterior, or set --model.teacher_latents=mean")
    if teacher_latents == "mean" and encoded.store == "sample":
        raise ValueError(f"{option} stores posterior samples, but --model.teacher_latents=mean learns the means; "
                         "encode with --store posterior or mean, or set --model.teacher_latents=sample")


def stored_targets(batch: dict[str, torch.Tensor], generator: torch.Generator | None) -> torch.Tensor:
    """The student's target latents from a batch of stored ones: the stored latent (a mean, or a sample drawn at
    encoding), or with `generator` and a stored posterior a fresh sample of it."""
    latents = batch["latent"].float()
    if generator is not None and "logvar" in batch:
        noise = torch.randn(latents.shape, generator=generator, device=latents.device)
        latents = latents + batch["logvar"].float().mul(0.5).exp() * noise
    return latents
