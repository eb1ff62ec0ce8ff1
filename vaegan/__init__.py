"""vaegan: train adversarially trained KL autoencoders and ship them as frozen latent codecs."""

__version__ = "0.1.0"

from vaegan.autoencoder.codec import Codec
from vaegan.autoencoder.network import PRESETS, AutoencoderConfig, AutoencoderKL, DiagonalGaussian, preset
from vaegan.autoencoder.tiny import TINY_PRESETS, TinyAutoencoder, TinyConfig
from vaegan.formats.load import FormatError, load
from vaegan.formats.save import save
from vaegan.latents.dataset import LatentDataset

__all__ = [
    "PRESETS", "TINY_PRESETS", "AutoencoderConfig", "AutoencoderKL", "Codec", "DiagonalGaussian", "FormatError",
    "LatentDataset", "TinyAutoencoder", "TinyConfig", "__version__", "load", "preset", "save",
]
