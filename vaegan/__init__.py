"""vaegan: train adversarially trained KL autoencoders and ship them as frozen latent codecs."""

from vaegan.autoencoder import PRESETS, AutoencoderConfig, AutoencoderKL, DiagonalGaussian, preset
from vaegan.codec import Codec
from vaegan.formats import FormatError, load, save
from vaegan.latents import LatentDataset

__all__ = [
    "PRESETS", "AutoencoderConfig", "AutoencoderKL", "Codec", "DiagonalGaussian", "FormatError",
    "LatentDataset", "load", "preset", "save",
]
