"""vaegan: train adversarially trained KL autoencoders and ship them as frozen latent codecs."""

from vaegan.autoencoder import PRESETS, AutoencoderConfig, AutoencoderKL, DiagonalGaussian, preset

__all__ = ["PRESETS", "AutoencoderConfig", "AutoencoderKL", "DiagonalGaussian", "preset"]
