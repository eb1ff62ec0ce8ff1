"""A frozen latent codec: images in, normalised latents out, and back, for code that uses a trained VAE.

`Codec` wraps an `AutoencoderKL` for inference. It
- normalises latents the way diffusion models expect them (`vaegan.autoencoder.normalization`: `(z - shift_factor) *
  scaling_factor`), and inverts that before decoding;
- accepts the usual image containers and returns the one asked for (see `encode` and `decode`);
- runs in chunks of `batch_size`, under `torch.inference_mode()`, in fp32, bf16 or fp16;
- guards fp16 against overflow: a chunk whose output is not finite is redone in fp32 (warned once);
- tiles large images so that memory is bounded by the tile size: `tiling="exact"` (the default) runs the
  network tile by tile with GroupNorm statistics gathered over the whole image
  (`vaegan.autoencoder.exact_tiling`), so the result
  equals the untiled one up to float rounding; `tiling="blend"` is the faster approximation most tools use,
  independent overlapping tiles blended with smooth weights, whose seams fade out but whose every pixel differs
  from the untiled result (each tile normalises with its own statistics).

Input kinds and what `encode` accepts:
    float torch tensor (B, 3, H, W) or (3, H, W), values in [-1, 1]
    uint8 torch tensor (B, 3, H, W) or (3, H, W), values 0..255 (channels first, as torchvision)
    uint8 numpy array  (B, H, W, 3) or (H, W, 3), values 0..255 (channels last, as PIL and imageio)
    a PIL image or a list of PIL images of one size (converted to RGB)
Results are always batched and always float32; tensors come back on the device of the input tensor (CPU for
numpy and PIL inputs), so a large batch never has to fit on the accelerator at once.
"""

from __future__ import annotations

import copy
import warnings
from typing import Literal

import numpy as np
import torch
from PIL import Image

from vaegan.autoencoder.blend_tiling import TileGrid, blend_tiles
from vaegan.autoencoder.exact_tiling import decode_exact, encode_exact
from vaegan.autoencoder.halo_tiling import receptive_radius, run_with_halo
from vaegan.autoencoder.network import AutoencoderKL, DiagonalGaussian
from vaegan.autoencoder.normalization import LatentNormalization
from vaegan.autoencoder.tiny import TinyAutoencoder
from vaegan.images.convert import ImageInput, OutputKind, from_float_images, to_float_images
from vaegan.utils.dtypes import resolve_dtype

Tiling = Literal["exact", "blend"]

# 512-px tiles (64 latent pixels): the size the SD decoders' memory is usually quoted at, and the attention in
# the middle block still sees a 64x64 neighbourhood; 128 px of overlap (25 %) is where the seam error of a tiled
# decode stops improving much (benchmarks/codec.py --overlaps prints it).
DEFAULT_TILE_SIZE = 512
DEFAULT_TILE_OVERLAP = 128
# Above this many output pixels tiling starts by itself: an untiled SD decode's activations grow with the image
# (its widest layers hold 512 channels at 1/8 and 128 at full resolution), several GB in fp32 past 1024^2.
DEFAULT_AUTO_TILE_PIXELS = 1024 * 1024


def check_finite(latents: torch.Tensor, what: str = "latents", allow: str = "allow_nonfinite=True") -> None:
    """Refuse latents holding NaN or inf (a diffusion sampler that diverged): their decode is a black or garbage
    image, which would pass for a result. `what` names them and `allow` says how to decode them anyway."""
    bad = int((~torch.isfinite(latents)).sum())
    if bad:
        raise ValueError(f"{what}: {bad} of {latents.numel()} latent values are not finite (NaN or inf), so the "
                         f"images would be black or garbage; {allow} decodes them anyway")


