"""Decode latents back to images; the same as `vaegan decode`.

    python scripts/decode_latents.py --input /data/latents --output /tmp/look --limit 32      # encoded shards
    python scripts/decode_latents.py --input samples.pt --model out/sd-vae --output samples   # a sampler's latents
"""

import argparse

from vaegan.cli import DECODE_DESCRIPTION, add_decode_arguments


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=DECODE_DESCRIPTION)
    add_decode_arguments(parser)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
