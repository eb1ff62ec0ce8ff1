"""Decode latents back to images; the same as `vaegan decode`.

    python scripts/decode_latents.py --input /data/latents --output /tmp/look --limit 32      # encoded shards
    python scripts/decode_latents.py --input samples.pt --model out/sd-vae --output samples   # a sampler's latents
"""

import sys

from vaegan.cli import main

if __name__ == "__main__":
    main(["decode", *sys.argv[1:]])
