"""Drop-in use: a vaegan-saved VAE runs inside unmodified diffusers pipelines (tiny random components, CPU).

Each test spies on the pipeline's `vae.decode` to get the latents it decoded, then checks that the returned
image is exactly what vaegan's own model makes of them, and that image size = latent size x 8 — a VAE with
the wrong downsampling factor or latent count would otherwise run silently.
"""

import numpy as np
import pytest
import torch
from einops import rearrange

import vaegan
from vaegan import AutoencoderKL, preset, save

diffusers = pytest.importorskip("diffusers")

# f8 like every public VAE (four levels), but narrow: the pipelines only see config and shapes.
TINY_F8 = {"block_out_channels": (32, 32, 64, 64), "norm_num_groups": 8, "layers_per_block": 1}
IMAGE_SIZE = 32  # pixels; 4x4 latents


def saved_and_reloaded(vae: AutoencoderKL, folder) -> torch.nn.Module:
    """Save with vaegan, load with diffusers: the path a user of our artifact takes."""
    save(vae, folder)
    return diffusers.AutoencoderKL.from_pretrained(folder).eval()


def spy_on_decode(vae: torch.nn.Module) -> list[torch.Tensor]:
    """Record every latent batch the pipeline hands to `vae.decode`."""
    seen: list[torch.Tensor] = []
    decode = vae.decode

    def recording_decode(z, *args, **kwargs):
        seen.append(z.detach().clone())
        return decode(z, *args, **kwargs)

    vae.decode = recording_decode
    return seen