class Codec:
    """A frozen VAE that encodes images to normalised latents and decodes them back (see the module doc).

    The codec takes the module over: it is moved and cast in place, put in eval mode and frozen. A tiny
    autoencoder (`vaegan.autoencoder.tiny`) works the same way, in its teacher's normalised space: so
    `Codec(big).encode` then `Codec(tiny).decode` is a preview of the big VAE's decode. Its exact tiling reads
    each tile with a halo as wide as the network's receptive field (`vaegan.autoencoder.halo_tiling`); TAEF2,
    whose pool branch normalises over the whole image, runs whole unless blended tiles are asked for.
    """

    def __init__(
        self,
        vae: AutoencoderKL | TinyAutoencoder,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = torch.float32,
        batch_size: int = 4,
        tile_size: int | None = None,
        tile_overlap: int = DEFAULT_TILE_OVERLAP,
        auto_tile_pixels: int | None = DEFAULT_AUTO_TILE_PIXELS,
        tiling: Tiling = "exact",
        stash_budget: int | None = None,
        stash_dtype: torch.dtype | str | None = None,
        compile: bool = False,
        channels_last: bool | None = None,
    ):
        """
        Args:
            vae: the autoencoder; moved to `device` and cast to `dtype` in place.
            device, dtype: where and in what precision the network runs (fp32 by default: highest precision);
                `dtype` is a torch dtype or a name such as "bf16" (see `vaegan.utils.dtypes`).
            batch_size: images (or tiles) per forward pass; bounds activation memory on the device.
            tile_size: tile side in pixels to always tile with; None tiles only images of more than
                `auto_tile_pixels` pixels, with `DEFAULT_TILE_SIZE` tiles.
            tile_overlap: blended tiles' overlap in pixels (at least this much; tiles are spread evenly, so the
                real overlap is often larger); exact tiles need none.
            auto_tile_pixels: pixel count (H * W) above which tiling starts by itself; None never auto-tiles.
            tiling: "exact" gives the untiled result (tile by tile, image-wide GroupNorm statistics, activations
                kept whole in host memory between GroupNorms); "blend" blends independent tiles, faster and
                approximate (see the module doc).
            stash_budget: bytes of whole activations exact tiling keeps between GroupNorms (in host memory);
                None keeps all it can use (about the untiled pass's time), less recomputes more.
            stash_dtype: the precision of those kept activations; None for `dtype`. "fp16" under fp32 halves
                them, so a budget recomputes less, and rounds them (no longer exact up to fp32 rounding; see
                `vaegan.autoencoder.exact_tiling.ExactTiling`); a VAE whose activations exceed fp16's range raises
                OverflowError.
            compile: `torch.compile` the untiled and blended encoder and decoder passes (one shape per tile
                size); exact tiling runs eagerly.
            channels_last: run convolutions on NHWC tensors; None: on a CPU only. With oneDNN on CPUs NHWC is
                faster; with cuDNN in bf16 the SD VAE measured slower in it than in NCHW (`benchmarks/codec.py`
                measures both; the GPU benchmark page has the figures).
        """
        config = vae.config
        self.factor = config.downsampling_factor
        for name, value in (("tile_size", tile_size), ("tile_overlap", tile_overlap)):
            if value is not None and value % self.factor:
                raise ValueError(
                    f"{name}={value} must be a multiple of the downsampling factor {self.factor}"
                )
        if tile_size is not None and tiling == "blend" and not 0 <= tile_overlap < tile_size:
            raise ValueError(f"tile_overlap={tile_overlap} must be in [0, tile_size={tile_size})")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        if tiling not in ("exact", "blend"):
            raise ValueError(f"tiling={tiling!r}; choose 'exact' or 'blend'")
        self.tiling, self.stash_budget = tiling, stash_budget
        self.stash_dtype = None if stash_dtype is None else resolve_dtype(stash_dtype)
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype)
        self.batch_size = batch_size
        self.tile_size = tile_size
        self.tile_overlap = tile_overlap
        self.auto_tile_pixels = auto_tile_pixels
        self.channels_last = self.device.type == "cpu" if channels_last is None else channels_last
        self.normalization = LatentNormalization.of(vae)
        # Normalised latents: FLUX.2's are 2x2 patches of the VAE's, with 4x the channels.
        self.latent_channels = self.normalization.channels(config.latent_channels)

        self.vae = vae.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        if self.channels_last:
            self.vae.to(memory_format=torch.channels_last)
        # The two tensor-to-tensor calls (not `vae.encode`, which returns a dataclass): compiling these is what
        # keeps torch.compile from breaking on encode.
        self._encoder = torch.compile(self.vae.moments, dynamic=False) if compile else self.vae.moments
        self._decoder = torch.compile(self.vae.decode, dynamic=False) if compile else self.vae.decode
        self._fp32_vae: AutoencoderKL | TinyAutoencoder | None = None  # made on the first fp16 overflow
        self._halo = None  # latent pixels of context per side of an exact tile: tiny autoencoders only
        if isinstance(vae, TinyAutoencoder):
            if vae.config.midblock_pool and tiling == "exact":
                if tile_size is not None:
                    raise ValueError("this tiny autoencoder's pool branch normalises over the whole image, so no "
                                     "tiling of it is exact: use tiling='blend', or no tile_size")
                self.auto_tile_pixels = None
            parts = {True: vae.encoder, False: vae.decoder}
            self._halo = {encode: receptive_radius(part, encode, self.factor)
                          for encode, part in parts.items() if part is not None}

    # ---- public API ----

    def encode(
        self, images: ImageInput, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Images (any kind in the module doc) -> normalised latents (B, C, H/f, W/f), float32.

        Returns the posterior mean by default, a posterior sample with `sample=True` (noise drawn from
        `generator`, on the device of the result).
        """
        posterior = self.posterior(images)
        return self.normalization.normalize(posterior.sample(generator) if sample else posterior.mode())

    def posterior(self, images: ImageInput) -> DiagonalGaussian:
        """Images -> the posterior q(z|x) over raw (not normalised) latents, mean and logvar (B, C, H/f, W/f).

        For callers that keep the whole posterior (dataset encoding stores mean and log-variance so that
        training can resample); float32, on the device of the input tensor (CPU for numpy and PIL inputs).
        """
        x = to_float_images(images)  # (B, 3, H, W) in [-1, 1], on the input's device
        height, width = x.shape[-2:]
        if height % self.factor or width % self.factor:
            raise ValueError(
                f"image shape {tuple(x.shape)}: height and width must be multiples of the downsampling "
                f"factor {self.factor}; crop or pad the images first"
            )
        moments = torch.empty(
            x.shape[0], 2 * self.vae.config.latent_channels, height // self.factor, width // self.factor,
            device=x.device,
        )
        with torch.inference_mode():
            self._fill(moments, x, encode=True)
        return DiagonalGaussian.from_moments(moments)

    def decode(
        self, latents: torch.Tensor, output: OutputKind = "tensor", allow_nonfinite: bool = False
    ) -> torch.Tensor | np.ndarray | list[Image.Image]:
        """Normalised latents (B, C, h, w) or (C, h, w) -> images (B, 3, h*f, w*f), in the kind asked for.

        output: "tensor" float32 (B, 3, H, W) clamped to [-1, 1]; "uint8" uint8 tensor (B, 3, H, W);
        "numpy" uint8 array (B, H, W, 3); "pil" a list of RGB PIL images.
        allow_nonfinite: decode latents holding NaN or inf (a diverged sampler's) instead of refusing them; their
        images are black or garbage.
        """
        if output not in ("tensor", "uint8", "numpy", "pil"):
            raise ValueError(f"output={output!r}; choose one of 'tensor', 'uint8', 'numpy', 'pil'")
        if not torch.is_tensor(latents) or not latents.is_floating_point():
            raise TypeError(f"latents must be a float tensor, got {type(latents).__name__}")
        if latents.ndim == 3:
            latents = latents.unsqueeze(0)
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"latents of shape {tuple(latents.shape)} do not fit this VAE: expected "
                f"(B, {self.latent_channels}, h, w)"
            )
        if not allow_nonfinite:
            check_finite(latents)
        z = self.normalization.denormalize(latents.float())
        batch, _, height, width = z.shape
        images = torch.empty(batch, 3, height * self.factor, width * self.factor, device=z.device)
        with torch.inference_mode():
            self._fill(images, z, encode=False)
        images.clamp_(-1.0, 1.0)
        return from_float_images(images, output)

    # ---- the network, chunk by chunk ----

    def _fill(self, out: torch.Tensor, x: torch.Tensor, encode: bool) -> None:
        """out = the encoder (moments) or decoder applied to x, chunk by chunk, tiled when asked or when the
        image is large."""
        latent_height, latent_width = out.shape[-2:] if encode else x.shape[-2:]
        tile_size = self.tile_size
        pixels = latent_height * latent_width * self.factor**2
        if tile_size is None and self.auto_tile_pixels is not None and pixels > self.auto_tile_pixels:
            tile_size = DEFAULT_TILE_SIZE
        tile = None if tile_size is None else tile_size // self.factor
        if tile is not None and latent_height <= tile and latent_width <= tile:
            tile = None
        if tile is None or self.tiling == "exact":
            for start in range(0, x.shape[0], self.batch_size):
                chunk = slice(start, start + self.batch_size)
                out[chunk] = self._forward(x[chunk], encode, exact_tile=tile).to(out.device)
            return
        overlap = self.tile_overlap // self.factor
        rows = TileGrid.cover(latent_height, tile, overlap)
        columns = TileGrid.cover(latent_width, tile, overlap)
        self._fill_tiled(out, x, encode, rows, columns)

    def _fill_tiled(self, out: torch.Tensor, x: torch.Tensor, encode: bool, rows: TileGrid, columns: TileGrid):
        """Blend the network's output on overlapping tiles into `out`: sum(w_t * y_t) / sum(w_t).

        Tiles are laid out in latent pixels, so that every tile of an image starts on the encoder's stride grid.
        """
        x_scale, out_scale = (self.factor, 1) if encode else (1, self.factor)
        tiles, weights = zip(*blend_tiles(rows, columns, out_scale), strict=True)
        weights = [weight.to(out.device) for weight in weights]
        out.zero_()
        # Every tile of every image is one job; all tiles have one size, so any jobs stack into a batch.
        jobs = [(image, t) for image in range(x.shape[0]) for t in range(len(tiles))]
        for start in range(0, len(jobs), self.batch_size):
            batch = jobs[start:start + self.batch_size]
            crops = torch.stack([x[image][tiles[t].region(x_scale)] for image, t in batch])  # (n, c, th, tw)
            results = self._forward(crops, encode).to(out.device)                      # (n, c', th', tw')
            for result, (image, t) in zip(results, batch, strict=True):
                out[image][tiles[t].region(out_scale)] += result * weights[t]

    def _forward(self, x: torch.Tensor, encode: bool, exact_tile: int | None = None) -> torch.Tensor:
        """One chunk through the encoder (moments) or decoder in the codec's dtype, returned as float32; in exact
        tiles of `exact_tile` latent pixels when given.

        If fp16 overflowed to inf/NaN, the chunk is redone with fp32 weights: fp16 tops out at 65504 and the
        SD/SDXL decoders' activations exceed it on some images (the origin of the "fp16-fix" VAE). Only the
        chunks that overflow pay for fp32, so typical images keep fp16 speed.
        """
        out = self._run(self.vae, self._prepare(x, self.dtype), encode, exact_tile)
        if self.dtype != torch.float16 or torch.isfinite(out).all():
            return out.float()
        if self._fp32_vae is None:
            # An fp32 copy of the (fp16-rounded) weights: the range of fp32, the weights the user chose.
            self._fp32_vae = copy.deepcopy(self.vae).float()
            warnings.warn(
                "fp16 overflowed to inf/NaN in the VAE; redoing affected chunks in fp32 (warned once)",
                RuntimeWarning, stacklevel=4,
            )
        return self._run(self._fp32_vae, self._prepare(x, torch.float32), encode, exact_tile)

    def _run(self, vae: AutoencoderKL | TinyAutoencoder, x: torch.Tensor, encode: bool,
             exact_tile: int | None) -> torch.Tensor:
        """`vae`'s encoder (moments) or decoder on x: in exact tiles when `exact_tile` is given, else whole, through
        the (possibly compiled) calls made at construction for the codec's own network."""
        if exact_tile is not None and self._halo is not None:
            network = vae.moments if encode else vae.decode
            return run_with_halo(network, x, exact_tile, self._halo.get(encode, 0), self.factor, encode)
        if exact_tile is not None:
            # The fp32 redo of an fp16 overflow keeps its activations in fp32 too: fp16 is what overflowed.
            stash_dtype = self.stash_dtype if vae is self.vae else None
            return (encode_exact if encode else decode_exact)(vae, x, exact_tile, self.stash_budget,
                                                              stash_dtype=stash_dtype)
        if vae is self.vae:
            return (self._encoder if encode else self._decoder)(x)
        return (vae.moments if encode else vae.decode)(x)

    def _prepare(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        x = x.to(device=self.device, dtype=dtype, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
