"""vaegan: train adversarially trained KL autoencoders and ship them as frozen latent codecs."""

from vaegan.autoencoder import PRESETS, AutoencoderConfig, AutoencoderKL, DiagonalGaussian, preset
from vaegan.codec import Codec
from vaegan.formats import FormatError, load, save

__all__ = [
    "PRESETS", "AutoencoderConfig", "AutoencoderKL", "Codec", "DiagonalGaussian", "FormatError",
    "load", "preset", "save",
]
