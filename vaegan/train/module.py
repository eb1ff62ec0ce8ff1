"""The VAE-GAN training module: a KL autoencoder against a PatchGAN, with L1/L2 + LPIPS reconstruction.

Read `training_step` top to bottom: one generator (autoencoder) step, then one discriminator step, per
batch. Optimization is manual, so this module does what the Trainer cannot: gradient accumulation,
clipping, the EMA, and counting *batches* (Lightning's `global_step` counts every optimizer step, two per
batch once the discriminator trains, which silently halves step-based schedules in other trainers).

Exact resume. A run resumed from any checkpoint, mid-epoch included, continues as if it had never stopped:
the parameters, the buffers (batch counter, seed, bad-step counts), the optimizer and scheduler states and the
training loader's place are all in the checkpoint. Two rules keep it so for anything added here:
  * state that changes during training is a parameter or a registered buffer, never a plain attribute;
  * every random draw of a training step comes from `self.rng(purpose)`, a generator seeded by (seed, batch,
    purpose, rank), never from torch's global generator, whose state depends on what ran before (data
    workers, validation, a restart).

One bad step does not end a run: a network whose loss or gradients are not finite skips that update (weights,
optimizer, schedule and EMA stay as they were), which is counted and logged with the batch number; only
`max_bad_steps` of them in a row stop the run, with `TrainingDiverged`, before the next checkpoint is written.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.fabric.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

from vaegan.autoencoder.network import AutoencoderKL, preset
from vaegan.autoencoder.normalization import LatentNormalization, LatentStatistics, measured_layout
from vaegan.autoencoder.preview import LatentPreviewFit
from vaegan.autoencoder.tiny import TinyAutoencoder
from vaegan.formats.load import load
from vaegan.images.convert import to_uint8
from vaegan.metrics.reconstruction import psnr, ssim
from vaegan.pretrained.lpips import PerceptualLoss
from vaegan.pretrained.vision import VisionFeatures
from vaegan.reporting.grids import reconstruction_grid, save_grid
from vaegan.train.checkpoint_io import WholeCheckpointIO
from vaegan.train.discriminator import PatchDiscriminator
from vaegan.train.distillation import Teacher, check_stored_latents, stored_targets, student_config
from vaegan.train.distributed import STRATEGY_NAME, GANDDPStrategy, average_gradients, on_every_rank
from vaegan.train.losses import (
    adaptive_gan_weight,
    adaptive_weight,
    discriminator_loss,
    gan_weight_schedule,
    generator_adversarial_loss,
    kl_loss,
    nll_loss,
    reconstruction_loss,
)
from vaegan.train.regularizer_options import GROUPS, Alignment, Equivariance, LatentNoise, ScaleEquivariance
from vaegan.train.regularizers import (
    eq_vae_transform,
    equivariance_loss,
    latent_noise_loss,
    scale_equivariance_transform,
    term_schedule,
    vf_loss,
)
from vaegan.utils.files import write_json
from vaegan.utils.seeds import seeded_generator

# Parameters and buffers of the frozen LPIPS network in this module's state dict.
PERCEPTUAL_PREFIX = "perceptual."
TEACHER_PREFIX = "teacher."
TEACHER_HASH_KEY = "vaegan_teacher_sha256"
# The regularisers compare images smaller than this by the pixel loss alone: LPIPS-alex's pooling needs 32 pixels
# (squeeze 20, vgg 16), and the equivariance terms shrink images by up to 4x.
MIN_PERCEPTUAL_SIDE = 32
# The two networks' places in the bad-step counters.
NETWORKS = ("generator", "discriminator")
GENERATOR, DISCRIMINATOR = range(len(NETWORKS))


class TrainingDiverged(RuntimeError):
    """`max_bad_steps` updates in a row of one network had a loss or gradients that were not finite."""


class VAEGAN(L.LightningModule):
    """Train (or fine-tune) an `AutoencoderKL` with the latent-diffusion objective.

    Args:
        arch: preset of the autoencoder to train from scratch (`sd`, `sdxl`, `sd3`, `flux`, `flux2`, `mini`).
        latent_channels: overrides the preset's latent channels (e.g. 16 for a Flux-like codec).
        block_out_channels: overrides the preset's level widths; n widths make an f 2^(n-1) autoencoder, e.g.
            (128, 128, 256, 256, 512) with 32 latent channels is VA-VAE's f16c32.
        init_from: fine-tune from any VAE `vaegan.load` reads; its architecture replaces `arch`.
        train_decoder_only: freeze encoder and quant conv (the sd-vae-ft-EMA/MSE recipe), so the latent space
            that existing diffusion models were trained on stays exactly the same.
        reconstruction: pixel loss, `l1` (the LDM recipe) or `l2` (sd-vae-ft-MSE).
        perceptual_net: LPIPS backbone; `vgg` as in the released recipe.
        perceptual_weight: LPIPS weight (1.0 in LDM, 0.1 in ft-MSE, 0.25 in Stability's sgm configs).
        perceptual_weights_file: backbone weights; else `$VAEGAN_WEIGHTS_DIR`, else torchvision's cache.
        allow_random_perceptual: permit a random LPIPS backbone when no weights exist (only for smoke tests).
        kl_weight: weight of the KL term, whose reduction is a per-element mean (see `vaegan.train.losses.kl_loss`).
        learn_logvar: optimize the log-variance of the reconstruction likelihood (LDM defines it, never trains it).
        logvar_init: its initial value.
        disc_start: batch (not optimizer step) at which the discriminator starts training.
        disc_warmup: batches over which the adversarial weight ramps from 0 to 1 after `disc_start`, so a fresh
            discriminator cannot wreck the reconstructions (taming-transformers #44).
        disc_weight: adversarial weight (multiplies the adaptive weight when `adaptive_disc_weight`).
        adaptive_disc_weight: balance the adversarial gradient against the reconstruction gradient at the
            decoder's last layer (LDM); else a constant weight (LiteVAE's choice under mixed precision).
        gan_loss: `hinge` (LDM), `vanilla` or `non_saturating`.
        disc_layers, disc_channels, disc_norm, disc_spectral_norm: the PatchGAN's shape.
        eq: EQ-VAE's equivariance term (`--model.eq.weight`, `.probability`, ...; see
            `vaegan.train.regularizer_options` for each group's options). Every group is off by default and
            scheduled in batches by its `start`, `ramp` and `end`.
        se: scale equivariance, d(D(↓z), ↓x).
        noise: latent noise, d(D(z + σ·ε), x).
        align: VA-VAE's alignment of the latents to a frozen vision model.
        lr, disc_lr: learning rates of autoencoder and discriminator (`disc_lr` defaults to `lr`).
        betas: Adam betas; (0.5, 0.9) as in LDM.
        optimizer: `adam` or `adamw`; `weight_decay` applies to both.
        lr_warmup: batches of linear learning-rate warm-up.
        lr_schedule: `constant` or `cosine` decay to 10 % over `max_batches`.
        grad_clip: max gradient norm of each network (None: no clipping).
        accumulate_grad_batches: batches per optimizer step.
        ema_decay: decay of the weight EMA (None: no EMA); warmed up as min(decay, (1 + n) / (10 + n)).
        validate_with_ema: validate (and export) the EMA weights.
        max_batches: training length in batches; the run stops there (set the Trainer's `max_steps` to -1).
        max_bad_steps: updates in a row of one network with a loss or gradients that are not finite (each one
            skipped) after which the run stops; a few in a row happen when fp16's loss scale is calibrated.
        channels_last: run the networks in channels_last memory format. Off by default: it did not help training
            on CPUs, and made it slower on a GPU in bf16-mixed (the GPU benchmark page has the figures).
        compile: `torch.compile` the encoder, the decoder and the discriminator.
        grid_images: validation images shown in the reconstruction grid.
        teacher: distil a tiny autoencoder (TAESD-style) from this VAE, a path or hub name `vaegan.load` reads
            (see `vaegan.train.distillation`). `arch` then names the student (`taesd`, `taef2`, `taesana`; the
            default `mini` picks the published variant for the teacher's shape), `block_out_channels` its widths,
            and `init_from` may start it from a published tiny autoencoder.
        distill: which part of the student learns: `both`, `decoder` (a previewer) or `encoder`.
        teacher_latents: what the student learns from, the teacher posterior's `mean` or a `sample` of it.
        teacher_decode_weight: weight of a second decoder target, the teacher's decode of the same latents (the
            same pixel and LPIPS distance as against the real image).
        latent_weight: weight of the encoder's mean squared error to the teacher's normalised latents.
    """

    def __init__(
        self,
        arch: str = "mini",
        latent_channels: int | None = None,
        block_out_channels: tuple[int, ...] | None = None,
        init_from: str | None = None,
        train_decoder_only: bool = False,
        reconstruction: Literal["l1", "l2"] = "l1",
        perceptual_net: Literal["vgg", "alex", "squeeze"] = "vgg",
        perceptual_weight: float = 1.0,
        perceptual_weights_file: str | None = None,
        allow_random_perceptual: bool = False,
        kl_weight: float = 1e-6,
        learn_logvar: bool = True,
        logvar_init: float = 0.0,
        disc_start: int = 50_001,
        disc_warmup: int = 0,
        disc_weight: float = 0.5,
        adaptive_disc_weight: bool = True,
        gan_loss: Literal["hinge", "vanilla", "non_saturating"] = "hinge",
        disc_layers: int = 3,
        disc_channels: int = 64,
        disc_norm: Literal["batch", "group", "none"] = "group",
        disc_spectral_norm: bool = False,
        eq: Equivariance = Equivariance(),
        se: ScaleEquivariance = ScaleEquivariance(),
        noise: LatentNoise = LatentNoise(),
        align: Alignment = Alignment(),
        lr: float = 1e-4,
        disc_lr: float | None = None,
        betas: tuple[float, float] = (0.5, 0.9),
        optimizer: Literal["adam", "adamw"] = "adam",
        weight_decay: float = 0.0,
        lr_warmup: int = 0,
        lr_schedule: Literal["constant", "cosine"] = "constant",
        grad_clip: float | None = 1.0,
        accumulate_grad_batches: int = 1,
        ema_decay: float | None = 0.999,
        validate_with_ema: bool = True,
        max_batches: int = 100_000,
        max_bad_steps: int = 20,
        channels_last: bool = False,
        compile: bool = False,
        grid_images: int = 8,
        teacher: str | None = None,
        distill: Literal["both", "decoder", "encoder"] = "both",
        teacher_latents: Literal["mean", "sample"] = "mean",
        teacher_decode_weight: float = 0.0,
        latent_weight: float = 1.0,
    ):
        super().__init__()
        # Checked before any network, weights file or logger: each named as the option a user writes.
        for option, value in (("lr", lr), ("disc_lr", disc_lr), ("align.lr", Alignment.of(align).lr)):
            if value is not None and not value > 0:
                raise ValueError(f"--model.{option}={value}: a learning rate must be positive")
        if max_batches < 1 or accumulate_grad_batches < 1:
            raise ValueError(f"--model.max_batches={max_batches} and --model.accumulate_grad_batches="
                             f"{accumulate_grad_batches} must be at least 1")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.eq, self.se, self.noise, self.align = (
            Equivariance.of(eq), ScaleEquivariance.of(se), LatentNoise.of(noise), Alignment.of(align)
        )
        # Checkpoints hold plain containers only (they are read with weights_only=True): the groups as dicts.
        for name in GROUPS:
            self.hparams[name] = dataclasses.asdict(getattr(self, name))

        self.teacher = Teacher(teacher) if teacher is not None else None
        if self.teacher is not None:
            self._check_distillation_options(train_decoder_only)
            student = student_config(self.teacher, None if arch == "mini" else arch, block_out_channels)
            self.vae = load(init_from) if init_from is not None else TinyAutoencoder(student)
            shape = (student.latent_channels, student.downsampling_factor)
            if not isinstance(self.vae, TinyAutoencoder) or (
                    self.vae.config.latent_channels, self.vae.config.downsampling_factor) != shape:
                raise ValueError(f"--model.init_from={init_from} is not a tiny autoencoder with the teacher's "
                                 f"{shape[0]} latent channels at 1/{shape[1]}")
            self.vae.config = self.vae.config.replace(teacher=teacher, patch_size=student.patch_size)
            frozen = {"both": None, "decoder": self.vae.encoder, "encoder": self.vae.decoder}[distill]
            if frozen is not None:
                frozen.requires_grad_(False)
        elif init_from is not None:
            self.vae = load(init_from)
        else:
            overrides = {"latent_channels": latent_channels} if latent_channels else {}
            if block_out_channels:
                overrides["block_out_channels"] = tuple(block_out_channels)
            self.vae = AutoencoderKL(preset(arch, **overrides))
        if train_decoder_only and self.teacher is None:
            self.vae.encoder.requires_grad_(False)
            if self.vae.quant_conv is not None:
                self.vae.quant_conv.requires_grad_(False)
        self.ema = copy.deepcopy(self.vae).requires_grad_(False) if ema_decay is not None else None

        self.discriminator = PatchDiscriminator(
            in_channels=3,
            base_channels=disc_channels,
            num_layers=disc_layers,
            norm=disc_norm,
            spectral_norm=disc_spectral_norm,
        )
        # Frozen and in eval mode for the whole run; its parameters are in no optimizer.
        self.perceptual = PerceptualLoss(
            net=perceptual_net, weights=perceptual_weights_file, allow_random_backbone=allow_random_perceptual
        )
        self.logvar = torch.nn.Parameter(torch.tensor(float(logvar_init)), requires_grad=learn_logvar)
        for name in GROUPS:
            getattr(self, name).check(name)
        if self.align.weight > 0 and train_decoder_only:
            raise ValueError("align.weight > 0 aligns the encoder's latents, but train_decoder_only freezes the "
                             "encoder")
        # VA-VAE's alignment: a frozen vision model (out of checkpoints, like LPIPS) and the 1x1 projection of the
        # latents to its feature width, trained with the autoencoder and left behind at export.
        self.vision, self.align_projection = None, None
        if self.align.weight > 0:
            self.vision = VisionFeatures(self.align.backbone, self.align.weights_file, self.align.image_size,
                                         allow_random=self.align.allow_random_backbone)
            self.align_projection = torch.nn.Conv2d(self.vae.config.latent_channels, self.vision.dim, 1)
        # Counted here rather than read from the Trainer: see the module docstring.
        self.register_buffer("batches_seen", torch.zeros((), dtype=torch.long))
        # What training draws is seeded from this (see `rng`); drawn from torch's global generator, so
        # `seed_everything` decides it, and kept in checkpoints, so a resumed run goes on with the same one.
        self.register_buffer("seed", torch.randint(0, 2**62, ()))
        # Skipped updates of (generator, discriminator): in this run, and since the last good one.
        self.register_buffer("bad_steps", torch.zeros(len(NETWORKS), dtype=torch.long))
        self.register_buffer("bad_steps_in_a_row", torch.zeros(len(NETWORKS), dtype=torch.long))

        self._latent_statistics = LatentStatistics()
        self._grid_batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self._last_batch_time: float | None = None

    # ---------------------------------------------------------------- setup
    def setup(self, stage: str) -> None:
        strategy = self.trainer.strategy
        # Lightning's own writer renames a file from /tmp, a copy when /tmp is another disk; ours never
        # leaves a checkpoint half-written and names a broken one when asked to load it. A writer of the
        # user's own choosing is left alone.
        if type(strategy.checkpoint_io) is TorchCheckpointIO:
            strategy.checkpoint_io = WholeCheckpointIO()
        if stage == "fit" and self.trainer.world_size > 1 and not isinstance(self.trainer.strategy, GANDDPStrategy):
            raise ValueError(
                f"training on {self.trainer.world_size} processes needs --trainer.strategy={STRATEGY_NAME}: "
                f"{type(self.trainer.strategy).__name__} wraps the module in one DistributedDataParallel, which "
                "cannot reduce the separate generator and discriminator backward passes (see vaegan.train.distributed)"
            )
        encoded = getattr(self.trainer.datamodule, "encoded", None)  # the data module's stored latents, if any
        if encoded is not None:
            check_stored_latents(self.teacher, encoded, self.hparams.teacher_latents)

    def configure_model(self) -> None:
        if (self.hparams.disc_norm == "batch" and self.trainer.world_size > 1
                and self.trainer.strategy.root_device.type == "cuda"):
            # Batch statistics over the global batch, as on one device (SyncBatchNorm needs CUDA).
            self.discriminator = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.discriminator)
        if self.hparams.channels_last:
            for network in (self.vae, self.ema, self.discriminator):
                if network is not None:
                    network.to(memory_format=torch.channels_last)
        if self.hparams.compile:
            # The encoder and decoder, whose forward passes `vae.encode` and `vae.decode` call (compiling the
            # AutoencoderKL itself would only wrap its unused `forward`), and the discriminator. It is called
            # with its parameters frozen (the generator's step, differentiated twice for the adaptive weight)
            # and trainable (its own step): dynamo's guards keep one graph for each, and its gradients equal
            # the eager ones after optimizer steps (tests/train/test_compiled_discriminator.py).
            self.vae.encoder.compile()
            self.vae.decoder.compile()
            self.discriminator.compile()

    def configure_optimizers(self):
        hp = self.hparams
        generator_params = [p for p in self.vae.parameters() if p.requires_grad]
        if hp.learn_logvar:
            generator_params.append(self.logvar)
        groups = [{"params": generator_params}]
        if self.align_projection is not None:
            groups.append({"params": list(self.align_projection.parameters()), "lr": self.align.lr or hp.lr})
        optimizer_class = torch.optim.AdamW if hp.optimizer == "adamw" else torch.optim.Adam
        opt_g = optimizer_class(groups, lr=hp.lr, betas=hp.betas, weight_decay=hp.weight_decay)
        opt_d = optimizer_class(
            self.discriminator.parameters(), lr=hp.disc_lr or hp.lr, betas=hp.betas, weight_decay=hp.weight_decay
        )
        schedules = [torch.optim.lr_scheduler.LambdaLR(opt, self._lr_factor) for opt in (opt_g, opt_d)]
        return [opt_g, opt_d], schedules

    def _lr_factor(self, update: int) -> float:
        """Learning-rate multiplier after `update` optimizer updates of one network."""
        hp = self.hparams
        if update < hp.lr_warmup:
            return (update + 1) / hp.lr_warmup
        if hp.lr_schedule == "constant":
            return 1.0
        total = max(hp.max_batches // hp.accumulate_grad_batches - hp.lr_warmup, 1)
        progress = min((update - hp.lr_warmup) / total, 1.0)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    # ---------------------------------------------------------------- the objective
    def rng(self, purpose: str, device: torch.device | str | None = None) -> torch.Generator:
        """The random generator of this batch's draws of one kind (`purpose`), on `device` (the module's).

        Seeded by (seed, batch, purpose, rank): the same numbers whether the run started at batch 0 or was resumed
        just before this batch, different for every purpose, batch and rank. Every random draw of a training step
        comes from one of these (see the module docstring).
        """
        return seeded_generator(
            int(self.seed), int(self.batches_seen), purpose, self.global_rank, device=device or self.device
        )

    def reconstruct(self, images: torch.Tensor, generator: torch.Generator | None = None):
        """Encode (without gradients when only the decoder trains), sample with `generator`, decode:
        (reconstructions, posterior, latents)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.hparams.train_decoder_only):
            posterior = self.vae.encode(images)
            latents = posterior.sample(generator)
        return self.vae.decode(latents), posterior, latents

    def generator_losses(
        self, images, reconstructions, posterior, gan_factor: float, latents: torch.Tensor | None = None,
        batch_number: int = 0,
    ) -> dict[str, torch.Tensor]:
        """Reconstruction NLL + KL + the ramped adversarial term + the scheduled regularisers, each kept for
        logging (the regularisers' values under their names, their effective weights as `<name>_weight`)."""
        hp = self.hparams
        pixel = reconstruction_loss(images, reconstructions, kind=hp.reconstruction)      # (B, C, H, W)
        perceptual = self.perceptual(images, reconstructions)                            # (B,)
        rec_map = pixel + hp.perceptual_weight * perceptual.view(-1, 1, 1, 1)
        losses = {
            "pixel": pixel.mean(),
            "perceptual": perceptual.mean(),
            "nll": nll_loss(rec_map, self.logvar),
        }
        losses["loss"] = losses["nll"]
        if posterior is not None:  # a distilled decoder has none
            losses["kl"] = kl_loss(posterior)
            losses["loss"] = losses["loss"] + hp.kl_weight * losses["kl"]
        if gan_factor > 0:
            adversarial = generator_adversarial_loss(hp.gan_loss, self.discriminator(reconstructions))
            if hp.adaptive_disc_weight:
                weight = hp.disc_weight * adaptive_gan_weight(
                    losses["nll"], adversarial, self.vae.last_layer_weight
                )
            else:
                weight = torch.tensor(hp.disc_weight, device=images.device)
            losses["adversarial"] = adversarial
            losses["adversarial_weight"] = weight * gan_factor
            losses["loss"] = losses["loss"] + losses["adversarial_weight"] * adversarial
        if latents is not None:
            self._add_regularizers(losses, images, latents, batch_number)
        return losses

    def _add_regularizers(self, losses: dict[str, torch.Tensor], images: torch.Tensor, latents: torch.Tensor,
                          batch_number: int) -> None:
        """Add each switched-on diffusability regulariser, times its scheduled weight, to `losses["loss"]`."""
        eq, se, noise, align = self.eq, self.se, self.noise, self.align
        decode = self.vae.decode
        terms: dict[str, tuple[torch.Tensor | None, torch.Tensor | float]] = {}  # name -> (value, weight)
        if eq.weight > 0 and (factor := term_schedule(batch_number, eq.start, eq.ramp, eq.end)):
            generator = self.rng("eq", device="cpu")
            if float(torch.rand((), generator=generator)) < eq.probability:
                transform = eq_vae_transform(tuple(latents.shape[-2:]), generator, eq.min_scale, eq.scale, eq.rotate)
                terms["eq"] = (equivariance_loss(decode, latents, images, transform, self.distance), eq.weight * factor)
            else:
                terms["eq"] = (None, 0.0)
        if se.weight > 0 and (factor := term_schedule(batch_number, se.start, se.ramp, se.end)):
            generator = self.rng("se", device="cpu")
            transform = scale_equivariance_transform(tuple(latents.shape[-2:]), generator, tuple(se.factors))
            terms["se"] = (equivariance_loss(decode, latents, images, transform, self.distance), se.weight * factor)
        if noise.weight > 0 and (factor := term_schedule(batch_number, noise.start, noise.ramp, noise.end)):
            generator = self.rng("noise")
            terms["noise"] = (latent_noise_loss(decode, latents, images, generator, noise.sigma, self.distance),
                              noise.weight * factor)
        if align.weight > 0 and (factor := term_schedule(batch_number, align.start, align.ramp, align.end)):
            with torch.no_grad():
                features = self.vision(images)  # (B, D, g, g)
            vf = vf_loss(self.align_projection(latents), features, align.margin_cosine, align.margin_distance,
                         align.center_features)
            value = vf.margin_cosine + vf.margin_distance
            weight = align.weight * factor
            if align.adaptive:
                weight = weight * adaptive_weight(losses["nll"], value, self.vae.encoder.conv_out.weight)
            terms["align"] = (value, weight)
            losses["align_cosine"] = vf.mean_cosine
        for name, (value, weight) in terms.items():
            weight = torch.as_tensor(weight, dtype=torch.float32, device=images.device)
            losses[f"{name}_weight"] = weight
            if value is not None:
                losses[name] = value
                losses["loss"] = losses["loss"] + weight * value

    def distillation_losses(self, images: torch.Tensor, gan_factor: float, stored: dict | None = None):
        """A tiny student's losses against the frozen teacher (see `vaegan.train.distillation`): its decode of the
        teacher's latents against the real image (and the teacher's decode), its encoding against those latents.
        The latents are the teacher's encoding of `images`, or those `stored` in the batch (`--data.latents`).
        Returns (the student's decode, or None when only the encoder learns; the losses)."""
        hp = self.hparams
        sample = self.rng("posterior") if hp.teacher_latents == "sample" else None
        if stored is None:
            targets = self.teacher.latents(images, sample)                               # (B, C, h, w)
        else:
            targets = stored_targets(stored, sample)
        reconstructions, losses = None, {"loss": torch.zeros((), device=images.device)}
        if hp.distill != "encoder":
            reconstructions = self.vae.decode(targets)
            losses = self.generator_losses(images, reconstructions, None, gan_factor)
            if hp.teacher_decode_weight > 0:
                losses["teacher_decode"] = self.distance(reconstructions, self.teacher.decode(targets)).mean()
                losses["loss"] = losses["loss"] + hp.teacher_decode_weight * losses["teacher_decode"]
        if hp.distill != "decoder":
            losses["latent"] = torch.nn.functional.mse_loss(self.vae.encode(images).float(), targets)
            losses["loss"] = losses["loss"] + hp.latent_weight * losses["latent"]
        return reconstructions, losses

    def _check_distillation_options(self, train_decoder_only: bool) -> None:
        if train_decoder_only:
            raise ValueError("--model.train_decoder_only does not apply to distillation: --model.distill decoder "
                             "trains only the student's decoder")
        for name in GROUPS:
            if getattr(self, name).weight > 0:
                raise ValueError(f"--model.{name}.weight regularises a KL autoencoder's latents; a distilled "
                                 "student's latents are its teacher's, so switch it off with --model.teacher")

    def distance(self, reconstructions: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """d of the regularisers, per image (B,): the pixel loss, plus the weighted LPIPS on images of at least
        `MIN_PERCEPTUAL_SIDE` pixels."""
        hp = self.hparams
        value = reconstruction_loss(images, reconstructions, kind=hp.reconstruction).mean(dim=(1, 2, 3))
        if min(images.shape[-2:]) >= MIN_PERCEPTUAL_SIDE and hp.perceptual_weight > 0:
            value = value + hp.perceptual_weight * self.perceptual(images, reconstructions)
        return value

    # ---------------------------------------------------------------- training
    # The adaptive weight differentiates the generator's graph twice before its backward (retain_graph=True),
    # which compiled backward graphs that donate their buffers refuse; donation only saves memory. Without
    # `compile` this setting changes nothing.
    @torch._functorch.config.patch(donated_buffer=False)
    def training_step(self, batch, batch_idx: int) -> None:
        hp = self.hparams
        images = self._images(batch)
        opt_g, opt_d = self.optimizers()
        sched_g, sched_d = self.lr_schedulers()
        batch_number = int(self.batches_seen)
        steps_now = (batch_number + 1) % hp.accumulate_grad_batches == 0
        gan_factor = gan_weight_schedule(batch_number, hp.disc_start, hp.disc_warmup)
        train_discriminator = batch_number >= hp.disc_start

        # 1. Generator: the discriminator's parameters are frozen while toggled, so no gradient leaks into it.
        with self.toggled_optimizer(opt_g):
            if self.teacher is None:
                reconstructions, posterior, latents = self.reconstruct(images, self.rng("posterior"))
                g_losses = self.generator_losses(images, reconstructions, posterior, gan_factor, latents, batch_number)
            else:
                stored = batch if isinstance(batch, dict) and "latent" in batch else None
                reconstructions, g_losses = self.distillation_losses(images, gan_factor, stored)
                train_discriminator = train_discriminator and reconstructions is not None
            self.manual_backward(g_losses["loss"] / hp.accumulate_grad_batches)
            if steps_now and self._step(opt_g, sched_g, g_losses["loss"], GENERATOR):
                self._update_ema()

        # 2. Discriminator, on detached reconstructions: no gradient reaches the autoencoder.
        if train_discriminator:
            with self.toggled_optimizer(opt_d):
                real_logits = self.discriminator(images.detach())
                fake_logits = self.discriminator(reconstructions.detach())
                d_loss = discriminator_loss(hp.gan_loss, real_logits, fake_logits)
                self.manual_backward(d_loss / hp.accumulate_grad_batches)
                if steps_now:
                    self._step(opt_d, sched_d, d_loss, DISCRIMINATOR)
            g_losses["discriminator"] = d_loss
            g_losses["logits_real"] = real_logits.mean()
            g_losses["logits_fake"] = fake_logits.mean()

        self.batches_seen += 1
        self._log_training(g_losses, images.shape[0])
        if self.batches_seen >= hp.max_batches:
            self.trainer.should_stop = True

    def _step(self, optimizer, scheduler, loss: torch.Tensor, network: int) -> bool:
        """Average this network's gradients over the ranks and update it, unless its loss or a gradient is not
        finite: then nothing changes but the bad-step counts. Returns whether the network was updated."""
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        average_gradients(parameters)
        values = [loss.detach(), *(p.grad for p in parameters if p.grad is not None)]
        finite = on_every_rank(torch.stack([value.isfinite().all() for value in values]).all())
        if finite:
            optimizer.step()  # clips in `on_before_optimizer_step`
            scheduler.step()
            self.bad_steps_in_a_row[network] = 0
        else:
            self._skip_step(network)
        optimizer.zero_grad(set_to_none=True)
        return finite

    def on_before_optimizer_step(self, optimizer) -> None:
        # Lightning calls this inside `optimizer.step()`, after un-scaling fp16 gradients, so the threshold
        # means the same in every precision.
        if self.hparams.grad_clip is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm")

    def _skip_step(self, network: int) -> None:
        """Count and report a skipped update; stop the run after `max_bad_steps` of them in a row."""
        self.bad_steps[network] += 1
        self.bad_steps_in_a_row[network] += 1
        batch, in_a_row, name = int(self.batches_seen), int(self.bad_steps_in_a_row[network]), NETWORKS[network]
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            # fp16: back the loss scale off, as the scaler does when it skips a step itself.
            scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
        if in_a_row >= self.hparams.max_bad_steps:
            raise TrainingDiverged(
                f"batch {batch}: the {name}'s loss or gradients were not finite {in_a_row} times in a row "
                f"(max_bad_steps={self.hparams.max_bad_steps}); each of those updates was skipped, so the "
                "weights are finite and the last checkpoint is intact. Resume from it with a lower learning "
                "rate, or in bf16-mixed or 32-bit precision if this ran in fp16"
            )
        rank_zero_warn(
            f"batch {batch}: the {name}'s loss or gradients are not finite; its update is skipped "
            f"({in_a_row} in a row, {int(self.bad_steps[network])} in this run)"
        )

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema is None:
            return
        updates = int(self.batches_seen) // self.hparams.accumulate_grad_batches
        decay = min(self.hparams.ema_decay, (1 + updates) / (10 + updates))
        torch._foreach_lerp_(list(self.ema.parameters()), list(self.vae.parameters()), 1 - decay)

    def _log_training(self, losses: dict[str, torch.Tensor], batch_size: int) -> None:
        now = time.perf_counter()
        if self._last_batch_time is not None:
            self.log("images_per_sec", batch_size / (now - self._last_batch_time), prog_bar=True)
        self._last_batch_time = now
        logged = {f"train/{name}": value.detach().float() for name, value in losses.items()}
        logged["train/logvar"] = self.logvar.detach()
        logged["train/batches"] = self.batches_seen.float()
        logged["train/bad_steps"] = self.bad_steps.sum().float()
        self.log_dict(logged, batch_size=batch_size)
        self.log("loss", losses["loss"].detach(), prog_bar=True, logger=False, batch_size=batch_size)

    # ---------------------------------------------------------------- validation
    @property
    def inference_vae(self) -> AutoencoderKL:
        """The weights that validation and export use: the EMA unless told otherwise."""
        return self.ema if (self.ema is not None and self.hparams.validate_with_ema) else self.vae

    def on_validation_epoch_start(self) -> None:
        self._latent_statistics = LatentStatistics()
        self._patch_statistics = LatentStatistics()
        self._preview_fit = LatentPreviewFit()
        # What the preview reads: the latents normalised as the validated weights declare, once per pass.
        self._normalization = LatentNormalization.of(self.inference_vae)
        self._grid_batch = None

    def validation_step(self, batch, batch_idx: int) -> None:
        images = self._images(batch)
        if self.teacher is not None:
            self._validate_student(images)
            return
        vae = self.inference_vae
        posterior = vae.encode(images)
        # The mean is what the frozen codec encodes by default, so the factors are measured on it.
        latents = posterior.mode()
        reconstructions = vae.decode(latents).float().clamp(-1, 1)
        reference, output = to_uint8(images), to_uint8(reconstructions)
        batch_size = images.shape[0]
        self.log_dict(
            {
                "val/psnr": psnr(reference, output).mean(),
                "val/ssim": ssim(reference, output).mean(),
                f"val/lpips_{self.hparams.perceptual_net}": self.perceptual(images, reconstructions).mean(),
            },
            batch_size=batch_size, sync_dist=True,
        )
        self._latent_statistics.update(latents.float())
        if latents.shape[-2] % 2 == 0 and latents.shape[-1] % 2 == 0:
            self._patch_statistics.update(measured_layout(latents.float(), "patch", self.vae.config.patch_size))
            # What a UI's zero-cost preview of these latents would show, fitted on this validation pass.
            normalized = self._normalization.normalize(latents.float())
            self._preview_fit.update(normalized, images.float())
        if self._grid_batch is None:
            count = self.hparams.grid_images
            self._grid_batch = (images[:count].float(), reconstructions[:count])
            if latents.shape[-2] % 2 == 0 and latents.shape[-1] % 2 == 0:
                self._grid_batch += (normalized[:count],)

    def _validate_student(self, images: torch.Tensor) -> None:
        """Student against teacher on the same latents: each decoder's PSNR to the image and to each other, the
        LPIPS between the two decodes; the encoder's latent error, and the PSNR of the teacher's decode of them."""
        student, hp = self.inference_vae, self.hparams
        targets = self.teacher.latents(images)
        teacher_images = self.teacher.decode(targets)
        reference, teacher_pixels, logged = to_uint8(images), to_uint8(teacher_images), {}
        teacher_psnr = psnr(reference, teacher_pixels).mean()  # the teacher's round trip, the mark for both parts
        if hp.distill != "encoder":
            decoded = student.decode(targets).float().clamp(-1, 1)
            logged |= {
                "val/psnr": psnr(reference, to_uint8(decoded)).mean(),
                "val/teacher_psnr": teacher_psnr,
                "val/psnr_to_teacher": psnr(teacher_pixels, to_uint8(decoded)).mean(),
                f"val/lpips_{hp.perceptual_net}_to_teacher": self.perceptual(teacher_images, decoded).mean(),
            }
            shown = decoded
        if hp.distill != "decoder":
            latents = student.encode(images).float()
            through_teacher = self.teacher.decode(latents)
            logged |= {
                "val/latent_mse": torch.nn.functional.mse_loss(latents, targets),
                "val/encoder_psnr": psnr(reference, to_uint8(through_teacher)).mean(),
                "val/teacher_round_trip_psnr": teacher_psnr,
            }
            shown = through_teacher if hp.distill == "encoder" else shown
        self.log_dict(logged, batch_size=images.shape[0], sync_dist=True)
        if self._grid_batch is None:
            count = hp.grid_images
            self._grid_batch = (teacher_images[:count], shown[:count])

    def on_validation_epoch_end(self) -> None:
        statistics = self._gather(self._latent_statistics)
        patches = self._gather(self._patch_statistics)
        fits = {}
        if statistics.mean is not None and torch.isfinite(statistics.m2).all():
            mean, std = statistics.overall()
            suggested = LatentNormalization.fit(statistics, "scalar", "shift")
            fits = {"scalar": suggested, "scalar (shift 0)": LatentNormalization.fit(statistics, "scalar", "scale"),
                    "channel": LatentNormalization.fit(statistics, "channel")}
            logged = {
                "val/latent_mean": mean, "val/latent_std": std,
                "val/suggested_scaling_factor": suggested.scaling_factor,
                "val/suggested_shift_factor": suggested.shift_factor,
                "val/suggested_scaling_factor_no_shift": fits["scalar (shift 0)"].scaling_factor,
                # How unequal the channels are: what a per-channel normalisation would correct.
                "val/latent_channel_std_min": statistics.channel_std.min().item(),
                "val/latent_channel_std_max": statistics.channel_std.max().item(),
            }
            if patches.mean is not None and torch.isfinite(patches.m2).all():
                fits["patch"] = LatentNormalization.fit(patches, "patch", patch_size=self.vae.config.patch_size,
                                                        eps=self.vae.config.batch_norm_eps)
                logged |= {"val/patch_std_min": patches.channel_std.min().item(),
                           "val/patch_std_max": patches.channel_std.max().item()}
            # The same values on every rank already (merged above); averaging keeps them.
            self.log_dict(logged, sync_dist=True)
        # Every rank asks for the directory: `Trainer.log_dir` is a collective (a broadcast from rank 0).
        directory = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            if fits:
                # Every kind of normalisation, measured on this validation pass (`vaegan export` measures again).
                write_json(directory / "latent_normalization.json",
                           {"batch": int(self.batches_seen)} | {kind: fit.to_json() for kind, fit in fits.items()})
            if self._grid_batch is not None:
                self._write_grid(directory / "grids", *self._grid_batch)

    def _gather(self, local: LatentStatistics) -> LatentStatistics:
        """Merge per-rank statistics exactly, so that every rank logs those of the whole validation set."""
        if self.trainer.world_size == 1 or local.mean is None:
            return local
        packed = torch.stack([torch.full_like(local.mean, local.count), local.mean, local.m2])  # (3, C)
        merged = LatentStatistics()
        for count, mean, m2 in self.all_gather(packed).to(torch.float64):
            merged.merge(LatentStatistics(int(count[0].item()), mean, m2))
        return merged

    def _write_grid(self, directory: Path, images: torch.Tensor, reconstructions: torch.Tensor,
                    latents: torch.Tensor | None = None) -> None:
        """input | reconstruction | error, and the latents' linear preview (`vaegan.autoencoder.preview`) when
        the validation pass gave enough latent positions to fit one."""
        previews = None
        if latents is not None and self._preview_fit.count >= self._preview_fit.positions_needed:
            previews = self._preview_fit.solve().apply(latents)
        grid = reconstruction_grid(images, reconstructions, previews=previews)
        path = save_grid(grid, directory / f"batch_{int(self.batches_seen):07d}.png")
        if self.teacher is not None:
            caption = "teacher decode | student decode | difference x4"
        else:
            caption = "input | reconstruction | error x4" + (" | latent preview" if previews is not None else "")
        for logger in self.loggers:
            if hasattr(logger, "log_image"):  # Weights & Biases
                logger.log_image("val/reconstructions", [grid], step=int(self.batches_seen), caption=[caption])
        self.print(f"reconstruction grid ({caption}): {path}")

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # What `vaegan.load` and `vaegan export` need to rebuild the autoencoder without this class.
        checkpoint["vaegan_config"] = self.vae.config.to_dict()
        if self.teacher is not None:
            # The teacher is read from its path again on resume, as LPIPS is; its hash says it is the same one.
            checkpoint[TEACHER_HASH_KEY] = self.teacher.sha256
            for key in [key for key in checkpoint["state_dict"] if key.startswith(TEACHER_PREFIX)]:
                del checkpoint["state_dict"][key]
        # The frozen LPIPS network is rebuilt from its weights file at construction (a resume needs that file
        # anyway), so it is not stored again in every checkpoint (58 MB with VGG).
        for key in [key for key in checkpoint["state_dict"] if key.startswith(PERCEPTUAL_PREFIX)]:
            del checkpoint["state_dict"][key]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Runs before the strict state-dict load: put back the LPIPS weights this module was built with.
        state = checkpoint["state_dict"]
        for key, value in self.perceptual.state_dict().items():
            state.setdefault(PERCEPTUAL_PREFIX + key, value)
        if self.teacher is not None:
            stored = checkpoint.get(TEACHER_HASH_KEY)
            if stored != self.teacher.sha256:
                raise ValueError(f"--model.teacher={self.teacher.source} holds other weights than the teacher this "
                                 "checkpoint was distilled from; resume with that teacher")
            for key, value in self.teacher.state_dict().items():
                state.setdefault(TEACHER_PREFIX + key, value)
        # Checkpoints written before the seed and the bad-step counts existed: this run's seed, no bad steps.
        for name in ("seed", "bad_steps", "bad_steps_in_a_row"):
            state.setdefault(name, getattr(self, name))

    # ---------------------------------------------------------------- helpers
    def _images(self, batch) -> torch.Tensor:
        images = batch["image"] if isinstance(batch, dict) else batch
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images