@torch.no_grad()
def assert_decoded_by(ours: AutoencoderKL, latents: list[torch.Tensor], images: np.ndarray) -> None:
    """The pipeline's images are our decoder's output for the latents it decoded, mapped to [0, 1]."""
    assert len(latents) == 1
    z = latents[0]
    assert z.shape[1] == ours.config.latent_channels
    assert images.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert z.shape[-1] * ours.config.downsampling_factor == IMAGE_SIZE
    expected = (ours.decode(z) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert np.isfinite(images).all()
    np.testing.assert_allclose(images, expected, atol=1e-4)


def test_dit_pipeline(tmp_path):
    ours = AutoencoderKL(preset("sd", **TINY_F8)).eval()
    transformer = diffusers.DiTTransformer2DModel(  # 1000 classes: the pipeline's "no class" label is 1000
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
        sample_size=IMAGE_SIZE // 8, patch_size=2, num_embeds_ada_norm=1000,
    )
    pipe = diffusers.DiTPipeline(
        transformer=transformer, vae=saved_and_reloaded(ours, tmp_path), scheduler=diffusers.DDIMScheduler()
    )
    latents = spy_on_decode(pipe.vae)

    images = pipe(
        class_labels=[1], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images

    assert_decoded_by(ours, latents, images)


def test_stable_diffusion_pipeline(tmp_path):
    ours = AutoencoderKL(preset("sd", **TINY_F8)).eval()
    unet = diffusers.UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16, attention_head_dim=8,
        norm_num_groups=8,
    )
    pipe = diffusers.StableDiffusionPipeline(
        vae=saved_and_reloaded(ours, tmp_path), unet=unet,
        # SD's own scheduler settings: diffusers warns about any others.
        scheduler=diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        tokenizer=None, text_encoder=None, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    latents = spy_on_decode(pipe.vae)

    images = pipe(
        prompt_embeds=torch.randn(1, 7, 16), negative_prompt_embeds=torch.randn(1, 7, 16),
        height=IMAGE_SIZE, width=IMAGE_SIZE, num_inference_steps=2, output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images

    assert pipe.vae_scale_factor == 8
    assert_decoded_by(ours, latents, images)


def test_flux_pipeline(tmp_path):
    # 16 channels, no quant convs, a nonzero shift: what Flux pipelines need from their VAE.
    ours = AutoencoderKL(preset("flux", **TINY_F8)).eval()
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4 * 16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
    )
    pipe = diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=saved_and_reloaded(ours, tmp_path),
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer,
    )
    latents = spy_on_decode(pipe.vae)

    images = pipe(
        prompt_embeds=torch.randn(1, 8, 32), pooled_prompt_embeds=torch.randn(1, 32),
        height=IMAGE_SIZE, width=IMAGE_SIZE, num_inference_steps=2, output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images

    assert pipe.vae.config.shift_factor == ours.config.shift_factor
    assert_decoded_by(ours, latents, images)


def tiny_flux2_transformer() -> torch.nn.Module:
    """FLUX.2's transformer at toy size, taking 2x2 patches of 32-channel latents (128 channels)."""
    return diffusers.Flux2Transformer2DModel(
        patch_size=1, in_channels=4 * 32, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
    )


def test_flux2_pipeline_denormalises_with_our_statistics(tmp_path):
    # 32 latent channels, quant convs, and `bn` statistics that FLUX.2's pipeline reads from the VAE.
    ours = AutoencoderKL(preset("flux2", **TINY_F8)).eval()
    generator = torch.Generator().manual_seed(0)
    ours.bn.running_mean.copy_(torch.randn(ours.bn.running_mean.shape, generator=generator))
    ours.bn.running_var.copy_(torch.rand(ours.bn.running_var.shape, generator=generator) + 0.5)
    vaegan.save(ours, tmp_path)
    pipe = diffusers.Flux2Pipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), text_encoder=None, tokenizer=None,
        vae=diffusers.AutoencoderKLFlux2.from_pretrained(tmp_path), transformer=tiny_flux2_transformer(),
    )
    latents = spy_on_decode(pipe.vae)
    final: list[torch.Tensor] = []  # the pipeline's normalised latents: (B, tokens, 4C), row-major 2x2 patches

    def keep_latents(pipe, step, timestep, tensors):
        final.append(tensors["latents"])
        return {}

    images = pipe(
        prompt_embeds=torch.randn(1, 8, 32), height=IMAGE_SIZE, width=IMAGE_SIZE, num_inference_steps=2,
        output_type="np", generator=torch.Generator().manual_seed(0), callback_on_step_end=keep_latents,
    ).images

    # What the pipeline decoded is the 2x2 patches denormalised with our bn statistics and eps, unpatchified.
    std = torch.sqrt(ours.bn.running_var + ours.config.batch_norm_eps)
    patches = rearrange(final[-1], "b (h w) c -> b c h w", h=IMAGE_SIZE // 16) * std[:, None, None]
    expected = rearrange(patches + ours.bn.running_mean[:, None, None], "b (c p q) h w -> b c (h p) (w q)", p=2, q=2)
    torch.testing.assert_close(latents[0], expected, rtol=0, atol=1e-6)
    assert_decoded_by(ours, latents, images)


def final_latents(pipe_kwargs: dict) -> tuple[dict, list[torch.Tensor]]:
    """Pipeline call options that keep the denoised latents of every step, and the list they go into."""
    kept: list[torch.Tensor] = []

    def keep(pipe, step, timestep, tensors):
        kept.append(tensors["latents"])
        return {}

    return pipe_kwargs | {"callback_on_step_end": keep}, kept


def test_sdxl_pipeline_denormalises_per_channel_as_we_do(tmp_path):
    # latents_mean/latents_std in the config: diffusers' SDXL pipelines decode latents * std / scale + mean.
    generator = torch.Generator().manual_seed(0)
    ours = AutoencoderKL(preset(
        "sdxl", **TINY_F8, latents_mean=torch.randn(4, generator=generator).tolist(),
        latents_std=(torch.rand(4, generator=generator) + 0.5).tolist(),
    )).eval()
    unet = diffusers.UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8,
    )
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=saved_and_reloaded(ours, tmp_path), unet=unet, scheduler=diffusers.EulerDiscreteScheduler(),
        text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
    )
    assert pipe.vae.config.latents_mean == list(ours.config.latents_mean)  # carried through save and load
    latents = spy_on_decode(pipe.vae)
    options, kept = final_latents(dict(
        prompt_embeds=torch.randn(1, 7, 16), pooled_prompt_embeds=torch.randn(1, 16),
        negative_prompt_embeds=torch.randn(1, 7, 16), negative_pooled_prompt_embeds=torch.randn(1, 16),
        height=IMAGE_SIZE, width=IMAGE_SIZE, num_inference_steps=2, output_type="np",
        generator=torch.Generator().manual_seed(0),
    ))
    images = pipe(**options).images

    normalization = vaegan.autoencoder.normalization.LatentNormalization.of(ours)
    assert normalization.kind == "channel"
    torch.testing.assert_close(latents[0], normalization.denormalize(kept[-1]), rtol=1e-5, atol=1e-5)
    assert_decoded_by(ours, latents, images)


@pytest.mark.parametrize("widths", [TINY_F8, {}], ids=["tiny", "released-shapes"])
def test_codec_latents_equal_flux2_pipelines_normalised_latents(widths, tmp_path):
    # What Flux2Pipeline computes from an image (posterior mode, 2x2 patches, bn statistics) is Codec.encode.
    ours = AutoencoderKL(preset("flux2", **widths)).eval()
    generator = torch.Generator().manual_seed(0)
    ours.bn.running_mean.copy_(torch.randn(ours.bn.running_mean.shape, generator=generator))
    ours.bn.running_var.copy_(torch.rand(ours.bn.running_var.shape, generator=generator) + 0.5)
    save(ours, tmp_path)
    theirs = diffusers.AutoencoderKLFlux2.from_pretrained(tmp_path).eval()
    image = torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) * 2 - 1
    pipe = diffusers.Flux2Pipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), text_encoder=None, tokenizer=None, vae=theirs,
        transformer=tiny_flux2_transformer(),
    )
    with torch.no_grad():
        expected = pipe._encode_vae_image(image, generator=None)  # what it conditions image edits on
    latents = vaegan.Codec(ours, channels_last=False).encode(image)
    assert latents.shape == expected.shape == (1, 128, IMAGE_SIZE // 16, IMAGE_SIZE // 16)
    torch.testing.assert_close(latents, expected, rtol=0, atol=5e-5)
