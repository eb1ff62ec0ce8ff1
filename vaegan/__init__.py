"""vaegan: train adversarially trained KL autoencoders and ship them as frozen latent codecs."""

__version__ = "0.1.0"

from vaegan.autoencoder.codec import Codec
from vaegan.autoencoder.network import PRESETS, AutoencoderConfig, AutoencoderKL, DiagonalGaussian, preset
from vaegan.formats.load import FormatError, load
from vaegan.formats.save import save
from vaegan.latents.dataset import LatentDataset

__all__ = [
    "PRESETS", "AutoencoderConfig", "AutoencoderKL", "Codec", "DiagonalGaussian", "FormatError",
    "LatentDataset", "__version__", "load", "preset", "save",
]
