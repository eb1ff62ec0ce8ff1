"""Encode an image dataset into latent Parquet shards with a frozen VAE; the same as `vaegan encode`.

    python scripts/encode_dataset.py --model out/sd-vae --input /data/images --output /data/latents --crop 256
    python scripts/encode_dataset.py --model sdxl_vae.safetensors --input webdataset:/data/shards \\
        --image-column jpg --id-column __key__ --output /data/latents --buckets 1024 --device cuda --dtype bf16
    torchrun --nproc-per-node 8 scripts/encode_dataset.py ... --device cuda     # one rank per GPU

Rerun the same command to resume; see vaegan/latents/encode.py for how the work is shared and committed.
"""

import sys

from vaegan.cli import main

if __name__ == "__main__":
    main(["encode", *sys.argv[1:]])
