"""How well VAEs' latents align with a frozen vision model: the cosine of VA-VAE's loss, measured on held-out images.

For every model the latents of 64² tiles (the demo's training crops) are compared with the vision features of the
same tiles, position by position on the feature grid, through two projections:

- **probe**: the least-squares 1×1 projection fitted on other images (`--fit-data`), the same for every model, so
  a VAE trained without alignment is measured the same way as one trained with it;
- **head**: the projection the alignment run trained (`align_projection` in its checkpoint), where there is one.

AlexNet's and SqueezeNet's features are ReLU outputs, all positive, so the mean feature alone (no latent at all)
already has a cosine of about 0.4 with every feature. The first row prints that floor, and the "centred" columns
measure the cosine of the deviations from the mean feature (of the fit images), which only what the latent
explains can raise.

    python scripts/measure_alignment.py --models plain=runs/demo-plain/checkpoints/last.ckpt \
        align=runs/demo-align/checkpoints/last.ckpt --backbone alexnet \
        --fit-data ../shared/assets/bsds500/train --data ../shared/assets/kodak

The latents are the weights `vaegan.load` reads from a checkpoint (the EMA, what export writes); the backbone's
weights come from `$VAEGAN_WEIGHTS_DIR` as in training.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import vaegan
from vaegan.images.readers import EvalCrop, open_reader
from vaegan.metrics.diagnostics import alignment_cosine, linear_probe
from vaegan.pretrained.vision import VisionFeatures


def tiles(data: str, resolution: int, tile: int, max_images: int) -> torch.Tensor:
    """Every image shorter-side resized to `resolution` and centre-cropped, cut into tile² pieces: (N, 3, t, t)."""
    reader, _ = open_reader(data, "train", "image", min_size=0)
    crop = EvalCrop(resolution)
    pieces = []
    for index in range(min(len(reader), max_images)):
        image = crop(reader.read(index))  # (3, R, R) in [-1, 1]
        pieces.append(image.unfold(1, tile, tile).unfold(2, tile, tile).permute(1, 2, 0, 3, 4).flatten(0, 1))
    return torch.cat(pieces)


@torch.inference_mode()
def latents_of(vae: vaegan.AutoencoderKL, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Posterior means (raw latents, as the alignment head sees them in training) of (N, 3, t, t) images."""
    return torch.cat([vae.encode(chunk).mode() for chunk in images.split(batch_size)])


@torch.inference_mode()
def features_of(vision: VisionFeatures, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    return torch.cat([vision(chunk) for chunk in images.split(batch_size)])


def head_of(checkpoint: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The trained alignment projection of a training checkpoint, or None."""
    if checkpoint.suffix != ".ckpt":
        return None
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    if "align_projection.weight" not in state:
        return None
    return state["align_projection.weight"], state["align_projection.bias"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", required=True, help="LABEL=PATH of VAEs or training checkpoints")
    parser.add_argument("--backbone", default="alexnet", 
                        help="the vision model (vaegan.pretrained.vision.VisionBackbone)")
    parser.add_argument("--image-size", type=int, default=224, help="side the tiles are resized to for it")
    parser.add_argument("--data", required=True, help="held-out images the cosine is measured on")
    parser.add_argument("--fit-data", required=True, help="images the linear probe is fitted on")
    parser.add_argument("--resolution", type=int, default=256, help="centre-crop size before tiling")
    parser.add_argument("--tile", type=int, default=64, help="tile side in pixels (the training crop size)")
    parser.add_argument("--max-images", type=int, default=48, help="images of each set")
    args = parser.parse_args()

    torch.manual_seed(0)
    vision = VisionFeatures(args.backbone, image_size=args.image_size)
    fit_images = tiles(args.fit_data, args.resolution, args.tile, args.max_images)
    test_images = tiles(args.data, args.resolution, args.tile, args.max_images)
    fit_features, test_features = features_of(vision, fit_images), features_of(vision, test_images)
    print(f"{args.backbone} features {tuple(test_features.shape[1:])} of {len(test_images)} held-out "
          f"{args.tile}² tiles ({args.data}); probe fitted on {len(fit_images)} tiles ({args.fit_data})")
    mean = fit_features.double().mean(dim=(0, 2, 3))  # (D,)
    centred = test_features - mean.view(1, -1, 1, 1)

    def cosines(latents: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> tuple[float, float]:
        """(cosine, centred cosine) of W·z + b with the held-out features; W (D, C) or a 1×1 conv's."""
        return (alignment_cosine(latents, test_features, weight, bias).mean().item(),
                alignment_cosine(latents, centred, weight, bias.double() - mean).mean().item())

    header = ("probe cosine", "centred", "head cosine", "centred")
    print(f"{'model':<16}" + "".join(f"{name:>14}" for name in header))
    no_latent = torch.zeros(len(test_images), 1, *test_features.shape[-2:])
    floor = cosines(no_latent, torch.zeros(len(mean), 1), mean)
    print(f"{'(mean feature)':<16}{floor[0]:>14.3f}{floor[1]:>14.3f}{'':>14}{'':>14}")
    for spec in args.models:
        label, _, path = spec.partition("=")
        vae = vaegan.load(path).eval()
        test_latents = latents_of(vae, test_images)
        probe = cosines(test_latents, *linear_probe(latents_of(vae, fit_images), fit_features))
        head = head_of(Path(path))
        trained = ("n/a", "n/a") if head is None else [f"{value:.3f}" for value in cosines(test_latents, *head)]
        print(f"{label:<16}{probe[0]:>14.3f}{probe[1]:>14.3f}{trained[0]:>14}{trained[1]:>14}")


if __name__ == "__main__":
    main()
